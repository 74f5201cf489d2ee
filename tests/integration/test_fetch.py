"""guest_init.fetch against real servers on 127.0.0.1: http.server and pyftpdlib.

Backoff values are tiny so the retry tests cost milliseconds; every test is
bounded by socket timeouts or a deadline.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guest_init.fetch import (
    FetchError,
    FetchResult,
    PinMismatch,
    TooLarge,
    fetch,
    fetch_bytes,
    redact,
)

pytestmark = pytest.mark.integration

PAYLOAD = os.urandom(300_000) + b"end"
SHA = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"backoff": 0.01, "timeout": 5.0}


@pytest.fixture
def web(http_server, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.bin").write_bytes(PAYLOAD)
    (root / "sub").mkdir()
    (root / "sub" / "small.txt").write_bytes(b"hello\n")
    return http_server(root)


@pytest.fixture
def ftp(ftp_server, tmp_path):
    root = tmp_path / "ftproot"
    (root / "pub").mkdir(parents=True)
    (root / "pub" / "a.bin").write_bytes(PAYLOAD)
    return ftp_server(root)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


# -- http ----------------------------------------------------------------------------


def test_http_get_with_pin(web, tmp_path):
    dest = tmp_path / "out" / "a.bin"
    seen: list[tuple[int, int | None]] = []
    res = fetch(web.url + "a.bin", dest, sha256=SHA, progress=lambda d, t: seen.append((d, t)), **FAST)
    assert isinstance(res, FetchResult)
    assert dest.read_bytes() == PAYLOAD
    assert (res.size, res.sha256, res.attempts, res.path) == (len(PAYLOAD), SHA, 1, dest)
    assert res.seconds >= 0
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert leftovers(dest.parent) == []


def test_http_pin_mismatch_leaves_nothing(web, tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"previous")
    wrong = "0" * 64
    with pytest.raises(PinMismatch) as info:
        fetch(web.url + "a.bin", dest, sha256=wrong, **FAST)
    msg = str(info.value)
    assert web.url + "a.bin" in msg and wrong in msg and SHA in msg
    assert (info.value.expected, info.value.got) == (wrong, SHA)
    assert dest.read_bytes() == b"previous"  # untouched
    assert leftovers(tmp_path) == []
    assert web.hits("/a.bin") == 1  # a wrong pin is not retried


def test_http_404_is_not_retried(web, tmp_path):
    with pytest.raises(FetchError) as info:
        fetch(web.url + "missing.bin", tmp_path / "m", **FAST)
    err = info.value
    assert err.attempts == 1 and not err.transient
    assert "404" in err.last_error and web.url + "missing.bin" in str(err)
    assert "1 attempt" in str(err)
    assert web.hits("/missing.bin") == 1
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_http_403_is_not_retried(web, tmp_path):
    web.fail_next(1, status=403)
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "a", **FAST)
    assert info.value.attempts == 1 and "403" in info.value.last_error


def test_http_503_twice_then_ok(web, tmp_path):
    web.fail_next(2, status=503)
    res = fetch(web.url + "a.bin", tmp_path / "a.bin", sha256=SHA, **FAST)
    assert res.attempts == 3
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert [s for m, p, s in web.log] == [503, 503, 200]


def test_http_429_honours_small_retry_after(web, tmp_path):
    web.fail_next(1, status=429, retry_after=0.3)
    t0 = time.monotonic()
    res = fetch(web.url + "a.bin", tmp_path / "a.bin", **FAST)
    assert res.attempts == 2 and time.monotonic() - t0 >= 0.3


def test_http_connection_dropped_then_ok(web, tmp_path):
    web.drop_next(1)  # no response at all
    web.drop_next(1, after_bytes=1000)  # headers, then part of the body
    res = fetch(web.url + "a.bin", tmp_path / "a.bin", sha256=SHA, **FAST)
    assert res.attempts == 3
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert leftovers(tmp_path) == []


def test_http_gives_up_after_retries(web, tmp_path):
    web.fail_next(10, status=500)
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "a.bin", retries=2, **FAST)
    err = info.value
    assert err.attempts == 3 and err.transient and "HTTP 500" in err.last_error
    assert "3 attempts" in str(err) and web.url + "a.bin" in str(err)
    assert not (tmp_path / "a.bin").exists() and leftovers(tmp_path) == []


def test_connection_refused_is_retried(closed_port, tmp_path):
    uri = f"http://127.0.0.1:{closed_port}/x"
    with pytest.raises(FetchError) as info:
        fetch(uri, tmp_path / "x", retries=2, **FAST)
    assert info.value.attempts == 3 and "refused" in info.value.last_error
    assert uri in str(info.value)


def test_deadline_stops_retries(web, tmp_path):
    web.fail_next(100, status=503)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "a.bin", deadline=t0 + 0.6, retries=100,
              backoff=0.1, timeout=5.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.6 + 0.2, "no attempt may start after the deadline"
    err = info.value
    assert err.transient and 1 <= err.attempts < 10 and "deadline" in err.last_error
    assert "503" in err.last_error


def test_deadline_bounds_a_stalled_server(web, tmp_path):
    web.stall_next(1, seconds=10)
    t0 = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "a.bin", deadline=t0 + 0.5, **FAST)
    assert time.monotonic() - t0 < 1.5
    assert "timed out" in info.value.last_error or "deadline" in info.value.last_error


def test_deadline_already_passed(web, tmp_path):
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "a.bin", deadline=time.monotonic() - 1, **FAST)
    assert info.value.attempts == 0 and web.log == []


def test_size_limit_declared(web, tmp_path):
    with pytest.raises(TooLarge) as info:
        fetch(web.url + "a.bin", tmp_path / "a.bin", max_bytes=1000, **FAST)
    assert "1000" in str(info.value) and web.url + "a.bin" in str(info.value)
    assert info.value.attempts == 1 and web.hits("/a.bin") == 1
    assert not (tmp_path / "a.bin").exists() and leftovers(tmp_path) == []


def test_size_limit_counted_while_streaming(tmp_path):
    """Without a declared size (a FIFO has none) the limit is enforced on bytes read."""
    src = tmp_path / "big"
    src.write_bytes(b"x" * 200_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen([sys.executable, "-c",
                               f"import shutil; shutil.copyfileobj(open({str(src)!r},'rb'), "
                               f"open({str(fifo)!r},'wb'))"], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(TooLarge) as info:
            fetch(f"file://{fifo}", tmp_path / "out", max_bytes=100_000)
        assert 100_000 < info.value.seen <= 100_000 + 64 * 1024  # stopped at the first chunk over
    finally:
        writer.kill()
        writer.wait(timeout=5)
    assert not (tmp_path / "out").exists()


def test_fetch_bytes_http(web):
    assert fetch_bytes(web.url + "sub/small.txt", sha256=hashlib.sha256(b"hello\n").hexdigest()) \
        == b"hello\n"
    with pytest.raises(TooLarge):
        fetch_bytes(web.url + "a.bin", max_bytes=10)


def test_https_with_ca_bundle(http_server, tls_cert, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.bin").write_bytes(PAYLOAD)
    web = http_server(root, tls=tls_cert)
    assert web.url.startswith("https://")
    res = fetch(web.url + "a.bin", tmp_path / "a.bin", sha256=SHA, ca_bundle=str(tls_cert[0]),
                **FAST)
    assert res.attempts == 1
    # Without the bundle the self-signed certificate is refused, at once (not retried).
    with pytest.raises(FetchError) as info:
        fetch(web.url + "a.bin", tmp_path / "b.bin", **FAST)
    assert info.value.attempts == 1 and "TLS" in info.value.last_error


# -- ftp -----------------------------------------------------------------------------


def test_ftp_retr(ftp, tmp_path):
    res = fetch(ftp.url + "pub/a.bin", tmp_path / "a.bin", sha256=SHA, **FAST)
    assert res.attempts == 1 and res.size == len(PAYLOAD)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_ftp_retr_with_login(ftp, tmp_path):
    uri = ftp.url_with_login + "pub/a.bin"
    res = fetch(uri, tmp_path / "a.bin", **FAST)
    assert res.sha256 == SHA
    assert "secret" not in res.uri and res.uri == redact(uri)


def test_ftp_550_is_not_retried(ftp, tmp_path):
    with pytest.raises(FetchError) as info:
        fetch(ftp.url + "pub/missing.bin", tmp_path / "m", **FAST)
    err = info.value
    assert err.attempts == 1 and "550" in err.last_error and not err.transient
    assert sum(1 for cmd, _ in ftp.log if cmd == "RETR") == 1


def test_ftp_bad_password_is_not_retried(ftp, tmp_path):
    uri = ftp.url.replace("ftp://", "ftp://user:wrong@") + "pub/a.bin"
    with pytest.raises(FetchError) as info:
        fetch(uri, tmp_path / "m", **FAST)
    assert info.value.attempts == 1 and "wrong" not in str(info.value)


def test_ftp_4xx_is_retried(ftp, tmp_path):
    ftp.fail_next(2, code="450")
    res = fetch(ftp.url + "pub/a.bin", tmp_path / "a.bin", sha256=SHA, **FAST)
    assert res.attempts == 3


def test_ftp_size_limit(ftp, tmp_path):
    with pytest.raises(TooLarge):
        fetch(ftp.url + "pub/a.bin", tmp_path / "a.bin", max_bytes=5000, **FAST)
    assert leftovers(tmp_path) == []


# -- file:// and errors ----------------------------------------------------------------


def test_file_uri_and_plain_path(tmp_path):
    src = tmp_path / "dir with space" / "src.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    res = fetch("file://" + str(src).replace(" ", "%20"), tmp_path / "o1", sha256=SHA)
    assert res.attempts == 1 and (tmp_path / "o1").read_bytes() == PAYLOAD
    fetch(str(src), tmp_path / "o2")
    assert (tmp_path / "o2").read_bytes() == PAYLOAD
    assert fetch_bytes(f"file://localhost{src}".replace(" ", "%20")) == PAYLOAD


def test_file_missing(tmp_path):
    with pytest.raises(FetchError) as info:
        fetch(f"file://{tmp_path}/nope", tmp_path / "o")
    assert info.value.attempts == 1 and "no such file" in str(info.value)
    assert f"file://{tmp_path}/nope" in str(info.value)


@pytest.mark.parametrize("uri", ["gopher://example/x", "relative/path", "file://otherhost/x"])
def test_unsupported(uri, tmp_path):
    with pytest.raises(FetchError) as info:
        fetch(uri, tmp_path / "o")
    assert uri in str(info.value)
    assert leftovers(tmp_path) == []


def test_redact():
    assert redact("ftp://u:pw@h:21/x") == "ftp://u:***@h:21/x"
    assert redact("http://h/x") == "http://h/x"
