"""The Xen hypervisor binary, from Debian's package, as qemu's multiboot ``-kernel``.

Why not install it: the host is no Xen host and never boots this file; the
package is only downloaded and unpacked (``apt-get download`` + ``dpkg-deb
-x``), and ``boot/xen-4.17-amd64.gz`` gunzipped gives a multiboot ELF that
qemu loads directly, no grub (xen-notes.md).  Cached under the package
version, so an updated package gives a new entry and the old one stays valid.
"""
from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

from dom0.atomic import write_atomically
from dom0.errors import EnvironmentProblem

XEN_PACKAGE = "xen-hypervisor-4.17-amd64"
XEN_GZ = "boot/xen-4.17-amd64.gz"


def run_tool(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run an external tool; a missing tool or a failure becomes one line naming it."""
    if shutil.which(cmd[0]) is None:
        raise EnvironmentProblem(f"'{cmd[0]}' not found: it is needed to {what}")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{what}: {cmd[0]} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise EnvironmentProblem(f"{what} failed ({' '.join(cmd[:3])} ...): {last}")
    return proc.stdout


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
        work = Path(tmp)
        run_tool(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                  f"{XEN_PACKAGE}={version}"], f"download {XEN_PACKAGE}", cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise EnvironmentProblem(f"apt-get download {XEN_PACKAGE} produced no .deb")
        run_tool(["dpkg-deb", "-x", str(debs[0]), str(work / "tree")], f"unpack {debs[0].name}")
        packed = work / "tree" / XEN_GZ
        if not packed.is_file():
            raise EnvironmentProblem(f"{debs[0].name}: expected {XEN_GZ} in the package, found none")
        write_atomically(final, [gzip.decompress(packed.read_bytes())])
    return final
