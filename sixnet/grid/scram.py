"""SCRAM (RFC 5802, RFC 7677) server side, with channel binding (RFC 5929, RFC 9266).

Written here rather than taken from `scramp` because scramp refuses ``tls-exporter``, the only
channel binding TLS 1.3 has. The server never sees or keeps a password: an account holds, per
hash, a salt, an iteration count, StoredKey = H(HMAC(SaltedPassword, "Client Key")) and
ServerKey = HMAC(SaltedPassword, "Server Key"). Proofs are compared in constant time.

`ScramExchange` is a pure object: it is fed the client's messages and returns the server's,
or raises `SaslFailure` with the RFC 6120 section 6.5 condition the stream must send. The
client side (`sixnet.grid.client.sasl`) uses the same key derivation (`scram_keys`), name
escaping and attribute parsing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

HASHES = {"SHA-1": "sha1", "SHA-256": "sha256"}


class SaslFailure(Exception):
    """Authentication fails with an RFC 6120 6.5 condition (e.g. not-authorized)."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text


@dataclass(frozen=True)
class ScramCredentials:
    """What an account stores for one SCRAM hash."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(cls, hash_name: str, password: str, iterations: int,
               salt: bytes | None = None) -> ScramCredentials:
        """Derive the stored keys from a (SASLprep-normalised) password."""
        salt = salt if salt is not None else os.urandom(16)
        client_key, server_key = scram_keys(hash_name, password, salt, iterations)
        return cls(salt, iterations, hashlib.new(HASHES[hash_name], client_key).digest(),
                   server_key)

    def check_password(self, hash_name: str, password: str) -> bool:
        """For PLAIN: derive again with the stored salt and compare in constant time."""
        again = ScramCredentials.derive(hash_name, password, self.iterations, self.salt)
        return hmac.compare_digest(again.stored_key, self.stored_key)


def server_end_point(certificate: x509.Certificate) -> bytes:
    """RFC 5929 tls-server-end-point: the certificate's hash with its signature's hash
    (SHA-256 for MD5, SHA-1, or a signature without a separate hash such as Ed25519)."""
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        name = "sha256"
    else:
        name = algorithm.name
    return hashlib.new(name, certificate.public_bytes(Encoding.DER)).digest()


def scram_keys(hash_name: str, password: str, salt: bytes,
               iterations: int) -> tuple[bytes, bytes]:
    """RFC 5802 3: ClientKey and ServerKey from a (SASLprep-normalised) password."""
    algo = HASHES[hash_name]
    salted = hashlib.pbkdf2_hmac(algo, password.encode("utf-8"), salt, iterations)
    return hmac.digest(salted, b"Client Key", algo), hmac.digest(salted, b"Server Key", algo)


def encode_saslname(value: str) -> str:
    """RFC 5802 5.1: ',' is written ``=2C`` and '=' is written ``=3D``."""
    return value.replace("=", "=3D").replace(",", "=2C")


def decode_saslname(value: str) -> str:
    """RFC 5802 5.1: ``=2C`` is ',' and ``=3D`` is '='; any other '=' is malformed."""
    out, i = [], 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            raise SaslFailure("malformed-request", "unescaped ',' in a name")
        if ch == "=":
            code = value[i + 1 : i + 3]
            if code == "2C":
                out.append(",")
            elif code == "3D":
                out.append("=")
            else:
                raise SaslFailure("malformed-request", "bad '=' escape in a name")
            i += 3
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_attributes(message: str, expected: str) -> list[tuple[str, str]]:
    """Split ``a=1,b=2`` into pairs and check the leading attribute names."""
    pairs = []
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise SaslFailure("malformed-request", f"bad SCRAM attribute {part[:20]!r}")
        pairs.append((part[0], part[2:]))
    names = "".join(n for n, _ in pairs)
    if not names.startswith(expected):
        raise SaslFailure("malformed-request", f"expected attributes {expected!r}")
    return pairs


class ScramExchange:
    """One SCRAM authentication, server side.

    `channel_bindings` maps the binding types this TLS connection offers (``tls-exporter``,
    ``tls-server-end-point``, ``tls-unique``) to their data; `plus` says whether the client
    chose the -PLUS mechanism. The caller reads the user name from `client_first`, looks the
    account up (storage is asynchronous) and passes its credentials to `server_first`; an
    unknown account gets a made-up salt derived from `secret`, so the exchange does not reveal
    which accounts exist before the proof is checked.
    """

    def __init__(self, hash_name: str, plus: bool, channel_bindings: dict[str, bytes],
                 secret: bytes, default_iterations: int) -> None:
        self.hash_name = hash_name
        self.algo = HASHES[hash_name]
        self.plus = plus
        self.channel_bindings = channel_bindings
        self.secret = secret
        self.default_iterations = default_iterations
        self.username: str | None = None
        self.authzid: str | None = None
        self.channel_binding: str | None = None
        self._step = 0

    # -- step 1 ----------------------------------------------------------------------------

    def client_first(self, data: bytes) -> str:
        """Read client-first-message; return the user name to look up."""
        if self._step != 0:
            raise SaslFailure("malformed-request", "unexpected client-first-message")
        self._step = 1
        text = _utf8(data)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise SaslFailure("malformed-request", "no GS2 header")
        flag, authz, bare = parts
        if flag.startswith("p="):
            cb_name = flag[2:]
            if not self.plus:
                raise SaslFailure("malformed-request",
                                  "channel binding requested with a non-PLUS mechanism")
            if cb_name not in self.channel_bindings:
                raise SaslFailure("not-authorized",
                                  f"channel binding {cb_name!r} is not offered here")
            self.channel_binding = cb_name
        elif flag in ("n", "y"):
            if self.plus:
                raise SaslFailure("malformed-request", "a -PLUS mechanism needs p=TYPE")
            if flag == "y" and self.channel_bindings:
                # The client could bind but believes we cannot: a downgrade (RFC 5802 6).
                raise SaslFailure("not-authorized", "channel binding downgrade detected")
        else:
            raise SaslFailure("malformed-request", "bad GS2 channel binding flag")
        if authz:
            if not authz.startswith("a="):
                raise SaslFailure("malformed-request", "bad authzid in the GS2 header")
            self.authzid = decode_saslname(authz[2:])
        self.gs2_header = f"{flag},{authz},".encode()
        attrs = parse_attributes(bare, "nr")
        if attrs[0][1] == "" or attrs[1][1] == "":
            raise SaslFailure("malformed-request", "empty user name or nonce")
        if any(n == "m" for n, _ in attrs):
            raise SaslFailure("malformed-request", "mandatory extension not supported")
        self.username = decode_saslname(attrs[0][1])
        client_nonce = attrs[1][1]
        if not all(0x21 <= ord(c) <= 0x7E and c != "," for c in client_nonce):
            raise SaslFailure("malformed-request", "bad nonce")
        self.client_nonce = client_nonce
        self.client_first_bare = bare
        return self.username

    def server_first(self, credentials: ScramCredentials | None) -> bytes:
        """The server-first-message, for the account's credentials (None: no such account)."""
        assert self.username is not None
        self.known = credentials is not None
        if credentials is None:
            fake_salt = hmac.digest(self.secret, self.username.encode("utf-8"), "sha256")[:16]
            credentials = ScramCredentials(fake_salt, self.default_iterations,
                                           os.urandom(32), os.urandom(32))
        self.credentials = credentials
        self.nonce = self.client_nonce + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(credentials.salt).decode()
        self.server_first = f"r={self.nonce},s={salt},i={credentials.iterations}"
        return self.server_first.encode()

    # -- step 2 ----------------------------------------------------------------------------

    def client_final(self, data: bytes) -> bytes:
        """Check client-final-message; return server-final-message (``v=...``) on success."""
        if self._step != 1:
            raise SaslFailure("malformed-request", "unexpected client-final-message")
        self._step = 2
        text = _utf8(data)
        without_proof, sep, proof_attr = text.rpartition(",p=")
        if not sep:
            raise SaslFailure("malformed-request", "no proof")
        attrs = parse_attributes(without_proof, "cr")
        if attrs[1][1] != self.nonce:
            raise SaslFailure("not-authorized", "nonce mismatch")
        expected_cb = self.gs2_header
        if self.channel_binding is not None:
            expected_cb += self.channel_bindings[self.channel_binding]
        try:
            got_cb = base64.b64decode(attrs[0][1], validate=True)
            proof = base64.b64decode(proof_attr, validate=True)
        except ValueError:
            raise SaslFailure("incorrect-encoding", "bad base64 in SCRAM") from None
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        creds = self.credentials
        signature = hmac.digest(creds.stored_key, auth_message, self.algo)
        if len(proof) != len(signature):
            raise SaslFailure("not-authorized", "bad proof")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        proof_ok = hmac.compare_digest(hashlib.new(self.algo, client_key).digest(),
                                       creds.stored_key)
        cb_ok = hmac.compare_digest(got_cb, expected_cb)
        if not (proof_ok and cb_ok and self.known):
            raise SaslFailure("not-authorized",
                              "channel binding mismatch" if proof_ok and not cb_ok else "")
        verifier = hmac.digest(creds.server_key, auth_message, self.algo)
        return b"v=" + base64.b64encode(verifier)


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslFailure("malformed-request", "not UTF-8") from None
