"""Compression of initramfs archives in formats the Linux kernel unpacks itself.

Why these settings: the kernel's decompressors are not the user-space tools.
- zstd: one frame with its content size and no dictionary; a checksum is fine.
  Multithreaded compression (``threads=-1``) still produces one frame, and its
  output does not depend on the number of CPUs, so builds stay reproducible.
- gzip: ``mtime=0`` so the same archive gives the same bytes.
- xz: the kernel's XZ decoder supports only CRC32 or no integrity check (not the
  CRC64 that ``xz``/``lzma`` use by default), and only the .xz container.
``decompress``/``decompress_stream`` sniff the magic bytes and exist for tests and
for checking a built initrd.
"""
from __future__ import annotations

import gzip
import lzma
import zlib

from dom0.errors import UserError

METHODS: tuple[str, ...] = ("zstd", "gzip", "xz", "none")

DEFAULT_LEVELS: dict[str, int] = {"zstd": 19, "gzip": 9, "xz": 6}

# A compressed initrd segment is padded with zeros to this size. Why: the kernel
# looks for a plain cpio archive after a compressed stream only at a 4-byte aligned
# offset of the whole initrd; a gzip or zstd stream has any length, so a per-domain
# archive appended right after it fails with "invalid magic at start of compressed
# archive" (measured: the plan silently missing at boot). 512 keeps every segment
# block-aligned too.
SEGMENT_ALIGN = 512

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"


def _zstandard():
    """Import zstandard lazily: only the zstd method needs it."""
    try:
        import zstandard
    except ImportError:  # pragma: no cover - depends on the installation
        from dom0.errors import EnvironmentProblem

        raise EnvironmentProblem(
            "zstd compression needs the 'zstandard' package (pip install 'supercharge[initrd]')"
        ) from None
    return zstandard


def check_method(method: str) -> str:
    """Return ``method`` if it is one we support, else a one-line UserError."""
    if method not in METHODS:
        raise UserError(f"unknown compression {method!r}: choose one of {', '.join(METHODS)}")
    return method


LEVEL_RANGES = {"zstd": (1, 22), "gzip": (0, 9), "xz": (0, 9)}


def compress(data: bytes, method: str, level: int | None = None) -> bytes:
    """Compress ``data`` as one stream of ``method`` that the kernel's initramfs unpacker accepts."""
    check_method(method)
    if method == "none":
        return bytes(data)
    lvl = DEFAULT_LEVELS[method] if level is None else int(level)
    low, high = LEVEL_RANGES[method]
    if not low <= lvl <= high:
        raise UserError(f"compression level {lvl} is out of range for {method}: expected {low} to {high}")
    if method == "zstd":
        return _compress_zstd(data, lvl)
    if method == "gzip":
        return gzip.compress(data, compresslevel=lvl, mtime=0)
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=lvl)


def compress_segment(data: bytes, method: str, level: int | None = None) -> bytes:
    """``compress`` plus zero padding to a multiple of SEGMENT_ALIGN, so that the
    result can be followed by another (plain or compressed) segment of the initrd."""
    packed = compress(data, method, level)
    return packed + b"\0" * ((-len(packed)) % SEGMENT_ALIGN)


def _compress_zstd(data: bytes, level: int) -> bytes:
    zstandard = _zstandard()
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise UserError(f"zstd level {level} out of range 1..{zstandard.MAX_COMPRESSION_LEVEL}")
    compressor = zstandard.ZstdCompressor(
        level=level, write_content_size=True, write_checksum=True, write_dict_id=False, threads=-1,
    )
    return compressor.compress(data)


def sniff(data: bytes) -> str:
    """The method whose magic starts ``data``; "none" for anything else (plain data)."""
    if data.startswith(ZSTD_MAGIC):
        return "zstd"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if data.startswith(XZ_MAGIC):
        return "xz"
    return "none"


def decompress_stream(data: bytes) -> tuple[bytes, int]:
    """Decompress the one stream at the start of ``data``; return it and the bytes consumed.

    Why the count: an initrd is a sequence of segments (compressed base, plain
    per-domain archive), and the caller continues after this stream.
    A plain cpio archive is returned whole with everything consumed.
    """
    method = sniff(data)
    if method == "none":
        return bytes(data), len(data)
    errors: tuple[type[Exception], ...] = (lzma.LZMAError, zlib.error, EOFError)
    if method == "zstd":
        zstandard = _zstandard()
        errors += (zstandard.ZstdError,)
        obj = zstandard.ZstdDecompressor().decompressobj()
    elif method == "gzip":
        obj = zlib.decompressobj(wbits=31)
    else:
        obj = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = obj.decompress(data)
        if method == "gzip":
            out += obj.flush()
    except errors as exc:
        raise UserError(f"corrupt {method} data: {exc}") from None
    if not obj.eof:
        raise UserError(f"truncated {method} data")
    return out, len(data) - len(obj.unused_data)


def decompress(data: bytes) -> bytes:
    """Decompress one zstd, gzip or xz stream (or return plain data), sniffing the magic."""
    out, _ = decompress_stream(data)
    return out
