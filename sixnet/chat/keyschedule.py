"""The SixChat key schedule: RFC 8446 section 7.1 with SHA-256 and ``sixchat `` labels.

Kept apart from the handshake so that tests can check it against the RFC's construction and
so that the record layer can derive the next generation of keys on a key update.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

HASH_LEN = 32
LABEL_PREFIX = b"sixchat "
KEY_LEN = 32
IV_LEN = 12
_ZERO = bytes(HASH_LEN)


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869): HMAC-SHA256 keyed with the salt."""
    return hmac.new(salt or _ZERO, ikm, hashlib.sha256).digest()


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int) -> bytes:
    full = LABEL_PREFIX + label.encode("ascii")
    info = struct.pack(">HB", length, len(full)) + full + struct.pack(">B", len(context)) + context
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def derive_secret(secret: bytes, label: str, transcript_hash: bytes) -> bytes:
    return hkdf_expand_label(secret, label, transcript_hash, HASH_LEN)


def empty_hash() -> bytes:
    return hashlib.sha256(b"").digest()


@dataclass(frozen=True)
class TrafficKeys:
    """AEAD key and IV of one direction, one generation."""

    secret: bytes
    key: bytes
    iv: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> TrafficKeys:
        return cls(secret, hkdf_expand_label(secret, "key", b"", KEY_LEN),
                   hkdf_expand_label(secret, "iv", b"", IV_LEN))

    def next(self) -> TrafficKeys:
        """The keys after a key update (``traffic upd``)."""
        return TrafficKeys.from_secret(hkdf_expand_label(self.secret, "traffic upd", b"",
                                                         HASH_LEN))


class KeySchedule:
    """Walks Early -> Handshake -> Master secret as the handshake reaches each point."""

    def __init__(self, shared_secret: bytes) -> None:
        early = hkdf_extract(_ZERO, _ZERO)
        self.handshake_secret = hkdf_extract(derive_secret(early, "derived", empty_hash()),
                                             shared_secret)
        self.master_secret = hkdf_extract(
            derive_secret(self.handshake_secret, "derived", empty_hash()), _ZERO)

    def handshake_traffic(self, hello_hash: bytes) -> tuple[bytes, bytes]:
        """(initiator, responder) handshake traffic secrets from Transcript-Hash(hellos)."""
        return (derive_secret(self.handshake_secret, "i hs traffic", hello_hash),
                derive_secret(self.handshake_secret, "r hs traffic", hello_hash))

    def application_traffic(self, transcript_hash: bytes) -> tuple[TrafficKeys, TrafficKeys]:
        """(initiator, responder) first application keys, from the hash through R.finished."""
        return (TrafficKeys.from_secret(derive_secret(self.master_secret, "i ap traffic",
                                                      transcript_hash)),
                TrafficKeys.from_secret(derive_secret(self.master_secret, "r ap traffic",
                                                      transcript_hash)))


def finished_mac(traffic_secret: bytes, transcript_hash: bytes) -> bytes:
    key = hkdf_expand_label(traffic_secret, "finished", b"", HASH_LEN)
    return hmac.new(key, transcript_hash, hashlib.sha256).digest()
