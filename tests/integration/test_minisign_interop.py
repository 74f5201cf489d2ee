"""Interop with Debian's real ``minisign`` binary, both ways, for signatures and secret keys.

- signed by minisign (prehashed default, legacy ``-l``), verified by us;
- signed by us (both modes), accepted by ``minisign -V`` (and ``-V -H`` for prehashed);
- secret keys: ``minisign -G -W`` (unencrypted) and ``minisign -G`` with a password load here;
  ours (encrypted at minisign's full strength and unencrypted) sign with ``minisign -S``.

minisign reads passwords with fgets on stdin (echo off when it is a terminal), so a pipe drives it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dom0 import keys as keys_mod
from dom0.errors import EXIT_FAILED, EXIT_OK, UserError
from dom0.keys import WrongPassphraseError, generate_keypair, load_secret_key, sign_file, write_signature
from dom0.trust_cli import add_parsers
from guest_init.trust import (
    FileModifiedError,
    PublicKey,
    UntrustedKeyError,
    load_trusted_keys,
    verify_file,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("minisign") is None, reason="minisign is not installed (apt-get install minisign)"),
]

PASSWORD = "interop password"


def minisign(*args: str, password: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run minisign; ``password`` is fed on stdin (twice is harmless: it reads what it needs)."""
    stdin = (password + "\n" + password + "\n") if password is not None else ""
    proc = subprocess.run(["minisign", *args], check=False, input=stdin, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"minisign {' '.join(args)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


@pytest.fixture(scope="module")
def ms_plain(tmp_path_factory) -> tuple[Path, Path]:
    """A key pair made by ``minisign -G -W`` (no password)."""
    d = tmp_path_factory.mktemp("ms-plain")
    minisign("-G", "-W", "-p", str(d / "ms.pub"), "-s", str(d / "ms.key"))
    return d / "ms.key", d / "ms.pub"


@pytest.fixture(scope="module")
def ms_encrypted(tmp_path_factory) -> tuple[Path, Path]:
    """A key pair made by ``minisign -G`` with a password (scrypt N=2^20: seconds)."""
    d = tmp_path_factory.mktemp("ms-enc")
    minisign("-G", "-p", str(d / "ms.pub"), "-s", str(d / "ms.key"), password=PASSWORD)
    return d / "ms.key", d / "ms.pub"


@pytest.fixture
def payload(tmp_path) -> Path:
    path = tmp_path / "web1.img"
    path.write_bytes(os.urandom(1 << 20) + b"tail")
    return path


def minisign_key_id(pub: Path) -> str:
    """The key id minisign wrote in the public key's comment line, zero-padded to 16 digits.

    Debian's minisign 0.11 prints key ids with ``%PRIX64`` (no leading zeros); later releases use
    ``%016PRIX64``, as we always do.
    """
    return pub.read_text().splitlines()[0].rsplit(" ", 1)[1].zfill(16)


# -- signed by minisign, verified by us ---------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed", "legacy"])
def test_signed_by_minisign_verified_by_us(ms_plain, payload, legacy):
    key, pub = ms_plain
    minisign("-S", "-s", str(key), "-m", str(payload), "-t", "from minisign", *(["-l"] if legacy else []))
    result = verify_file(payload, None, load_trusted_keys(pub))
    assert result.key_id == minisign_key_id(pub)
    assert result.prehashed is (not legacy)
    assert result.trusted_comment == "from minisign"


def test_minisign_default_trusted_comment_and_tampering(ms_plain, payload):
    key, pub = ms_plain
    minisign("-S", "-s", str(key), "-m", str(payload))
    result = verify_file(payload, None, load_trusted_keys(pub))
    assert result.trusted_comment.startswith("timestamp:") and result.trusted_comment.endswith(
        f"\tfile:{payload.name}\thashed")
    payload.write_bytes(payload.read_bytes() + b"!")
    with pytest.raises(FileModifiedError):
        verify_file(payload, None, load_trusted_keys(pub))


def test_key_id_mismatch_uses_minisigs_key_id_spelling(ms_plain, tmp_path, payload):
    key, pub = ms_plain
    minisign("-S", "-s", str(key), "-m", str(payload))
    minisign("-G", "-W", "-p", str(tmp_path / "other.pub"), "-s", str(tmp_path / "other.key"))
    with pytest.raises(UntrustedKeyError) as err:
        verify_file(payload, None, load_trusted_keys(tmp_path / "other.pub"))
    assert err.value.found == minisign_key_id(pub)
    assert err.value.trusted == [minisign_key_id(tmp_path / "other.pub")]
    # minisign itself names the same two ids
    proc = minisign("-V", "-p", str(tmp_path / "other.pub"), "-m", str(payload), check=False)
    assert proc.returncode == 1
    for key_id in (minisign_key_id(pub), minisign_key_id(tmp_path / "other.pub")):
        assert key_id.lstrip("0") in proc.stderr


# -- signed by us, accepted by minisign ----------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed", "legacy"])
def test_signed_by_us_accepted_by_minisign(ms_plain, payload, legacy):
    key, pub = ms_plain
    sk = load_secret_key(key, None)
    write_signature(payload, sign_file(payload, sk, prehash=not legacy, trusted_comment="from supercharge"))
    proc = minisign("-V", "-p", str(pub), "-m", str(payload))
    assert "Signature and comment signature verified" in proc.stdout
    assert "Trusted comment: from supercharge" in proc.stdout
    strict = minisign("-V", "-H", "-p", str(pub), "-m", str(payload), check=False)
    assert strict.returncode == (1 if legacy else 0), strict.stderr


def test_minisign_rejects_what_we_signed_once_tampered(ms_plain, payload):
    key, pub = ms_plain
    write_signature(payload, sign_file(payload, load_secret_key(key, None)))
    payload.write_bytes(b"x" + payload.read_bytes()[1:])
    proc = minisign("-V", "-p", str(pub), "-m", str(payload), check=False)
    assert proc.returncode == 1 and "Signature verification failed" in proc.stderr


def test_our_public_key_and_base64_work_with_minisign(tmp_path, payload):
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    (tmp_path / "our.pub").write_text(public_text)
    sk = keys_mod.parse_secret_key(secret_text, None)
    write_signature(payload, sign_file(payload, sk))
    minisign("-V", "-p", str(tmp_path / "our.pub"), "-m", str(payload))
    minisign("-V", "-P", PublicKey.from_string(public_text).to_base64(), "-m", str(payload))
    assert minisign_key_id(tmp_path / "our.pub") == sk.key_id_hex


# -- secret keys both ways ----------------------------------------------------------------


def test_minisign_unencrypted_key_signs_identically(ms_plain, payload, tmp_path):
    """minisign -G -W key loads here, and (Ed25519 being deterministic) our signature bytes equal minisign's."""
    key, _ = ms_plain
    minisign("-S", "-s", str(key), "-m", str(payload), "-t", "same", "-x", str(tmp_path / "theirs.minisig"))
    ours = sign_file(payload, load_secret_key(key, None), trusted_comment="same")
    theirs = (tmp_path / "theirs.minisig").read_text().splitlines()
    assert ours.splitlines()[1:] == theirs[1:]


def test_minisign_encrypted_key_loads_with_its_password(ms_encrypted, payload, tmp_path):
    key, pub = ms_encrypted
    sk = load_secret_key(key, PASSWORD.encode())
    assert sk.key_id_hex == minisign_key_id(pub)
    write_signature(payload, sign_file(payload, sk))
    minisign("-V", "-p", str(pub), "-m", str(payload))
    with pytest.raises(WrongPassphraseError, match=f"{key}: wrong passphrase"):
        load_secret_key(key, b"not the password")


def test_our_encrypted_key_full_strength_signs_with_minisign(tmp_path, payload):
    """A key from generate_keypair at minisign's own scrypt strength (N=2^20) decrypts in minisign -S."""
    secret_text, public_text = generate_keypair(PASSWORD.encode())
    (tmp_path / "our.key").write_text(secret_text)
    (tmp_path / "our.pub").write_text(public_text)
    minisign("-S", "-s", str(tmp_path / "our.key"), "-m", str(payload), password=PASSWORD)
    assert verify_file(payload, None, load_trusted_keys(tmp_path / "our.pub")).prehashed
    proc = minisign("-S", "-s", str(tmp_path / "our.key"), "-m", str(payload), password="wrong", check=False)
    assert proc.returncode != 0 and "Wrong password" in proc.stderr + proc.stdout


def test_our_encrypted_key_lower_strength_signs_with_minisign(tmp_path, payload):
    """minisign derives scrypt's N from the limits stored in the file, so lower limits work too."""
    secret_text, public_text = generate_keypair(PASSWORD.encode(), opslimit=524288, memlimit=16777216)
    (tmp_path / "our.key").write_text(secret_text)
    (tmp_path / "our.pub").write_text(public_text)
    minisign("-S", "-l", "-s", str(tmp_path / "our.key"), "-m", str(payload), password=PASSWORD)
    assert not verify_file(payload, None, load_trusted_keys(tmp_path / "our.pub")).prehashed


def test_our_unencrypted_key_signs_with_minisign(tmp_path, payload):
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    (tmp_path / "our.key").write_text(secret_text)
    (tmp_path / "our.pub").write_text(public_text)
    minisign("-S", "-W", "-s", str(tmp_path / "our.key"), "-m", str(payload))
    minisign("-V", "-p", str(tmp_path / "our.pub"), "-m", str(payload))
    assert verify_file(payload, None, load_trusted_keys(tmp_path / "our.pub")).prehashed


# -- the commands against minisign --------------------------------------------------------


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="supercharge")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"supercharge: {exc}", file=sys.stderr)
        return exc.exit_code


def test_cli_keygen_and_sign_then_minisign_verifies(tmp_path, payload, monkeypatch, capsys):
    monkeypatch.setenv("SUPERCHARGE_SIGN_PASSPHRASE", PASSWORD)
    monkeypatch.setattr(keys_mod, "DEFAULT_OPSLIMIT", 524288)
    monkeypatch.setattr(keys_mod, "DEFAULT_MEMLIMIT", 16777216)
    assert run(["keygen", "-o", str(tmp_path)]) == EXIT_OK
    assert run(["sign", str(payload), "-k", str(tmp_path / "supercharge.key")]) == EXIT_OK
    minisign("-V", "-H", "-p", str(tmp_path / "supercharge.pub"), "-m", str(payload))
    # and minisign can use the secret key the command wrote
    minisign("-S", "-s", str(tmp_path / "supercharge.key"), "-m", str(payload), "-x", str(tmp_path / "m.sig"),
             password=PASSWORD)
    assert run(["verify", str(payload), "-p", str(tmp_path / "supercharge.pub"), "-x", str(tmp_path / "m.sig")]) \
        == EXIT_OK


def test_cli_verify_minisign_signatures(ms_plain, tmp_path, payload, capsys):
    key, pub = ms_plain
    minisign("-S", "-s", str(key), "-m", str(payload))
    assert run(["verify", str(payload), "-p", str(pub)]) == EXIT_OK
    assert f"OK, signed by key {minisign_key_id(pub)} (prehashed)" in capsys.readouterr().out
    minisign("-G", "-W", "-p", str(tmp_path / "o.pub"), "-s", str(tmp_path / "o.key"))
    assert run(["verify", str(payload), "-p", str(tmp_path / "o.pub")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"signed by key {minisign_key_id(pub)}, trusted keys are {minisign_key_id(tmp_path / 'o.pub')}" in err
    # rotation: both keys trusted
    assert run(["verify", str(payload), "-p", str(tmp_path / "o.pub"), "-p", str(pub)]) == EXIT_OK


def run_on_terminal(argv: list[str], answers: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its controlling tty, typing each answer at a prompt.

    An answer is typed only once a *new* prompt has appeared: getpass turns echo off with
    TCSAFLUSH, which throws away anything typed ahead.
    """
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execv(argv[0], argv)
    output = b""
    answered_at = 0
    pending = list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
                if pending and output[answered_at:].rstrip(b" ").endswith(b":"):
                    os.write(fd, pending.pop(0).encode() + b"\n")
                    answered_at = len(output)
    finally:
        status = None
        for _ in range(20):  # the child has closed its terminal; give it a moment to exit
            waited, st = os.waitpid(pid, os.WNOHANG)
            if waited:
                status = st
                break
            time.sleep(0.1)
        if status is None:  # past the deadline, still running: it is stuck
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


_HARNESS = """
import argparse, sys
from dom0 import keys
from dom0.errors import UserError
from dom0.trust_cli import add_parsers
keys.DEFAULT_OPSLIMIT, keys.DEFAULT_MEMLIMIT = 524288, 16777216
parser = argparse.ArgumentParser(prog="supercharge")
add_parsers(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except UserError as exc:
    print(f"supercharge: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def test_keygen_and_sign_ask_the_passphrase_on_a_terminal(tmp_path, payload, monkeypatch):
    monkeypatch.delenv("SUPERCHARGE_SIGN_PASSPHRASE", raising=False)
    monkeypatch.delenv("SUPERCHARGE_SIGN_KEY", raising=False)
    cmd = [sys.executable, "-c", _HARNESS]
    code, out = run_on_terminal([*cmd, "keygen", "-o", str(tmp_path)], ["typed pass", "typed pass"])
    assert code == EXIT_OK, out
    assert "typed pass" not in out  # not echoed
    code, out = run_on_terminal([*cmd, "keygen", "-o", str(tmp_path), "--force"], ["one", "two"])
    assert code != EXIT_OK and "the two passphrases differ" in out
    code, out = run_on_terminal([*cmd, "sign", str(payload), "-k", str(tmp_path / "supercharge.key")],
                                ["typed pass"])
    assert code == EXIT_OK, out
    minisign("-V", "-p", str(tmp_path / "supercharge.pub"), "-m", str(payload))
    # minisign, reading the same passphrase from its terminal, decrypts our key too
    code, out = run_on_terminal(["/usr/bin/minisign", "-S", "-s", str(tmp_path / "supercharge.key"), "-m",
                                 str(payload), "-x", str(tmp_path / "tty.minisig")], ["typed pass"])
    assert code == 0, out
    assert verify_file(payload, tmp_path / "tty.minisig", load_trusted_keys(tmp_path / "supercharge.pub"))
