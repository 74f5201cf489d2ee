"""Signing keys and signing, in minisign's formats (the verifying half is guest_init.trust).

Why minisign's formats, secret key included: an admin can make a key with
``minisign -G`` and use it here, or make one with ``supercharge keygen`` and sign
with the stock ``minisign -S``; either tool verifies the other's signatures.

Secret key file: ``untrusted comment: ...`` line, then base64 of (158 bytes)::

    sig_alg "Ed" | kdf_alg "Sc" (scrypt) or "\\0\\0" (none) | chk_alg "B2"
    | kdf_salt (32) | opslimit (8, LE) | memlimit (8, LE)
    | key id (8) | Ed25519 secret key (64: seed + public key) | checksum (32)

The last 104 bytes are XOR-ed with a scrypt stream derived from the passphrase
(libsodium's ``crypto_pwhash_scryptsalsa208sha256``: N, r, p are picked from
opslimit and memlimit by :func:`scrypt_params`); the checksum, BLAKE2b-256 over
sig_alg + key id + secret key, is what tells a wrong passphrase from a right one.

Keys for automation come from ``SUPERCHARGE_SIGN_KEY`` (the key's text, or a
path) and ``SUPERCHARGE_SIGN_PASSPHRASE``; otherwise the passphrase is asked on
the terminal.  Errors are :class:`dom0.errors.UserError` (one line, exit code 2).
"""
from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guest_init.trust import (
    KEY_ALG,
    KEY_ID_BYTES,
    SIG_ALG_LEGACY,
    SIG_ALG_PREHASHED,
    TRUSTED_COMMENT_MAX,
    TRUSTED_PREFIX,
    UNTRUSTED_COMMENT_MAX,
    UNTRUSTED_PREFIX,
    PublicKey,
    blake2b_file,
    format_key_id,
    format_signature,
    signature_path_for,
)

from .errors import UserError

ENV_KEY = "SUPERCHARGE_SIGN_KEY"
ENV_PASSPHRASE = "SUPERCHARGE_SIGN_PASSPHRASE"

KDF_SCRYPT = b"Sc"
KDF_NONE = b"\0\0"
CHK_ALG = b"B2"
SALT_BYTES = 32
SECRET_KEY_BYTES = 64
CHECKSUM_BYTES = 32
KEYNUM_SK_BYTES = KEY_ID_BYTES + SECRET_KEY_BYTES + CHECKSUM_BYTES     # 104, the encrypted part
SECRET_KEY_BLOB = 2 + 2 + 2 + SALT_BYTES + 8 + 8 + KEYNUM_SK_BYTES     # 158

#: libsodium's crypto_pwhash_scryptsalsa208sha256_{OPS,MEM}LIMIT_SENSITIVE, what minisign -G uses:
#: scrypt N=2^20, r=8, p=1, i.e. 1 GiB of memory and a few seconds per key load.
OPSLIMIT_SENSITIVE = 33554432
MEMLIMIT_SENSITIVE = 1073741824
#: What new keys are made with; read at call time, so tests can lower them (minisign honours any).
DEFAULT_OPSLIMIT = OPSLIMIT_SENSITIVE
DEFAULT_MEMLIMIT = MEMLIMIT_SENSITIVE

#: minisign reads passphrases into a 1024-byte buffer.
PASSPHRASE_MAX = 1023

Passphrase = bytes | None | Callable[[], bytes | None]


class SecretKeyError(UserError):
    """A secret key that cannot be used: unreadable, malformed, damaged, or no passphrase."""


class WrongPassphraseError(SecretKeyError):
    """The passphrase does not decrypt the secret key (its checksum does not match)."""


# -- scrypt, as libsodium does it ----------------------------------------------------


def scrypt_params(opslimit: int, memlimit: int) -> tuple[int, int, int]:
    """``(log2 N, r, p)`` from opslimit/memlimit, as libsodium's ``pickparams`` picks them.

    minisign stores only opslimit and memlimit in the key file; the scrypt
    parameters are derived from them at every load, so this must match libsodium
    exactly or no minisign key would decrypt.
    """
    opslimit = max(opslimit, 32768)
    r = 8
    if opslimit < memlimit // 32:
        p = 1
        max_n = opslimit // (r * 4)
        n_log2 = 1
        while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
            n_log2 += 1
    else:
        max_n = memlimit // (r * 128)
        n_log2 = 1
        while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
            n_log2 += 1
        max_rp = min((opslimit // 4) // (1 << n_log2), 0x3FFFFFFF)
        p = max_rp // r
    return n_log2, r, p


def _scrypt(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int, length: int) -> bytes:
    """The passphrase-derived stream; hashlib's scrypt while its memory cap allows, else cryptography's."""
    n_log2, r, p = scrypt_params(opslimit, memlimit)
    if n_log2 > 22 or not 1 <= p <= 64:
        # minisign makes N=2^20; a key file asking for more than 4 GiB is damaged or hostile.
        raise SecretKeyError(f"secret key asks for unreasonable scrypt parameters "
                             f"(N=2^{n_log2}, r={r}, p={p})")
    need = 128 * r * (1 << n_log2) + 128 * r * p + 256 * r + (1 << 20)
    if need < 2 ** 31 - 1:
        return hashlib.scrypt(passphrase, salt=salt, n=1 << n_log2, r=r, p=p, maxmem=need, dklen=length)
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=length, n=1 << n_log2, r=r, p=p).derive(passphrase)


def _checksum(sig_alg: bytes, key_id: bytes, secret: bytes) -> bytes:
    return hashlib.blake2b(sig_alg + key_id + secret, digest_size=CHECKSUM_BYTES).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


# -- secret keys ----------------------------------------------------------------------


@dataclass(frozen=True)
class SecretKey:
    """An Ed25519 signing key and its minisign key id.

    ``secret`` is libsodium's 64-byte form (32-byte seed, then the public key),
    which is what the key file stores.
    """

    key_id: bytes
    secret: bytes
    source: str = ""

    @property
    def key_id_hex(self) -> str:
        return format_key_id(self.key_id)

    def public_key(self) -> PublicKey:
        return PublicKey(key_id=self.key_id, raw=self.secret[32:], source=self.source)

    def sign(self, message: bytes | bytearray | memoryview) -> bytes:
        """A raw 64-byte Ed25519 signature."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.secret[:32]).sign(bytes(message))

    def to_text(self, passphrase: bytes | None, *, comment: str | None = None,
                opslimit: int | None = None, memlimit: int | None = None) -> str:
        """The key file's text, encrypted under ``passphrase`` (``None``: unencrypted, as ``-W``).

        Like minisign, when the machine cannot give scrypt the memory asked for,
        both limits are halved until it can; the limits used are what the file
        records, so any loader derives the same stream.
        """
        checksum = _checksum(KEY_ALG, self.key_id, self.secret)
        keynum_sk = self.key_id + self.secret + checksum
        if passphrase is None:
            header = KEY_ALG + KDF_NONE + CHK_ALG + bytes(SALT_BYTES) + bytes(16)
            body = keynum_sk
            comment = comment or "minisign secret key (unencrypted)"
        else:
            opslimit = DEFAULT_OPSLIMIT if opslimit is None else opslimit
            memlimit = DEFAULT_MEMLIMIT if memlimit is None else memlimit
            salt = os.urandom(SALT_BYTES)
            while True:
                try:
                    stream = _scrypt(passphrase, salt, opslimit, memlimit, KEYNUM_SK_BYTES)
                    break
                except (MemoryError, ValueError):
                    # OpenSSL reports a failed allocation as ValueError ("memory limit exceeded").
                    if memlimit <= 1 << 24:
                        raise SecretKeyError("not enough memory to derive a key from the passphrase") from None
                    opslimit //= 2
                    memlimit //= 2
            header = KEY_ALG + KDF_SCRYPT + CHK_ALG + salt + struct.pack("<QQ", opslimit, memlimit)
            body = _xor(keynum_sk, stream)
            comment = comment or "minisign encrypted secret key"
        blob = header + body
        assert len(blob) == SECRET_KEY_BLOB
        return f"untrusted comment: {comment}\n{base64.b64encode(blob).decode('ascii')}\n"


def generate_secret_key() -> SecretKey:
    """A new random key; the key id is 8 random bytes, as minisign makes them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SecretKey(key_id=os.urandom(KEY_ID_BYTES), secret=seed + public)


def generate_keypair(passphrase: bytes | None, *, unencrypted: bool = False,
                     opslimit: int | None = None, memlimit: int | None = None) -> tuple[str, str]:
    """A new key pair as ``(secret key text, public key text)``.

    The secret key is encrypted under ``passphrase``; an unencrypted one needs both
    ``passphrase=None`` and ``unencrypted=True``, so that a forgotten passphrase
    never silently produces a key anyone who copies the file can use.
    ``opslimit``/``memlimit`` default to minisign's (:data:`DEFAULT_OPSLIMIT`,
    :data:`DEFAULT_MEMLIMIT`); lower ones (tests) are recorded in the file and
    honoured by minisign too.
    """
    if passphrase is None and not unencrypted:
        raise SecretKeyError("no passphrase for the new secret key; an unencrypted key must be asked "
                             "for explicitly (--unencrypted)")
    if passphrase is not None and unencrypted:
        raise SecretKeyError("a passphrase was given for a key asked to be unencrypted")
    if passphrase is not None:
        _check_passphrase(passphrase)
    key = generate_secret_key()
    public = key.public_key()
    secret_text = key.to_text(passphrase, opslimit=opslimit, memlimit=memlimit,
                              comment=(f"supercharge encrypted secret key {key.key_id_hex}" if passphrase
                                       is not None else f"supercharge secret key {key.key_id_hex} (unencrypted)"))
    return secret_text, public.to_text(f"minisign public key {key.key_id_hex}")


def _check_passphrase(passphrase: bytes) -> None:
    if not passphrase:
        raise SecretKeyError("empty passphrase; use --unencrypted for a key without one")
    if len(passphrase) > PASSPHRASE_MAX:
        raise SecretKeyError(f"passphrase longer than {PASSPHRASE_MAX} bytes (minisign could not read it)")
    if b"\n" in passphrase or b"\r" in passphrase or b"\0" in passphrase:
        raise SecretKeyError("passphrase contains a line break or NUL (minisign could not read it)")


def _looks_like_key_text(value: str) -> bool:
    return value.lstrip().startswith("untrusted comment:") or "\n" in value.strip()


def parse_secret_key(text: str | bytes, passphrase: Passphrase, source: str = "secret key") -> SecretKey:
    """Decode a secret key file's text; ``passphrase`` may be a callable, asked only if needed."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if lines and lines[0].startswith(b"untrusted comment:"):
        lines = lines[1:]
    if not lines:
        raise SecretKeyError(f"{source}: truncated secret key: no key line")
    try:
        blob = base64.b64decode(lines[0], validate=True)
    except (binascii.Error, ValueError):
        raise SecretKeyError(f"{source}: secret key is not valid base64 (corrupted or truncated)") from None
    if len(blob) != SECRET_KEY_BLOB:
        raise SecretKeyError(f"{source}: secret key is {len(blob)} bytes, expected {SECRET_KEY_BLOB} "
                             f"(truncated, or not a minisign secret key)")
    sig_alg, kdf_alg, chk_alg = blob[0:2], blob[2:4], blob[4:6]
    salt = blob[6:6 + SALT_BYTES]
    opslimit, memlimit = struct.unpack("<QQ", blob[38:54])
    body = blob[54:]
    if sig_alg != KEY_ALG:
        raise SecretKeyError(f"{source}: unsupported key algorithm {sig_alg!r}, expected {KEY_ALG!r}")
    if chk_alg != CHK_ALG:
        raise SecretKeyError(f"{source}: unsupported checksum algorithm {chk_alg!r}, expected {CHK_ALG!r}")
    if kdf_alg == KDF_SCRYPT:
        secret_pass = passphrase() if callable(passphrase) else passphrase
        if secret_pass is None:
            raise SecretKeyError(f"{source}: secret key is encrypted and no passphrase was given "
                                 f"(set {ENV_PASSPHRASE} or run on a terminal)")
        try:
            stream = _scrypt(secret_pass, salt, opslimit, memlimit, KEYNUM_SK_BYTES)
        except MemoryError:
            raise SecretKeyError(f"{source}: not enough memory to derive the key from the passphrase "
                                 f"(scrypt N=2^{scrypt_params(opslimit, memlimit)[0]})") from None
        body = _xor(body, stream)
    elif kdf_alg != KDF_NONE:
        raise SecretKeyError(f"{source}: unsupported key derivation {kdf_alg!r}, expected 'Sc' (scrypt) "
                             f"or none")
    key_id, secret, checksum = body[:8], body[8:72], body[72:]
    # minisign -G -W leaves the checksum of an unencrypted key all zero (it is only computed when
    # encrypting) and never checks it for one; the seed/public-key check below still catches damage.
    unchecked = kdf_alg == KDF_NONE and checksum == bytes(CHECKSUM_BYTES)
    if not unchecked and _checksum(sig_alg, key_id, secret) != checksum:
        if kdf_alg == KDF_SCRYPT:
            raise WrongPassphraseError(f"{source}: wrong passphrase for the secret key "
                                       f"(checksum does not match after decryption)")
        raise SecretKeyError(f"{source}: secret key {format_key_id(key_id)} is damaged (checksum mismatch)")
    key = SecretKey(key_id=key_id, secret=secret, source=source)
    if _derive_public(secret[:32]) != secret[32:]:
        raise SecretKeyError(f"{source}: secret key {key.key_id_hex} is damaged (its public half does "
                             f"not match its seed)")
    return key


def _derive_public(seed: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_secret_key(source: Path | str, passphrase: Passphrase) -> SecretKey:
    """A secret key from a file path, or from the key's text itself (as in ``SUPERCHARGE_SIGN_KEY``).

    A ``str`` that starts with ``untrusted comment:`` or spans lines is the text;
    anything else is a path.  ``passphrase`` may be a callable so that a prompt
    only appears for an encrypted key.
    """
    if isinstance(source, str) and _looks_like_key_text(source):
        return parse_secret_key(source, passphrase, source="secret key text")
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecretKeyError(f"{path}: secret key file not found") from None
    except OSError as exc:
        raise SecretKeyError(f"{path}: cannot read secret key: {exc.strerror or exc}") from None
    return parse_secret_key(data, passphrase, source=str(path))


# -- passphrases and keys from the environment ----------------------------------------


def passphrase_from_environment() -> bytes | None:
    """``SUPERCHARGE_SIGN_PASSPHRASE`` as bytes, or None when unset (empty counts as unset)."""
    value = os.environ.get(ENV_PASSPHRASE)
    return os.fsencode(value) if value else None


def ask_passphrase(prompt: str = "Passphrase: ", *, confirm: bool = False) -> bytes:
    """Ask on the terminal (twice when ``confirm``), echo off; UserError when there is no terminal."""
    if not sys.stdin.isatty():
        raise SecretKeyError(f"a passphrase is needed and there is no terminal to ask on; set {ENV_PASSPHRASE}")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Passphrase (again): ") != first:
        raise SecretKeyError("the two passphrases differ")
    return os.fsencode(first)


def passphrase_for_loading() -> bytes:
    """The passphrase for an encrypted key: the environment first (automation), then the terminal."""
    return passphrase_from_environment() or ask_passphrase("Passphrase for the secret key: ")


def signing_key(source: str | Path | None = None, passphrase: Passphrase = passphrase_for_loading) -> SecretKey:
    """The key to sign with: ``source`` (a path or key text), else ``SUPERCHARGE_SIGN_KEY``.

    The passphrase is only asked for (environment, then terminal) when the key is
    encrypted.  There is no implicit default file: signing with a key nobody named
    is how the wrong key ends up in production.
    """
    if source is None:
        env = os.environ.get(ENV_KEY)
        if not env:
            raise SecretKeyError(f"no signing key: pass -k SECKEY or set {ENV_KEY} (key text or path)")
        source = env
    return load_secret_key(source if isinstance(source, str) else Path(source), passphrase)


# -- signing --------------------------------------------------------------------------


def default_trusted_comment(name: str, prehash: bool, timestamp: int | None = None) -> str:
    """minisign's default: ``timestamp:<unix>\\tfile:<basename>[\\thashed]``."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"timestamp:{ts}\tfile:{os.path.basename(name)}" + ("\thashed" if prehash else "")


def _check_comment(value: str, label: str, limit: int) -> bytes:
    data = value.encode("utf-8")
    if b"\n" in data or b"\r" in data:
        raise UserError(f"{label} comment must be one line")
    if len(data) > limit:
        raise UserError(f"{label} comment is {len(data)} bytes, at most {limit} fit in a minisign signature")
    return data


def sign_message(message: bytes | bytearray | memoryview, sk: SecretKey, *, prehashed: bool,
                 trusted_comment: str, untrusted_comment: str | None = None) -> str:
    """The ``.minisig`` text for ``message`` (the file, or its BLAKE2b-512 digest when prehashed)."""
    trusted = _check_comment(trusted_comment, "trusted", TRUSTED_COMMENT_MAX - len(TRUSTED_PREFIX) - 2)
    untrusted = _check_comment(untrusted_comment if untrusted_comment is not None
                               else f"signature from supercharge secret key {sk.key_id_hex}",
                               "untrusted", UNTRUSTED_COMMENT_MAX - len(UNTRUSTED_PREFIX) - 2)
    signature = sk.sign(message)
    global_signature = sk.sign(signature + trusted)
    return format_signature(SIG_ALG_PREHASHED if prehashed else SIG_ALG_LEGACY, sk.key_id, signature,
                            trusted, global_signature, untrusted)


def sign_bytes(data: bytes | bytearray | memoryview, sk: SecretKey, *, name: str = "data",
               trusted_comment: str | None = None, prehash: bool = True,
               untrusted_comment: str | None = None) -> str:
    """Sign data held in memory (a plan, a generated patch); ``name`` goes into the default comment."""
    if trusted_comment is None:
        trusted_comment = default_trusted_comment(name, prehash)
    message = hashlib.blake2b(data, digest_size=64).digest() if prehash else data
    return sign_message(message, sk, prehashed=prehash, trusted_comment=trusted_comment,
                        untrusted_comment=untrusted_comment)


def sign_file(path: Path | str, sk: SecretKey, trusted_comment: str | None = None, prehash: bool = True,
              untrusted_comment: str | None = None) -> str:
    """The ``.minisig`` text for a file; prehashed (the default) streams it, legacy reads it whole."""
    path = Path(path)
    if trusted_comment is None:
        trusted_comment = default_trusted_comment(path.name, prehash)
    try:
        message = blake2b_file(path) if prehash else path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return sign_message(message, sk, prehashed=prehash, trusted_comment=trusted_comment,
                        untrusted_comment=untrusted_comment)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write beside ``path`` and rename over it, so a reader never sees half a key or signature."""
    from .atomic import write_atomically as write

    write(Path(path), [data], mode)


def write_signature(path: Path | str, text: str, sig_path: Path | str | None = None) -> Path:
    """Store a signature as ``path.minisig`` (or ``sig_path``), atomically; returns where."""
    target = Path(sig_path) if sig_path is not None else signature_path_for(path)
    try:
        write_atomically(target, text.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        raise UserError(f"{target}: cannot write signature: {exc.strerror or exc}") from None
    return target


def write_signed_plan(path: Path, plan: dict, signer: SecretKey | None) -> None:
    """Write a boot plan (JSON) atomically and sign it with ``signer``.

    Without a signer an old ``.minisig`` beside it is removed: a signature must
    never vouch for a plan it was not made for.
    """
    import json

    write_atomically(path, (json.dumps(plan, indent=2, sort_keys=True) + "\n").encode())
    if signer is not None:
        write_signature(path, sign_file(path, signer))
    else:
        signature_path_for(path).unlink(missing_ok=True)


def ensure_unencrypted_keypair(directory: Path, name: str) -> tuple[Path, Path]:
    """A key pair kept in ``directory`` for demos and tests, made once, unencrypted on purpose.

    Production keys come from ``supercharge keygen`` with a passphrase; this is
    for throwaway domains whose signing key lives next to them anyway.
    """
    directory.mkdir(parents=True, exist_ok=True)
    secret, public = directory / f"{name}.key", directory / f"{name}.pub"
    if not (secret.is_file() and public.is_file()):
        secret_text, public_text = generate_keypair(None, unencrypted=True)
        write_atomically(secret, secret_text.encode(), 0o600)
        write_atomically(public, public_text.encode(), 0o644)
    return secret, public


def sign_with(path: Path, secret_key_file: Path) -> Path:
    """Sign ``path`` with an unencrypted secret key file; returns the .minisig path."""
    sk = load_secret_key(secret_key_file, None)
    return write_signature(path, sign_file(path, sk))
