"""Store artifacts at URIs, and fetch them into a per-invocation cache, for dom0.

Container processing moves files both ways: ``[create]`` and ``fork`` store an
archive at a URI (``file://``, ``ftp://`` as in the paper, or an HTTP PUT), and
``[replace]``, ``[populate]``, ``[patch]`` fetch archives and patches.  Fetching
reuses the guest's :func:`guest_init.fetch.fetch` (one implementation of retries,
pins and size limits on both sides); this module adds what only dom0 needs:

- storing, atomically where the protocol allows it: a temporary name and then a
  rename (``os.replace`` locally, RNFR/RNTO over FTP), so a reader never sees half
  an archive; HTTP PUT is as atomic as the server makes it;
- a cache that fetches each URI once per invocation (a container file that names
  one base archive for 100 domains downloads it once), invalidated when this
  process stores to that URI;
- a progress bar on a terminal, and errors as :class:`dom0.errors.UserError`
  (bad URI, 404, wrong pin) or :class:`dom0.errors.EnvironmentProblem` (server
  down or failing after the retries), one line naming the URI.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dom0.errors import EnvironmentProblem, UserError
from guest_init.fetch import (
    CHUNK,
    DEFAULT_TIMEOUT,
    FetchError,
    FetchResult,
    PermanentError,
    TransientError,
    fetch,
    ftp_classify,
    ftp_connect,
    ftp_path,
    redact,
)


@dataclass(frozen=True)
class StoreResult:
    """What was stored: the URI (password masked), its size and SHA-256 (hex)."""

    uri: str
    size: int
    sha256: str


# -- storing -----------------------------------------------------------------------


class _HashingReader:
    """A file wrapper that hashes what is read from it, and knows its length.

    ``__len__`` lets requests send a Content-Length instead of chunked encoding,
    which simple servers (and ``http.server``-based ones) do not accept for PUT.
    """

    def __init__(self, f: Any, size: int) -> None:
        self.f = f
        self.size = size
        self.hash = hashlib.sha256()
        self.sent = 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.hash.update(chunk)
        self.sent += len(chunk)
        return chunk


def _store_file(source: Path, uri: str, parts: Any) -> tuple[int, str]:
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"cannot store to {redact(uri)}: file:// URIs must be local "
                        f"(file:///path), not on host {parts.netloc!r}")
    path = Path(unquote(parts.path)) if parts.scheme else Path(uri)
    if not path.is_absolute() or not path.name:
        raise UserError(f"cannot store to {uri}: expected an absolute file path (file:///path)")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise UserError(f"cannot store to {uri}: {path} is a directory")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        tmp = path.parent / f".{path.name}.{os.urandom(4).hex()}.part"
        fd = os.open(tmp, flags, 0o644)
        h = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchmod(fd, 0o644)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return size, h.hexdigest()
    except OSError as exc:
        raise UserError(f"cannot store to {uri}: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if exc.filename else "")) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _ftp_cd_creating(ftp: Any, directory: str) -> None:
    """CWD into ``directory`` (relative to the login directory unless absolute),
    creating each missing component with MKD, as ``mkdir -p`` would."""
    import ftplib

    if directory.startswith("/"):
        ftp.cwd("/")
    for comp in [c for c in directory.split("/") if c]:
        try:
            ftp.cwd(comp)
        except ftplib.error_perm:
            try:
                ftp.mkd(comp)
            except ftplib.error_perm:
                pass  # created meanwhile, or not allowed: the CWD below says which
            ftp.cwd(comp)


def _store_ftp_once(source: Path, parts: Any, size: int, timeout: float) -> str:
    import ftplib

    path = ftp_path(parts)
    directory, _, name = path.rpartition("/")
    tmp = f".{name}.{os.urandom(4).hex()}.part"
    ftp = ftp_connect(parts, timeout)
    tmp_exists = False  # so a failed transfer or rename does not leave the temporary file
    try:
        if directory or path.startswith("/"):
            _ftp_cd_creating(ftp, directory or "/")
        with open(source, "rb") as f:
            reader = _HashingReader(f, size)
            tmp_exists = True
            conn = ftp.transfercmd(f"STOR {tmp}")
            try:
                while chunk := reader.read(CHUNK):
                    conn.sendall(chunk)
            finally:
                conn.close()
            ftp.voidresp()
        try:
            ftp.rename(tmp, name)
        except ftplib.error_perm:
            # Some servers refuse to rename over an existing file: remove it, then rename.
            try:
                ftp.delete(name)
            except ftplib.error_perm:
                pass
            ftp.rename(tmp, name)
        tmp_exists = False
        try:
            ftp.quit()
        except ftplib.all_errors:
            pass
        return reader.hash.hexdigest()
    except BaseException:
        if tmp_exists:
            try:
                ftp.delete(tmp)
            except ftplib.all_errors:
                pass
        raise
    finally:
        ftp.close()


def _store_ftp(source: Path, parts: Any, size: int, timeout: float) -> str:
    import ftplib

    try:
        return _store_ftp_once(source, parts, size, timeout)
    except (TransientError, PermanentError):
        raise
    except ftplib.all_errors as exc:  # includes OSError and EOFError
        raise ftp_classify(exc) from None


def _store_http(source: Path, uri: str, size: int, timeout: float, ca_bundle: str | None) -> str:
    import requests

    try:
        with open(source, "rb") as f:
            reader = _HashingReader(f, size)
            resp = requests.put(uri, data=reader, timeout=(timeout, timeout),
                                headers={"Content-Type": "application/octet-stream",
                                         "User-Agent": "supercharge-store"},
                                verify=ca_bundle if ca_bundle else True)
            resp.close()
    except requests.exceptions.SSLError as exc:
        raise PermanentError(f"TLS error: {' '.join(str(exc).split())}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        text = " ".join(str(exc).split())
        raise TransientError("connection refused" if "refused" in text.lower() else text) from None
    except requests.exceptions.RequestException as exc:
        raise PermanentError(" ".join(str(exc).split())) from None
    status = resp.status_code
    if not 200 <= status <= 299:
        reason = f"HTTP {status} {resp.reason or ''}".rstrip()
        if status in (408, 429) or status >= 500:
            raise TransientError(reason)
        raise PermanentError(reason)
    if reader.sent != size:
        raise TransientError(f"sent {reader.sent} of {size} bytes (the file changed?)")
    return reader.hash.hexdigest()


def store(
    source: Path,
    uri: str,
    *,
    retries: int = 2,
    backoff: float = 0.5,
    timeout: float = DEFAULT_TIMEOUT,
    ca_bundle: str | None = None,
) -> StoreResult:
    """Store the file ``source`` at ``uri``; return its size and SHA-256.

    ``file://`` (or a plain absolute path): temporary file beside the target, then
    rename; missing parent directories are created.  ``ftp://``: STOR to a
    temporary name in the target directory (created with MKD where missing), then
    RNFR/RNTO.  ``http(s)://``: PUT, any 2xx is success.  Network failures that
    another try might cure are retried ``retries`` times with exponential
    ``backoff``.  Raises :class:`UserError` naming the URI (an
    :class:`EnvironmentProblem` when the server stayed unreachable or failing).
    """
    shown = redact(uri)
    source = Path(source)
    try:
        st = source.stat()
    except OSError as exc:
        raise UserError(f"cannot store {source} to {shown}: {exc.strerror or exc}") from None
    if not source.is_file():
        raise UserError(f"cannot store {source} to {shown}: not a regular file")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise UserError(f"cannot store to {shown}: malformed URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if not scheme and not uri.startswith("/"):
            raise UserError(f"cannot store to {uri}: expected a URI (file://, ftp://, http://, "
                            "https://) or an absolute path")
        size, digest = _store_file(source, uri, parts)
        forget(uri)
        return StoreResult(uri=shown, size=size, sha256=digest)
    if scheme == "ftp":
        if not parts.hostname:
            raise UserError(f"cannot store to {shown}: the URI has no host")
        def attempt() -> str:
            return _store_ftp(source, parts, st.st_size, timeout)
    elif scheme in ("http", "https"):
        if not parts.hostname:
            raise UserError(f"cannot store to {shown}: the URI has no host")
        def attempt() -> str:
            return _store_http(source, uri, st.st_size, timeout, ca_bundle)
    else:
        raise UserError(f"cannot store to {shown}: unsupported scheme {parts.scheme!r} "
                        "(supported: file, ftp, http, https)")
    tries = 0
    while True:
        tries += 1
        try:
            digest = attempt()
            break
        except PermanentError as exc:
            raise UserError(f"cannot store to {shown}: {exc}") from None
        except TransientError as exc:
            if tries > retries:
                plural = "" if tries == 1 else "s"
                raise EnvironmentProblem(f"cannot store to {shown} ({tries} attempt{plural}): "
                                         f"{exc}") from None
        time.sleep(backoff * (2 ** (tries - 1)))
    forget(uri)
    return StoreResult(uri=shown, size=st.st_size, sha256=digest)


# -- fetching into the cache -------------------------------------------------------

#: What this process fetched: (cache dir, URI) -> result.  Per invocation on purpose:
#: a later run must see a changed base archive, while one run must not download the
#: same archive for every domain it derives from it.
_FETCHED: dict[tuple[str, str], FetchResult] = {}


def forget(uri: str) -> None:
    """Drop ``uri`` from the per-invocation cache (after storing to it, say)."""
    for key in [k for k in _FETCHED if k[1] == uri]:
        del _FETCHED[key]


def clear_fetch_cache() -> None:
    """Forget everything fetched in this process (tests, long-running callers)."""
    _FETCHED.clear()


def _cache_name(uri: str) -> str:
    """A file name for ``uri`` in the cache: a hash (unique) plus the URI's base name
    (readable, and keeps the extension for whoever looks at the directory)."""
    try:
        base = unquote(urlsplit(uri).path).rstrip("/").rpartition("/")[2]
    except ValueError:
        base = ""
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[-80:].lstrip(".")
    key = hashlib.sha256(uri.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{key}-{base or 'download'}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class _ProgressLine:
    """A carriage-return progress line on stderr, at most ten updates a second."""

    def __init__(self, label: str, stream: Any) -> None:
        self.label = label
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and (total is None or done < total):
            return
        self.last = now
        if total:
            text = f"{self.label}: {_human(done)} / {_human(total)} ({100 * done // total}%)"
        else:
            text = f"{self.label}: {_human(done)}"
        self.stream.write("\r" + text[:150].ljust(60))
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 150 + "\r")
            self.stream.flush()


class _TqdmProgress:
    def __init__(self, label: str, tqdm: Any) -> None:
        self.bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def __call__(self, done: int, total: int | None) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        if done < self.bar.n:  # a retry starts over
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _progress_for(uri: str, stream: Any = None) -> Any:
    """A progress callback for ``uri``, or None when stderr is not a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    label = redact(uri).rstrip("/").rpartition("/")[2] or redact(uri)
    try:
        from tqdm import tqdm  # optional: nicer, if the admin has it
    except ImportError:
        return _ProgressLine(label, stream)
    return _TqdmProgress(label, tqdm)


def fetch_to_cache_result(
    uri: str,
    cache_dir: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    ca_bundle: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> FetchResult:
    """Like :func:`fetch_to_cache`, returning the whole :class:`FetchResult`
    (size and SHA-256, which plans pin; ``attempts == 0`` when it came from the cache)."""
    cache_dir = Path(cache_dir)
    key = (str(cache_dir.resolve()), uri)
    hit = _FETCHED.get(key)
    if hit is not None and hit.path.is_file():
        want = sha256.strip().lower() if sha256 else None
        if want is not None and hit.sha256 != want:
            raise UserError(f"{hit.uri}: SHA-256 mismatch: expected {want}, got {hit.sha256}")
        return FetchResult(uri=hit.uri, path=hit.path, size=hit.size, sha256=hit.sha256,
                           attempts=0, seconds=0.0)
    bar = _progress_for(uri) if progress else None
    try:
        result = fetch(uri, cache_dir / _cache_name(uri), sha256=sha256, max_bytes=max_bytes,
                       deadline=deadline, retries=retries, backoff=backoff, progress=bar,
                       ca_bundle=ca_bundle, timeout=timeout)
    except FetchError as exc:
        if exc.transient:
            raise EnvironmentProblem(str(exc)) from None
        raise UserError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    _FETCHED[key] = result
    return result


def fetch_to_cache(uri: str, cache_dir: Path, **kw: Any) -> Path:
    """The local path of ``uri``'s content, fetched into ``cache_dir`` once per invocation.

    Keyword arguments are those of :func:`fetch_to_cache_result` (``sha256``,
    ``max_bytes``, ``deadline``, ``retries``, ``backoff``, ``ca_bundle``,
    ``timeout``, ``progress``).  ``file://`` URIs are copied too, so the caller may
    modify or delete the cached file without touching the original.  Raises
    :class:`UserError` (404, wrong pin, too large, bad URI) or
    :class:`EnvironmentProblem` (server unreachable or failing after the retries),
    one line naming the URI.
    """
    return fetch_to_cache_result(uri, cache_dir, **kw).path
