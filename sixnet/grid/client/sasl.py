"""The client's side of SASL (RFC 6120 6): which mechanism to use, and SCRAM as a pure object.

Mechanisms, strongest first: EXTERNAL (a client certificate, XEP-0178), SCRAM-SHA-256-PLUS,
SCRAM-SHA-1-PLUS, SCRAM-SHA-256, SCRAM-SHA-1. Channel binding is ``tls-exporter`` on TLS 1.3
(RFC 9266) and ``tls-server-end-point`` (RFC 5929) on TLS 1.2 when the server lists it
(XEP-0440); ``tls-unique`` is never used. The key derivation, name escaping and attribute
parsing are the server's own (`sixnet.grid.scram`); the password is prepared as the server
prepares it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from sixnet.grid.scram import (
    HASHES,
    SaslFailure,
    encode_saslname,
    parse_attributes,
    scram_keys,
)
from sixnet.grid.storage.accounts import AccountError, prepare_password

#: Every mechanism this client can use, strongest first.
MECHANISMS = ("EXTERNAL", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256",
              "SCRAM-SHA-1")
#: Channel binding types this client can compute, preferred first.
BINDINGS = ("tls-exporter", "tls-server-end-point")
#: Iteration counts a server may ask for: below, the stored keys are too cheap to guess
#: (RFC 7677 5); above, one login would cost this client seconds of CPU.
MIN_ITERATIONS, MAX_ITERATIONS = 4096, 1_000_000


class ScramError(Exception):
    """The server's SCRAM messages are malformed or its signature is wrong."""


@dataclass(frozen=True)
class Choice:
    """The mechanism chosen and, for -PLUS, the channel binding type."""

    mechanism: str
    binding: str | None = None
    #: The GS2 flag without a binding: "y" when we could bind but the server offers no
    #: -PLUS (lets the server detect a downgrade), "n" otherwise.
    flag: str = "n"


def choose(offered: Sequence[str], *, tls_version: str, advertised: Collection[str] | None,
           password: bool, certificate: bool,
           allowed: Collection[str] | None = None) -> Choice | None:
    """The strongest mechanism both sides have, or None.

    `advertised` is the server's XEP-0440 channel binding list (None: it sent none);
    `allowed` restricts the mechanisms (the caller's ``mechanisms=``).
    """
    usable = [b for b in BINDINGS if b != "tls-exporter" or tls_version == "TLSv1.3"]
    if advertised is not None:
        usable = [b for b in usable if b in advertised]
    elif tls_version == "TLSv1.3":
        usable = ["tls-exporter"]  # the only binding TLS 1.3 has (RFC 9266)
    else:
        # TLS 1.2 and no XEP-0440 list: the server's binding is likely tls-unique (RFC 5802's
        # default, all Prosody 0.12 has), which this client does not do (RFC 9266 1: the
        # triple handshake attack). Unknown, so no -PLUS.
        usable = []
    server_plus = any(m.endswith("-PLUS") for m in offered)
    for mechanism in MECHANISMS:
        if mechanism not in offered or (allowed is not None and mechanism not in allowed):
            continue
        if mechanism == "EXTERNAL":
            if certificate:
                return Choice(mechanism)
            continue
        if not password:
            continue
        if mechanism.endswith("-PLUS"):
            if usable:
                return Choice(mechanism, usable[0])
            continue
        return Choice(mechanism, flag="n" if server_plus or not usable else "y")
    return None


class ScramClient:
    """One SCRAM exchange (RFC 5802), client side: messages out, the server's checked.

    ``first()`` gives client-first-message; ``final(server_first)`` the client-final-message;
    ``verify(server_final)`` checks the server's signature. `binding_data` is the channel
    binding (empty without -PLUS).
    """

    def __init__(self, mechanism: str, username: str, password: str, *,
                 binding: str | None = None, binding_data: bytes = b"", flag: str = "n",
                 nonce: str | None = None) -> None:
        hash_name = mechanism.removeprefix("SCRAM-").removesuffix("-PLUS")
        if hash_name not in HASHES:
            raise ValueError(f"{mechanism} is not a SCRAM mechanism")
        self.hash_name = hash_name
        self.algo = HASHES[hash_name]
        try:
            self.password = prepare_password(password)
        except AccountError as e:
            raise ScramError(str(e)) from None
        self.gs2 = (f"p={binding},," if binding else f"{flag},,").encode()
        self.binding_data = binding_data if binding else b""
        self.nonce = nonce or base64.b64encode(os.urandom(24)).decode()
        self.first_bare = f"n={encode_saslname(username)},r={self.nonce}"
        self._server_signature: bytes | None = None
        self.final_sent = False
        #: The server proved it knows the password (its signature was checked).
        self.verified = False

    def first(self) -> bytes:
        return self.gs2 + self.first_bare.encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            text = server_first.decode("utf-8")
            attrs = dict(parse_attributes(text, "rsi"))
        except (UnicodeDecodeError, SaslFailure) as e:
            raise ScramError(f"malformed server-first-message ({e})") from None
        if "m" in attrs:
            raise ScramError("the server requires a SCRAM extension we do not know")
        nonce = attrs["r"]
        if not nonce.startswith(self.nonce) or len(nonce) == len(self.nonce):
            raise ScramError("the server's nonce does not extend ours")
        try:
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except ValueError:
            raise ScramError("malformed salt or iteration count") from None
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"the server asks for {iterations} iterations (accepted: "
                             f"{MIN_ITERATIONS}-{MAX_ITERATIONS})")
        client_key, server_key = scram_keys(self.hash_name, self.password, salt, iterations)
        stored_key = hashlib.new(self.algo, client_key).digest()
        channel = base64.b64encode(self.gs2 + self.binding_data).decode()
        without_proof = f"c={channel},r={nonce}"
        auth_message = f"{self.first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, self.algo)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = hmac.digest(server_key, auth_message, self.algo)
        self.final_sent = True
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check server-final-message (``v=...``); ScramError when it is wrong or an error."""
        if self._server_signature is None:
            raise ScramError("server-final-message before client-final-message")
        text = server_final.decode("utf-8", "replace")
        if text.startswith("e="):
            raise ScramError(f"the server refused: {text[2:]}")
        if not text.startswith("v="):
            raise ScramError("malformed server-final-message")
        try:
            got = base64.b64decode(text[2:], validate=True)
        except ValueError:
            raise ScramError("malformed server signature") from None
        if not hmac.compare_digest(got, self._server_signature):
            raise ScramError("the server's signature is wrong: it does not know the password "
                             "(or someone is in the middle)")
        self.verified = True
