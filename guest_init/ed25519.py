"""Ed25519 signature checks for the agent, through the OpenSSL the initramfs already carries.

Why not ``cryptography`` here: its Rust extension links its own OpenSSL and
adds 11 MB to the initramfs (a third of it) and about a second of import time
under TCG, while Python's ``hashlib``/``ssl`` already ship ``libcrypto``,
which verifies Ed25519 itself (OpenSSL >= 1.1.1).  So the agent calls
``EVP_DigestVerify`` through ctypes.  Where that libcrypto is not available
(another Python build), ``cryptography`` is used instead; dom0 signs with
``cryptography`` either way, and the tests check both paths agree.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable

_NID_ED25519 = 1087
_LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1")


class Ed25519Unavailable(RuntimeError):
    """Neither OpenSSL's libcrypto nor ``cryptography`` can check Ed25519 here."""


def _load_libcrypto() -> ctypes.CDLL | None:
    try:
        import _hashlib  # noqa: F401  - loads the libcrypto Python was built with, if any
    except ImportError:
        pass
    for name in _LIBCRYPTO_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            lib.EVP_PKEY_new_raw_public_key.restype = ctypes.c_void_p
            lib.EVP_PKEY_new_raw_public_key.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                                        ctypes.c_char_p, ctypes.c_size_t]
            lib.EVP_MD_CTX_new.restype = ctypes.c_void_p
            lib.EVP_MD_CTX_new.argtypes = []
            lib.EVP_DigestVerifyInit.restype = ctypes.c_int
            lib.EVP_DigestVerifyInit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                 ctypes.c_void_p, ctypes.c_void_p]
            lib.EVP_DigestVerify.restype = ctypes.c_int
            lib.EVP_DigestVerify.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                             ctypes.c_char_p, ctypes.c_size_t]
            lib.EVP_MD_CTX_free.argtypes = [ctypes.c_void_p]
            lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
        except AttributeError:
            continue   # an OpenSSL without Ed25519 (before 1.1.1)
        return lib
    return None


def _openssl_verifier(lib: ctypes.CDLL) -> Callable[[bytes, bytes, bytes], bool]:
    def verify(public: bytes, signature: bytes, message: bytes) -> bool:
        if len(public) != 32 or len(signature) != 64:
            return False
        pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, public, 32)
        if not pkey:
            return False
        ctx = lib.EVP_MD_CTX_new()
        try:
            if not ctx or lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
                return False
            return lib.EVP_DigestVerify(ctx, signature, 64, message, len(message)) == 1
        finally:
            if ctx:
                lib.EVP_MD_CTX_free(ctx)
            lib.EVP_PKEY_free(pkey)

    return verify


def _cryptography_verifier() -> Callable[[bytes, bytes, bytes], bool] | None:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        return None

    def verify(public: bytes, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    return verify


@functools.lru_cache(maxsize=1)
def backend() -> tuple[str, Callable[[bytes, bytes, bytes], bool]]:
    """(name, verify function) of the first backend that works here."""
    lib = _load_libcrypto()
    if lib is not None:
        return "openssl", _openssl_verifier(lib)
    fallback = _cryptography_verifier()
    if fallback is not None:
        return "cryptography", fallback
    raise Ed25519Unavailable("cannot check Ed25519 signatures: neither OpenSSL's libcrypto (>= 1.1.1) "
                             "nor the cryptography package is available")


def verify(public: bytes, signature: bytes, message: bytes | bytearray | memoryview) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by ``public``."""
    return backend()[1](bytes(public), bytes(signature), bytes(message))
