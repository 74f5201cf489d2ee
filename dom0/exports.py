"""VBD exports: how a domain gets its disks from dom0's images.

Why this exists: the paper's gain comes from reuse.  One ``/usr`` image is
shared read-only by every domain; a root or ``/var`` per domain is a
copy-on-write view of a canned image, so a new domain costs the blocks it
writes, not a copy of the image.  Three mechanisms, each giving one xl disk
spec (xl-disk-configuration(5)):

* **a file-backed image** (raw, or qcow2), read-only (``access=ro``: safe to
  share across domains) or read-write (this domain's own image);
* **a qcow2 overlay** over a shared base (``qemu-img create -f qcow2 -b BASE
  -F raw OVERLAY``): the overlay holds only the clusters the domain writes and
  the base is never written.  Xen's blkback cannot read qcow2, so the disk
  spec says ``format=qcow2, backendtype=qdisk`` (qemu in dom0); the qemu
  backend reads qcow2 natively and opens the base read-only;
* **an LVM snapshot** where the image is a logical volume (``lvcreate -s``):
  the same idea at the block layer, ``backendtype=phy``.

An existing overlay or snapshot over the same base is kept by default (it
holds the domain's changes: its ``/var``, its ``/home``); one over a different
base is an error, never silently replaced.  Overlays are created under a
temporary name and renamed, so a failure leaves nothing half-made.
"""
from __future__ import annotations

import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import UserError
from .tools import require_tool, run_tool
from .xlcfg import DiskSpec

Access = Literal["ro", "rw", "cow"]
BASE_FORMATS = ("raw", "qcow2")
#: What an LVM snapshot gets when the container gives no ``snapshot-size``: a
#: share of the origin's size (lvcreate's ``-l N%ORIGIN``).  A snapshot whose
#: copy-on-write space fills up becomes invalid, so err on the large side.
DEFAULT_SNAPSHOT_PERCENT = 20
LV_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}")

QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
_QCOW2_EXT_END = 0


# ---------------------------------------------------------------------------
# Tools


def _run(cmd: list[str], what: str) -> str:
    return run_tool(cmd, what, timeout=300)


# ---------------------------------------------------------------------------
# qcow2 headers (read here, so checking a chain needs no tool and takes no lock)


@dataclass(frozen=True)
class Qcow2Header:
    """What an overlay says about itself: its version, virtual size and backing file."""

    version: int
    size: int
    backing_file: str | None
    backing_format: str | None


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """The qcow2 header of ``path``, or None when it is not a qcow2 image.

    Read directly (the layout is in qemu's docs/interop/qcow2.txt) rather than
    through ``qemu-img info``, which takes a lock that a running domain holds.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except (IsADirectoryError, FileNotFoundError):
        return None
    if len(head) < 72 or head[:4] != QCOW2_MAGIC:
        return None
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    size = struct.unpack_from(">Q", head, 24)[0]
    backing = None
    if backing_offset and backing_size:
        raw = head[backing_offset:backing_offset + backing_size]
        if len(raw) < backing_size:  # not in the first 4 KiB (qemu-img puts it there)
            with open(path, "rb") as handle:
                handle.seek(backing_offset)
                raw = handle.read(backing_size)
        backing = raw.decode("utf-8", "replace")
    backing_format = None
    if version >= 3 and len(head) >= 104:
        offset = struct.unpack_from(">I", head, 100)[0]     # header_length: extensions follow
        while offset + 8 <= len(head):
            kind, length = struct.unpack_from(">II", head, offset)
            if kind == _QCOW2_EXT_END:
                break
            if kind == _QCOW2_EXT_BACKING_FORMAT:
                backing_format = head[offset + 8:offset + 8 + length].decode("ascii", "replace")
            offset += 8 + ((length + 7) & ~7)
    return Qcow2Header(version, size, backing, backing_format)


def backing_path(overlay: Path, header: Qcow2Header) -> Path | None:
    """The backing file an overlay names, resolved as qemu does (relative to the overlay)."""
    if not header.backing_file:
        return None
    backing = Path(header.backing_file)
    return backing if backing.is_absolute() else overlay.parent / backing


def image_format(path: Path) -> str:
    """``qcow2`` when the file starts with qcow2's magic, else ``raw``."""
    return "qcow2" if read_qcow2_header(path) is not None else "raw"


def allocated_bytes(path: Path) -> int:
    """Bytes the file really takes on disk (``du``'s figure: st_blocks x 512)."""
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------
# Disk specs


def is_block_path(path: str | Path) -> bool:
    """Whether a path names a block device by its spelling (``/dev/...``), as the container does."""
    return str(path).startswith("/dev/")


def disk_spec(target: Path | str, vdev: str, access: Literal["ro", "rw"], fmt: str = "raw") -> DiskSpec:
    """The xl disk for an image: qcow2 needs qemu in dom0 (qdisk), a block device goes to blkback."""
    backendtype = None
    if fmt == "qcow2":
        backendtype = "qdisk"
    elif is_block_path(target):
        backendtype = "phy"
    return DiskSpec(target=str(target), vdev=vdev, format=fmt, access=access, backendtype=backendtype)


# ---------------------------------------------------------------------------
# Where per-domain views go when the container does not say


def default_overlay(base: Path, domain: str, vdev: str) -> Path:
    """``BASEDIR/DOMAIN-VDEV.qcow2``: beside the base, so images and their overlays stay together."""
    return base.parent / f"{_safe_name(domain)}-{vdev}.qcow2"


def default_snapshot_name(domain: str, vdev: str) -> str:
    """``DOMAIN-VDEV``, in the characters LVM allows."""
    return f"{_safe_name(domain)}-{vdev}"


def snapshot_path(origin: Path, name: str) -> Path:
    """Where the snapshot ``name`` of ``origin`` (``/dev/VG/LV``) appears: ``/dev/VG/NAME``."""
    return origin.parent / name


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9+_.-]", "_", name).lstrip("-.")
    return safe or "domain"


# ---------------------------------------------------------------------------
# qcow2 overlays


def create_overlay(base: Path, overlay: Path, base_format: str = "raw", *,
                   keep: bool = True, where: str = "") -> tuple[str, int]:
    """A qcow2 overlay at ``overlay`` over ``base``; returns (what was done, bytes allocated).

    An existing overlay over the same base is kept when ``keep`` (it holds the
    domain's writes); ``keep=False`` makes a fresh one.  An existing file that
    is not an overlay of ``base`` is never replaced.  The base is only read.
    """
    prefix = f"{where}: " if where else ""
    base, overlay = Path(base).absolute(), Path(overlay).absolute()
    check_base(base, base_format, where)
    if overlay == base:
        raise UserError(f"{prefix}the overlay {overlay} is the base image itself")
    if overlay.exists() or overlay.is_symlink():
        header = read_qcow2_header(overlay)
        backing = backing_path(overlay, header) if header else None
        if header is None or backing is None:
            raise UserError(f"{prefix}{overlay} exists and is not a qcow2 overlay; it is left "
                            "alone (remove it, or name another overlay)")
        if not same_file(backing, base):
            raise UserError(f"{prefix}{overlay} is an overlay of {backing}, not of {base}; it is "
                            "left alone (remove it to start this domain from the new base)")
        if keep:
            return "overlay kept (it holds the domain's changes)", allocated_bytes(overlay)
    if not overlay.parent.is_dir():
        raise UserError(f"{prefix}{overlay.parent}: the overlay's directory does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{overlay.name}.", suffix=".tmp", dir=overlay.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format,
              str(tmp)], f"{prefix}creating the overlay {overlay} over {base}")
        os.replace(tmp, overlay)
    finally:
        tmp.unlink(missing_ok=True)
    return "overlay created", allocated_bytes(overlay)


def check_base(base: Path, base_format: str, where: str = "") -> None:
    """The base must be a file in the format the container says (a raw base that is
    really qcow2 would show the guest qcow2's metadata, and the other way round)."""
    prefix = f"{where}: " if where else ""
    if not base.is_file():
        raise UserError(f"{prefix}image {base} not found")
    found = image_format(base)
    if found != base_format:
        raise UserError(f"{prefix}image {base}: expected a {base_format} image (format "
                        f"{base_format}), found a {found} image (write 'format {found}')")


def same_file(a: Path, b: Path) -> bool:
    """Do ``a`` and ``b`` name the same file (False where either is missing)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------------------
# LVM snapshots


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    size: int
    origin: str

    @property
    def path(self) -> Path:
        return Path("/dev") / self.vg / self.name


def logical_volume(path: Path) -> LogicalVolume | None:
    """The LV at ``path`` (``/dev/VG/LV`` or ``/dev/mapper/...``), or None if it is not one."""
    if not Path(path).exists():
        return None
    argv = [require_tool("lvs"), "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
            "-o", "vg_name,lv_name,lv_size,origin", str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return None
    fields = proc.stdout.strip().split("|")
    if len(fields) != 4:
        return None
    vg, name, size, origin = (f.strip() for f in fields)
    return LogicalVolume(vg, name, int(size or 0), origin)


def lvm_snapshot(origin: Path, name: str, size: int | None = None, *, keep: bool = True,
                 where: str = "") -> tuple[Path, str]:
    """A snapshot ``name`` of the logical volume ``origin`` (``lvcreate -s``).

    Returns (the snapshot's device path, what was done).  An existing snapshot
    of the same origin is kept when ``keep``, else removed and made anew; an LV
    of that name that is not a snapshot of ``origin`` is an error.
    """
    prefix = f"{where}: " if where else ""
    if not LV_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{prefix}snapshot name {name!r}: expected letters, digits, '+', '_', "
                        "'.' and '-', at most 127")
    lv = logical_volume(origin)
    if lv is None:
        raise UserError(f"{prefix}{origin}: expected a logical volume (lvs does not know it); a "
                        "copy-on-write export of a /dev path is an LVM snapshot")
    snap = Path("/dev") / lv.vg / name
    existing = logical_volume(snap)
    if existing is not None:
        if existing.origin != lv.name:
            raise UserError(f"{prefix}{snap} exists and is not a snapshot of {lv.vg}/{lv.name}; "
                            "it is left alone")
        if keep:
            return snap, "snapshot kept (it holds the domain's changes)"
        _run(["lvremove", "-f", f"{lv.vg}/{name}"], f"{prefix}removing the old snapshot {snap}")
    sizing = ["-L", f"{size}b"] if size else ["-l", f"{DEFAULT_SNAPSHOT_PERCENT}%ORIGIN"]
    _run(["lvcreate", "-q", "-s", "-n", name, *sizing, f"{lv.vg}/{lv.name}"],
         f"{prefix}creating the snapshot {lv.vg}/{name} of {lv.vg}/{lv.name}")
    return snap, "snapshot created"
