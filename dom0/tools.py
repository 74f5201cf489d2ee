"""External tools dom0 runs, and Debian packages it unpacks: one way to find and run them.

A tool that is missing names the Debian package that has it; a tool that
fails becomes one line naming what was being done and the tool's last line of
output (an :class:`~dom0.errors.EnvironmentProblem`, exit code 3), never a
traceback.  Shared by the image builder, the kernel cache, the VBD exports and
the Xen lab.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import EnvironmentProblem

#: The Debian package of each tool whose package is not named like the tool.
PACKAGES = {"mkfs.ext4": "e2fsprogs", "mkfs.ext3": "e2fsprogs", "mkfs.ext2": "e2fsprogs",
            "mkfs.xfs": "xfsprogs", "mount": "mount", "umount": "mount",
            "qemu-img": "qemu-utils", "qemu-io": "qemu-utils",
            "lvcreate": "lvm2", "lvs": "lvm2", "lvremove": "lvm2"}


class UnknownPackage(EnvironmentProblem):
    """apt has no such package (or version)."""


def require_tool(name: str) -> str:
    """The path of ``name``, or an error naming the Debian package that has it (exit code 3)."""
    found = shutil.which(name)
    if found is None:
        package = PACKAGES.get(name, name)
        raise EnvironmentProblem(f"'{name}' not found: install Debian's {package} package "
                                 f"(apt-get install {package})")
    return found


def run_tool(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: float = 1800) -> str:
    """Run ``cmd`` and return its output; a missing tool, a failure or a timeout is one line.

    The default timeout only stops a tool that hangs (debootstrap over a slow mirror
    takes minutes); callers that expect seconds give their own.
    """
    argv = [require_tool(cmd[0]), *cmd[1:]]
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{what}: {cmd[0]} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise EnvironmentProblem(f"{what} failed ({' '.join(cmd[:3])} ...): {last}")
    return proc.stdout


def unpack_package(package: str, work: Path) -> tuple[str, Path]:
    """Download ``package`` (``NAME`` or ``NAME=VERSION``) with apt into ``work`` and unpack it.

    Returns the .deb's file name and the directory it was unpacked to
    (``work/tree``).  Raises :class:`UnknownPackage` if apt has no such package.
    """
    proc = subprocess.run([require_tool("apt-get"), "download", "-q", "-o", "APT::Sandbox::User=root",
                           package], cwd=work, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "Unable to locate package" in proc.stderr or "Can't select" in proc.stderr:
            raise UnknownPackage(f"apt has no package {package}")
        raise EnvironmentProblem(f"apt-get download {package} failed: "
                                 f"{(proc.stderr.strip() or 'no output').splitlines()[-1]}")
    debs = sorted(work.glob("*.deb"))
    if not debs:
        raise EnvironmentProblem(f"apt-get download {package} produced no .deb")
    tree = work / "tree"
    run_tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"unpack {debs[0].name}")
    return debs[0].name, tree
