"""Safe reading and extraction of cpio and tar archives, plain or compressed.

Used in dom0 to expand the archives a container file names, and in the guest for
the ``extract`` operation.  An archive is input from the network: it may be built
to write outside the directory it is extracted into, to fill the disk, or to plant
device nodes.  Every member is checked here, by our own rules, before anything is
written for it; tarfile's extraction filters are not relied on (Python 3.11.2, as
in Debian 12, predates them) and tarfile is used only to parse headers.

Formats are recognised by their magic, never by a file name: cpio "newc"
(070701), "crc" (070702, checksum verified) and old portable ASCII (070707); tar
(v7, ustar, GNU, pax); each plain or compressed with gzip, xz, bzip2 (standard
library) or zstd (``zstandard``, imported only for a zstd archive).  Concatenated
cpio archives (zero padding between them, as in an initrd) are read as one.

Rules (each refusal is :class:`UnsafeArchive` naming the member):

- Names: a leading ``./`` is dropped; an absolute name, a ``..`` component or a
  NUL is refused.  ``.`` itself describes the destination directory.
- Symlinks are created as they are, but only when their target stays inside the
  destination: an absolute target is read relative to the destination (as in a
  chroot), a relative one from the member's directory, ``..`` lexically.
- Nothing is written through a symlink that leaves the destination or has an
  absolute target: a member's parent path is resolved component by component and
  may follow only relative symlinks that stay inside.  Why also absolute ones: on
  the host ``a -> /etc`` means the host's /etc; the guest meaning is only right
  when the destination is the guest's root, which the extractor cannot know.  (GNU
  tar protects itself the same way, by delaying such symlinks to the end.)  The
  final component is never followed: a member replaces a symlink, never writes
  through it.
- Hard links must name an earlier regular-file member of the same archive (tar),
  or share an inode number with one (cpio).
- Device nodes, FIFOs and sockets only with ``allow_devices``; set-user-ID and
  set-group-ID bits only with ``allow_setid``; ownership only when running as root
  and ``preserve_owner`` asks (numeric ids; the guest's user database is not ours).
- Limits: member count, size of each file, and total size; declared sizes are
  checked before a file is written, actual bytes are counted while writing.

All or nothing: members are extracted into a staging directory that is removed
on any failure.  When ``dest`` does not exist, the staging directory is created
beside it and renamed to ``dest`` at the end.  When ``dest`` exists (it may be a
mount point, or already hold files), the staging directory is created inside it
and its contents are moved into place at the end, one rename per entry (a whole
directory at once when ``dest`` has nothing by that name).  Every refusal caused
by the archive itself happens before ``dest`` is touched; only a conflict with
what ``dest`` already holds (a directory where the archive has a file, a symlink
there that cannot be followed safely) or an I/O error during those final renames
can leave ``dest`` partly updated.  Existing directories keep their own mode,
owner and mtime when merged into.

Extracted trees keep the guest's absolute symlinks: read them with
:func:`guest_init.safepath.resolve_in_root`, never by following symlinks on the host.
"""
from __future__ import annotations

import io
import os
import stat
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

#: Read size for archive data.
CHUNK = 256 * 1024
#: Default limit of the total size of regular files extracted from one archive.
DEFAULT_MAX_TOTAL = 4 << 30
#: Default limit of the number of members.
DEFAULT_MAX_MEMBERS = 1_000_000
#: Longest member name or symlink target accepted (Linux's PATH_MAX, with its NUL).
MAX_NAME = 4096
#: Most symlinks followed while resolving one member's parent path (Linux's MAXSYMLINKS).
MAX_SYMLINKS = 40

CPIO_NEWC = b"070701"
CPIO_CRC = b"070702"
CPIO_ODC = b"070707"
CPIO_TRAILER = "TRAILER!!!"

# Magic numbers of compressed streams, checked in this order.
_COMPRESSIONS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)
_UNSUPPORTED_MAGIC: tuple[tuple[str, bytes], ...] = (
    ("lz4", b"\x04\x22\x4d\x18"),
    ("lzop", b"\x89LZO"),
    ("old binary cpio", b"\xc7\x71"),
    ("old binary cpio", b"\x71\xc7"),
)


# -- errors ------------------------------------------------------------------------


class ArchiveError(Exception):
    """An archive could not be read or extracted; ``member`` is set when one is to blame."""

    def __init__(self, reason: str, member: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.member = member
        self.source = source
        where = f"{source}: " if source else ""
        what = f"member {member!r}: " if member is not None else ""
        super().__init__(f"{where}{what}{reason}")


class UnsafeArchive(ArchiveError):
    """A member would escape the destination, or is of a kind or size not allowed."""


class ArchiveTooLarge(UnsafeArchive):
    """A member, or the archive as a whole, is over a size or member-count limit."""


class CorruptArchive(ArchiveError):
    """The archive is malformed or truncated (including its compression)."""


class UnsupportedArchive(ArchiveError):
    """Not a format we read, or its decompressor is not installed."""


# -- member descriptions -----------------------------------------------------------


@dataclass(frozen=True)
class MemberInfo:
    """One archive member as its header describes it (``name`` as stored).

    ``kind``: file, dir, symlink, hardlink, chardev, blockdev, fifo or socket.
    ``linkname``: the symlink target or, for a tar hard link, the member linked to.
    ``mode``: permission bits (including set-id bits) without the file type.
    ``ino``/``nlink``/``dev``: cpio only; regular files sharing ``(dev, ino)`` with
    ``nlink`` > 1 are hard links to each other.
    """

    name: str
    kind: str
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    linkname: str | None = None
    devmajor: int = 0
    devminor: int = 0
    ino: int = 0
    nlink: int = 1
    dev: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ExtractResult:
    """Counts of what was extracted (``bytes``: regular-file content written)."""

    files: int
    dirs: int
    symlinks: int
    bytes: int
    hardlinks: int = 0
    specials: int = 0
    format: str = ""
    compression: str = ""


_KIND_BITS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_SPECIAL_KINDS = ("chardev", "blockdev", "fifo", "socket")


# -- input streams -----------------------------------------------------------------


class _Input:
    """A read-only byte stream with ``peek``, an absolute position, and a short memory.

    The position lets cpio find its 4-byte padding; the memory of the last bytes
    read (only when ``remember`` is set, for tar) lets the tar reader look at the
    header block where tarfile stopped: tarfile silently ends at a truncated or
    invalid header in a stream, which would hide a truncated archive.
    """

    KEEP = 128 * 1024

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = b""
        self._off = 0  # bytes of _buf already consumed (slicing per read would be quadratic)
        self.pos = 0
        self.remember = False
        self._recent: deque[tuple[int, bytes]] = deque()  # (offset, chunk), no copies
        self._recent_bytes = 0
        self._eof = False

    def _avail(self) -> int:
        return len(self._buf) - self._off

    def _fill(self, n: int) -> None:
        if self._avail() >= n or self._eof:
            return
        parts = [self._buf[self._off:]]
        have = len(parts[0])
        while have < n:
            chunk = self._read(max(n - have, CHUNK))
            if not chunk:
                self._eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        self._off = 0

    def peek(self, n: int) -> bytes:
        self._fill(n)
        return self._buf[self._off:self._off + n]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._off:]]
            while chunk := self._read(CHUNK):
                parts.append(chunk)
            self._eof = True
            self._buf, self._off = b"", 0
            out = b"".join(parts)
        else:
            self._fill(n)
            out = self._buf[self._off:self._off + n]
            self._off += len(out)
        if self.remember and out:
            self._recent.append((self.pos, out))
            self._recent_bytes += len(out)
            while self._recent_bytes - len(self._recent[0][1]) >= self.KEEP:
                self._recent_bytes -= len(self._recent.popleft()[1])
        self.pos += len(out)
        return out

    def recent(self, offset: int, n: int) -> bytes | None:
        """Bytes ``[offset, offset+n)`` if they were read recently (``remember``), else None."""
        if not self.remember or not self._recent or offset < self._recent[0][0]:
            return None
        base = self._recent[0][0]
        joined = b"".join(chunk for _, chunk in self._recent)
        return joined[offset - base:offset - base + n]


class _Decoder:
    """Decompresses a stream incrementally, with bounded output per call.

    Concatenated streams (gzip members, xz streams, zstd frames), optionally
    separated by zero padding, are read as one; a stream that ends early is a
    :class:`CorruptArchive` (the stdlib file wrappers would say so too, but zstd's
    stream reader would silently stop).
    """

    def __init__(self, raw: _Input, name: str, magic: bytes, source: str | None) -> None:
        self.raw = raw
        self.name = name
        self.magic = magic
        self.source = source
        self.dec: Any = self._new()
        self.pending = b""  # decoder input not consumed yet
        self.out = bytearray()
        self.finished = False

    def _new(self) -> Any:
        if self.name == "gzip":
            import zlib

            return _ZlibAdapter(zlib.decompressobj(wbits=31))
        if self.name == "xz":
            import lzma

            return _StdAdapter(lzma.LZMADecompressor(format=lzma.FORMAT_XZ))
        if self.name == "bzip2":
            import bz2

            return _StdAdapter(bz2.BZ2Decompressor())
        try:
            import zstandard
        except ImportError:
            raise UnsupportedArchive(
                "the archive is zstd-compressed and the Python module 'zstandard' is not "
                "installed", source=self.source) from None
        return _ZstdAdapter(zstandard.ZstdDecompressor().decompressobj())

    def _next_stream(self) -> bool:
        """After a stream's end: start the next concatenated one, or finish."""
        rest = self.dec.unused_data + self.pending
        self.pending = b""
        while True:
            rest = rest.lstrip(b"\0")
            if rest:
                break
            rest = self.raw.read(CHUNK)
            if not rest:
                self.finished = True
                return False
        while len(rest) < len(self.magic):
            more = self.raw.read(len(self.magic) - len(rest))
            if not more:
                break
            rest += more
        if not rest.startswith(self.magic):
            raise CorruptArchive(f"unexpected data after the end of the {self.name} stream",
                                 source=self.source)
        self.dec = self._new()
        self.pending = rest
        return True

    def read(self, n: int) -> bytes:
        try:
            while len(self.out) < n and not self.finished:
                if self.dec.eof:
                    if not self._next_stream():
                        break
                    continue
                if not self.pending and self.dec.needs_input:
                    self.pending = self.raw.read(self.dec.read_size)
                    if not self.pending:
                        raise CorruptArchive(f"the {self.name} stream is truncated",
                                             source=self.source)
                data, self.pending = self.pending, b""
                self.out += self.dec.decompress(data, CHUNK)
        except ArchiveError:
            raise
        except Exception as exc:  # zlib.error, lzma.LZMAError, OSError, zstd.ZstdError
            raise CorruptArchive(f"{self.name} data error: {exc}", source=self.source) from None
        out = bytes(self.out[:n])
        del self.out[:n]
        return out


class _StdAdapter:
    """lzma and bz2 decompressors: they keep their own unconsumed input."""

    read_size = 64 * 1024

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    @property
    def eof(self) -> bool:
        return self.obj.eof

    @property
    def unused_data(self) -> bytes:
        return self.obj.unused_data

    @property
    def needs_input(self) -> bool:
        return self.obj.needs_input

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self.obj.decompress(data, max_length)


class _ZlibAdapter(_StdAdapter):
    """zlib hands back what it could not use under ``max_length`` as ``unconsumed_tail``."""

    @property
    def needs_input(self) -> bool:
        return not self.obj.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self.obj.decompress(self.obj.unconsumed_tail + data, max_length)


class _ZstdAdapter:
    """zstandard's decompressobj has no output bound, so it is fed small inputs:
    a few KiB of zstd can expand to hundreds of MiB (RLE blocks)."""

    read_size = 2 * 1024

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    @property
    def eof(self) -> bool:
        return self.obj.eof

    @property
    def unused_data(self) -> bytes:
        return self.obj.unused_data

    needs_input = True

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self.obj.decompress(data) if data else b""


def _open_input(archive: Path | bytes | bytearray | memoryview, stack: list[Any]) -> _Input:
    if isinstance(archive, (bytes, bytearray, memoryview)):
        f: BinaryIO = io.BytesIO(bytes(archive))
    else:
        try:
            f = open(archive, "rb")
        except OSError as exc:
            raise ArchiveError(f"cannot open: {exc.strerror or exc}", source=str(archive)) from None
    stack.append(f)
    return _Input(f.read)


def _sniff(archive: Path | bytes | bytearray | memoryview, stack: list[Any],
           source: str | None) -> tuple[_Input, str, str]:
    """The decompressed input, the compression name and the archive format."""
    raw = _open_input(archive, stack)
    head = raw.peek(8)
    compression = "none"
    stream = raw
    for name, magic in _COMPRESSIONS:
        if head.startswith(magic):
            compression = name
            dec = _Decoder(raw, name, magic, source)
            stream = _Input(dec.read)
            head = stream.peek(8)
            break
    fmt = _inner_format(stream, source)
    return stream, compression, fmt


def _inner_format(stream: _Input, source: str | None) -> str:
    head = stream.peek(512)
    if head[:6] in (CPIO_NEWC, CPIO_CRC):
        return "cpio-newc" if head[:6] == CPIO_NEWC else "cpio-crc"
    if head[:6] == CPIO_ODC:
        return "cpio-odc"
    if len(head) == 512 and (head[257:262] == b"ustar" or _tar_checksum_ok(head)):
        return "tar"
    for name, magic in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            raise UnsupportedArchive(f"{name} is not supported (cpio newc/crc/odc or tar, "
                                     "plain or gzip/xz/bzip2/zstd)", source=source)
    for name, magic in _COMPRESSIONS:
        if head.startswith(magic):
            raise UnsupportedArchive(f"{name} data inside the compression: nested compression "
                                     "is not supported", source=source)
    if not head:
        raise CorruptArchive("empty archive", source=source)
    raise UnsupportedArchive(f"not a cpio or tar archive (starts with {head[:8]!r})", source=source)


def _tar_checksum_ok(block: bytes) -> bool:
    """A v7 tar header (no magic) is recognised by its header checksum."""
    field_ = block[148:156].split(b"\0", 1)[0].strip()
    if not field_ or block.count(0) == 512:
        return False
    try:
        want = int(field_, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    return want == unsigned


# -- cpio --------------------------------------------------------------------------


class _Data:
    """Reads exactly one member's data from the stream; short data is a truncation."""

    def __init__(self, stream: _Input, size: int, member: str, source: str | None,
                 crc: bool = False) -> None:
        self.stream = stream
        self.left = size
        self.member = member
        self.source = source
        self.crc = 0 if crc else None

    def read(self, n: int = CHUNK) -> bytes:
        if self.left <= 0:
            return b""
        chunk = self.stream.read(min(n, self.left))
        if not chunk:
            raise CorruptArchive(f"truncated: {self.left} bytes of data missing",
                                 self.member, self.source)
        self.left -= len(chunk)
        if self.crc is not None:
            self.crc = (self.crc + sum(chunk)) & 0xFFFFFFFF
        return chunk

    def drain(self) -> None:
        while self.left > 0:
            self.read(CHUNK)


def _cpio_members(stream: _Input, source: str | None) -> Iterator[tuple[MemberInfo, Any]]:
    """Members of one or more concatenated cpio archives (newc, crc, odc)."""
    while True:
        start = stream.pos
        magic = stream.peek(6)
        if magic in (CPIO_NEWC, CPIO_CRC):
            size = 110
        elif magic == CPIO_ODC:
            size = 76
        elif not magic:
            raise CorruptArchive(f"truncated: no {CPIO_TRAILER} entry at offset {start}",
                                 source=source)
        else:
            raise CorruptArchive(f"bad cpio header magic {magic!r} at offset {start}",
                                 source=source)
        header = stream.read(size)
        if len(header) < size:
            raise CorruptArchive(f"truncated cpio header at offset {start}", source=source)
        try:
            if magic == CPIO_ODC:
                f = []
                for o, w in ((6, 6), (12, 6), (18, 6), (24, 6), (30, 6), (36, 6), (42, 6),
                             (48, 11), (59, 6), (65, 11)):
                    text = header[o:o + w]
                    if not all(c in b"01234567" for c in text):
                        raise ValueError(text)
                    f.append(int(text, 8))
                dev, ino, mode, uid, gid, nlink, rdev, mtime, namesize, filesize = f
                devpair = (os.major(dev), os.minor(dev)) if dev < (1 << 32) else (dev, 0)
                rdevpair = (os.major(rdev), os.minor(rdev)) if rdev < (1 << 32) else (0, 0)
                check = 0
            else:
                f = []
                for i in range(13):
                    text = header[6 + 8 * i:14 + 8 * i]
                    if not all(c in b"0123456789abcdefABCDEF" for c in text):
                        raise ValueError(text)
                    f.append(int(text, 16))
                ino, mode, uid, gid, nlink, mtime, filesize = f[:7]
                devpair = (f[7], f[8])
                rdevpair = (f[9], f[10])
                namesize, check = f[11], f[12]
        except ValueError:
            raise CorruptArchive(f"malformed cpio header at offset {start}", source=source) from None
        if not 1 <= namesize <= MAX_NAME + 1:
            raise CorruptArchive(f"bad cpio name size {namesize} at offset {start}", source=source)
        raw_name = stream.read(namesize)
        if len(raw_name) < namesize:
            raise CorruptArchive(f"truncated cpio header at offset {start}", source=source)
        if raw_name[-1:] != b"\0":
            raise CorruptArchive(f"cpio name not NUL-terminated at offset {start}", source=source)
        name = raw_name[:-1].decode("utf-8", "surrogateescape")
        if magic != CPIO_ODC:
            _cpio_skip(stream, (-stream.pos) % 4, name, source)
        if name == CPIO_TRAILER:
            _cpio_skip(stream, filesize, name, source)
            if magic != CPIO_ODC:
                _cpio_skip(stream, (-stream.pos) % 4, name, source)
            # Zero padding, then possibly another archive (as in a concatenated initrd).
            while True:
                chunk = stream.peek(CHUNK)
                stripped = chunk.lstrip(b"\0")
                stream.read(len(chunk) - len(stripped))
                if stripped or not chunk:
                    break
            nxt = stream.peek(6)
            if not nxt:
                return
            if nxt in (CPIO_NEWC, CPIO_CRC, CPIO_ODC):
                continue
            raise CorruptArchive(f"unexpected data after the cpio trailer at offset {stream.pos}",
                                 source=source)
        kind = _KIND_BITS.get(stat.S_IFMT(mode))
        if kind is None:
            raise CorruptArchive(f"unknown file type {mode:o}", name, source)
        base = MemberInfo(name=name, kind=kind, size=0, mode=stat.S_IMODE(mode), mtime=mtime,
                          uid=uid, gid=gid, devmajor=rdevpair[0], devminor=rdevpair[1], ino=ino,
                          nlink=nlink, dev=devpair)
        if kind == "symlink":
            if not 1 <= filesize <= MAX_NAME - 1:
                raise CorruptArchive(f"bad symlink target length {filesize}", name, source)
            data = _Data(stream, filesize, name, source)  # the crc format sums files only
            target = data.read(filesize)
            while len(target) < filesize:
                target += data.read(filesize - len(target))
            yield replace(base, size=filesize,
                          linkname=target.decode("utf-8", "surrogateescape")), None
        elif kind == "file":
            data = _Data(stream, filesize, name, source, magic == CPIO_CRC)
            yield replace(base, size=filesize), data
            data.drain()
            _cpio_check(data, check, magic, name, source)
        else:
            data = _Data(stream, filesize, name, source)
            data.drain()  # a directory or device has no data; tolerate and skip any
            yield base, None
        if magic != CPIO_ODC:
            _cpio_skip(stream, (-stream.pos) % 4, name, source)


def _cpio_skip(stream: _Input, n: int, name: str, source: str | None) -> None:
    if n and len(stream.read(n)) < n:
        raise CorruptArchive("truncated", name, source)


def _cpio_check(data: _Data, check: int, magic: bytes, name: str, source: str | None) -> None:
    if magic == CPIO_CRC and data.crc is not None and data.crc != check:
        raise CorruptArchive(f"checksum mismatch: header says {check:08x}, data sums to "
                             f"{data.crc:08x}", name, source)


# -- tar ---------------------------------------------------------------------------


class _TarData:
    def __init__(self, fobj: Any, member: str, source: str | None) -> None:
        self.fobj = fobj
        self.member = member
        self.source = source

    def read(self, n: int = CHUNK) -> bytes:
        import tarfile

        try:
            return self.fobj.read(n)
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptArchive(f"truncated or corrupt data: {exc}", self.member,
                                 self.source) from None


def _tar_member(ti: Any, kind: str, size: int = 0, linkname: str | None = None) -> MemberInfo:
    return MemberInfo(name=ti.name, kind=kind, size=size, mode=stat.S_IMODE(ti.mode),
                      mtime=ti.mtime, uid=ti.uid, gid=ti.gid, linkname=linkname,
                      devmajor=ti.devmajor, devminor=ti.devminor)


def _tar_members(stream: _Input, source: str | None) -> Iterator[tuple[MemberInfo, Any]]:
    """Members of a tar stream, parsed by tarfile, read in order without seeking."""
    import tarfile

    stream.remember = True
    try:
        fileobj: Any = stream  # tarfile needs only read()
        tf = tarfile.open(fileobj=fileobj, mode="r|", encoding="utf-8", errors="surrogateescape")
    except (tarfile.TarError, EOFError) as exc:
        raise CorruptArchive(f"not a readable tar archive: {exc}", source=source) from None
    try:
        it = iter(tf)
        while True:
            try:
                ti = next(it)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError) as exc:
                raise CorruptArchive(f"bad tar header at offset {tf.offset}: {exc}",
                                     source=source) from None
            name = ti.name
            if ti.issparse():
                raise UnsupportedArchive("GNU sparse files are not supported", name, source)
            if ti.isreg():
                fobj = tf.extractfile(ti)
                yield _tar_member(ti, "file", ti.size), _TarData(fobj, name, source)
            elif ti.isdir():
                yield _tar_member(ti, "dir"), None
            elif ti.issym():
                yield _tar_member(ti, "symlink", linkname=ti.linkname), None
            elif ti.islnk():
                yield _tar_member(ti, "hardlink", linkname=ti.linkname), None
            elif ti.ischr() or ti.isblk() or ti.isfifo():
                kind = "chardev" if ti.ischr() else "blockdev" if ti.isblk() else "fifo"
                yield _tar_member(ti, kind), None
            else:
                raise UnsupportedArchive(f"unsupported tar member type {ti.type!r}", name, source)
        _tar_check_end(stream, tf.offset, source)
    finally:
        tf.close()


def _tar_check_end(stream: _Input, offset: int, source: str | None) -> None:
    """Tell a proper end from a truncated or garbled header, which tarfile hides.

    tarfile's iteration ends quietly at a short or invalid header block (anywhere
    but at offset 0), so a truncated download would extract as a shorter archive.
    The block where it stopped must be end-of-archive zeros, or the archive must
    end exactly there (tar without the end blocks, which GNU tar accepts too).
    """
    if stream.pos < offset + 512:
        stream.read(offset + 512 - stream.pos)
    block = stream.recent(offset, 512)
    if block is None:  # cannot happen with KEEP well above tarfile's record size
        return
    if not block:
        return
    if len(block) < 512:
        raise CorruptArchive(f"truncated tar header at offset {offset}", source=source)
    if block.count(0) != 512:
        raise CorruptArchive(f"invalid tar header at offset {offset}", source=source)


# -- listing -----------------------------------------------------------------------


def _members(stream: _Input, fmt: str, source: str | None) -> Iterator[tuple[MemberInfo, Any]]:
    return _tar_members(stream, source) if fmt == "tar" else _cpio_members(stream, source)


def _source_label(archive: Any) -> str | None:
    return None if isinstance(archive, (bytes, bytearray, memoryview)) else str(archive)


def _close_all(stack: list[Any]) -> None:
    for f in reversed(stack):
        try:
            f.close()
        except OSError:
            pass


def archive_format(archive: Path | bytes) -> tuple[str, str]:
    """``(format, compression)`` of an archive, e.g. ``("cpio-newc", "gzip")``."""
    stack: list[Any] = []
    try:
        _, compression, fmt = _sniff(archive, stack, _source_label(archive))
        return fmt, compression
    finally:
        _close_all(stack)


def list_archive(archive: Path | bytes, *, max_members: int = DEFAULT_MAX_MEMBERS) -> list[MemberInfo]:
    """Every member's header, in archive order, names as stored (nothing is checked
    for safety here: that is :func:`extract_archive`'s job; corruption is reported)."""
    source = _source_label(archive)
    stack: list[Any] = []
    out: list[MemberInfo] = []
    try:
        stream, _, fmt = _sniff(archive, stack, source)
        for info, _data in _members(stream, fmt, source):
            out.append(info)
            if len(out) > max_members:
                raise ArchiveTooLarge(f"more than {max_members} members", info.name, source)
    finally:
        _close_all(stack)
    return out


# -- extraction --------------------------------------------------------------------


def _split_name(name: str, source: str | None) -> list[str]:
    """The member's path components below the destination ([] for the root itself)."""
    if "\0" in name:
        raise UnsafeArchive("the name contains a NUL character", name, source)
    if name.startswith("/"):
        raise UnsafeArchive("absolute path; only paths relative to the destination are "
                            "allowed", name, source)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive("'..' in the path would leave the destination", name, source)
    return parts


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass
class _Options:
    allow_devices: bool
    allow_setid: bool
    preserve_owner: bool
    max_total: int
    max_member: int | None
    max_members: int
    source: str | None


@dataclass
class _Counts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    specials: int = 0
    bytes: int = 0
    declared: int = 0
    members: int = 0


class _Extractor:
    """Creates members below ``stage`` (a fresh directory), checking every one."""

    def __init__(self, stage: Path, opts: _Options) -> None:
        self.stage = stage
        self.opts = opts
        self.counts = _Counts()
        # Regular files created, for hard links: name -> (host path, (st_dev, st_ino)).
        self.regular: dict[str, tuple[Path, tuple[int, int]]] = {}
        self.cpio_inodes: dict[tuple[int, int, int], str] = {}
        # Directories whose metadata is set at the end: host path -> (mode, mtime, uid, gid).
        self.dir_meta: dict[Path, tuple[int, float, int, int]] = {}
        self.root_meta: tuple[int, float, int, int] | None = None
        # Resolved parent directories; cleared whenever an entry is replaced, since
        # only replacing a symlink can change where a cached path leads.
        self.parents: dict[tuple[str, ...], Path] = {}
        self.owner = opts.preserve_owner and os.geteuid() == 0

    # -- checks --

    def _perm(self, mode: int) -> int:
        perm = mode & 0o7777
        if not self.opts.allow_setid:
            perm &= ~(stat.S_ISUID | stat.S_ISGID)
        return perm

    def _check_symlink_target(self, parts: list[str], target: str, name: str) -> None:
        src = self.opts.source
        if not target or "\0" in target:
            raise CorruptArchive("empty or invalid symlink target", name, src)
        where = [] if target.startswith("/") else list(parts[:-1])
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not where:
                    raise UnsafeArchive(f"symlink target {target!r} leads outside the "
                                        "destination", name, src)
                where.pop()
            else:
                where.append(comp)

    def _parent(self, parts: list[str], name: str) -> Path:
        """The host directory for a member's parent ``parts``, created if missing.

        Follows only relative symlinks that stay inside the stage; refuses a
        symlink with an absolute target, one that climbs out, or a non-directory.
        """
        key = tuple(parts)
        hit = self.parents.get(key)
        if hit is None:
            hit = _resolve_dir(self.stage, parts, name, self.opts.source, create=True)
            self.parents[key] = hit
        return hit

    # -- one member --

    def add(self, info: MemberInfo, data: Any) -> None:
        opts, c, name, src = self.opts, self.counts, info.name, self.opts.source
        c.members += 1
        if c.members > opts.max_members:
            raise ArchiveTooLarge(f"more than {opts.max_members} members", name, src)
        parts = _split_name(name, src)
        kind = info.kind
        if kind in _SPECIAL_KINDS and not opts.allow_devices:
            what = {"chardev": "character device", "blockdev": "block device"}.get(kind, kind)
            extra = f" {info.devmajor},{info.devminor}" if kind in ("chardev", "blockdev") else ""
            raise UnsafeArchive(f"{what}{extra} not allowed (devices, FIFOs and sockets "
                                "need allow_devices)", name, src)
        if kind == "file":
            if opts.max_member is not None and info.size > opts.max_member:
                raise ArchiveTooLarge(f"declares {info.size} bytes; the limit per file is "
                                      f"{opts.max_member}", name, src)
            if c.declared + info.size > opts.max_total:
                raise ArchiveTooLarge(f"declares {info.size} bytes, which brings the total to "
                                      f"{c.declared + info.size}; the limit is {opts.max_total}",
                                      name, src)
            c.declared += info.size
        if not parts:
            if kind != "dir":
                raise UnsafeArchive("the archive's '.' entry is not a directory", name, src)
            self.root_meta = (self._perm(info.mode), info.mtime, info.uid, info.gid)
            return
        parent = self._parent(parts[:-1], name)
        target = parent / parts[-1]
        key = "/".join(parts)
        existing = _lstat(target)
        if existing is not None:
            if kind == "dir" and stat.S_ISDIR(existing.st_mode):
                self.dir_meta[target] = (self._perm(info.mode), info.mtime, info.uid, info.gid)
                return
            if stat.S_ISDIR(existing.st_mode):
                raise UnsafeArchive("would replace a directory of the same name", name, src)
            os.unlink(target)  # a later member replaces an earlier one; never writes through it
            self._forget(target)
            self.parents.clear()
        if kind == "dir":
            os.mkdir(target, 0o700)
            self.dir_meta[target] = (self._perm(info.mode), info.mtime, info.uid, info.gid)
            c.dirs += 1
        elif kind == "file":
            self._file(info, data, target, key)
        elif kind == "symlink":
            assert info.linkname is not None
            self._check_symlink_target(parts, info.linkname, name)
            os.symlink(info.linkname, target)
            self._meta(target, info, link=True)
            c.symlinks += 1
        elif kind == "hardlink":
            self._hardlink(info, target, key)
        else:
            fmt = {"chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK, "fifo": stat.S_IFIFO,
                   "socket": stat.S_IFSOCK}[kind]
            rdev = os.makedev(info.devmajor, info.devminor) if kind in ("chardev", "blockdev") else 0
            try:
                os.mknod(target, fmt | 0o600, rdev)
            except PermissionError:
                raise UnsafeArchive(f"cannot create a {kind} without privilege (CAP_MKNOD)",
                                    name, src) from None
            self._meta(target, info)
            c.specials += 1

    def _forget(self, target: Path) -> None:
        for k, (p, _) in list(self.regular.items()):
            if p == target:
                del self.regular[k]

    def _file(self, info: MemberInfo, data: Any, target: Path, key: str) -> None:
        c, src = self.counts, self.opts.source
        link_to: Path | None = None
        ikey = (info.dev[0], info.dev[1], info.ino)
        if info.nlink > 1 and info.ino:  # cpio hard links share an inode number
            first = self.cpio_inodes.get(ikey)
            if first is not None and first in self.regular:
                link_to = self._linkable(first, info.name)
        if link_to is not None:
            os.link(link_to, target, follow_symlinks=False)
            c.hardlinks += 1
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if info.size else 0)
            fd = os.open(target, flags)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            c.files += 1
        try:
            written = 0
            if data is not None:
                while True:
                    chunk = data.read(CHUNK)
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > info.size or c.bytes + len(chunk) > self.opts.max_total:
                        raise ArchiveTooLarge("more data than its header declares or than the "
                                              "total limit allows", info.name, src)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    c.bytes += len(chunk)
            if written != info.size:
                raise CorruptArchive(f"truncated: {written} of {info.size} bytes", info.name, src)
            if link_to is None or info.size:
                if self.owner:
                    os.fchown(fd, info.uid, info.gid)
                os.fchmod(fd, self._perm(info.mode))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        _set_mtime(target, info.mtime)
        self.regular[key] = (target, (st.st_dev, st.st_ino))
        if info.nlink > 1 and info.ino and ikey not in self.cpio_inodes:
            self.cpio_inodes[ikey] = key

    def _linkable(self, key: str, name: str) -> Path:
        """The host path of earlier regular member ``key``, checked to be that same file."""
        path, ident = self.regular[key]
        st = _lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != ident:
            raise UnsafeArchive(f"hard link to {key!r}, which is no longer the file the archive "
                                "created", name, self.opts.source)
        return path

    def _hardlink(self, info: MemberInfo, target: Path, key: str) -> None:
        src = self.opts.source
        linkname = info.linkname or ""
        try:
            lparts = _split_name(linkname, src)
        except UnsafeArchive:
            raise UnsafeArchive(f"hard link to {linkname!r}, outside the destination",
                                info.name, src) from None
        lkey = "/".join(lparts)
        if lkey not in self.regular:
            raise UnsafeArchive(f"hard link to {linkname!r}, which is not an earlier regular "
                                "file of the archive", info.name, src)
        path = self._linkable(lkey, info.name)
        os.link(path, target, follow_symlinks=False)
        self.regular[key] = self.regular[lkey]
        self.counts.hardlinks += 1

    def _meta(self, target: Path, info: MemberInfo, link: bool = False) -> None:
        if self.owner:
            os.chown(target, info.uid, info.gid, follow_symlinks=False)
        if not link:
            os.chmod(target, self._perm(info.mode))
        _set_mtime(target, info.mtime)

    def finish(self) -> None:
        """Directory modes and mtimes last: writing into a directory changes its mtime,
        and a read-only mode would have stopped the writes."""
        for path in sorted(self.dir_meta, key=lambda p: len(p.parts), reverse=True):
            mode, mtime, uid, gid = self.dir_meta[path]
            if self.owner:
                os.chown(path, uid, gid, follow_symlinks=False)
            os.chmod(path, mode)
            _set_mtime(path, mtime)


def _set_mtime(path: Path, mtime: float) -> None:
    ns = int(mtime * 1_000_000_000)
    try:
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
    except (OverflowError, ValueError):
        pass  # an absurd mtime is not worth failing the extraction for


def _resolve_dir(base: Path, parts: list[str], name: str, source: str | None, *,
                 create: bool) -> Path:
    """Host directory for ``parts`` under ``base``, following only safe symlinks.

    A relative symlink that stays inside ``base`` is followed (``lib -> usr/lib``);
    an absolute one or one that climbs out is refused, as is a component that is
    not a directory.  Missing directories are created (0755) when ``create``.
    """
    pending = list(reversed(parts))
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":  # only ever from a symlink target
            if not resolved:
                raise UnsafeArchive("a symlink in its path leads outside the destination",
                                    name, source)
            resolved.pop()
            continue
        candidate = base.joinpath(*resolved, part)
        st = _lstat(candidate)
        if st is None:
            if not create:
                raise UnsafeArchive(f"'{'/'.join(resolved + [part])}' does not exist", name, source)
            os.mkdir(candidate, 0o755)
            os.chmod(candidate, 0o755)
            resolved.append(part)
            continue
        if stat.S_ISDIR(st.st_mode):
            resolved.append(part)
            continue
        shown = "/".join(resolved + [part])
        if not stat.S_ISLNK(st.st_mode):
            raise UnsafeArchive(f"'{shown}' in its path is not a directory", name, source)
        target = os.readlink(candidate)
        if target.startswith("/"):
            raise UnsafeArchive(f"refusing to write through symlink '{shown}' -> '{target}' "
                                "(an absolute target)", name, source)
        links += 1
        if links > MAX_SYMLINKS:
            raise UnsafeArchive("too many levels of symbolic links in its path", name, source)
        pending.extend(reversed(target.split("/")))
    return base.joinpath(*resolved)


def _mkdtemp(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        path = parent / f"{prefix}{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {parent}")


def _remove_tree(path: Path) -> None:
    import shutil

    def onerror(func: Any, p: str, exc: Any) -> None:
        try:  # a read-only directory extracted earlier: make it writable and retry once
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)


def extract_archive(
    archive: Path | bytes,
    dest: Path,
    *,
    allow_devices: bool = False,
    allow_setid: bool = False,
    preserve_owner: bool = False,
    max_total: int = DEFAULT_MAX_TOTAL,
    max_member: int | None = None,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> ExtractResult:
    """Extract a cpio or tar archive (plain or compressed) into ``dest``, safely.

    See the module documentation for the rules and the all-or-nothing behaviour.
    Raises :class:`UnsafeArchive` (:class:`ArchiveTooLarge`), :class:`CorruptArchive`,
    :class:`UnsupportedArchive` or :class:`ArchiveError` (an I/O problem; ``OSError``
    from the destination is wrapped so callers get one line naming the member).
    """
    source = _source_label(archive)
    dest = Path(dest)
    opts = _Options(allow_devices=allow_devices, allow_setid=allow_setid,
                    preserve_owner=preserve_owner, max_total=max_total, max_member=max_member,
                    max_members=max_members, source=source)
    fresh = not os.path.lexists(dest)
    stack: list[Any] = []
    stage: Path | None = None
    member: str | None = None
    made_parents: list[Path] = []  # removed again on failure: nothing left outside dest
    ok = False
    try:
        stream, compression, fmt = _sniff(archive, stack, source)
        if fresh:
            missing = dest.parent
            while not os.path.lexists(missing) and missing != missing.parent:
                made_parents.append(missing)
                missing = missing.parent
            dest.parent.mkdir(parents=True, exist_ok=True)
            stage = _mkdtemp(dest.parent, f".{dest.name}.extract-")
        else:
            if not dest.is_dir():
                raise ArchiveError(f"destination {dest} exists and is not a directory",
                                   source=source)
            stage = _mkdtemp(dest, ".supercharge-extract-")
        ex = _Extractor(stage, opts)
        for info, data in _members(stream, fmt, source):
            member = info.name
            ex.add(info, data)
        member = None
        ex.finish()
        if fresh:
            mode, mtime, uid, gid = ex.root_meta or (0o755, 0.0, 0, 0)
            if ex.owner and ex.root_meta:
                os.chown(stage, uid, gid)
            os.chmod(stage, mode)
            os.rename(stage, dest)
            stage = None
            if ex.root_meta:
                _set_mtime(dest, mtime)
        else:
            _merge(stage, dest, [], source)
        c = ex.counts
        ok = True
        return ExtractResult(files=c.files, dirs=c.dirs, symlinks=c.symlinks, bytes=c.bytes,
                             hardlinks=c.hardlinks, specials=c.specials, format=fmt,
                             compression=compression)
    except OSError as exc:
        raise ArchiveError(f"cannot extract: {exc.strerror or exc}"
                           + (f" ({exc.filename})" if exc.filename else ""),
                           member, source) from None
    finally:
        _close_all(stack)
        if stage is not None:
            _remove_tree(stage)
        if not ok:
            for parent in made_parents:
                try:
                    os.rmdir(parent)
                except OSError:
                    break


def _merge(src_dir: Path, dst_dir: Path, rel: list[str], source: str | None) -> None:
    """Move the staged tree ``src_dir`` into the existing ``dst_dir`` (see module doc)."""
    for entry in sorted(os.scandir(src_dir), key=lambda e: e.name):
        name = entry.name
        shown = "/".join(rel + [name])
        src = Path(entry.path)
        dst = dst_dir / name
        st = _lstat(dst)
        if entry.is_dir(follow_symlinks=False):
            if st is None:
                os.rename(src, dst)
            elif stat.S_ISDIR(st.st_mode):
                _merge(src, dst, rel + [name], source)
            elif stat.S_ISLNK(st.st_mode):
                real = _resolve_dir(dst_dir, [name], shown, source, create=False)
                _merge(src, real, rel + [name], source)
            else:
                os.unlink(dst)
                os.rename(src, dst)
        else:
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise UnsafeArchive("the destination has a directory where the archive has a "
                                    "file", shown, source)
            os.replace(src, dst)
