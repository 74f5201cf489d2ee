"""A deterministic cpio "newc" (070701) writer and reader, for initramfs archives.

Why our own writer instead of GNU cpio: the initrd must be byte-for-byte reproducible
(same inputs, same bytes, so cached bases can be compared and signed), must contain
device nodes without running as root, and must be fast enough that a per-domain
segment costs milliseconds. The kernel's unpacker (init/initramfs.c) reads "newc"
only: a 110-byte ASCII header, the NUL-terminated name padded to 4 bytes, then the
data padded to 4 bytes; an entry named ``TRAILER!!!`` ends an archive, and zero bytes
may separate it from a following archive (that is how the per-domain segment is
appended to the cached base).

The reader (:func:`read_cpio`, :func:`read_initrd`) exists for tests and for checks
on a built initrd; it accepts concatenated archives like the kernel does.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Self

MAGIC = b"070701"
MAGIC_CRC = b"070702"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
BLOCK = 512

_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)


def _pad4(n: int) -> int:
    """Bytes of zero padding that bring ``n`` to a multiple of 4."""
    return (-n) % 4


def default_mtime() -> int:
    """``SOURCE_DATE_EPOCH`` if set (reproducible-builds convention), else 0."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return 0
    try:
        return max(0, int(value))
    except ValueError:
        return 0


def normalize_name(path: str | PurePosixPath) -> str:
    """The name as stored: relative, no leading '/', no '.', '..' or empty components.

    Why strict: an archive name with '..' would let the unpacker write outside the
    root, and two spellings of one path ("a//b", "./a/b") would defeat the
    duplicate check.
    """
    text = str(path)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cpio: empty path {text!r}")
    if ".." in parts:
        raise ValueError(f"cpio: path {text!r} contains '..'")
    name = "/".join(parts)
    if "\0" in name:
        raise ValueError(f"cpio: path {text!r} contains a NUL byte")
    if name == TRAILER:
        raise ValueError(f"cpio: path {text!r} is reserved for the trailer")
    return name


class CpioWriter:
    """Writes a newc archive to a binary file object, deterministically.

    Every entry has uid/gid 0, the same mtime, sequential inode numbers from 1 and
    check 0, so the output depends only on the calls made. Parent directories are
    added automatically (mode 0755) the first time a path below them is added.
    A path can be added only once: a second explicit add raises ``ValueError``,
    except :meth:`add_dir` on a directory that was only added implicitly as a
    parent with the same mode, which is a no-op (so "add_dir('lib')" after
    "add_file('lib/x')" is harmless).

    Counters: ``files`` (entries written, trailer excluded) and ``bytes_in``
    (payload bytes: file contents and symlink targets).
    """

    def __init__(self, fileobj: BinaryIO, mtime: int | None = None) -> None:
        self._out = fileobj
        self.mtime = default_mtime() if mtime is None else int(mtime)
        self._next_ino = 1
        self._written = 0
        self._paths: dict[str, int] = {}  # name -> mode of what was written
        self._implicit: set[str] = set()  # directories added only as parents
        self._closed = False
        self.files = 0
        self.bytes_in = 0
        # (uid, gid, mtime) of the entry being written by a preserving add_tree
        self._stamp: tuple[int, int, int] | None = None

    # -- public API ---------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, (str, PurePosixPath)):
            return False
        return normalize_name(path) in self._paths

    @property
    def bytes_out(self) -> int:
        """Bytes written so far (including padding and, after close, the trailer)."""
        return self._written

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory entry (parents are added first if missing)."""
        name = normalize_name(path)
        perm = mode & 0o7777
        if name in self._implicit and self._paths.get(name) == stat.S_IFDIR | perm:
            self._implicit.discard(name)
            return
        self._claim(name)
        self._write_entry(name, stat.S_IFDIR | perm, b"", nlink=2)

    def add_file(self, path: str, data: bytes | Path, mode: int | None = None) -> None:
        """Add a regular file from bytes or from a file on disk.

        ``mode`` defaults to 0644 for bytes and to the source file's permission
        bits for a :class:`Path`; keeping the source's bits matters for the
        dynamic loader, which the kernel must be able to execute.
        """
        name = normalize_name(path)
        if isinstance(data, Path):
            if mode is None:
                mode = data.stat().st_mode
            payload = data.read_bytes()
        else:
            payload = bytes(data)
        if mode is None:
            mode = 0o644
        self._claim(name)
        self._write_entry(name, stat.S_IFREG | (mode & 0o7777), payload)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link; the target is stored as the entry's data, as is."""
        name = normalize_name(path)
        if not target or "\0" in target:
            raise ValueError(f"cpio: bad symlink target {target!r} for {name!r}")
        self._claim(name)
        self._write_entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character ("c") or block ("b") device node; no root needed to write it."""
        name = normalize_name(path)
        if kind == "c":
            fmt = stat.S_IFCHR
        elif kind == "b":
            fmt = stat.S_IFBLK
        else:
            raise ValueError(f"cpio: device kind must be 'c' or 'b', not {kind!r}")
        self._claim(name)
        self._write_entry(name, fmt | (mode & 0o7777), b"", rdev=(major, minor))

    def add_tree(self, src: Path, prefix: str = "", *, preserve: bool = False,
                 exclude: tuple[str, ...] = ()) -> None:
        """Add everything below ``src`` (not ``src`` itself) under ``prefix``.

        The prefix directory, if any, is created as a 0755 parent when missing.
        A directory that is already in the archive is merged into (not added
        again), so a skeleton tree can be laid over paths added earlier; a file,
        symlink or device that is already there is still an error.

        Walks in sorted order so the archive does not depend on directory order,
        keeps permission bits, stores symlinks as symlinks (never followed) and
        device nodes as device nodes. Sockets and FIFOs are rejected: nothing in an
        initramfs tree should be one, and silently dropping it would hide a bug.

        ``preserve`` keeps each entry's owner and mtime (an archive of a file
        system, where /etc/shadow must stay group shadow); the default stamps
        root and the writer's mtime, for reproducible initramfs archives.
        ``exclude`` names paths relative to ``src`` to leave out (``lost+found``).
        """
        src = Path(src)
        if not src.is_dir():
            raise ValueError(f"cpio: {src} is not a directory")
        base = normalize_name(prefix) if prefix.strip("/.") else ""
        if base and base not in self._paths:
            self._ensure_parents(base + "/-")  # the prefix itself, as an implicit 0755 dir
        self._add_tree_dir(src, base, preserve, set(exclude), "")

    def close(self) -> None:
        """Write the trailer and pad the archive to a multiple of 512 bytes."""
        if self._closed:
            return
        self._write_header(TRAILER, ino=0, mode=0, nlink=1, size=0, rdev=(0, 0))
        pad = (-self._written) % BLOCK
        if pad:
            self._emit(b"\0" * pad)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()

    # -- internals ----------------------------------------------------------

    def _add_tree_dir(self, directory: Path, base: str, preserve: bool = False,
                      exclude: set[str] | None = None, rel_src: str = "") -> None:
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            rel = f"{base}/{child.name}" if base else child.name
            child_src = f"{rel_src}/{child.name}" if rel_src else child.name
            if exclude and child_src in exclude:
                continue
            st = child.lstat()
            self._stamp = (st.st_uid, st.st_gid, int(st.st_mtime)) if preserve else None
            try:
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(rel, os.readlink(child))
                elif stat.S_ISDIR(st.st_mode):
                    if not stat.S_ISDIR(self._paths.get(rel, 0)):
                        self.add_dir(rel, st.st_mode)
                    self._add_tree_dir(child, rel, preserve, exclude, child_src)
                elif stat.S_ISREG(st.st_mode):
                    self.add_file(rel, child, st.st_mode)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                    self.add_device(rel, kind, os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode)
                else:
                    raise ValueError(f"cpio: {child} is neither file, directory, symlink nor device")
            finally:
                self._stamp = None

    def _claim(self, name: str) -> None:
        """Reject a second add of ``name``, then make sure its parents exist."""
        if self._closed:
            raise ValueError("cpio: archive already closed")
        if name in self._paths:
            raise ValueError(f"cpio: {name!r} added twice")
        self._ensure_parents(name)

    def _ensure_parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._paths:
                self._write_entry(parent, stat.S_IFDIR | 0o755, b"", nlink=2)
                self._implicit.add(parent)

    def _write_entry(
        self, name: str, mode: int, payload: bytes, *, nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        ino = self._next_ino
        self._next_ino += 1
        self._paths[name] = mode
        self._write_header(name, ino=ino, mode=mode, nlink=nlink, size=len(payload), rdev=rdev)
        if payload:
            self._emit(payload)
            self._emit(b"\0" * _pad4(len(payload)))
        self.files += 1
        self.bytes_in += len(payload)

    def _write_header(
        self, name: str, *, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int],
    ) -> None:
        encoded = name.encode("utf-8", "surrogateescape") + b"\0"
        uid, gid, mtime = self._stamp or (0, 0, self.mtime)
        values = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        for field, value in zip(_FIELDS, values):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"cpio: {field}={value} does not fit in newc for {name!r}")
        header = MAGIC + b"".join(b"%08X" % v for v in values)
        self._emit(header + encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded)))

    def _emit(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._written += len(chunk)


# -- reading ---------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One archive member as read back; ``symlink_target`` is set for symlinks only."""

    name: str
    mode: int
    size: int
    data: bytes
    rdev_major: int = 0
    rdev_minor: int = 0
    symlink_target: str | None = None
    ino: int = 0
    nlink: int = 0
    mtime: int = 0
    uid: int = 0
    gid: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return stat.S_ISCHR(self.mode) or stat.S_ISBLK(self.mode)


def parse_archive(data: bytes, offset: int = 0) -> tuple[list[CpioEntry], int]:
    """Parse one archive starting at ``offset``; return its entries and the offset
    just after its trailer (before any zero padding)."""
    entries: list[CpioEntry] = []
    pos = offset
    while True:
        if len(data) - pos < HEADER_SIZE:
            raise ValueError(f"cpio: truncated header at offset {pos}")
        magic = data[pos:pos + 6]
        if magic not in (MAGIC, MAGIC_CRC):
            raise ValueError(f"cpio: bad magic {magic!r} at offset {pos}")
        try:
            fields = dict(zip(_FIELDS, (int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16)
                                        for i in range(13))))
        except ValueError:
            raise ValueError(f"cpio: malformed header at offset {pos}") from None
        name_start = pos + HEADER_SIZE
        name_end = name_start + fields["namesize"]
        if fields["namesize"] < 1 or name_end > len(data):
            raise ValueError(f"cpio: bad name size at offset {pos}")
        name = data[name_start:name_end - 1].decode("utf-8", "surrogateescape")
        data_start = name_end + _pad4(name_end - pos)
        data_end = data_start + fields["filesize"]
        if data_end > len(data):
            raise ValueError(f"cpio: truncated data for {name!r} at offset {pos}")
        pos = data_end + _pad4(fields["filesize"])
        if name == TRAILER:
            return entries, min(pos, len(data))
        payload = data[data_start:data_end]
        mode = fields["mode"]
        entries.append(CpioEntry(
            name=name, mode=mode, size=fields["filesize"], data=payload,
            rdev_major=fields["rdevmajor"], rdev_minor=fields["rdevminor"],
            symlink_target=payload.decode("utf-8", "surrogateescape") if stat.S_ISLNK(mode) else None,
            ino=fields["ino"], nlink=fields["nlink"], mtime=fields["mtime"],
            uid=fields["uid"], gid=fields["gid"],
        ))


def _skip_zeros(data: bytes, pos: int) -> int:
    """Skip the zero padding between concatenated archives (as the kernel does)."""
    while pos < len(data) and data[pos] == 0:
        pos += 1
    return pos


def read_cpio(data: bytes) -> list[CpioEntry]:
    """All entries of one or more concatenated, uncompressed newc archives.

    After each trailer, zero padding is skipped; if another header follows it is
    read too, anything else is an error (a compressed segment needs
    :func:`read_initrd`).
    """
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        part, pos = parse_archive(data, pos)
        entries.extend(part)
        pos = _skip_zeros(data, pos)
        if pos >= len(data):
            return entries
        if data[pos:pos + 6] not in (MAGIC, MAGIC_CRC):
            raise ValueError(f"cpio: unexpected data at offset {pos} after a trailer")


def read_initrd(data: bytes) -> list[CpioEntry]:
    """All entries of an initrd as the kernel sees it: any sequence of plain and
    compressed (zstd, gzip, xz) cpio archives, separated by zero padding.

    Follows the kernel's rule (init/initramfs.c, unpack_to_rootfs): a plain
    archive is recognised only at a 4-byte aligned offset of the whole initrd;
    anything else that is not a zero byte must be a compressed stream. So a plain
    segment appended right after a gzip or zstd stream whose length is not a
    multiple of 4 is an error here, as it is at boot ("invalid magic at start of
    compressed archive"): pad compressed segments (see
    ``dom0.compress.compress_segment``).

    Later entries with the same name win at unpack time; this returns every
    entry in archive order so a check can see both.
    """
    from dom0.compress import (  # local: cpio is usable without zstandard
        decompress_stream,
        sniff,
    )

    entries: list[CpioEntry] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            pos += 1
        elif data[pos:pos + 1] == b"0" and pos % 4 == 0:
            part, pos = parse_archive(data, pos)
            entries.extend(part)
        elif sniff(data[pos:pos + 8]) == "none":
            raise ValueError(
                f"initrd: invalid magic at offset {pos}"
                + (" (a cpio archive must start at a 4-byte aligned offset)" if data[pos:pos + 1] == b"0" else "")
            )
        else:
            plain, used = decompress_stream(data[pos:])
            entries.extend(read_cpio(plain))
            pos += used
    return entries
