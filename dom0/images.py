"""File-system images in dom0: create (sparse, labelled), populate, and open for changes.

A fresh image is filled with ``mkfs -d`` (no mount, works unprivileged); an
image that already holds data is loop-mounted, because only the kernel's own
file-system driver can change it safely.  Changes to an image always happen
through :func:`mounted_image`, which unmounts even when the change fails.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guest_init.devices import read_fs_identity

from .errors import EnvironmentProblem, UserError
from .tools import require_tool

FS_TYPES = ("ext4", "ext3", "ext2", "xfs")
LABEL_LIMITS = {"ext4": 16, "ext3": 16, "ext2": 16, "xfs": 12}


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise EnvironmentProblem(f"{what}: {detail}")


def _mkfs(image: Path, fstype: str, label: str, tree: Path | None = None, uuid: str | None = None) -> None:
    if fstype == "xfs":
        cmd = [require_tool("mkfs.xfs"), "-q", "-f", "-L", label]
        if uuid:
            cmd += ["-m", f"uuid={uuid}"]
        if tree is not None:
            raise UserError(f"{image}: populating xfs needs a loop mount (fresh-image fill is ext only)")
    else:
        cmd = [require_tool(f"mkfs.{fstype}"), "-q", "-F", "-L", label]
        if uuid:
            cmd += ["-U", uuid]
        if tree is not None:
            cmd += ["-d", str(tree)]
    _run(cmd + [str(image)], f"mkfs.{fstype} {image} failed")


def create_image(path: Path, size: int, label: str, fstype: str = "ext4") -> None:
    """A sparse file of ``size`` bytes formatted with ``label``; replaces an existing file."""
    if fstype not in FS_TYPES:
        raise UserError(f"{path}: unknown file-system type '{fstype}': expected one of {', '.join(FS_TYPES)}")
    if len(label.encode()) > LABEL_LIMITS[fstype]:
        raise UserError(f"{path}: label '{label}' is longer than {fstype} allows "
                        f"({LABEL_LIMITS[fstype]} bytes)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
        _mkfs(tmp, fstype, label)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def image_identity(image: Path):
    if not image.is_file():
        raise UserError(f"{image}: image not found")
    ident = read_fs_identity(image)
    if ident is None:
        raise UserError(f"{image}: no file system found in the image")
    return ident


def populate_image(image: Path, tree: Path, *, fresh: bool) -> str:
    """Fill ``image`` with the contents of ``tree``; returns how ("mkfs -d" or "loop mount").

    A fresh ext image is simply made again with ``-d``, keeping its size,
    label and UUID; anything else is loop-mounted and copied into.
    """
    ident = image_identity(image)
    if fresh and ident.fstype in ("ext2", "ext3", "ext4"):
        _mkfs(image, ident.fstype, ident.label or "", tree=tree, uuid=ident.uuid)
        return "mkfs -d"
    with mounted_image(image) as mnt:
        _run(["cp", "-a", "--", f"{tree}/.", str(mnt)], f"copying {tree} into {image} failed")
    return "loop mount"


@contextmanager
def mounted_image(image: Path, *, readonly: bool = False) -> Iterator[Path]:
    """Loop-mount ``image`` on a private temporary directory for the duration of the block."""
    image_identity(image)
    if os.geteuid() != 0:
        raise EnvironmentProblem(f"{image}: changing an image that holds data needs a loop mount, "
                                 "which needs root")
    mnt = Path(tempfile.mkdtemp(prefix="sc-image-"))
    options = "loop,ro" if readonly else "loop"
    try:
        _run([require_tool("mount"), "-o", options, str(image), str(mnt)], f"mounting {image} failed")
        try:
            yield mnt
        finally:
            os.sync()
            _run([require_tool("umount"), str(mnt)], f"unmounting {image} failed")
    finally:
        try:
            mnt.rmdir()
        except OSError:
            pass
