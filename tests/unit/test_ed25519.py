"""The agent's Ed25519 check (OpenSSL through ctypes) agrees with cryptography's."""
from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from guest_init import ed25519

pytestmark = pytest.mark.unit


def _pair():
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_the_agent_uses_openssl_here():
    assert ed25519.backend()[0] == "openssl"


@pytest.mark.parametrize("size", [0, 1, 64, 4096])
def test_both_backends_agree_on_good_and_bad_signatures(size):
    openssl = ed25519._openssl_verifier(ed25519._load_libcrypto())
    reference = ed25519._cryptography_verifier()
    key, public = _pair()
    message = os.urandom(size)
    signature = key.sign(message)
    assert openssl(public, signature, message) is True
    assert reference(public, signature, message) is True
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    other = message + b"x"
    _, stranger = _pair()
    for args in ((public, flipped, message), (public, signature, other), (stranger, signature, message),
                 (public, signature[:63], message), (public[:31], signature, message)):
        assert openssl(*args) is False
        assert reference(*args) is False
