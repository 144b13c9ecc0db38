"""Signatures by key type: the one table that IRP answers, chat handshakes and the CA sign with.

Each key type signs with one algorithm, named on the wire as IRP's ``alg`` and chat's
``certificate-verify algorithm`` name it. An ECDSA key uses the SHA-2 hash of its curve's
strength, as TLS 1.3 pairs them (RFC 8446, 4.2.3): P-256 with SHA-256, P-384 with SHA-384,
P-521 with SHA-512. RSA signs with PSS (MGF1 and the message hash SHA-256, 32-byte salt);
Ed25519 and Ed448 hash internally.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from sixnet.pki.keys import PrivateKey

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


class UnsupportedKey(ValueError):
    """A key of a type or curve that has no signature algorithm here."""


@dataclass(frozen=True)
class SignatureAlgorithm:
    """One row of the table: the wire name and the hash the key signs with (None: built in)."""

    name: str
    hash: type[hashes.HashAlgorithm] | None

    def digest(self) -> hashes.HashAlgorithm | None:
        return self.hash() if self.hash is not None else None


#: ECDSA by curve name; the other key types by class, below.
_ECDSA = {
    "secp256r1": SignatureAlgorithm("ecdsa-sha256", hashes.SHA256),
    "secp384r1": SignatureAlgorithm("ecdsa-sha384", hashes.SHA384),
    "secp521r1": SignatureAlgorithm("ecdsa-sha512", hashes.SHA512),
}
_ED25519 = SignatureAlgorithm("ed25519", None)
_ED448 = SignatureAlgorithm("ed448", None)
_RSA_PSS = SignatureAlgorithm("rsa-pss-sha256", hashes.SHA256)

#: Every wire name, in the order a protocol lists them.
ALGORITHM_NAMES = (*(a.name for a in _ECDSA.values()), _ED25519.name, _ED448.name,
                   _RSA_PSS.name)


def algorithm(key: object) -> SignatureAlgorithm:
    """The algorithm a private or public key signs with; `UnsupportedKey` if it has none."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    if isinstance(public, ec.EllipticCurvePublicKey):
        found = _ECDSA.get(public.curve.name)
        if found is None:
            raise UnsupportedKey(f"no signature algorithm for the ECDSA curve {public.curve.name}")
        return found
    if isinstance(public, ed25519.Ed25519PublicKey):
        return _ED25519
    if isinstance(public, ed448.Ed448PublicKey):
        return _ED448
    if isinstance(public, rsa.RSAPublicKey):
        return _RSA_PSS
    raise UnsupportedKey(f"no signature algorithm for a {type(public).__name__}")


def algorithm_name(key: object) -> str:
    """The wire name of `algorithm(key)`."""
    return algorithm(key).name


def certificate_hash(key: object) -> hashes.HashAlgorithm | None:
    """The digest to sign certificates and CRLs with `key` (None for Ed25519 and Ed448)."""
    return algorithm(key).digest()


def sign(key: PrivateKey, data: bytes) -> bytes:
    """`data` signed by `key` with its algorithm."""
    return signer(key)(data)


def signer(key: PrivateKey) -> Callable[[bytes], bytes]:
    """A function signing with `key`, its algorithm chosen once (for keys that sign often:
    choosing costs about as much as an Ed25519 signature)."""
    digest = algorithm(key).digest()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert digest is not None
        ecdsa = ec.ECDSA(digest)
        return lambda data: key.sign(data, ecdsa)
    if isinstance(key, rsa.RSAPrivateKey):
        assert digest is not None
        return lambda data: key.sign(data, _PSS, digest)
    assert isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
    return key.sign


def verify(public_key: object, signature: bytes, data: bytes) -> None:
    """Check `signature` over `data` by `public_key`'s algorithm.

    Raises `cryptography.exceptions.InvalidSignature` when it does not verify and
    `UnsupportedKey` for a key with no algorithm.
    """
    digest = algorithm(public_key).digest()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        assert digest is not None
        public_key.verify(signature, data, ec.ECDSA(digest))
    elif isinstance(public_key, rsa.RSAPublicKey):
        assert digest is not None
        public_key.verify(signature, data, _PSS, digest)
    else:
        assert isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        public_key.verify(signature, data)
