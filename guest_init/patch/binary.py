"""Git's binary patch encoding: base85 lines, deltas, and blob hashes.

``git diff --binary`` writes a changed binary file as zlib-deflated data,
either the whole new content (``literal``) or copy/insert instructions
against the old content (``delta``), in lines of base85 text whose first
character gives the decoded length.  The ``index OLD..NEW`` line carries the
git blob hashes of both versions (``--binary`` implies ``--full-index``), which
is how a binary patch is checked against the file it is applied to: unlike
text, there is no context to compare.

Only imported when a patch contains binary data.
"""
from __future__ import annotations

import hashlib

_B85 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
_B85_VALUE = {c: i for i, c in enumerate(_B85)}


def decode_base85_line(line: bytes) -> bytes:
    """One data line: a length character (A-Z = 1-26, a-z = 27-52) and base85 groups."""
    if not line:
        raise ValueError("empty line")
    c = line[0]
    if 65 <= c <= 90:
        length = c - 64
    elif 97 <= c <= 122:
        length = c - 96 + 26
    else:
        raise ValueError(f"bad length character {chr(c)!r}")
    body = line[1:]
    if len(body) % 5 or len(body) // 5 * 4 < length:
        raise ValueError(f"{len(body)} base85 characters cannot hold {length} bytes")
    out = bytearray()
    for k in range(0, len(body), 5):
        acc = 0
        for ch in body[k:k + 5]:
            value = _B85_VALUE.get(ch)
            if value is None:
                raise ValueError(f"bad base85 character {chr(ch)!r}")
            acc = acc * 85 + value
        if acc > 0xFFFFFFFF:
            raise ValueError("base85 group out of range")
        out += acc.to_bytes(4, "big")
    return bytes(out[:length])


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("delta header ends early")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def apply_delta(source: bytes, delta: bytes) -> bytes:
    """Git's delta format (patch-delta.c): sizes, then copy-from-source and insert opcodes.

    Raises ``ValueError`` if the delta does not describe ``source``.
    """
    src_size, pos = _varint(delta, 0)
    if src_size != len(source):
        raise ValueError(f"delta expects a {src_size}-byte original, the file has {len(source)} bytes")
    dst_size, pos = _varint(delta, pos)
    out = bytearray()
    end = len(delta)
    while pos < end:
        cmd = delta[pos]
        pos += 1
        if cmd & 0x80:
            offset = size = 0
            for bit, shift in ((0x01, 0), (0x02, 8), (0x04, 16), (0x08, 24)):
                if cmd & bit:
                    if pos >= end:
                        raise ValueError("delta copy instruction ends early")
                    offset |= delta[pos] << shift
                    pos += 1
            for bit, shift in ((0x10, 0), (0x20, 8), (0x40, 16)):
                if cmd & bit:
                    if pos >= end:
                        raise ValueError("delta copy instruction ends early")
                    size |= delta[pos] << shift
                    pos += 1
            if size == 0:
                size = 0x10000
            if offset + size > len(source):
                raise ValueError("delta copies beyond the end of the original")
            out += source[offset:offset + size]
        elif cmd:
            if pos + cmd > end:
                raise ValueError("delta insert instruction ends early")
            out += delta[pos:pos + cmd]
            pos += cmd
        else:
            raise ValueError("delta contains the reserved opcode 0")
    if len(out) != dst_size:
        raise ValueError(f"delta produced {len(out)} bytes, its header says {dst_size}")
    return bytes(out)


def blob_hash(content: bytes) -> str:
    """Git's object id of ``content`` as a blob (SHA-1 of ``blob LEN\\0`` + content)."""
    h = hashlib.sha1(b"blob %d\0" % len(content))
    h.update(content)
    return h.hexdigest()


def full_hash(value: str | None) -> str | None:
    """``value`` if it is a full 40-digit SHA-1 (``--full-index``), else None."""
    if value and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value
    return None
