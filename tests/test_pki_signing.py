"""The one table of signature algorithms per key type (sixnet.pki.signing)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sixnet.pki import signing

KEYS = {
    "ecdsa-sha256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ecdsa-sha384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ecdsa-sha512": lambda: ec.generate_private_key(ec.SECP521R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
    "rsa-pss-sha256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def test_every_wire_name_has_a_key_type() -> None:
    assert set(signing.ALGORITHM_NAMES) == set(KEYS)


@pytest.mark.parametrize("name", list(KEYS))
def test_every_key_type_signs_and_verifies(name: str) -> None:
    key = KEYS[name]()
    public = key.public_key()
    assert signing.algorithm_name(key) == signing.algorithm_name(public) == name
    signature = signing.sign(key, b"the canonical bytes")
    signing.verify(public, signature, b"the canonical bytes")
    with pytest.raises(InvalidSignature):
        signing.verify(public, signature, b"the canonical bytes, changed")
    with pytest.raises(InvalidSignature):
        signing.verify(KEYS[name]().public_key(), signature, b"the canonical bytes")


def test_p521_signs_with_sha512_as_tls13_does() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    signature = signing.sign(key, b"data")
    key.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA512()))
    with pytest.raises(InvalidSignature):
        key.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA384()))
    assert isinstance(signing.certificate_hash(key), hashes.SHA512)


@pytest.mark.parametrize(("name", "digest"), [
    ("ecdsa-sha256", hashes.SHA256), ("ecdsa-sha384", hashes.SHA384),
    ("ecdsa-sha512", hashes.SHA512), ("rsa-pss-sha256", hashes.SHA256),
    ("ed25519", type(None)), ("ed448", type(None)),
])
def test_certificates_are_signed_with_the_same_hash(name: str, digest: type) -> None:
    assert isinstance(signing.certificate_hash(KEYS[name]()), digest)


def test_a_curve_outside_the_table_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(signing.UnsupportedKey, match="secp256k1"):
        signing.algorithm_name(key)
    with pytest.raises(signing.UnsupportedKey):
        signing.sign(key, b"data")
