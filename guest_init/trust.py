"""Signature checks in minisign's formats: public keys, ``.minisig`` files, Ed25519.

Why minisign's formats: admins already have the stock ``minisign`` tool and may
keep their signing key on another machine; anything it signs we verify, and
anything ``supercharge sign`` writes, ``minisign -V`` accepts.  Formats
(docs/trust.md has the details):

- public key: ``untrusted comment: ...`` line, then base64 of ``b"Ed"`` + 8-byte
  key id + 32-byte Ed25519 public key;
- signature (``FILE.minisig``): ``untrusted comment: ...`` / base64 of the
  algorithm (``b"ED"``: Ed25519 over the BLAKE2b-512 digest of the file, the
  "prehashed" mode; ``b"Ed"``: over the file itself, the "legacy" mode) + key id +
  64-byte signature / ``trusted comment: ...`` / base64 of the *global* signature,
  Ed25519 over the 64 signature bytes followed by the trusted comment, so the
  comment (timestamp, file name) cannot be swapped between signatures.

This module is the verifying half and runs inside the frozen PID 1 of the
initramfs as well as in dom0, so only the standard library is imported at module
level; ``cryptography`` is imported on the first check.  Signing and key
generation live in :mod:`dom0.keys`, which imports this module, never the reverse.

Every failure is a :class:`TrustError` with a one-line message naming the file and
the key id (16 upper-case hex digits, as minisign prints it) and a ``kind`` string
the boot report can carry as a field.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Algorithm tag of public and secret keys (Ed25519).
KEY_ALG = b"Ed"
#: Signature over the file itself (minisign ``-l``); verifying needs the whole file in memory.
SIG_ALG_LEGACY = b"Ed"
#: Signature over the file's BLAKE2b-512 digest (minisign's default since 0.8); streams.
SIG_ALG_PREHASHED = b"ED"

KEY_ID_BYTES = 8
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PUBLIC_KEY_BLOB = len(KEY_ALG) + KEY_ID_BYTES + PUBLIC_KEY_BYTES        # 42
SIGNATURE_BLOB = len(SIG_ALG_PREHASHED) + KEY_ID_BYTES + SIGNATURE_BYTES  # 74

UNTRUSTED_PREFIX = b"untrusted comment: "
TRUSTED_PREFIX = b"trusted comment: "
SIG_SUFFIX = ".minisig"

#: minisign's own limits (COMMENTMAXBYTES, TRUSTEDCOMMENTMAXBYTES), line included.
UNTRUSTED_COMMENT_MAX = 1024
TRUSTED_COMMENT_MAX = 8192
#: A signature file is four short lines; anything much larger is not one, so it is not read whole.
SIG_FILE_MAX = 64 * 1024

#: Bytes per read when hashing: large enough that the per-call overhead vanishes next to
#: the hash, small enough to stay in cache and to keep a 1 GiB image out of memory.
CHUNK_SIZE = 1 << 20

#: Largest file a legacy signature is checked for: the whole file is held in memory, and minisign
#: itself refuses to sign or verify more than this without prehashing.
LEGACY_MAX_BYTES = 1 << 30

#: Where the agent looks for trusted public keys (``*.pub``) in the initramfs, unless told otherwise.
DEFAULT_TRUSTED_DIR = Path("/etc/supercharge/trusted-keys")


def format_key_id(key_id: bytes) -> str:
    """The key id as minisign prints it: the 8 bytes read as a little-endian number, in hex.

    minisign stores the id as bytes but prints ``%016llX`` of a little-endian load,
    so the printed form is the stored bytes reversed; using the same form lets an
    admin match our messages against ``minisign.pub``'s comment line.
    """
    return key_id[::-1].hex().upper()


def signature_path_for(path: Path | str) -> Path:
    """``FILE.minisig``, the signature minisign writes and looks for by default."""
    return Path(str(path) + SIG_SUFFIX)


# -- errors -------------------------------------------------------------------------


class TrustError(Exception):
    """A key or signature could not be used, or a check failed; one line.

    ``path`` is the signed file (when there is one), ``sig_path`` the signature
    file and ``key_id`` the key id (printed form) the signature names; the boot
    report carries them as fields next to ``kind``.
    """

    kind = "trust"

    def __init__(self, message: str, *, path: str | None = None, sig_path: str | None = None,
                 key_id: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.sig_path = sig_path
        self.key_id = key_id


class KeyFormatError(TrustError):
    """A public key file or string is not a minisign Ed25519 public key."""

    kind = "bad-key"


class NoTrustedKeysError(KeyFormatError):
    """Verification was asked for with no trusted key at all: nothing could ever pass."""

    kind = "no-trusted-keys"


class SignatureError(TrustError):
    """The signature check did not pass; subclasses say why."""

    kind = "bad-signature"


class MissingSignatureError(SignatureError):
    """The signature file does not exist."""

    kind = "missing-signature"


class UnreadableError(SignatureError):
    """The signed file or its signature could not be read (permissions, I/O error, a directory)."""

    kind = "unreadable"


class MalformedSignatureError(SignatureError):
    """The signature file is not in minisign's format: truncated, not base64, wrong length."""

    kind = "malformed-signature"


class CorruptSignatureError(MalformedSignatureError):
    """The 64 signature bytes cannot be any Ed25519 signature, so they were damaged.

    Ed25519 signers only produce a scalar below the group order and a curve point;
    anything else is damage in transit or storage, not a different signer.
    """

    kind = "corrupt-signature"


class UnsupportedAlgorithmError(SignatureError):
    """The signature uses an algorithm tag other than ``Ed`` or ``ED``."""

    kind = "unsupported-algorithm"


class LegacySignatureError(UnsupportedAlgorithmError):
    """A legacy (non-prehashed) signature where prehashed ones are required (minisign ``-H``)."""

    kind = "legacy-signature"


class UntrustedKeyError(SignatureError):
    """The signature names a key id that is not among the trusted keys.

    ``found`` is the key id in the signature, ``trusted`` the trusted key ids, so
    that a boot report can say which key was expected and which was found.
    """

    kind = "untrusted-key"

    def __init__(self, message: str, *, found: str, trusted: list[str], **kw: Any) -> None:
        super().__init__(message, key_id=found, **kw)
        self.found = found
        self.trusted = trusted


class FileModifiedError(SignatureError):
    """The file's signature fails while the global signature holds: the file changed."""

    kind = "file-modified"


class CommentTamperedError(SignatureError):
    """The file's signature holds but the global one fails: the trusted comment changed."""

    kind = "comment-tampered"


class WrongKeyError(SignatureError):
    """Neither the file's nor the global signature verifies with the key the id names.

    Both failing at once is what a different secret key that reuses a trusted key
    id produces (a forged or regenerated key); it is also what damage to the
    signature bytes that still leaves a well-formed signature produces, and the two
    cannot be told apart without the other key, so the message names both.
    """

    kind = "wrong-key"


# -- public keys ----------------------------------------------------------------------


def _decode_b64(text: bytes, what: str, *, source: str, error: type[TrustError], **kw: Any) -> bytes:
    """Strict base64 (no stray characters), because a tolerant decoder hides damage."""
    try:
        return base64.b64decode(text.strip(b"\r\n"), validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{source}: {what} is not valid base64 (corrupted or truncated)",
                    **kw) from None


def _text_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its minisign key id.

    ``key_id`` is the 8 stored bytes (use :attr:`key_id_hex` in messages), ``raw``
    the 32-byte public key, ``comment`` the untrusted comment (informational only)
    and ``source`` where it was read from, for error messages.
    """

    key_id: bytes
    raw: bytes
    comment: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_BYTES or len(self.raw) != PUBLIC_KEY_BYTES:
            raise KeyFormatError(f"{self.source or 'public key'}: key id must be {KEY_ID_BYTES} bytes "
                                 f"and key {PUBLIC_KEY_BYTES} bytes")
        if weak_public_key(self.raw):
            raise KeyFormatError(f"{self.source or 'public key'}: key {format_key_id(self.key_id)} is not a "
                                 f"usable Ed25519 public key (not a canonical point of large order)",
                                 key_id=format_key_id(self.key_id))

    @property
    def key_id_hex(self) -> str:
        """The key id as minisign prints it (16 upper-case hex digits)."""
        return format_key_id(self.key_id)

    @classmethod
    def from_base64(cls, value: str | bytes, *, comment: str = "", source: str = "public key") -> PublicKey:
        """A key from its base64 line alone, as minisign's ``-P`` takes it."""
        blob = _decode_b64(_text_bytes(value), "public key", source=source, error=KeyFormatError)
        if len(blob) != PUBLIC_KEY_BLOB:
            raise KeyFormatError(f"{source}: public key is {len(blob)} bytes, expected {PUBLIC_KEY_BLOB} "
                                 f"(truncated or not a minisign public key)")
        if blob[:2] != KEY_ALG:
            raise KeyFormatError(f"{source}: unsupported key algorithm {blob[:2]!r}, expected {KEY_ALG!r} "
                                 f"(Ed25519)")
        return cls(key_id=blob[2:10], raw=blob[10:], comment=comment, source=source)

    @classmethod
    def from_string(cls, text: str | bytes, source: str = "public key") -> PublicKey:
        """A key from a ``.pub`` file's text, or from its base64 line alone."""
        lines = [line for line in _text_bytes(text).splitlines() if line.strip()]
        if not lines:
            raise KeyFormatError(f"{source}: empty, expected a minisign public key")
        comment = ""
        if lines[0].startswith(b"untrusted comment:"):
            comment = lines[0][len(b"untrusted comment:"):].strip().decode("utf-8", "replace")
            if len(lines) < 2:
                raise KeyFormatError(f"{source}: truncated public key: no key line after the comment")
            lines = lines[1:]
        return cls.from_base64(lines[0], comment=comment, source=source)

    @classmethod
    def from_file(cls, path: Path | str) -> PublicKey:
        """A key from a ``.pub`` file (minisign's or ours)."""
        try:
            with open(path, "rb") as handle:
                data = handle.read(SIG_FILE_MAX)
        except FileNotFoundError:
            raise KeyFormatError(f"{path}: public key file not found") from None
        except OSError as exc:
            raise KeyFormatError(f"{path}: cannot read public key: {exc.strerror or exc}") from None
        return cls.from_string(data, source=str(path))

    def to_base64(self) -> str:
        """The key line, as minisign's ``-P`` takes it."""
        return base64.b64encode(KEY_ALG + self.key_id + self.raw).decode("ascii")

    def to_text(self, comment: str | None = None) -> str:
        """The ``.pub`` file's text, with minisign's comment unless given one."""
        if comment is None:
            comment = f"minisign public key {self.key_id_hex}"
        return f"untrusted comment: {comment}\n{self.to_base64()}\n"

    def verify_raw(self, signature: bytes, message: bytes | bytearray | memoryview) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``.

        Through :mod:`guest_init.ed25519` (OpenSSL's libcrypto, which the
        initramfs carries anyway, rather than the 11 MB ``cryptography``).
        """
        from .ed25519 import Ed25519Unavailable, verify

        try:
            return verify(self.raw, signature, message)
        except Ed25519Unavailable as exc:
            raise VerifierUnavailableError(str(exc)) from None


class VerifierUnavailableError(TrustError):
    """``cryptography`` cannot be imported (e.g. left out of a frozen agent): nothing can be checked."""

    kind = "verifier-unavailable"


def load_trusted_keys(source: Path | str | Iterable[Path | str], *,
                      allow_empty: bool = False) -> list[PublicKey]:
    """Trusted keys from files, and from directories (every ``*.pub`` in them, sorted).

    Several keys at once is how keys are rotated: sign with the new key, trust
    both until every artifact is re-signed, then drop the old one.  The same key
    twice (same id, same bytes) is kept once; two different keys that claim the
    same id are refused, since a signature naming that id would be ambiguous.
    No key at all is an error unless ``allow_empty``: a verifier with nothing to
    trust can only fail, and saying so early beats a confusing later message.
    """
    items: list[Path | str] = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    keys: list[PublicKey] = []
    by_id: dict[bytes, PublicKey] = {}
    for item in items:
        path = Path(item)
        paths = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for one in paths:
            key = PublicKey.from_file(one)
            seen = by_id.get(key.key_id)
            if seen is not None:
                if seen.raw != key.raw:
                    raise KeyFormatError(f"{one}: key id {key.key_id_hex} is also used by a different "
                                         f"key in {seen.source}; key ids must be unique among trusted keys",
                                         key_id=key.key_id_hex)
                continue
            by_id[key.key_id] = key
            keys.append(key)
    if not keys and not allow_empty:
        where = ", ".join(str(i) for i in items) or "(nothing given)"
        raise NoTrustedKeysError(f"no trusted public keys found in {where}")
    return keys


# -- signatures -----------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """A parsed ``.minisig`` file.

    The trusted comment is kept as the exact bytes of the file, because the global
    signature covers those bytes; :attr:`trusted_comment_text` is for display.
    """

    algorithm: bytes
    key_id: bytes
    signature: bytes
    trusted_comment: bytes
    global_signature: bytes
    untrusted_comment: bytes = b""

    @property
    def prehashed(self) -> bool:
        return self.algorithm == SIG_ALG_PREHASHED

    @property
    def key_id_hex(self) -> str:
        return format_key_id(self.key_id)

    @property
    def trusted_comment_text(self) -> str:
        return self.trusted_comment.decode("utf-8", "replace")

    @classmethod
    def parse(cls, data: str | bytes, source: str = "signature", *, path: str | None = None) -> Signature:
        """Parse minisign's four lines, strictly: each problem has its own message."""
        raw = _text_bytes(data)
        kw = {"path": path, "sig_path": source}
        lines = raw.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        if not raw.strip():
            raise MalformedSignatureError(f"{source}: empty signature file", **kw)
        if not lines[0].startswith(UNTRUSTED_PREFIX):
            raise MalformedSignatureError(f"{source}: not a minisign signature: first line must start "
                                          f"with 'untrusted comment: '", **kw)
        if len(lines) < 2 or not lines[1]:
            raise MalformedSignatureError(f"{source}: truncated signature file: no signature line", **kw)
        blob = _decode_b64(lines[1], "signature line", source=source, error=MalformedSignatureError, **kw)
        if len(blob) != SIGNATURE_BLOB:
            raise MalformedSignatureError(f"{source}: signature line decodes to {len(blob)} bytes, "
                                          f"expected {SIGNATURE_BLOB} (truncated or corrupted)", **kw)
        algorithm, key_id, signature = blob[:2], blob[2:10], blob[10:]
        key_hex = format_key_id(key_id)
        if algorithm not in (SIG_ALG_LEGACY, SIG_ALG_PREHASHED):
            raise UnsupportedAlgorithmError(
                f"{source}: unsupported signature algorithm {algorithm!r} (key {key_hex}); "
                f"supported: 'ED' (prehashed BLAKE2b-512) and 'Ed' (legacy)", key_id=key_hex, **kw)
        if len(lines) < 3 or not lines[2]:
            raise MalformedSignatureError(f"{source}: truncated signature file: no trusted comment line "
                                          f"(key {key_hex})", key_id=key_hex, **kw)
        if not lines[2].startswith(TRUSTED_PREFIX):
            raise MalformedSignatureError(f"{source}: line 3 must start with 'trusted comment: ' "
                                          f"(key {key_hex})", key_id=key_hex, **kw)
        trusted = lines[2][len(TRUSTED_PREFIX):]
        if len(lines) < 4 or not lines[3]:
            raise MalformedSignatureError(f"{source}: truncated signature file: no global signature line "
                                          f"(key {key_hex})", key_id=key_hex, **kw)
        global_sig = _decode_b64(lines[3], "global signature line", source=source,
                                 error=MalformedSignatureError, key_id=key_hex, **kw)
        if len(global_sig) != SIGNATURE_BYTES:
            raise MalformedSignatureError(f"{source}: global signature decodes to {len(global_sig)} bytes, "
                                          f"expected {SIGNATURE_BYTES} (truncated or corrupted; key {key_hex})",
                                          key_id=key_hex, **kw)
        return cls(algorithm=algorithm, key_id=key_id, signature=signature, trusted_comment=trusted,
                   global_signature=global_sig, untrusted_comment=lines[0][len(UNTRUSTED_PREFIX):])

    def to_text(self) -> str:
        """The ``.minisig`` file's text, byte for byte as minisign writes it."""
        return format_signature(self.algorithm, self.key_id, self.signature, self.trusted_comment,
                                self.global_signature, self.untrusted_comment)


def format_signature(algorithm: bytes, key_id: bytes, signature: bytes, trusted_comment: bytes | str,
                     global_signature: bytes, untrusted_comment: bytes | str) -> str:
    """Lay out a ``.minisig`` file (shared with :mod:`dom0.keys`, so there is one writer)."""
    untrusted = _text_bytes(untrusted_comment)
    trusted = _text_bytes(trusted_comment)
    for label, value in (("untrusted", untrusted), ("trusted", trusted)):
        if b"\n" in value or b"\r" in value:
            raise ValueError(f"{label} comment must be one line")
    out = (UNTRUSTED_PREFIX + untrusted + b"\n"
           + base64.b64encode(algorithm + key_id + signature) + b"\n"
           + TRUSTED_PREFIX + trusted + b"\n"
           + base64.b64encode(global_signature) + b"\n")
    return out.decode("utf-8", "surrogateescape")


# -- Ed25519 plausibility ---------------------------------------------------------------

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _decode_point(encoded: bytes) -> tuple[int, int] | None:
    """The affine point a 32-byte Ed25519 encoding stands for, or None if it is none (or not canonical)."""
    value = int.from_bytes(encoded, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x2 = u * pow(v, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else (0, y)
    x = pow(x2, (_P + 3) // 8, _P)
    if x * x % _P != x2:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if x * x % _P != x2:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def weak_public_key(raw: bytes) -> bool:
    """Whether 32 bytes are unusable as an Ed25519 public key: not a canonical point, or of small order.

    A small-order key (the all-zero bytes, for one) lets a trivial signature pass
    for every message in verifiers that do not refuse it, and OpenSSL does not;
    libsodium, and so minisign, does.  Refusing such keys when they are loaded
    keeps our verdicts the same as minisign's.
    """
    point = _decode_point(raw)
    if point is None:
        return True
    x, y = point
    for _ in range(3):  # multiply by the cofactor 8: a small-order point lands on the identity
        xy = x * y % _P
        t = _D * xy * xy % _P
        x, y = (2 * xy * pow(1 + t, _P - 2, _P) % _P,
                (y * y + x * x) * pow(1 - t, _P - 2, _P) % _P)
    return (x, y) == (0, 1)


def plausible_signature(signature: bytes) -> bool:
    """Whether 64 bytes could have come out of an Ed25519 signer at all.

    A signer always emits ``S`` below the group order ``L`` and ``R`` the encoding
    of a curve point.  When both checks of a signature fail, this separates bytes
    that were damaged (no signer makes them) from a genuine signature by another
    key, so the error can say which.  Only run on the failure path.
    """
    if len(signature) != SIGNATURE_BYTES:
        return False
    if int.from_bytes(signature[32:], "little") >= _L:
        return False
    return _decode_point(signature[:32]) is not None


# -- verifying --------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A signature that passed: who signed (key id) and what they said (trusted comment)."""

    key_id: str
    trusted_comment: str
    prehashed: bool
    path: str = ""
    sig_path: str = ""


class _Blake2b512:
    """BLAKE2b-512 from OpenSSL through ``cryptography`` when present, else ``hashlib``.

    Same digest either way; OpenSSL's is about 1.5x faster than CPython's bundled
    one on this kind of machine, which is what keeps a 1 GiB image within reach of
    libsodium (what ``minisign -V`` uses).  ``cryptography`` is needed for the
    Ed25519 check anyway, so preferring it costs no extra import.
    """

    __slots__ = ("_finish", "_hash")

    def __init__(self) -> None:
        try:
            from cryptography.hazmat.primitives import hashes

            h = hashes.Hash(hashes.BLAKE2b(64))
            self._hash: Any = h
            self._finish: Callable[[], bytes] = h.finalize
        except Exception:  # noqa: BLE001  # pragma: no cover - any failure here means: use hashlib
            h2 = hashlib.blake2b(digest_size=64)
            self._hash = h2
            self._finish = h2.digest

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._finish()


def _hash_file(path: Path | str, hasher: Any, chunk_size: int = CHUNK_SIZE) -> None:
    """Feed a file to ``hasher`` in chunks through one reused buffer: no per-chunk allocation."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as handle:
        try:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):  # pragma: no cover - not on every file system
            pass
        readinto = handle.readinto
        update = hasher.update
        while True:
            n = readinto(buf)
            if not n:
                break
            update(view[:n] if n < chunk_size else view)


def sha256_file(path: Path | str) -> str:
    """The SHA-256 of a file, lower-case hex, as plans pin artifacts; streamed, never read whole."""
    h = hashlib.sha256()
    _hash_file(path, h)
    return h.hexdigest()


def blake2b_file(path: Path | str) -> bytes:
    """The BLAKE2b-512 digest of a file, the message a prehashed signature signs; streamed."""
    h = _Blake2b512()
    _hash_file(path, h)
    return h.digest()


def _key_list(keys: Sequence[PublicKey]) -> str:
    return ", ".join(k.key_id_hex for k in keys) or "(none)"


class StreamVerifier:
    """Check one signature while the data goes by, e.g. as it is downloaded.

    Everything that can be decided from the signature alone (format, algorithm,
    whether its key id is trusted) is decided in the constructor, before a byte of
    data is read, so an untrusted artifact is refused without fetching it.  Then
    :meth:`update` with the data in order and :meth:`finish` for the verdict.
    Prehashed signatures stream in constant memory; legacy ones must hold the
    whole data, as minisign does, so ``require_prehashed`` refuses them (use it
    for large images).
    """

    def __init__(self, signature: Signature, keys: Sequence[PublicKey], *, name: str = "data",
                 sig_name: str = "signature", require_prehashed: bool = False) -> None:
        self.signature = signature
        self.name = name
        self.sig_name = sig_name
        key_hex = signature.key_id_hex
        kw = {"path": name, "sig_path": sig_name, "key_id": key_hex}
        if not keys:
            raise NoTrustedKeysError(f"{name}: no trusted public keys to check {sig_name} against "
                                     f"(signed by key {key_hex})", **kw)
        if require_prehashed and not signature.prehashed:
            raise LegacySignatureError(f"{sig_name}: legacy (non-prehashed) signature by key {key_hex} "
                                       f"refused for {name}; sign without -l / --legacy", **kw)
        self.candidates = [k for k in keys if k.key_id == signature.key_id]
        if not self.candidates:
            trusted = [k.key_id_hex for k in keys]
            raise UntrustedKeyError(f"{sig_name}: {name} is signed by key {key_hex}, trusted keys are "
                                    f"{_key_list(keys)}", found=key_hex, trusted=trusted,
                                    path=name, sig_path=sig_name)
        self._hash: _Blake2b512 | None = _Blake2b512() if signature.prehashed else None
        self._buffer: bytearray | None = None if signature.prehashed else bytearray()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._hash is not None:
            self._hash.update(data)
            return
        assert self._buffer is not None
        if len(self._buffer) + len(data) > LEGACY_MAX_BYTES:
            self._too_large()
        self._buffer += data

    def _too_large(self) -> None:
        key_hex = self.signature.key_id_hex
        raise LegacySignatureError(f"{self.sig_name}: legacy (non-prehashed) signature by key {key_hex} for "
                                   f"{self.name}, which is larger than 1 GiB; sign it prehashed",
                                   path=self.name, sig_path=self.sig_name, key_id=key_hex)

    def finish(self) -> Verified:
        """The verdict; raises the :class:`SignatureError` subclass that says what is wrong."""
        message: bytes | bytearray = self._hash.digest() if self._hash is not None else self._buffer or b""
        return self._decide(message)

    def _decide(self, message: bytes | bytearray) -> Verified:
        sig = self.signature
        global_message = sig.signature + sig.trusted_comment
        key_hex = sig.key_id_hex
        kw = {"path": self.name, "sig_path": self.sig_name, "key_id": key_hex}
        outcome: tuple[bool, bool] | None = None
        for key in self.candidates:
            file_ok = key.verify_raw(sig.signature, message)
            global_ok = key.verify_raw(sig.global_signature, global_message)
            if file_ok and global_ok:
                return Verified(key_id=key_hex, trusted_comment=sig.trusted_comment_text,
                                prehashed=sig.prehashed, path=self.name, sig_path=self.sig_name)
            if outcome is None or (file_ok or global_ok):
                outcome = (file_ok, global_ok)
        assert outcome is not None
        file_ok, global_ok = outcome
        if global_ok:
            raise FileModifiedError(f"{self.name}: signature does not match the file: modified after it was "
                                    f"signed by key {key_hex} ({self.sig_name} itself is intact)", **kw)
        if file_ok:
            raise CommentTamperedError(f"{self.sig_name}: trusted comment was altered after signing: global "
                                       f"signature fails for key {key_hex} (the file {self.name} matches)",
                                       **kw)
        if not plausible_signature(sig.signature) or not plausible_signature(sig.global_signature):
            raise CorruptSignatureError(f"{self.sig_name}: signature bytes are corrupted (not a valid Ed25519 "
                                        f"signature; key {key_hex}, file {self.name})", **kw)
        raise WrongKeyError(f"{self.sig_name}: signature names trusted key {key_hex} but does not verify "
                            f"with it: made by a different secret key reusing that key id, or damaged "
                            f"(file {self.name})", **kw)


def read_signature_file(sig_path: Path | str, *, path: str | None = None) -> Signature:
    """Read and parse a ``.minisig`` file; a missing one is :class:`MissingSignatureError`."""
    target = path or str(sig_path)
    try:
        with open(sig_path, "rb") as handle:
            data = handle.read(SIG_FILE_MAX + 1)
    except FileNotFoundError:
        raise MissingSignatureError(f"{target}: not signed: signature file {sig_path} not found",
                                    path=path, sig_path=str(sig_path)) from None
    except OSError as exc:
        raise UnreadableError(f"{sig_path}: cannot read signature: {exc.strerror or exc}",
                              path=path, sig_path=str(sig_path)) from None
    if len(data) > SIG_FILE_MAX:
        raise MalformedSignatureError(f"{sig_path}: not a minisign signature: larger than {SIG_FILE_MAX} bytes",
                                      path=path, sig_path=str(sig_path))
    return Signature.parse(data, str(sig_path), path=path)


def begin_verify(sig_text: str | bytes, keys: Sequence[PublicKey], *, name: str = "data",
                 sig_name: str | None = None, require_prehashed: bool = False) -> StreamVerifier:
    """A :class:`StreamVerifier` for a signature held in memory (e.g. a fetched ``.minisig``)."""
    sig_name = sig_name or name + SIG_SUFFIX
    sig = Signature.parse(sig_text, sig_name, path=name)
    return StreamVerifier(sig, keys, name=name, sig_name=sig_name, require_prehashed=require_prehashed)


def verify_file(path: Path | str, sig_path: Path | str | None, keys: Sequence[PublicKey], *,
                require_prehashed: bool = False) -> Verified:
    """Check ``path`` against its signature (``path.minisig`` unless ``sig_path``).

    Prehashed signatures are checked by streaming the file through BLAKE2b-512 in
    :data:`CHUNK_SIZE` pieces, so a 1 GiB image costs one read and no memory;
    legacy ones read the file whole, as minisign does (``require_prehashed``
    refuses them instead).  The key is picked among ``keys`` by the signature's
    key id.  Returns who signed and the trusted comment; raises a
    :class:`SignatureError` subclass naming the file, the signature file and the
    key id otherwise.
    """
    path = Path(path)
    sig_file = Path(sig_path) if sig_path is not None else signature_path_for(path)
    sig = read_signature_file(sig_file, path=str(path))
    verifier = StreamVerifier(sig, keys, name=str(path), sig_name=str(sig_file),
                              require_prehashed=require_prehashed)
    try:
        if sig.prehashed:
            _hash_file(path, verifier)
        else:
            with open(path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > LEGACY_MAX_BYTES:
                    verifier._too_large()
                verifier.update(handle.read(LEGACY_MAX_BYTES + 1))
    except FileNotFoundError:
        raise UnreadableError(f"{path}: file not found (signature {sig_file} exists)", path=str(path),
                              sig_path=str(sig_file), key_id=sig.key_id_hex) from None
    except OSError as exc:
        raise UnreadableError(f"{path}: cannot read: {exc.strerror or exc}", path=str(path),
                              sig_path=str(sig_file), key_id=sig.key_id_hex) from None
    return verifier.finish()


def verify_bytes(data: bytes | bytearray | memoryview, sig_text: str | bytes, keys: Sequence[PublicKey], *,
                 name: str = "data", sig_name: str | None = None,
                 require_prehashed: bool = False) -> Verified:
    """Check data held in memory (a plan, a patch, a hook) against a signature's text.

    ``name`` (and ``sig_name``, default ``name + ".minisig"``) is what messages call
    them, e.g. the URI the data came from.
    """
    verifier = begin_verify(sig_text, keys, name=name, sig_name=sig_name, require_prehashed=require_prehashed)
    verifier.update(data)
    return verifier.finish()
