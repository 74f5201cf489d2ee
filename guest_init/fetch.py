"""Retrieve an artifact by URI into a file, verified, with bounded retries.

One fetcher for both sides: the agent's ``fetch`` stage pulls patches, files and
hooks at boot, and dom0 (``dom0.store.fetch_to_cache``) pulls the archives and
images a container file names.  Both need the same guarantees, so they live here:

- The destination is never half-written: bytes stream into a temporary file beside
  ``dest`` (same file system, so the final ``os.replace`` is atomic) and the SHA-256
  is computed on the way, so a pinned artifact is checked without reading it twice.
- Retries only where another try can help (refused or reset connections, timeouts,
  HTTP 5xx/408/429, FTP 4xx "temporary" replies), with exponential backoff, and
  never past an absolute ``deadline``: a boot has a time budget, and a 404 or a
  wrong pin will not get better by waiting.
- Failures are exceptions that carry what a boot report needs (URI, attempts, last
  error) in one line, with any password in the URI masked.

Import cost matters inside the frozen PID 1: only the standard library is imported
here at module level; ``requests`` is imported when an ``http(s)://`` URI is first
fetched and ``ftplib`` when an ``ftp://`` one is, so a boot that fetches nothing
over the network never pays for either.
"""
from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import SplitResult, unquote, urlsplit

#: Bytes per read; large enough for throughput, small enough to stop soon after a limit.
CHUNK = 64 * 1024

#: Per-operation socket timeout (connect, each read) when no deadline is closer.
DEFAULT_TIMEOUT = 30.0

#: Default size limit of :func:`fetch_bytes`, which holds the whole artifact in memory.
SMALL_LIMIT = 16 * 1024 * 1024

#: Longest ``Retry-After`` we honour, in seconds; a server asking for more gets our backoff.
MAX_RETRY_AFTER = 30.0

Progress = Callable[[int, int | None], None]


# -- errors -------------------------------------------------------------------------


class FetchError(Exception):
    """An artifact could not be retrieved.

    ``uri`` (password masked), ``attempts`` (0 when the deadline had passed before
    the first one) and ``last_error`` (one line) are kept as attributes so the boot
    report can carry them as fields, not only as text.  ``transient`` says whether
    the last failure was of a kind that a later try might cure (server down,
    timeout), as opposed to a definite answer (404, wrong pin): dom0 maps the first
    to an environment problem and the second to bad input.
    """

    def __init__(self, uri: str, attempts: int, last_error: str, *, transient: bool = False,
                 message: str | None = None) -> None:
        self.uri = uri
        self.attempts = attempts
        self.last_error = last_error
        self.transient = transient
        if message is None:
            plural = "" if attempts == 1 else "s"
            message = f"cannot fetch {uri} ({attempts} attempt{plural}): {last_error}"
        super().__init__(message)


class PinMismatch(FetchError):
    """The content's SHA-256 is not the pinned one (the downloaded bytes were discarded)."""

    def __init__(self, uri: str, expected: str, got: str, attempts: int = 1) -> None:
        self.expected = expected
        self.got = got
        super().__init__(
            uri, attempts, f"SHA-256 mismatch: expected {expected}, got {got}",
            message=f"{uri}: SHA-256 mismatch: expected {expected}, got {got}",
        )


class TooLarge(FetchError):
    """The artifact is larger than its limit; reading stopped as soon as that was known."""

    def __init__(self, uri: str, limit: int, seen: int, attempts: int = 1, *,
                 declared: bool = False) -> None:
        self.limit = limit
        self.seen = seen
        what = f"declares {seen} bytes" if declared else f"exceeds {limit} bytes (read {seen})"
        super().__init__(
            uri, attempts, f"too large: {what}; the limit is {limit} bytes",
            message=f"{uri}: too large: {what}; the limit is {limit} bytes",
        )


@dataclass(frozen=True)
class FetchResult:
    """What was fetched: where it now is, how big, its SHA-256 (hex), and what it took."""

    uri: str
    path: Path
    size: int
    sha256: str
    attempts: int
    seconds: float


# -- internal outcome of one attempt ------------------------------------------------


class TransientError(Exception):
    """One attempt failed in a way that another attempt might not (public so that
    ``dom0.store`` classifies FTP and HTTP failures exactly as fetching does)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """One attempt got a definite answer (not found, forbidden, bad URI): do not retry.

    The message is one line without the URI; :class:`FetchError` adds it."""


class _DeadlinePassed(Exception):
    """The overall deadline passed in the middle of a transfer."""


def redact(uri: str) -> str:
    """``uri`` with the password (if any) replaced by ``***``, for messages and reports."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (requests nests reasons in long reprs)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:297] + "..."
    return text


# -- sinks: where bytes go, with hashing, limits, progress and the deadline --------


class _Sink:
    """Counts, hashes and stores one attempt's bytes, enforcing the size limit and deadline.

    ``restart`` begins a fresh attempt (partial bytes of a failed attempt are dropped,
    not resumed: a restart is simpler than ranges and works with every scheme).
    """

    def __init__(self, uri: str, max_bytes: int | None, deadline: float | None,
                 progress: Progress | None) -> None:
        self.uri = uri
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.progress = progress
        self.size = 0
        self.total: int | None = None
        self.hash = hashlib.sha256()

    def restart(self) -> None:
        self.size = 0
        self.total = None
        self.hash = hashlib.sha256()

    def start(self, total: int | None) -> None:
        """The transfer began; ``total`` is the announced size, if any."""
        self.total = total
        if total is not None and self.max_bytes is not None and total > self.max_bytes:
            raise TooLarge(self.uri, self.max_bytes, total, declared=True)
        if self.progress is not None:
            self.progress(0, total)

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLarge(self.uri, self.max_bytes, self.size)
        self.hash.update(chunk)
        self._store(chunk)
        if self.progress is not None:
            self.progress(self.size, self.total)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _DeadlinePassed()

    def _store(self, chunk: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _FileSink(_Sink):
    """Streams into a fresh temporary file beside ``dest``; :meth:`commit` renames it."""

    def __init__(self, dest: Path, *args: Any) -> None:
        super().__init__(*args)
        self.dest = dest
        self.tmp: Path | None = None
        self.fd = -1

    def open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(100):
            tmp = self.dest.parent / f".{self.dest.name}.{os.urandom(4).hex()}.part"
            try:
                self.fd = os.open(tmp, flags, 0o600)
            except FileExistsError:
                continue
            self.tmp = tmp
            return
        raise FileExistsError(f"no free temporary name beside {self.dest}")

    def restart(self) -> None:
        super().restart()
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def _store(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]

    def commit(self) -> None:
        """Make the temporary file ``dest``: flushed, readable (0644), renamed."""
        os.fchmod(self.fd, 0o644)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        assert self.tmp is not None
        os.replace(self.tmp, self.dest)
        self.tmp = None

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class _BytesSink(_Sink):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.parts: list[bytes] = []

    def restart(self) -> None:
        super().restart()
        self.parts = []

    def _store(self, chunk: bytes) -> None:
        self.parts.append(bytes(chunk))


# -- schemes -----------------------------------------------------------------------


def _local_path(uri: str, parts: SplitResult) -> Path:
    """The local path of a ``file://`` URI or a plain absolute path."""
    if not parts.scheme:
        return Path(uri)
    if parts.netloc not in ("", "localhost"):
        raise PermanentError(f"file:// URI names host {parts.netloc!r}; only local files are supported")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise PermanentError("file:// URI needs an absolute path (file:///path)")
    return Path(path)


def _get_file(uri: str, parts: SplitResult, sink: _Sink, timeout: float,
              ca_bundle: str | None) -> None:
    path = _local_path(uri, parts)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise PermanentError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise PermanentError(f"is a directory: {path}") from None
    except OSError as exc:
        raise PermanentError(f"cannot open {path}: {exc.strerror or exc}") from None
    with f:
        try:
            st = os.fstat(f.fileno())
            sink.start(st.st_size if stat.S_ISREG(st.st_mode) else None)
            while chunk := f.read(CHUNK):
                sink.write(chunk)
        except OSError as exc:
            raise PermanentError(f"cannot read {path}: {exc.strerror or exc}") from None


#: HTTP statuses worth another try: request timeout, too many requests, server errors.
def _http_transient(status: int) -> bool:
    return status in (408, 425, 429) or 500 <= status <= 599


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP date: not worth parsing for a bounded retry loop
    return max(0.0, seconds)


def _get_http(uri: str, parts: SplitResult, sink: _Sink, timeout: float,
              ca_bundle: str | None) -> None:
    import requests  # lazily: about 1 s of import time under TCG, only for http(s)

    if not parts.hostname:
        raise PermanentError("the URI has no host")
    # identity: hash exactly the bytes the server stores, not a re-encoding of them.
    headers = {"Accept-Encoding": "identity", "User-Agent": "supercharge-fetch"}
    try:
        with requests.get(uri, stream=True, timeout=(timeout, timeout), headers=headers,
                          verify=ca_bundle if ca_bundle else True) as resp:
            status = resp.status_code
            if not 200 <= status <= 299:
                reason = f"HTTP {status} {resp.reason or ''}".rstrip()
                if _http_transient(status):
                    raise TransientError(reason, _retry_after(resp.headers.get("Retry-After")))
                raise PermanentError(reason)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            sink.start(total)
            for chunk in resp.iter_content(CHUNK):
                sink.write(chunk)
            if total is not None and sink.size != total:
                raise TransientError(f"short read: {sink.size} of {total} bytes")
    except (TransientError, PermanentError, TooLarge, _DeadlinePassed):
        raise
    except requests.exceptions.SSLError as exc:
        raise PermanentError(f"TLS error: {_one_line(exc)}") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema, requests.exceptions.TooManyRedirects) as exc:
        raise PermanentError(_one_line(exc)) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError) as exc:
        raise TransientError(_describe_network(exc)) from None
    except requests.exceptions.RequestException as exc:
        raise PermanentError(_one_line(exc)) from None
    except OSError as exc:
        raise TransientError(_one_line(exc)) from None


def _describe_network(exc: BaseException) -> str:
    """A short cause for a requests network error ("connection refused", "timed out")."""
    import requests

    text = _one_line(exc)
    low = text.lower()
    if "refused" in low:
        return "connection refused"
    if "reset" in low:
        return "connection reset"
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in low:
        return "timed out"
    if "incomplete" in low or "prematurely" in low or "aborted" in low:
        return f"connection dropped: {text}"
    return text


def ftp_connect(parts: SplitResult, timeout: float) -> Any:
    """A logged-in, passive, binary-mode ``ftplib.FTP`` for ``parts`` (anonymous by default).

    Shared with ``dom0.store`` so fetching and storing speak FTP the same way.
    Raises ftplib's and socket's own exceptions; callers classify them.
    """
    import ftplib

    if not parts.hostname:
        raise PermanentError("the URI has no host")
    ftp = ftplib.FTP(timeout=timeout)
    try:
        ftp.connect(parts.hostname, parts.port or 21)
        user = unquote(parts.username) if parts.username else "anonymous"
        password = unquote(parts.password) if parts.password is not None else "anonymous@"
        ftp.login(user, password)
        ftp.set_pasv(True)
        ftp.voidcmd("TYPE I")
    except BaseException:
        ftp.close()
        raise
    return ftp


def ftp_path(parts: SplitResult) -> str:
    """The server-side path of an ``ftp://`` URI.

    As curl does: ``ftp://host/dir/file`` is ``dir/file`` relative to the login
    directory (the root for anonymous users), ``ftp://host//abs/file`` (or ``%2F``)
    is the absolute ``/abs/file``.
    """
    path = unquote(parts.path)
    if path.startswith("/"):
        path = path[1:]
    if not path or path.endswith("/"):
        raise PermanentError("the URI names a directory, not a file")
    return path


def ftp_classify(exc: BaseException) -> Exception:
    """Map an ftplib/socket error to a retry decision: 4xx and network trouble retry."""
    import ftplib

    text = _one_line(exc)
    if isinstance(exc, ftplib.error_temp):
        return TransientError(f"FTP {text}")
    if isinstance(exc, ftplib.error_perm):
        return PermanentError(f"FTP {text}")
    if isinstance(exc, (ftplib.error_reply, ftplib.error_proto)):
        return TransientError(f"FTP unexpected reply: {text}")
    if isinstance(exc, EOFError):
        return TransientError("FTP connection closed by the server")
    if isinstance(exc, TimeoutError):
        return TransientError("timed out")
    if isinstance(exc, ConnectionRefusedError):
        return TransientError("connection refused")
    if isinstance(exc, ConnectionResetError):
        return TransientError("connection reset")
    return TransientError(text)


def _get_ftp(uri: str, parts: SplitResult, sink: _Sink, timeout: float,
             ca_bundle: str | None) -> None:
    import ftplib

    path = ftp_path(parts)
    ftp = None
    try:
        ftp = ftp_connect(parts, timeout)
        try:
            total: int | None = ftp.size(path)
        except ftplib.all_errors:
            total = None  # SIZE is optional (RFC 3659); the transfer still works
        # transfercmd rather than retrbinary: we stop reading the moment a limit is passed.
        conn = ftp.transfercmd(f"RETR {path}")
        try:
            sink.start(total)
            while chunk := conn.recv(CHUNK):
                sink.write(chunk)
        finally:
            conn.close()
        ftp.voidresp()
        if total is not None and sink.size != total:
            raise TransientError(f"short read: {sink.size} of {total} bytes")
        try:
            ftp.quit()
        except ftplib.all_errors:
            pass
    except (TransientError, PermanentError, TooLarge, _DeadlinePassed):
        raise
    except ftplib.all_errors as exc:  # includes OSError and EOFError
        raise ftp_classify(exc) from None
    finally:
        if ftp is not None:
            ftp.close()


_SCHEMES: dict[str, Callable[[str, SplitResult, _Sink, float, str | None], None]] = {
    "": _get_file,
    "file": _get_file,
    "http": _get_http,
    "https": _get_http,
    "ftp": _get_ftp,
}


def supported(uri: str) -> bool:
    """Whether :func:`fetch` knows ``uri``'s scheme (plain absolute paths count as file)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    if not parts.scheme:
        return uri.startswith("/")
    return parts.scheme.lower() in _SCHEMES


# -- the retry loop ----------------------------------------------------------------


def _run(uri: str, sink: _Sink, *, deadline: float | None, retries: int, backoff: float,
         ca_bundle: str | None, timeout: float) -> int:
    """Attempt the transfer into ``sink`` until it succeeds; return the attempts used.

    Raises :class:`FetchError` (or a subclass) when it gives up.
    """
    shown = redact(uri)
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise FetchError(shown, 0, f"malformed URI: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme and not uri.startswith("/"):
        raise FetchError(shown, 0, "not a URI or an absolute path")
    getter = _SCHEMES.get(scheme)
    if getter is None:
        raise FetchError(shown, 0, f"unsupported scheme {parts.scheme!r} "
                                   "(supported: file, http, https, ftp)")
    attempts = 0
    last = "deadline passed before the first attempt"
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise FetchError(shown, attempts, last if attempts == 0
                             else f"deadline passed; last error: {last}", transient=True)
        per_try = DEFAULT_TIMEOUT if timeout is None else timeout
        if deadline is not None:
            per_try = max(0.05, min(per_try, deadline - now))
        attempts += 1
        if attempts > 1:
            sink.restart()
        try:
            getter(uri, parts, sink, per_try, ca_bundle)
            return attempts
        except TooLarge as exc:
            exc.attempts = attempts
            raise
        except PermanentError as exc:
            raise FetchError(shown, attempts, str(exc)) from None
        except _DeadlinePassed:
            raise FetchError(shown, attempts, f"deadline passed during the transfer "
                                              f"({sink.size} bytes received)",
                             transient=True) from None
        except TransientError as exc:
            last = str(exc)
            retry_after = exc.retry_after
        if attempts > retries:
            raise FetchError(shown, attempts, last, transient=True)
        delay = backoff * (2 ** (attempts - 1))
        delay *= 1.0 + 0.25 * (int.from_bytes(os.urandom(2), "big") / 65535.0)  # jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise FetchError(shown, attempts, f"{last}; no time left for another attempt "
                                              "before the deadline", transient=True)
        time.sleep(delay)


def _check_pin(uri: str, sha256: str | None, got: str, attempts: int) -> None:
    if sha256 is not None and got != sha256.strip().lower():
        raise PinMismatch(redact(uri), sha256.strip().lower(), got, attempts)


def fetch(
    uri: str,
    dest: Path,
    *,
    sha256: str | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    progress: Progress | None = None,
    ca_bundle: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> FetchResult:
    """Retrieve ``uri`` into ``dest`` (atomically), checking ``sha256`` if pinned.

    ``uri``: ``file://`` (or a plain absolute path), ``http://``, ``https://``
    (``ca_bundle`` is the CA file to verify against; the system's/certifi's
    otherwise) or ``ftp://`` (anonymous unless ``user:pass@`` is given; passive,
    binary).  ``deadline`` is an absolute :func:`time.monotonic` value: no attempt
    starts after it and a transfer running past it is abandoned.  ``retries`` is
    the number of extra attempts after the first for transient failures, spaced
    ``backoff * 2**n`` seconds (plus up to 25% jitter, or the server's
    ``Retry-After`` when larger, at most 30 s).  ``timeout`` bounds each connect and
    each read.  ``progress(done, total_or_None)`` is called as bytes arrive.

    ``dest``'s parent directory is created if missing.  On any failure ``dest`` is
    untouched and no temporary file is left.  Raises :class:`PinMismatch`,
    :class:`TooLarge` or :class:`FetchError`.
    """
    started = time.monotonic()
    dest = Path(dest)
    sink = _FileSink(dest, redact(uri), max_bytes, deadline, progress)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sink.open()
    except OSError as exc:
        raise FetchError(redact(uri), 0, f"cannot write beside {dest}: {exc.strerror or exc}") from None
    try:
        attempts = _run(uri, sink, deadline=deadline, retries=retries, backoff=backoff,
                        ca_bundle=ca_bundle, timeout=timeout)
        digest = sink.hash.hexdigest()
        _check_pin(uri, sha256, digest, attempts)
        size = sink.size
        try:
            sink.commit()
        except OSError as exc:
            raise FetchError(redact(uri), attempts, f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        sink.discard()
    return FetchResult(uri=redact(uri), path=dest, size=size, sha256=digest, attempts=attempts,
                       seconds=time.monotonic() - started)


def fetch_bytes(
    uri: str,
    *,
    sha256: str | None = None,
    max_bytes: int | None = SMALL_LIMIT,
    deadline: float | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    progress: Progress | None = None,
    ca_bundle: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """Like :func:`fetch`, into memory, for small things (signatures, plans, patches).

    ``max_bytes`` defaults to :data:`SMALL_LIMIT` because the content is held in
    memory (in the guest, memory is the initramfs's tmpfs as well); pass ``None``
    to lift it.
    """
    sink = _BytesSink(redact(uri), max_bytes, deadline, progress)
    attempts = _run(uri, sink, deadline=deadline, retries=retries, backoff=backoff,
                    ca_bundle=ca_bundle, timeout=timeout)
    _check_pin(uri, sha256, sink.hash.hexdigest(), attempts)
    return b"".join(sink.parts)
