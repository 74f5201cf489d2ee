"""Find block devices by file-system label or UUID, reading superblocks directly.

The initramfs has no udev, no blkid and no /dev/disk/by-label, and kernel names
differ between hypervisors (xvda under Xen, vda under qemu), so the agent lists
the devices in /sys/class/block and reads each one's superblock itself.  ext2/3/4
is what the project's images use; xfs, btrfs, vfat and swap are recognised so a
report can say what *was* there when the wanted device was not.
"""
from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import DeviceRef

#: Bytes read from each device: enough for btrfs (superblock at 64 KiB) and for
#: the swap signature at the end of a 64 KiB page.
PROBE_SIZE = 0x11000

SYS_BLOCK = Path("/sys/class/block")
DEV_DIR = Path("/dev")


@dataclass(frozen=True)
class FsIdentity:
    """What a superblock says: ``fstype`` as mount(8) names it, label and UUID or None."""

    fstype: str
    label: str | None
    uuid: str | None

    def describe(self) -> str:
        """``ext4 LABEL=root UUID=...``: how a device is shown in errors and reports."""
        words = [self.fstype]
        if self.label is not None:
            words.append(f"LABEL={self.label}")
        if self.uuid is not None:
            words.append(f"UUID={self.uuid}")
        return " ".join(words)

    def matches(self, ref: DeviceRef) -> bool:
        """Labels compare exactly, UUIDs case-insensitively (FAT serials are upper-case)."""
        if ref.label is not None:
            return self.label == ref.label
        return self.uuid is not None and ref.uuid is not None and self.uuid.lower() == ref.uuid.lower()


class DeviceError(Exception):
    """Base of the errors of the devices stage."""


class DeviceTimeout(DeviceError):
    """Some devices were not found before the deadline.

    ``missing``: the ``describe()`` strings not found; ``seen``: what the last poll
    did find, as ``{"device", "fstype", "label", "uuid"}`` dicts (plus ``"error"``
    for a device that could not be read), so the report shows the near misses.
    """

    def __init__(self, missing: list[str], seen: list[dict[str, Any]], timeout: float) -> None:
        self.missing = missing
        self.seen = seen
        self.timeout = timeout
        shown = ", ".join(_describe_seen(s) for s in seen) or "no block devices"
        super().__init__(f"no block device with {', '.join(missing)} after {timeout:.1f} s (seen: {shown})")


class AmbiguousDevice(DeviceError):
    """Two or more devices carry the wanted label or UUID; guessing could mount the wrong one."""

    def __init__(self, ref: str, devices: list[Path]) -> None:
        self.ref = ref
        self.devices = devices
        super().__init__(
            f"{ref} is ambiguous: found on {' and '.join(str(d) for d in devices)}; "
            "give the file systems distinct labels or use UUID="
        )


def _describe_seen(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{entry['device']} unreadable ({entry['error']})"
    if entry["fstype"] is None:
        return f"{entry['device']} no file system"
    ident = FsIdentity(entry["fstype"], entry["label"], entry["uuid"])
    return f"{entry['device']} {ident.describe()}"


# ------------------------------------------------------------------- superblocks


def _uuid(raw: bytes) -> str | None:
    """Canonical lower-case dashed form; all zeros means "no UUID"."""
    if len(raw) != 16 or not any(raw):
        return None
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _label(raw: bytes) -> str | None:
    """NUL-terminated (or padded) label; empty means "no label"."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return text or None


# ext feature bits (linux/fs/ext4/ext4.h); blkid's rules for telling ext2/3/4 apart.
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8
_EXT3_INCOMPAT_SUPP = 0x2 | 0x4 | 0x10  # filetype, recover, meta_bg
_EXT3_RO_COMPAT_SUPP = 0x1 | 0x2 | 0x4  # sparse_super, large_file, btree_dir


def _probe_ext(buf: bytes) -> FsIdentity | None:
    sb = buf[1024:2048]
    if len(sb) < 0x88 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 0x5C)
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:
        fstype = "jbd"  # an external journal, not mountable
    elif incompat & ~_EXT3_INCOMPAT_SUPP or ro_compat & ~_EXT3_RO_COMPAT_SUPP:
        fstype = "ext4"  # extents, 64bit, flex_bg, huge_file, metadata_csum, ...
    elif compat & _EXT_COMPAT_HAS_JOURNAL:
        fstype = "ext3"
    else:
        fstype = "ext2"
    return FsIdentity(fstype, _label(sb[0x78:0x88]), _uuid(sb[0x68:0x78]))


def _probe_xfs(buf: bytes) -> FsIdentity | None:
    if buf[0:4] != b"XFSB" or len(buf) < 120:
        return None
    return FsIdentity("xfs", _label(buf[108:120]), _uuid(buf[32:48]))


def _probe_btrfs(buf: bytes) -> FsIdentity | None:
    if buf[0x10040:0x10048] != b"_BHRfS_M":
        return None
    return FsIdentity("btrfs", _label(buf[0x1012B:0x1022B]), _uuid(buf[0x10020:0x10030]))


def _probe_swap(buf: bytes) -> FsIdentity | None:
    for page in (4096, 8192, 16384, 65536):
        if buf[page - 10 : page] == b"SWAPSPACE2":
            return FsIdentity("swap", _label(buf[1052:1068]), _uuid(buf[1036:1052]))
    return None


def _probe_vfat(buf: bytes) -> FsIdentity | None:
    if len(buf) < 512 or buf[510:512] != b"\x55\xaa":
        return None
    if buf[0x52:0x57] == b"FAT32":
        serial_at, label_at = 0x43, 0x47
    elif buf[0x36:0x39] == b"FAT":
        serial_at, label_at = 0x27, 0x2B
    else:
        return None
    serial = struct.unpack_from("<I", buf, serial_at)[0]
    label = buf[label_at : label_at + 11].decode("latin-1").rstrip(" \0")
    if label == "NO NAME":
        label = ""
    return FsIdentity("vfat", label or None, f"{serial >> 16:04X}-{serial & 0xFFFF:04X}")


# ext first: it is what the project's images use.  vfat last: its test is the weakest.
_PROBES = (_probe_ext, _probe_xfs, _probe_btrfs, _probe_swap, _probe_vfat)


def identify(buf: bytes) -> FsIdentity | None:
    """The identity in the first :data:`PROBE_SIZE` bytes of a device, or None."""
    for probe in _PROBES:
        ident = probe(buf)
        if ident is not None:
            return ident
    return None


def read_fs_identity(path: str | Path) -> FsIdentity | None:
    """Read the superblock of ``path`` (block device or image file) in one read.

    Returns None when no known file system is there; raises ``OSError`` when the
    device cannot be read, which callers must tell apart from "empty".
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = b""
        while len(buf) < PROBE_SIZE:  # read() may return short on some devices
            chunk = os.pread(fd, PROBE_SIZE - len(buf), len(buf))
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(fd)
    return identify(buf)


# ------------------------------------------------------------------ enumeration


def _scan(sys_block: Path, dev_dir: Path) -> list[tuple[Path, int | None]]:
    """``(node, size in sectors or None)`` for each usable device in ``sys_block``."""
    try:
        names = sorted(os.listdir(sys_block))
    except FileNotFoundError:
        return []
    found: list[tuple[Path, int | None]] = []
    for name in names:
        if name.startswith("ram"):
            continue
        try:
            size: int | None = int((sys_block / name / "size").read_text().strip())
        except (OSError, ValueError):
            size = None
        # An unattached loop device, an empty CD drive: nothing to read.
        if size == 0:
            continue
        node = dev_dir / name.replace("!", "/")  # sysfs spells cciss/c0d0 as cciss!c0d0
        if not node.exists():
            continue
        found.append((node, size))
    return found


def list_block_devices(sys_block: Path = SYS_BLOCK, dev_dir: Path = DEV_DIR) -> list[Path]:
    """Device nodes of every disk and partition in ``sys_block`` worth probing.

    Skipped: ram disks, devices of size 0 (unattached loop devices, empty drives),
    and devices whose node is not in ``dev_dir`` (devtmpfs not caught up yet).
    """
    return [node for node, _ in _scan(sys_block, dev_dir)]


def wait_for_devices(
    refs: list[DeviceRef],
    timeout: float,
    *,
    sys_block: Path = SYS_BLOCK,
    dev_dir: Path = DEV_DIR,
    poll_interval: float = 0.05,
) -> dict[str, Path]:
    """Poll until every ref is on exactly one device; ``{ref.describe(): node}``.

    Virtual disks appear asynchronously after the kernel starts, so we poll
    rather than look once.  Each device is read once per (node, size): a device
    that grows from 0 to its real size when its backend connects is read again.
    Raises :class:`AmbiguousDevice` at once if a ref matches two devices (waiting
    will not fix that), :class:`DeviceTimeout` at the deadline.
    """
    wanted = {ref.describe(): ref for ref in refs}
    deadline = time.monotonic() + timeout
    cache: dict[tuple[Path, int | None], FsIdentity | None] = {}
    while True:
        seen: list[dict[str, Any]] = []
        matches: dict[str, list[Path]] = {key: [] for key in wanted}
        for node, size in _scan(sys_block, dev_dir):
            key = (node, size)
            if key not in cache:
                try:
                    cache[key] = read_fs_identity(node)
                except OSError as exc:  # not cached: it may become readable
                    seen.append({"device": str(node), "fstype": None, "label": None, "uuid": None,
                                 "error": exc.strerror or str(exc)})
                    continue
            ident = cache[key]
            seen.append({
                "device": str(node),
                "fstype": ident.fstype if ident else None,
                "label": ident.label if ident else None,
                "uuid": ident.uuid if ident else None,
            })
            if ident is not None:
                for describe, ref in wanted.items():
                    if ident.matches(ref):
                        matches[describe].append(node)
        for describe, nodes in matches.items():
            if len(nodes) > 1:
                raise AmbiguousDevice(describe, nodes)
        if all(matches.values()):
            return {describe: nodes[0] for describe, nodes in matches.items()}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = [describe for describe, nodes in matches.items() if not nodes]
            raise DeviceTimeout(missing, seen, timeout)
        time.sleep(min(poll_interval, remaining))
