"""Container processing with signatures: --sign-key, --trust, --require-signatures."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dom0.keys import ensure_unencrypted_keypair, sign_with
from guest_init.trust import load_trusted_keys, verify_file

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(tmp_path):
    return ensure_unencrypted_keypair(tmp_path / "keys", "ops"), ensure_unencrypted_keypair(tmp_path / "keys", "other")


def _etc_archive(tmp_path: Path) -> Path:
    """An /etc archive made by the processor itself (create), unsigned."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "hostname").write_text("base\n")
    (src / "hosts").write_text("127.0.0.1 localhost\n")
    return src


def _container(tmp_path: Path, body: str) -> Path:
    ct = tmp_path / "web.ct"
    ct.write_text('name = "web1"\nmemory = 256\n' + body)
    return ct


def test_sign_key_signs_archives_and_plan(cli, tmp_path, keys):
    (secret, public), _ = keys
    src = _etc_archive(tmp_path)
    out = tmp_path / "images"
    ct = _container(tmp_path, f"""
[create {src} file://{out}/etc.cpio.gz] [end]
[replace /etc/hostname archive file://{out}/etc.cpio.gz fork file://{out}/web1-etc.cpio.gz

web1
] [end]
[replace /etc/motd at boot

hello
] [end]
[mount web1-root / rw] [end]
""")
    proc = cli("container", str(ct), "--stripped", str(tmp_path / "web1.cfg"), "--dir", str(tmp_path / "w"),
               "--sign-key", str(secret))
    assert proc.returncode == 0, proc.stderr
    trusted = load_trusted_keys([public])
    for artifact in (out / "etc.cpio.gz", out / "web1-etc.cpio.gz", tmp_path / "web1.cfg.plan.json"):
        assert verify_file(artifact, None, trusted).key_id
        if shutil.which("minisign"):
            check = subprocess.run(["minisign", "-V", "-q", "-p", str(public), "-m", str(artifact)],
                                   capture_output=True, text=True)
            assert check.returncode == 0, check.stderr


def test_trust_accepts_signed_and_refuses_tampered(cli, tmp_path, keys):
    (secret, public), _ = keys
    src = _etc_archive(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    first = _container(tmp_path, f"[create {src} file://{base}/etc.cpio.gz] [end]\n")
    assert cli("container", str(first), "--stripped", str(tmp_path / "a.cfg"), "--dir", str(tmp_path / "w0"),
               "--sign-key", str(secret)).returncode == 0
    use = _container(tmp_path, f"""
[replace /etc/hostname archive file://{base}/etc.cpio.gz fork file://{tmp_path}/fork.cpio.gz

web1
] [end]
""")
    ok = cli("container", str(use), "--stripped", str(tmp_path / "b.cfg"), "--dir", str(tmp_path / "w1"),
             "--trust", str(public), "--require-signatures")
    assert ok.returncode == 0, ok.stderr

    data = bytearray((base / "etc.cpio.gz").read_bytes())
    data[-20] ^= 0xFF
    (base / "etc.cpio.gz").write_bytes(bytes(data))
    bad = cli("container", str(use), "--stripped", str(tmp_path / "c.cfg"), "--dir", str(tmp_path / "w2"),
              "--trust", str(public))
    assert bad.returncode == 1
    assert "etc.cpio.gz" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_require_signatures_refuses_unsigned(cli, tmp_path, keys):
    (_, public), _ = keys
    src = _etc_archive(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    first = _container(tmp_path, f"[create {src} file://{base}/etc.cpio.gz] [end]\n")
    assert cli("container", str(first), "--stripped", str(tmp_path / "a.cfg"),
               "--dir", str(tmp_path / "w0")).returncode == 0
    use = _container(tmp_path, f"""
[replace /etc/hostname archive file://{base}/etc.cpio.gz

web1
] [end]
""")
    lenient = cli("container", str(use), "--stripped", str(tmp_path / "b.cfg"), "--dir", str(tmp_path / "w1"),
                  "--trust", str(public))
    assert lenient.returncode == 0, lenient.stderr
    strict = cli("container", str(use), "--stripped", str(tmp_path / "c.cfg"), "--dir", str(tmp_path / "w2"),
                 "--trust", str(public), "--require-signatures")
    assert strict.returncode == 1
    assert "no signature" in strict.stderr and "etc.cpio.gz.minisig" in strict.stderr


def test_signed_by_an_untrusted_key_names_both_ids(cli, tmp_path, keys):
    (_, public), (other_secret, _) = keys
    src = _etc_archive(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    first = _container(tmp_path, f"[create {src} file://{base}/etc.cpio.gz] [end]\n")
    assert cli("container", str(first), "--stripped", str(tmp_path / "a.cfg"), "--dir", str(tmp_path / "w0"),
               "--sign-key", str(other_secret)).returncode == 0
    use = _container(tmp_path, f"""
[replace /etc/hostname archive file://{base}/etc.cpio.gz

web1
] [end]
""")
    proc = cli("container", str(use), "--stripped", str(tmp_path / "b.cfg"), "--dir", str(tmp_path / "w1"),
               "--trust", str(public))
    assert proc.returncode == 1
    ours = load_trusted_keys([public])[0].key_id_hex
    assert ours in proc.stderr


def test_require_signatures_without_trust_is_bad_input(cli, tmp_path):
    ct = _container(tmp_path, "")
    proc = cli("container", str(ct), "--stripped", str(tmp_path / "x.cfg"), "--require-signatures")
    assert proc.returncode == 2
    assert "--require-signatures needs --trust" in proc.stderr
