"""Linux system calls the standard library lacks, through ctypes on libc.

Python has no mount, umount2, finit_module or reboot.  ctypes on the libc that
ships in the initramfs is the lightest way to reach them (no compiled helper
to build and bundle).  Syscall numbers are x86_64.
"""
from __future__ import annotations

import ctypes
import os

_NR_INIT_MODULE = 175
_NR_FINIT_MODULE = 313

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384

MNT_DETACH = 2

RB_POWER_OFF = 0x4321FEDC
RB_HALT_SYSTEM = 0xCDEF0123
RB_AUTOBOOT = 0x01234567

MODULE_INIT_COMPRESSED_FILE = 4

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(libc().mount(source.encode(), target.encode(),
                        fstype.encode() if fstype else None, flags,
                        data.encode() if data else None),
           f"mount {source} on {target}" + (f" ({fstype})" if fstype else ""))


def umount(target: str, flags: int = 0) -> None:
    _check(libc().umount2(target.encode(), flags), f"umount {target}")


def finit_module(fd: int, params: str = "", flags: int = 0) -> None:
    result = libc().syscall(_NR_FINIT_MODULE, ctypes.c_int(fd), ctypes.c_char_p(params.encode()),
                            ctypes.c_int(flags))
    _check(int(result), "finit_module")


def init_module(image: bytes, params: str = "") -> None:
    buf = ctypes.create_string_buffer(image, len(image))
    result = libc().syscall(_NR_INIT_MODULE, buf, ctypes.c_ulong(len(image)),
                            ctypes.c_char_p(params.encode()))
    _check(int(result), "init_module")


def reboot(command: int) -> None:
    os.sync()
    libc().reboot(ctypes.c_int(command))
