"""The handshake's cryptography: transcript, signatures, key agreement, Finished MACs.

Pure functions and small objects, no state machine and no I/O; `sixnet.chat.session` drives
them in protocol order (docs/chat.rst).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from lxml import etree

from sixnet.chat.alerts import Alert
from sixnet.chat.keyschedule import finished_mac
from sixnet.chat.messages import KEY_AGREEMENTS, canonical
from sixnet.chat.records import CIPHERS
from sixnet.pki import signing
from sixnet.pki.keys import PrivateKey

SIGNATURE_CONTEXT = {
    "initiator": b"SixChat 1, initiator CertificateVerify",
    "responder": b"SixChat 1, responder CertificateVerify",
}
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@dataclass(frozen=True)
class HandshakePolicy:
    """What this agent offers and accepts, in its order of preference."""

    key_agreements: tuple[str, ...] = KEY_AGREEMENTS
    ciphers: tuple[str, ...] = tuple(CIPHERS)

    def __post_init__(self) -> None:
        unknown = set(self.key_agreements) - set(KEY_AGREEMENTS) | set(self.ciphers) - set(
            CIPHERS)
        if unknown or not self.key_agreements or not self.ciphers:
            raise ValueError(f"bad handshake policy: {sorted(unknown)}")

    def choose(self, offered: tuple[str, ...], mine: tuple[str, ...], what: str) -> str:
        """The responder's choice: its own first preference that the initiator offered."""
        for name in mine:
            if name in offered:
                return name
        raise Alert("insufficient-security", f"no common {what}: offered {list(offered)[:8]}")


DEFAULT_POLICY = HandshakePolicy()


class Transcript:
    """The running SHA-256 over the canonical bytes of every handshake element."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, element: etree._Element) -> None:
        self._hash.update(canonical(element))

    def digest(self) -> bytes:
        return self._hash.copy().digest()


# -- signatures -------------------------------------------------------------------------------


def signature_algorithm(key: object) -> str:
    """The ``certificate-verify`` algorithm of a private or public key (`sixnet.pki.signing`)."""
    try:
        return signing.algorithm_name(key)
    except signing.UnsupportedKey:
        raise Alert("bad-certificate", f"unsupported certificate key {type(key).__name__}"
                    ) from None


def _signed_content(role: str, transcript_hash: bytes) -> bytes:
    return b" " * 64 + SIGNATURE_CONTEXT[role] + b"\x00" + transcript_hash


def sign(key: PrivateKey, role: str, transcript_hash: bytes) -> tuple[str, bytes]:
    algorithm = signature_algorithm(key)
    return algorithm, signing.sign(key, _signed_content(role, transcript_hash))


def verify_signature(certificate: x509.Certificate, role: str, transcript_hash: bytes,
                     algorithm: str, signature: bytes) -> None:
    """Check the peer's certificate-verify; raise `Alert` decrypt-error when it is wrong."""
    public = certificate.public_key()
    if algorithm != signature_algorithm(public):
        raise Alert("decrypt-error", f"{algorithm} does not match the certificate key")
    try:
        signing.verify(public, signature, _signed_content(role, transcript_hash))
    except InvalidSignature:
        # The two transcripts differ: an offer or a choice was changed on the way.
        raise Alert("decrypt-error", f"the {role}'s signature over the transcript does not "
                                     "verify", event="chat.downgrade",
                    facts={"check": "certificate-verify"}) from None


# -- key agreement ----------------------------------------------------------------------------


class X25519Share:
    """One side's ephemeral X25519 key: made for one handshake, then forgotten."""

    def __init__(self) -> None:
        self._private = x25519.X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes_raw()

    def shared_secret(self, peer_share: bytes) -> bytes:
        try:
            secret = self._private.exchange(x25519.X25519PublicKey.from_public_bytes(peer_share))
        except ValueError:  # cryptography refuses an all-zero result (a low-order point)
            raise Alert("handshake-failure", "the peer's X25519 share is invalid") from None
        return secret


def can_receive_key_transport(certificate: x509.Certificate) -> bool:
    """An RSA certificate whose keyUsage allows keyEncipherment (or has no keyUsage)."""
    if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
        return False
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_encipherment


def transport_secret(certificate: x509.Certificate) -> tuple[bytes, bytes]:
    """(secret, RSA-OAEP ciphertext of it to the certificate's key): the responder's side."""
    if not can_receive_key_transport(certificate):
        raise Alert("insufficient-security", "rsa-oaep needs an RSA certificate that allows "
                                             "keyEncipherment")
    public = certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    secret = os.urandom(32)
    return secret, public.encrypt(secret, _OAEP)


def receive_transported_secret(key: PrivateKey, ciphertext: bytes) -> bytes:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise Alert("handshake-failure", "rsa-oaep chosen but this agent's key is not RSA")
    try:
        secret = key.decrypt(ciphertext, _OAEP)
    except ValueError:
        raise Alert("decrypt-error", "the transported secret does not decrypt") from None
    if len(secret) != 32:
        raise Alert("handshake-failure", "the transported secret is not 32 bytes")
    return secret


def check_finished(traffic_secret: bytes, transcript_hash: bytes, mac: bytes, role: str) -> None:
    if not hmac.compare_digest(finished_mac(traffic_secret, transcript_hash), mac):
        raise Alert("decrypt-error", f"the {role}'s Finished MAC is wrong",
                    event="chat.downgrade", facts={"check": "finished"})
