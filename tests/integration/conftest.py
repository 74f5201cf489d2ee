"""Loopback HTTP and FTP servers for integration tests, with fault injection.

Usage (any test in tests/integration/)::

    def test_x(http_server, ftp_server, tmp_path):
        web = http_server(tmp_path / "www")          # serves GET/HEAD, accepts PUT
        tls = http_server(root, tls=tls_cert)        # HTTPS; tls_cert[0] is the CA bundle
        web.fail_next(2, status=503)                 # the next two requests get 503
        url = web.url + "file.bin"                   # http://127.0.0.1:PORT/file.bin
        ftp = ftp_server(tmp_path / "ftp")           # anonymous, write allowed
        ftp.url                                      # ftp://127.0.0.1:PORT/

A server object is also a ``str`` equal to its base URL, so ``f"{web}a.txt"``
works.  Servers bind 127.0.0.1 on a free port, run in daemon threads and are
stopped when the test ends; every socket has a timeout, so a broken test cannot
hang the run.  Faults (HTTP): ``fail_next(n, status, retry_after=None)``,
``drop_next(n, after_bytes=None)`` (close the connection without a response,
or after the headers and that many body bytes), ``stall_next(n, seconds)``
(wait before answering; woken early at teardown).  FTP: ``fail_next(n,
code="450")`` makes the next n RETR/STOR get that reply.  ``log`` lists
``(method, path, status)`` for HTTP and ``(command, argument)`` for FTP.
"""
from __future__ import annotations

import http.server
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlsplit

import pytest

SOCKET_TIMEOUT = 10.0


class _Faults:
    """A queue of faults shared by a server's handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queue: list[tuple[str, dict]] = []
        self.stop = threading.Event()

    def add(self, n: int, kind: str, **args: object) -> None:
        with self.lock:
            self.queue.extend([(kind, args)] * n)

    def take(self) -> tuple[str, dict] | None:
        with self.lock:
            return self.queue.pop(0) if self.queue else None


class LoopbackHTTP(str):
    """A running HTTP server; the string value is its base URL (ending in '/')."""

    root: Path
    url: str
    port: int
    log: list[tuple[str, str, int]]
    faults: _Faults

    def fail_next(self, n: int = 1, status: int = 503, retry_after: float | None = None) -> "LoopbackHTTP":
        self.faults.add(n, "fail", status=status, retry_after=retry_after)
        return self

    def drop_next(self, n: int = 1, after_bytes: int | None = None) -> "LoopbackHTTP":
        self.faults.add(n, "drop", after_bytes=after_bytes)
        return self

    def stall_next(self, n: int = 1, seconds: float = 5.0) -> "LoopbackHTTP":
        self.faults.add(n, "stall", seconds=seconds)
        return self

    def hits(self, path: str, method: str = "GET") -> int:
        """How many requests for ``path`` (URL path, e.g. "/a.bin") with ``method`` arrived."""
        return sum(1 for m, p, _ in self.log if m == method and p == path)


def _make_handler(root: Path, server: LoopbackHTTP) -> type:
    class Handler(http.server.SimpleHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT

        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(root), **kw)  # type: ignore[misc]

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _record(self, status: int) -> None:
            server.log.append((self.command, urlsplit(self.path).path, status))

        def _fault(self) -> bool:
            """Apply the next queued fault; True when the request was answered by it."""
            fault = server.faults.take()
            if fault is None:
                return False
            kind, args = fault
            if kind == "stall":
                server.faults.stop.wait(float(args["seconds"]))
                return False
            if kind == "fail":
                status = int(args["status"])
                self._record(status)
                body = f"injected {status}\n".encode()
                self.send_response(status)
                if args.get("retry_after") is not None:
                    self.send_header("Retry-After", str(args["retry_after"]))
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return True
            # drop
            self._record(-1)
            after = args.get("after_bytes")
            if after is not None and self.command == "GET":
                path = Path(self.translate_path(self.path))
                data = path.read_bytes() if path.is_file() else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: int(after)])
                self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return True

        def do_GET(self) -> None:
            if self._fault():
                return
            path = Path(self.translate_path(self.path))
            self._record(200 if path.is_file() else 404)
            super().do_GET()

        def do_HEAD(self) -> None:
            if self._fault():
                return
            self._record(200)
            super().do_HEAD()

        def do_PUT(self) -> None:
            if self._fault():
                return
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            target = (root / rel).resolve()
            if not rel or root.resolve() not in target.parents:
                self._reply(403)
                return
            length = self.headers.get("Content-Length")
            if length is None:
                self._reply(411)
                return
            remaining = int(length)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.put")
            with open(tmp, "wb") as f:
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 65536))
                    if not chunk:
                        break
                    f.write(chunk)
                    remaining -= len(chunk)
            if remaining:
                tmp.unlink()
                self._reply(400)
                return
            existed = target.exists()
            os.replace(tmp, target)
            self._reply(204 if existed else 201)

        def _reply(self, status: int) -> None:
            self._record(status)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class _QuietHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early (size limits, deadlines, injected drops) are
        expected here; socketserver would print a traceback for each."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


@pytest.fixture
def http_server() -> Iterator[Callable[..., LoopbackHTTP]]:
    """Factory: ``http_server(root_dir)`` starts a server for ``root_dir`` (created if missing)."""
    running: list[tuple[_QuietHTTPServer, threading.Thread, LoopbackHTTP]] = []

    def start(root_dir: Path, *, tls: tuple[Path, Path] | None = None) -> LoopbackHTTP:
        """``tls=(certfile, keyfile)`` serves HTTPS instead (see the ``tls_cert`` fixture)."""
        root = Path(root_dir)
        root.mkdir(parents=True, exist_ok=True)
        httpd = _QuietHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        port = httpd.server_address[1]
        url = f"http://127.0.0.1:{port}/"
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
            url = f"https://127.0.0.1:{port}/"
        srv = LoopbackHTTP(url)
        srv.root, srv.url, srv.port, srv.log, srv.faults = root, url, port, [], _Faults()
        httpd.RequestHandlerClass = _make_handler(root, srv)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True, name=f"http-{port}")
        thread.start()
        running.append((httpd, thread, srv))
        return srv

    yield start
    for httpd, thread, srv in running:
        srv.faults.stop.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class LoopbackFTP(str):
    """A running FTP server; the string value is its base URL (ending in '/').

    Anonymous users may read and write below ``root``; ``user``/``secret`` may too
    (``url_with_login`` has them in the URI).
    """

    root: Path
    url: str
    url_with_login: str
    port: int
    log: list[tuple[str, str]]
    faults: _Faults

    def fail_next(self, n: int = 1, code: str = "450") -> "LoopbackFTP":
        self.faults.add(n, "fail", code=code)
        return self


@pytest.fixture
def ftp_server() -> Iterator[Callable[..., LoopbackFTP]]:
    """Factory: ``ftp_server(root_dir)`` starts a pyftpdlib server for ``root_dir``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyftpdlib imports asyncore
        pytest.importorskip("pyftpdlib")
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import FTPServer

    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    running: list[tuple[FTPServer, threading.Thread, threading.Event]] = []

    def start(root_dir: Path) -> LoopbackFTP:
        root = Path(root_dir)
        root.mkdir(parents=True, exist_ok=True)
        authorizer = DummyAuthorizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "write permissions assigned to anonymous user"
            authorizer.add_anonymous(str(root), perm="elradfmwMT")
        authorizer.add_user("user", "secret", str(root), perm="elradfmwMT")
        faults = _Faults()
        log: list[tuple[str, str]] = []

        class Handler(FTPHandler):
            timeout = SOCKET_TIMEOUT

            def _injected(self, cmd: str, arg: str) -> bool:
                log.append((cmd, arg))
                fault = faults.take()
                if fault is None:
                    return False
                self.respond(f"{fault[1]['code']} Injected temporary failure.")
                return True

            def ftp_RETR(self, file: str) -> object:
                if self._injected("RETR", file):
                    return None
                return super().ftp_RETR(file)

            def ftp_STOR(self, file: str, mode: str = "w") -> object:
                if self._injected("STOR", file):
                    return None
                return super().ftp_STOR(file, mode)

        Handler.authorizer = authorizer
        Handler.banner = "supercharge test ftp"
        Handler.auth_failed_timeout = 0.05  # pyftpdlib waits 3 s after a wrong password
        Handler.passive_ports = None
        Handler.masquerade_address = None
        server = FTPServer(("127.0.0.1", 0), Handler)
        port = server.address[1]
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
            server.close_all()

        thread = threading.Thread(target=serve, daemon=True, name=f"ftp-{port}")
        thread.start()
        running.append((server, thread, stop))
        url = f"ftp://127.0.0.1:{port}/"
        srv = LoopbackFTP(url)
        srv.root, srv.url, srv.port, srv.log, srv.faults = root, url, port, log, faults
        srv.url_with_login = f"ftp://user:secret@127.0.0.1:{port}/"
        return srv

    yield start
    for _server, thread, stop in running:
        stop.set()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost): ``(certfile, keyfile)``.

    The certificate is its own CA, so passing ``certfile`` as a CA bundle verifies it.
    """
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "supercharge test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

