"""Switch from the initramfs into the real root, as switch_root(8) does.

pivot_root is refused on rootfs (EINVAL), so: move /dev, /proc, /sys and /run
into the new root, delete the initramfs's files (never crossing into another
mount, compared by st_dev) to give its memory back, move the new root onto /,
chroot into it and exec the real init.  After the delete, nothing may be
imported any more: the agent's own files are gone.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from . import sysc

API_MOUNTS = ("/dev", "/proc", "/sys", "/run")


def init_in_root(root: Path, init: str) -> Path:
    """The real init as seen from the initramfs, checked before we burn bridges."""
    candidate = root / init.lstrip("/")
    # A symlink (e.g. /sbin/init -> /lib/systemd/systemd) is resolved as the new
    # root would see it, so an absolute target is looked up under ``root``.
    for _ in range(40):
        if not candidate.is_symlink():
            break
        target = os.readlink(candidate)
        candidate = (root / target.lstrip("/")) if target.startswith("/") else candidate.parent / target
    if not candidate.is_file() or not os.access(candidate, os.X_OK):
        raise FileNotFoundError(f"init {init} not found or not executable in the root file system")
    return candidate


def _delete_initramfs(top: str, root_dev: int) -> None:
    """Remove everything on the initramfs, staying on its device."""
    for entry in os.scandir(top):
        path = entry.path
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_dev != root_dev:
            continue  # a mount point of another file system (e.g. /sysroot)
        if stat.S_ISDIR(st.st_mode):
            _delete_initramfs(path, root_dev)
            try:
                os.rmdir(path)
            except OSError:
                pass  # still holds a mount point
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def switch_root(new_root: Path) -> None:
    """Move the API mounts, free the initramfs, and make ``new_root`` the root.

    Returns with the process chrooted into the new root and cwd "/".
    """
    for mnt in API_MOUNTS:
        target = new_root / mnt.lstrip("/")
        if os.path.ismount(mnt) and target.is_dir():
            sysc.mount(mnt, str(target), None, sysc.MS_MOVE)
        elif os.path.ismount(mnt):
            sysc.umount(mnt, sysc.MNT_DETACH)
    root_dev = os.stat("/").st_dev
    os.chdir(new_root)
    _delete_initramfs("/", root_dev)
    sysc.mount(".", "/", None, sysc.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def clean_environment(env: dict[str, str]) -> dict[str, str]:
    """Drop what the frozen bootloader put into the environment (LD_LIBRARY_PATH, _PYI_*)."""
    return {k: v for k, v in env.items()
            if k not in ("LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG", "TCL_LIBRARY", "TK_LIBRARY")
            and not k.startswith("_PYI") and not k.startswith("_MEI")}
