"""dom0.store: storing to file://, ftp:// and HTTP PUT, and the per-invocation fetch cache."""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from dom0.errors import EnvironmentProblem, UserError
from dom0.store import (
    StoreResult,
    _ProgressLine,
    _progress_for,
    clear_fetch_cache,
    fetch_to_cache,
    fetch_to_cache_result,
    store,
)

pytestmark = pytest.mark.integration

DATA = os.urandom(100_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_fetch_cache()
    yield
    clear_fetch_cache()


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "src" / "etc.cpio.gz"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith((".part", ".put"))]


# -- store ---------------------------------------------------------------------------


def test_store_file_creates_parents_atomically(source, tmp_path):
    target = tmp_path / "out" / "new" / "dirs" / "etc.cpio.gz"
    res = store(source, f"file://{target}")
    assert res == StoreResult(uri=f"file://{target}", size=len(DATA), sha256=SHA)
    assert target.read_bytes() == DATA
    # Replacing keeps the name valid throughout (rename), and leaves no temporary.
    source.write_bytes(b"second")
    store(source, str(target))
    assert target.read_bytes() == b"second"
    assert no_temporaries(tmp_path / "out")


def test_store_ftp_nested_new_dirs(source, ftp_server, tmp_path):
    ftp = ftp_server(tmp_path / "ftproot")
    res = store(source, ftp.url + "images/web/etc.cpio.gz", backoff=0.01)
    assert (res.size, res.sha256) == (len(DATA), SHA)
    assert (tmp_path / "ftproot" / "images" / "web" / "etc.cpio.gz").read_bytes() == DATA
    stors = [arg for cmd, arg in ftp.log if cmd == "STOR"]
    assert len(stors) == 1 and stors[0] != "etc.cpio.gz"  # a temporary name, then renamed
    # Over an existing file, with a login.
    source.write_bytes(b"v2")
    store(source, ftp.url_with_login + "images/web/etc.cpio.gz", backoff=0.01)
    assert (tmp_path / "ftproot" / "images" / "web" / "etc.cpio.gz").read_bytes() == b"v2"
    assert no_temporaries(tmp_path / "ftproot")


def test_store_ftp_retries_4xx(source, ftp_server, tmp_path):
    ftp = ftp_server(tmp_path / "ftproot")
    ftp.fail_next(1, code="452")
    store(source, ftp.url + "x.bin", backoff=0.01)
    assert (tmp_path / "ftproot" / "x.bin").read_bytes() == DATA


def test_store_ftp_refused_path(source, ftp_server, tmp_path):
    ftp = ftp_server(tmp_path / "ftproot")
    (tmp_path / "ftproot" / "afile").write_bytes(b"x")
    with pytest.raises(UserError) as info:
        store(source, ftp.url + "afile/below/x.bin", backoff=0.01)
    assert ftp.url + "afile/below/x.bin" in str(info.value)
    assert type(info.value) is UserError  # definite answer: not an environment problem


def test_store_http_put(source, http_server, tmp_path):
    web = http_server(tmp_path / "www")
    res = store(source, web.url + "up/etc.cpio.gz")
    assert res.sha256 == SHA
    assert (tmp_path / "www" / "up" / "etc.cpio.gz").read_bytes() == DATA
    assert web.log[-1] == ("PUT", "/up/etc.cpio.gz", 201)


def test_store_http_error_names_uri_and_status(source, http_server, tmp_path):
    web = http_server(tmp_path / "www")
    web.fail_next(1, status=405)
    with pytest.raises(UserError) as info:
        store(source, web.url + "x.bin")
    assert web.url + "x.bin" in str(info.value) and "405" in str(info.value)


def test_store_http_5xx_retried_then_environment_problem(source, http_server, tmp_path):
    web = http_server(tmp_path / "www")
    web.fail_next(1, status=503)
    store(source, web.url + "ok.bin", backoff=0.01)  # one 503, then success
    web.fail_next(5, status=503)
    with pytest.raises(EnvironmentProblem) as info:
        store(source, web.url + "x.bin", retries=1, backoff=0.01)
    assert "2 attempts" in str(info.value) and "503" in str(info.value)


@pytest.mark.parametrize("uri", ["gopher://h/x", "relative/x", "file:///"])
def test_store_bad_uris(source, uri):
    with pytest.raises(UserError) as info:
        store(source, uri)
    assert uri in str(info.value)


def test_store_missing_source(tmp_path):
    with pytest.raises(UserError) as info:
        store(tmp_path / "nope", f"file://{tmp_path}/x")
    assert "nope" in str(info.value)


def test_store_unwritable(source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(UserError) as info:
        store(source, f"file://{blocker}/below/x")
    assert f"file://{blocker}/below/x" in str(info.value)


def test_store_connection_refused(source, closed_port):
    with pytest.raises(EnvironmentProblem) as info:
        store(source, f"ftp://127.0.0.1:{closed_port}/x", retries=1, backoff=0.01)
    assert "refused" in str(info.value)


# -- fetch_to_cache --------------------------------------------------------------------


def test_fetch_to_cache_once_per_uri(http_server, tmp_path):
    web = http_server(tmp_path / "www")
    (tmp_path / "www" / "base.cpio.gz").write_bytes(DATA)
    cache = tmp_path / "cache"
    first = fetch_to_cache(web.url + "base.cpio.gz", cache, sha256=SHA)
    for _ in range(5):
        assert fetch_to_cache(web.url + "base.cpio.gz", cache) == first
    assert first.read_bytes() == DATA and first.name.endswith("base.cpio.gz")
    assert web.hits("/base.cpio.gz") == 1
    again = fetch_to_cache_result(web.url + "base.cpio.gz", cache)
    assert again.attempts == 0 and again.sha256 == SHA


def test_store_invalidates_the_cache(source, tmp_path):
    uri = f"file://{tmp_path}/shared/a.bin"
    store(source, uri)
    cache = tmp_path / "cache"
    assert fetch_to_cache(uri, cache).read_bytes() == DATA
    source.write_bytes(b"changed")
    store(source, uri)
    assert fetch_to_cache(uri, cache).read_bytes() == b"changed"


def test_fetch_to_cache_errors_are_user_errors(http_server, tmp_path, closed_port):
    web = http_server(tmp_path / "www")
    (tmp_path / "www" / "a").write_bytes(DATA)
    with pytest.raises(UserError) as info:
        fetch_to_cache(web.url + "missing", tmp_path / "c", backoff=0.01)
    assert web.url + "missing" in str(info.value) and "404" in str(info.value)
    assert type(info.value) is UserError
    with pytest.raises(UserError) as info:
        fetch_to_cache(web.url + "a", tmp_path / "c", sha256="1" * 64)
    assert "SHA-256 mismatch" in str(info.value) and web.url + "a" in str(info.value)
    with pytest.raises(EnvironmentProblem) as info:
        fetch_to_cache(f"http://127.0.0.1:{closed_port}/a", tmp_path / "c", retries=1, backoff=0.01)
    assert f"127.0.0.1:{closed_port}/a" in str(info.value)


def test_progress_only_on_a_terminal(tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress_for("http://h/x", io.StringIO()) is None
    out = Tty()
    line = _ProgressLine("x", out)
    line(0, 1000)
    line(1000, 1000)
    line.close()
    assert "\r" in out.getvalue() and "100%" in out.getvalue()
    assert _progress_for("http://h/x", out) is not None
