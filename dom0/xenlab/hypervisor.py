"""The Xen hypervisor binary, from Debian's package, as qemu's multiboot ``-kernel``.

Why not install it: the host is no Xen host and never boots this file; the
package is only downloaded and unpacked (``apt-get download`` + ``dpkg-deb
-x``), and ``boot/xen-4.17-amd64.gz`` gunzipped gives a multiboot ELF that
qemu loads directly, no grub (xen-notes.md).  Cached under the package
version, so an updated package gives a new entry and the old one stays valid.
"""
from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

from dom0.atomic import write_atomically
from dom0.errors import EnvironmentProblem
from dom0.tools import run_tool, unpack_package

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
XEN_GZ = "boot/xen-4.17-amd64.gz"


def candidate_version(package: str) -> str:
    """The version apt would install now: the cache key of what we build from it."""
    out = run_tool(["apt-cache", "show", "--no-all-versions", package], f"look up {package}")
    for line in out.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise EnvironmentProblem(f"apt knows no package {package}: run 'apt-get update'")


def fetch_hypervisor(cache: Path) -> Path:
    """The multiboot ELF of Xen 4.17, downloaded once per package version."""
    version = candidate_version(XEN_PACKAGE)
    final = cache / f"xen-{version.replace(':', '_')}" / "xen.elf"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xen-", dir=cache) as tmp:
        deb, tree = unpack_package(f"{XEN_PACKAGE}={version}", Path(tmp))
        packed = tree / XEN_GZ
        if not packed.is_file():
            raise EnvironmentProblem(f"{deb}: expected {XEN_GZ} in the package, found none")
        write_atomically(final, [gzip.decompress(packed.read_bytes())])
    return final
