"""Guest kernels: Debian's linux-image packages, extracted (never installed) into the cache.

``kernel fetch`` runs ``apt-get download`` and ``dpkg-deb -x`` into
``<cache>/kernels/<version>/`` and then ``depmod -b`` there, because the
package ships no modules.dep (its postinst would make it).  Other commands
take ``--kernel`` as a cached version, or as a vmlinuz path together with
``--modules-dir``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir
from .errors import EnvironmentProblem, UserError
from .tools import UnknownPackage, run_tool, unpack_package

_VERSION_RE = re.compile(r"^[0-9][A-Za-z0-9.+~_-]*$")


@dataclass(frozen=True)
class KernelRef:
    version: str
    vmlinuz: Path
    modules_dir: Path   # .../lib/modules/<version>


def kernels_dir() -> Path:
    return cache_dir("kernels")


def _cached(version: str) -> KernelRef | None:
    root = kernels_dir() / version
    vmlinuz = root / "boot" / f"vmlinuz-{version}"
    modules = root / "lib" / "modules" / version
    if vmlinuz.is_file() and (modules / "modules.dep").is_file():
        return KernelRef(version, vmlinuz, modules)
    return None


def cached_versions() -> list[str]:
    return sorted(p.name for p in kernels_dir().iterdir() if _cached(p.name))


def default_version() -> str:
    """The version Debian's linux-image-amd64 points to for the running release."""
    out = run_tool(["apt-cache", "depends", "linux-image-amd64"], "find the current Debian kernel")
    for line in out.splitlines():
        match = re.search(r"Depends:\s*linux-image-(\S+)", line)
        if match and match.group(1) != "amd64":
            return match.group(1)
    raise EnvironmentProblem("apt-cache knows no linux-image-amd64 package: run 'apt-get update'")


def fetch_kernel(version: str | None = None) -> tuple[KernelRef, bool]:
    """Download and extract a kernel unless cached; returns (kernel, came_from_cache)."""
    version = version or default_version()
    if not _VERSION_RE.match(version):
        raise UserError(f"invalid kernel version '{version}': expected e.g. 6.1.0-56-amd64")
    hit = _cached(version)
    if hit:
        return hit, True
    package = f"linux-image-{version}"
    if shutil.which("apt-get") is None:
        raise EnvironmentProblem("'apt-get' not found: it is needed to download Debian kernels")
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=kernels_dir()) as tmp:
        try:
            deb, tree = unpack_package(package, Path(tmp))
        except UnknownPackage:
            raise UserError(f"unknown kernel version '{version}': apt has no package {package}") from None
        if not (tree / "lib" / "modules" / version).is_dir():
            raise EnvironmentProblem(f"{deb} has no lib/modules/{version}")
        run_tool(["depmod", "-b", str(tree), version], "compute module dependencies (kmod's depmod)")
        final = kernels_dir() / version
        if final.exists():
            shutil.rmtree(final)
        os.replace(tree, final)
    hit = _cached(version)
    assert hit is not None
    return hit, False


def resolve_kernel(spec: str | None, modules_dir: str | Path | None = None) -> KernelRef:
    """Turn ``--kernel`` (a cached version or a vmlinuz path) into a KernelRef."""
    if spec and (os.sep in spec or Path(spec).is_file()):
        vmlinuz = Path(spec)
        if not vmlinuz.is_file():
            raise UserError(f"{spec}: kernel image not found")
        if modules_dir is None:
            raise UserError(f"{spec}: a kernel given as a file needs --modules-dir (its lib/modules/VERSION)")
        mods = Path(modules_dir)
        if not mods.is_dir():
            raise UserError(f"{mods}: modules directory not found")
        if not (mods / "modules.dep").is_file():
            raise UserError(f"{mods}: no modules.dep (run depmod for this kernel)")
        return KernelRef(mods.name, vmlinuz, mods)
    if spec is None:
        versions = cached_versions()
        if not versions:
            raise UserError("no kernel in the cache: run 'supercharge kernel fetch'")
        spec = versions[-1]
    hit = _cached(spec)
    if hit is None:
        raise UserError(f"unknown kernel version '{spec}': not in the cache "
                        f"(have: {', '.join(cached_versions()) or 'none'}; run 'supercharge kernel fetch {spec}')")
    if modules_dir is not None:
        return KernelRef(hit.version, hit.vmlinuz, Path(modules_dir))
    return hit
