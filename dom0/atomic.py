"""Writing dom0's outputs (initrds, configs, plans, keys, signatures, reports) atomically.

One implementation for all of them: a reader, or a second run, sees the old
file or the new one, never half of one, and a failure leaves nothing behind.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _write_chunks(out, chunks: Iterable[bytes | Path]) -> None:
    """Bytes are written; a Path is copied in the kernel (copy_file_range), not through Python."""
    for chunk in chunks:
        if isinstance(chunk, Path):
            out.flush()
            with open(chunk, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                done = 0
                while done < size:
                    try:
                        n = os.copy_file_range(src.fileno(), out.fileno(), size - done)
                    except OSError:
                        n = 0
                    if n == 0:   # not supported here: plain copy
                        src.seek(done)
                        out.seek(0, os.SEEK_END)
                        out.write(src.read())
                        break
                    done += n
            out.seek(0, os.SEEK_END)
        elif chunk:
            out.write(chunk)


def write_atomically(path: Path, chunks: Iterable[bytes | Path], mode: int = 0o644) -> None:
    """Never leave a half-written file at ``path``: temporary file, fsync, rename.

    The temporary file is made 0600 and given ``mode`` before any byte is written,
    so a secret key is never readable on the way.  A device such as /dev/null is
    written in place: a rename would replace the node.
    """
    if path.exists() and not path.is_file() and not path.is_dir():
        with open(path, "wb") as out:
            _write_chunks(out, chunks)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            _write_chunks(out, chunks)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
