"""Signatures in minisign's formats: round trips, every kind of tampering with its own message,
key rotation, secret keys, and the keygen/sign/verify commands (through a small argparse harness).

Known-answer fixtures below were made by Debian's minisign 0.11 (``minisign -G -W``, ``-S``,
``-S -l``), so the formats are checked against the real tool even where it is not installed;
tests/integration/test_minisign_interop.py drives the binary itself.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import stat
import sys
from pathlib import Path

import pytest

from dom0 import keys as keys_mod
from dom0.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, UserError
from dom0.keys import (
    SecretKeyError,
    WrongPassphraseError,
    default_trusted_comment,
    generate_keypair,
    generate_secret_key,
    load_secret_key,
    parse_secret_key,
    scrypt_params,
    sign_bytes,
    sign_file,
    signing_key,
    write_signature,
)
from dom0.trust_cli import add_parsers
from guest_init.trust import (
    CHUNK_SIZE,
    CommentTamperedError,
    CorruptSignatureError,
    FileModifiedError,
    KeyFormatError,
    LegacySignatureError,
    MalformedSignatureError,
    MissingSignatureError,
    NoTrustedKeysError,
    PublicKey,
    Signature,
    SignatureError,
    UnsupportedAlgorithmError,
    UntrustedKeyError,
    WrongKeyError,
    begin_verify,
    blake2b_file,
    format_key_id,
    load_trusted_keys,
    plausible_signature,
    sha256_file,
    signature_path_for,
    verify_bytes,
    verify_file,
)

pytestmark = pytest.mark.unit

# -- minisign 0.11 known answers ---------------------------------------------------------

MS_KEY_ID = "1B2DEE07E23DAB98"
MS_PUB = """untrusted comment: minisign public key 1B2DEE07E23DAB98
RWSYqz3iB+4tG1IXmFqZbL78oxRZZQFSlE9dASFsoG1qqyCu+sOSpF+J
"""
# minisign -G -W: unencrypted, and minisign leaves the checksum of such a key all zero.
MS_SECRET_UNENCRYPTED = """untrusted comment: minisign encrypted secret key
""" + (
    "RWQAAEIyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAmKs94gfuLRv0nEftqrnGECasbi9H"
    "DdP5Ul3pOHTHJiKsO1blkSZ5AVIXmFqZbL78oxRZZQFSlE9dASFsoG1qqyCu+sOSpF+JAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAA=\n")
MS_MESSAGE = b"hello\n"
MS_SIG_PREHASHED = """untrusted comment: signature from minisign secret key
RUSYqz3iB+4tG8JZF6kST/rNZCY9Q7z/tBMndQ5c8KC1CMJeOHNIxs45C+3AQ4Ek9pusCxB2J3vQvEmKfrOjxsnTYKCdDkFHSwQ=
trusted comment: timestamp:1795919482\tfile:f.txt\thashed
DkbLFW1DA9EzoSS8qRgPfbWMr3x1l/yOCC/h9YiEEKrnjitFlSwQWpDvJrXS60oZNqW56NQrHIWKqlyYzkrUCQ==
"""
MS_SIG_LEGACY = """untrusted comment: signature from minisign secret key
RWSYqz3iB+4tG3pkRRPHQLN8B0grMw4lh+KQOpEAgJkTV/NHCUuQHIej1d61L7TxiYj3WNULzdG+2QJdbEZs68uEVWNzkG3UVwQ=
trusted comment: timestamp:1795919482\tfile:f.txt
NUJrIeXhbuzIKf78/MxB7hlMw+SRDjERENJufPLiZY4KQIi6IL6vyDCIc9CXvRCjdTzjIko/bBsf1bFxFp8QCw==
"""

# Cheap scrypt for encrypted keys in unit tests (N=2^14, 16 MiB); minisign's own is N=2^20, 1 GiB.
FAST_OPS, FAST_MEM = 524288, 16777216


@pytest.fixture(autouse=True)
def _fast_kdf(monkeypatch):
    monkeypatch.setattr(keys_mod, "DEFAULT_OPSLIMIT", FAST_OPS)
    monkeypatch.setattr(keys_mod, "DEFAULT_MEMLIMIT", FAST_MEM)
    monkeypatch.delenv(keys_mod.ENV_KEY, raising=False)
    monkeypatch.delenv(keys_mod.ENV_PASSPHRASE, raising=False)


@pytest.fixture(scope="module")
def signer():
    """One unencrypted key pair: (SecretKey, PublicKey)."""
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    return parse_secret_key(secret_text, None), PublicKey.from_string(public_text)


@pytest.fixture(scope="module")
def other():
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    return parse_secret_key(secret_text, None), PublicKey.from_string(public_text)


@pytest.fixture
def signed(tmp_path, signer):
    """A file and its prehashed signature by ``signer``."""
    sk, _ = signer
    path = tmp_path / "image.img"
    path.write_bytes(os.urandom(3000) + b"end\n")
    write_signature(path, sign_file(path, sk))
    return path


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]


def resign_lines(sig_path: Path, *, line: int, edit) -> None:
    """Rewrite one line of a .minisig (0-based) through ``edit(bytes) -> bytes``."""
    lines = sig_path.read_bytes().split(b"\n")
    lines[line] = edit(lines[line])
    sig_path.write_bytes(b"\n".join(lines))


def edit_blob(b64_line: bytes, index: int, mask: int = 0x01) -> bytes:
    return base64.b64encode(flip(base64.b64decode(b64_line), index, mask))


# -- formats, against minisign's known answers ------------------------------------------


def test_public_key_parses_and_prints_the_key_id_like_minisign():
    key = PublicKey.from_string(MS_PUB)
    assert key.key_id_hex == MS_KEY_ID
    assert len(key.raw) == 32
    assert key.to_text() == MS_PUB
    assert PublicKey.from_base64(key.to_base64()) == PublicKey(key.key_id, key.raw, source="public key")


def test_minisign_prehashed_and_legacy_signatures_verify():
    key = PublicKey.from_string(MS_PUB)
    pre = verify_bytes(MS_MESSAGE, MS_SIG_PREHASHED, [key], name="f.txt")
    assert (pre.key_id, pre.prehashed) == (MS_KEY_ID, True)
    assert pre.trusted_comment == "timestamp:1795919482\tfile:f.txt\thashed"
    legacy = verify_bytes(MS_MESSAGE, MS_SIG_LEGACY, [key], name="f.txt")
    assert (legacy.key_id, legacy.prehashed) == (MS_KEY_ID, False)


def test_minisign_unencrypted_secret_key_loads_and_signs_byte_for_byte_like_minisign():
    sk = parse_secret_key(MS_SECRET_UNENCRYPTED, None)
    assert sk.key_id_hex == MS_KEY_ID
    assert sk.public_key().raw == PublicKey.from_string(MS_PUB).raw
    # Ed25519 is deterministic: same key, same message, same signature line as minisign wrote.
    ours = sign_bytes(MS_MESSAGE, sk, trusted_comment="timestamp:1795919482\tfile:f.txt\thashed",
                      untrusted_comment="signature from minisign secret key")
    assert ours == MS_SIG_PREHASHED
    ours_legacy = sign_bytes(MS_MESSAGE, sk, prehash=False, trusted_comment="timestamp:1795919482\tfile:f.txt",
                             untrusted_comment="signature from minisign secret key")
    assert ours_legacy == MS_SIG_LEGACY


def test_signature_text_layout_is_minisigs():
    sig = Signature.parse(MS_SIG_PREHASHED, "f.txt.minisig")
    assert sig.algorithm == b"ED" and sig.prehashed and sig.key_id_hex == MS_KEY_ID
    assert sig.to_text() == MS_SIG_PREHASHED
    assert Signature.parse(MS_SIG_PREHASHED.replace("\n", "\r\n")).to_text() == MS_SIG_PREHASHED


def test_default_trusted_comment_is_minisigs():
    assert default_trusted_comment("/a/b/web1.img", True, 1700000000) == "timestamp:1700000000\tfile:web1.img\thashed"
    assert default_trusted_comment("web1.img", False, 1700000000) == "timestamp:1700000000\tfile:web1.img"


def test_scrypt_parameters_follow_libsodium_pickparams():
    assert scrypt_params(33554432, 1073741824) == (20, 8, 1)   # SENSITIVE, what minisign -G uses
    assert scrypt_params(524288, 16777216) == (14, 8, 1)       # INTERACTIVE
    assert scrypt_params(32768, 1 << 30) == (10, 8, 1)          # opslimit-bound branch
    assert scrypt_params(1, 1 << 30)[0] == 10                   # opslimit floor of 32768


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("prehash", [True, False], ids=["prehashed", "legacy"])
def test_round_trip_file(tmp_path, signer, prehash):
    sk, pk = signer
    path = tmp_path / "plan.json"
    path.write_bytes(b'{"version": 1}\n')
    sig_path = write_signature(path, sign_file(path, sk, prehash=prehash, trusted_comment="plan web1"))
    assert sig_path == signature_path_for(path) == tmp_path / "plan.json.minisig"
    result = verify_file(path, None, [pk])
    assert (result.key_id, result.trusted_comment, result.prehashed) == (sk.key_id_hex, "plan web1", prehash)
    assert result.sig_path == str(sig_path)


def test_round_trip_bytes_and_explicit_signature_path(tmp_path, signer):
    sk, pk = signer
    text = sign_bytes(b"patch body\n", sk, name="x.patch")
    assert verify_bytes(b"patch body\n", text, [pk], name="http://h/x.patch").trusted_comment.endswith(
        "\tfile:x.patch\thashed")
    path = tmp_path / "x.patch"
    path.write_bytes(b"patch body\n")
    elsewhere = tmp_path / "sigs" / "x.sig"
    elsewhere.parent.mkdir()
    elsewhere.write_text(text)
    assert verify_file(path, elsewhere, [pk]).sig_path == str(elsewhere)


def test_streaming_across_chunk_boundaries(tmp_path, signer):
    sk, pk = signer
    path = tmp_path / "big.img"
    data = os.urandom(CHUNK_SIZE) * 2 + os.urandom(12345)
    path.write_bytes(data)
    assert blake2b_file(path) == hashlib.blake2b(data).digest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    text = sign_file(path, sk)
    (tmp_path / "big.img.minisig").write_text(text)
    assert verify_file(path, None, [pk]).prehashed
    verifier = begin_verify(text, [pk], name="download")
    for start in range(0, len(data), 777_777):
        verifier.update(memoryview(data)[start:start + 777_777])
    assert verifier.finish().key_id == sk.key_id_hex


def test_empty_file(tmp_path, signer):
    sk, pk = signer
    path = tmp_path / "empty"
    path.write_bytes(b"")
    for prehash in (True, False):
        write_signature(path, sign_file(path, sk, prehash=prehash))
        assert verify_file(path, None, [pk]).prehashed is prehash


# -- tampering: one test each, each with its own message ----------------------------------


def test_flipped_byte_in_the_file(signed, signer):
    _, pk = signer
    signed.write_bytes(flip(signed.read_bytes(), 1000))
    with pytest.raises(FileModifiedError) as err:
        verify_file(signed, None, [pk])
    message = str(err.value)
    assert message.startswith(f"{signed}: signature does not match the file")
    assert pk.key_id_hex in message and err.value.kind == "file-modified"


def test_flipped_byte_in_the_signature(signed, signer):
    _, pk = signer
    sig_path = signature_path_for(signed)
    # Byte 73 of the blob is the top byte of S: any high bit there makes S >= L, which no signer emits.
    resign_lines(sig_path, line=1, edit=lambda line: edit_blob(line, 73, 0x80))
    with pytest.raises(CorruptSignatureError) as err:
        verify_file(signed, None, [pk])
    assert str(err.value).startswith(f"{sig_path}: signature bytes are corrupted")
    assert pk.key_id_hex in str(err.value) and err.value.kind == "corrupt-signature"


@pytest.mark.parametrize("index", range(10, 74, 3))
def test_any_flipped_signature_byte_is_refused(signed, signer, index):
    """Wherever the damage lands, the signature is refused: as corrupted when the bytes cannot be an
    Ed25519 signature, otherwise as not verifying with the named key (indistinguishable from another
    key reusing the id, and the message says both)."""
    _, pk = signer
    resign_lines(signature_path_for(signed), line=1, edit=lambda line: edit_blob(line, index))
    with pytest.raises((CorruptSignatureError, WrongKeyError)):
        verify_file(signed, None, [pk])


def test_flipped_byte_in_the_trusted_comment(signed, signer):
    _, pk = signer
    sig_path = signature_path_for(signed)
    resign_lines(sig_path, line=2, edit=lambda line: flip(line, len(line) - 3))
    with pytest.raises(CommentTamperedError) as err:
        verify_file(signed, None, [pk])
    assert str(err.value).startswith(f"{sig_path}: trusted comment was altered after signing")
    assert pk.key_id_hex in str(err.value) and err.value.kind == "comment-tampered"


def test_key_id_mismatch_names_found_and_trusted_ids(signed, signer, other):
    _, pk = signer
    _, other_pk = other
    with pytest.raises(UntrustedKeyError) as err:
        verify_file(signed, None, [other_pk])
    sig_path = signature_path_for(signed)
    assert str(err.value) == (f"{sig_path}: {signed} is signed by key {pk.key_id_hex}, "
                              f"trusted keys are {other_pk.key_id_hex}")
    assert err.value.found == pk.key_id_hex and err.value.trusted == [other_pk.key_id_hex]


def test_wrong_key_with_the_right_key_id(signed, signer, other):
    """A different key that claims the signer's key id (forged or regenerated) does not pass."""
    _, pk = signer
    _, other_pk = other
    impostor = PublicKey(key_id=pk.key_id, raw=other_pk.raw, source="impostor.pub")
    with pytest.raises(WrongKeyError) as err:
        verify_file(signed, None, [impostor])
    assert f"names trusted key {pk.key_id_hex} but does not verify with it" in str(err.value)
    assert err.value.kind == "wrong-key"


@pytest.mark.parametrize("cut", ["after-comment", "mid-signature", "after-signature",
                                 "after-trusted-comment", "mid-global-signature"])
def test_truncated_signature_file(signed, signer, cut):
    _, pk = signer
    sig_path = signature_path_for(signed)
    lines = sig_path.read_text().split("\n")
    cuts = {
        "after-comment": lines[0] + "\n",
        "mid-signature": lines[0] + "\n" + lines[1][:40] + "\n",
        "after-signature": "\n".join(lines[:2]) + "\n",
        "after-trusted-comment": "\n".join(lines[:3]) + "\n",
        "mid-global-signature": "\n".join(lines[:3]) + "\n" + lines[3][:60],
    }
    sig_path.write_text(cuts[cut])
    with pytest.raises(MalformedSignatureError) as err:
        verify_file(signed, None, [pk])
    assert str(err.value).startswith(f"{sig_path}: ")
    assert "truncated" in str(err.value)
    assert not isinstance(err.value, CorruptSignatureError)


def test_signature_not_base64(signed, signer):
    _, pk = signer
    sig_path = signature_path_for(signed)
    resign_lines(sig_path, line=1, edit=lambda line: b"!" + line[1:])
    with pytest.raises(MalformedSignatureError, match="signature line is not valid base64"):
        verify_file(signed, None, [pk])


def test_not_a_signature_file(signed, signer):
    _, pk = signer
    signature_path_for(signed).write_text("hello\n")
    with pytest.raises(MalformedSignatureError, match="first line must start with 'untrusted comment: '"):
        verify_file(signed, None, [pk])


def test_unsupported_algorithm(signed, signer):
    _, pk = signer
    sig_path = signature_path_for(signed)
    resign_lines(sig_path, line=1, edit=lambda line: base64.b64encode(b"XX" + base64.b64decode(line)[2:]))
    with pytest.raises(UnsupportedAlgorithmError) as err:
        verify_file(signed, None, [pk])
    assert "unsupported signature algorithm b'XX'" in str(err.value) and pk.key_id_hex in str(err.value)


def test_missing_signature_file(tmp_path, signer):
    _, pk = signer
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(MissingSignatureError) as err:
        verify_file(path, None, [pk])
    assert str(err.value) == f"{path}: not signed: signature file {path}.minisig not found"


def test_legacy_refused_when_prehashed_required(tmp_path, signer):
    sk, pk = signer
    path = tmp_path / "root.img"
    path.write_bytes(b"x" * 100)
    write_signature(path, sign_file(path, sk, prehash=False))
    with pytest.raises(LegacySignatureError, match="legacy \\(non-prehashed\\) signature by key"):
        verify_file(path, None, [pk], require_prehashed=True)
    assert not verify_file(path, None, [pk]).prehashed


def test_each_failure_has_its_own_message(tmp_path, signer, other):
    """The six tampering cases of issue 5 end in six different exception kinds."""
    sk, pk = signer
    kinds = set()

    def fresh(name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(b"payload " * 100)
        write_signature(path, sign_file(path, sk))
        return path

    cases = {
        "file": lambda p: p.write_bytes(flip(p.read_bytes(), 5)),
        "sig": lambda p: resign_lines(signature_path_for(p), line=1, edit=lambda l: edit_blob(l, 73, 0x80)),
        "comment": lambda p: resign_lines(signature_path_for(p), line=2, edit=lambda l: l + b"!"),
        "truncated": lambda p: signature_path_for(p).write_text(
            signature_path_for(p).read_text().split("\n")[0] + "\n"),
        "missing": lambda p: signature_path_for(p).unlink(),
    }
    for name, damage in cases.items():
        path = fresh(name)
        damage(path)
        with pytest.raises(SignatureError) as err:
            verify_file(path, None, [pk])
        kinds.add(err.value.kind)
    path = fresh("mismatch")
    with pytest.raises(SignatureError) as err:
        verify_file(path, None, [other[1]])
    kinds.add(err.value.kind)
    with pytest.raises(SignatureError) as err:
        verify_file(path, None, [PublicKey(pk.key_id, other[1].raw)])
    kinds.add(err.value.kind)
    assert len(kinds) == 7, kinds


def test_plausible_signature_accepts_real_ones(signer):
    sk, _ = signer
    for i in range(20):
        assert plausible_signature(sk.sign(b"m%d" % i))
    assert not plausible_signature(b"\xff" * 64)


# -- several trusted keys (rotation) ------------------------------------------------------


def test_rotation_with_two_trusted_keys(tmp_path, signer, other):
    old_sk, old_pk = signer
    new_sk, new_pk = other
    third_sk = generate_secret_key()
    trusted = [old_pk, new_pk]
    for name, sk in (("old", old_sk), ("new", new_sk), ("third", third_sk)):
        path = tmp_path / name
        path.write_bytes(name.encode())
        write_signature(path, sign_file(path, sk))
    assert verify_file(tmp_path / "old", None, trusted).key_id == old_sk.key_id_hex
    assert verify_file(tmp_path / "new", None, trusted).key_id == new_sk.key_id_hex
    with pytest.raises(UntrustedKeyError) as err:
        verify_file(tmp_path / "third", None, trusted)
    assert str(err.value).endswith(f"is signed by key {third_sk.key_id_hex}, trusted keys are "
                                   f"{old_pk.key_id_hex}, {new_pk.key_id_hex}")


def test_load_trusted_keys_from_files_and_directories(tmp_path, signer, other):
    _, a = signer
    _, b = other
    keydir = tmp_path / "trusted"
    keydir.mkdir()
    (keydir / "a.pub").write_text(a.to_text())
    (keydir / "b.pub").write_text(b.to_text())
    (keydir / "README").write_text("not a key")
    loaded = load_trusted_keys(keydir)
    assert {k.key_id for k in loaded} == {a.key_id, b.key_id}
    # the same key twice is kept once
    assert len(load_trusted_keys([keydir, keydir / "a.pub"])) == 2
    (keydir / "c.pub").write_text(PublicKey(a.key_id, b.raw).to_text())
    with pytest.raises(KeyFormatError, match=f"key id {a.key_id_hex} is also used by a different key"):
        load_trusted_keys(keydir)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoTrustedKeysError, match="no trusted public keys found"):
        load_trusted_keys(empty)
    assert load_trusted_keys(empty, allow_empty=True) == []


@pytest.mark.parametrize("text,problem", [
    ("", "empty"),
    ("untrusted comment: x\n", "truncated public key"),
    ("untrusted comment: x\nnot base64!\n", "not valid base64"),
    ("untrusted comment: x\n" + base64.b64encode(b"Ed" + bytes(20)).decode() + "\n", "truncated or not"),
    ("untrusted comment: x\n" + base64.b64encode(b"XX" + bytes(40)).decode() + "\n", "unsupported key algorithm"),
])
def test_bad_public_keys(tmp_path, text, problem):
    path = tmp_path / "k.pub"
    path.write_text(text)
    with pytest.raises(KeyFormatError, match=problem) as err:
        PublicKey.from_file(path)
    assert str(err.value).startswith(str(path))
    with pytest.raises(KeyFormatError, match="public key file not found"):
        PublicKey.from_file(tmp_path / "nope.pub")


# -- secret keys ---------------------------------------------------------------------------


def test_encrypted_secret_key_round_trip_and_wrong_passphrase(tmp_path):
    secret_text, public_text = generate_keypair(b"correct horse")
    blob = base64.b64decode(secret_text.splitlines()[1])
    assert blob[:6] == b"EdScB2" and len(blob) == 158
    pk = PublicKey.from_string(public_text)
    sk = parse_secret_key(secret_text, b"correct horse")
    assert sk.key_id == pk.key_id and sk.public_key().raw == pk.raw
    with pytest.raises(WrongPassphraseError, match="wrong passphrase for the secret key"):
        parse_secret_key(secret_text, b"battery staple")
    with pytest.raises(SecretKeyError, match="encrypted and no passphrase was given"):
        parse_secret_key(secret_text, None)


def test_passphrase_callable_is_only_asked_for_encrypted_keys():
    asked = []

    def ask() -> bytes:
        asked.append(1)
        return b"pw"

    plain, _ = generate_keypair(None, unencrypted=True)
    parse_secret_key(plain, ask)
    assert not asked
    encrypted, _ = generate_keypair(b"pw")
    parse_secret_key(encrypted, ask)
    assert asked == [1]


def test_unencrypted_key_only_when_asked_explicitly():
    with pytest.raises(SecretKeyError, match="must be asked for explicitly"):
        generate_keypair(None)
    with pytest.raises(SecretKeyError, match="empty passphrase"):
        generate_keypair(b"")
    secret_text, _ = generate_keypair(None, unencrypted=True)
    assert base64.b64decode(secret_text.splitlines()[1])[:6] == b"Ed\0\0B2"


def test_damaged_secret_key():
    secret_text, _ = generate_keypair(None, unencrypted=True)
    comment, line = secret_text.splitlines()[:2]
    damaged = base64.b64encode(flip(base64.b64decode(line), 100)).decode()
    with pytest.raises(SecretKeyError, match="is damaged"):
        parse_secret_key(f"{comment}\n{damaged}\n", None)
    with pytest.raises(SecretKeyError, match="expected 158"):
        parse_secret_key(f"{comment}\n{line[:100]}\n", None)


def test_signing_key_from_environment(tmp_path, monkeypatch):
    secret_text, public_text = generate_keypair(b"env pass")
    key_file = tmp_path / "k.key"
    key_file.write_text(secret_text)
    with pytest.raises(SecretKeyError, match="no signing key: pass -k SECKEY or set SUPERCHARGE_SIGN_KEY"):
        signing_key()
    monkeypatch.setenv("SUPERCHARGE_SIGN_PASSPHRASE", "env pass")
    for value in (secret_text, str(key_file)):
        monkeypatch.setenv("SUPERCHARGE_SIGN_KEY", value)
        assert signing_key().key_id == PublicKey.from_string(public_text).key_id
    assert load_secret_key(key_file, b"env pass").source == str(key_file)
    monkeypatch.setenv("SUPERCHARGE_SIGN_PASSPHRASE", "wrong")
    with pytest.raises(WrongPassphraseError):
        signing_key()


def test_comments_must_be_one_line(signer):
    sk, _ = signer
    with pytest.raises(UserError, match="trusted comment must be one line"):
        sign_bytes(b"x", sk, trusted_comment="a\nb")
    with pytest.raises(UserError, match="at most"):
        sign_bytes(b"x", sk, trusted_comment="x" * 9000)


# -- the commands, through the same dispatch as dom0.cli.main -----------------------------


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="supercharge")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UserError as exc:
        print(f"supercharge: {exc}", file=sys.stderr)
        code = exc.exit_code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_keygen_sign_verify(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SUPERCHARGE_SIGN_PASSPHRASE", "cli pass")
    code, out, err = run(["keygen", "-o", str(tmp_path)], capsys)
    assert code == EXIT_OK, err
    secret, public = tmp_path / "supercharge.key", tmp_path / "supercharge.pub"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    key_id = PublicKey.from_file(public).key_id_hex
    assert key_id in out
    assert base64.b64decode(secret.read_text().splitlines()[1])[2:4] == b"Sc"

    files = [tmp_path / "a.img", tmp_path / "b.patch"]
    for f in files:
        f.write_bytes(os.urandom(500))
    code, out, err = run(["sign", *map(str, files), "-k", str(secret), "-t", "release 7"], capsys)
    assert code == EXIT_OK, err
    assert out.count(f"signed by key {key_id}") == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    code, out, err = run(["verify", *map(str, files), "-p", str(public)], capsys)
    assert code == EXIT_OK, err
    assert out.count(f"OK, signed by key {key_id} (prehashed); trusted comment: release 7") == 2

    files[1].write_bytes(b"changed")
    code, out, err = run(["verify", *map(str, files), "-p", str(public)], capsys)
    assert code == EXIT_FAILED
    assert f"{files[0]}: OK" in out
    assert err.strip() == f"supercharge: {files[1]}: signature does not match the file: modified after it " \
                          f"was signed by key {key_id} ({files[1]}.minisig itself is intact)"


def test_cli_keygen_refuses_to_overwrite_and_needs_a_passphrase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO())
    code, _, err = run(["keygen", "-o", str(tmp_path)], capsys)
    assert code == EXIT_BAD_INPUT and "set SUPERCHARGE_SIGN_PASSPHRASE" in err
    assert run(["keygen", "-o", str(tmp_path), "--unencrypted"], capsys)[0] == EXIT_OK
    first = (tmp_path / "supercharge.pub").read_text()
    code, _, err = run(["keygen", "-o", str(tmp_path), "--unencrypted"], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == f"supercharge: {tmp_path / 'supercharge.key'}: already exists; pass --force to overwrite " \
                  "the key pair\n"
    assert (tmp_path / "supercharge.pub").read_text() == first
    assert run(["keygen", "-o", str(tmp_path), "--unencrypted", "--force"], capsys)[0] == EXIT_OK
    assert (tmp_path / "supercharge.pub").read_text() != first


def test_cli_sign_with_key_from_environment_and_legacy(tmp_path, capsys, monkeypatch):
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    (tmp_path / "k.pub").write_text(public_text)
    monkeypatch.setenv("SUPERCHARGE_SIGN_KEY", secret_text)
    target = tmp_path / "hook.sh"
    target.write_text("#!/bin/sh\n")
    code, _, err = run(["sign", str(target), "--legacy", "-x", str(tmp_path / "hook.sig")], capsys)
    assert code == EXIT_OK, err
    code, out, err = run(["verify", str(target), "-p", str(tmp_path / "k.pub"), "-x", str(tmp_path / "hook.sig")],
                         capsys)
    assert code == EXIT_OK and "(legacy)" in out
    code, _, err = run(["verify", str(target), "-p", str(tmp_path / "k.pub"), "-H",
                        "-x", str(tmp_path / "hook.sig")], capsys)
    assert code == EXIT_FAILED and "legacy (non-prehashed) signature" in err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    secret_text, public_text = generate_keypair(None, unencrypted=True)
    (tmp_path / "k.pub").write_text(public_text)
    (tmp_path / "k.key").write_text(secret_text)
    target = tmp_path / "f"
    target.write_text("x")
    cases = [
        (["verify", str(target), "-p", str(tmp_path / "missing.pub")], "missing.pub: public key file not found"),
        (["verify", str(tmp_path / "nofile"), "-p", str(tmp_path / "k.pub")], "nofile: file not found"),
        (["sign", str(tmp_path / "nofile"), "-k", str(tmp_path / "k.key")], "nofile: file not found"),
        (["sign", str(target), "-k", str(tmp_path / "none.key")], "none.key: secret key file not found"),
        (["sign", str(target), str(target), "-x", "s", "-k", str(tmp_path / "k.key")], "exactly one FILE"),
        (["verify", str(target), "-p", str(target)], "not valid base64"),
    ]
    for argv, expected in cases:
        code, _, err = run(argv, capsys)
        assert code == EXIT_BAD_INPUT, (argv, err)
        assert len(err.splitlines()) == 1 and expected in err, (argv, err)


def test_cli_missing_signature_is_a_failure_not_bad_input(tmp_path, capsys):
    _, public_text = generate_keypair(None, unencrypted=True)
    (tmp_path / "k.pub").write_text(public_text)
    target = tmp_path / "f"
    target.write_text("x")
    code, _, err = run(["verify", str(target), "-p", str(tmp_path / "k.pub")], capsys)
    assert code == EXIT_FAILED and "not signed" in err


def test_key_id_format():
    assert format_key_id(bytes.fromhex("98ab3de207ee2d1b")) == MS_KEY_ID


def test_legacy_signature_of_a_huge_file_is_refused_not_read_into_memory(tmp_path, signer, monkeypatch):
    """minisign refuses legacy signatures over 1 GiB; so do we, before reading the file whole."""
    from guest_init import trust

    sk, pk = signer
    path = tmp_path / "big"
    path.write_bytes(b"y" * 4096)
    write_signature(path, sign_file(path, sk, prehash=False))
    monkeypatch.setattr(trust, "LEGACY_MAX_BYTES", 1024)
    with pytest.raises(LegacySignatureError, match="larger than 1 GiB; sign it prehashed"):
        verify_file(path, None, [pk])
    verifier = begin_verify(signature_path_for(path).read_text(), [pk], name="stream")
    with pytest.raises(LegacySignatureError):
        for _ in range(8):
            verifier.update(b"y" * 512)


@pytest.mark.parametrize("encoding", [
    "00" * 32,                                                              # order 4: with it, an all-zero
    "01" + "00" * 31,                                                       # signature passes in OpenSSL
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",     # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",     # order 8
    "ec" + "ff" * 30 + "7f",                                                # order 2
    "ee" + "ff" * 30 + "7f",                                                # non-canonical 1
])
def test_small_order_public_keys_are_refused_like_libsodium(encoding):
    raw = bytes.fromhex(encoding)
    with pytest.raises(KeyFormatError, match="not a usable Ed25519 public key"):
        PublicKey.from_base64(base64.b64encode(b"Ed" + bytes(8) + raw))
