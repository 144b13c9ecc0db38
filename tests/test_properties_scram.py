"""Properties of the SCRAM server (sixnet/grid/scram.py): whatever a client sends in its two
messages, the exchange answers or raises `SaslFailure` (never anything else), quickly; a
correct client always gets in, and any change to its final message keeps it out."""

from __future__ import annotations

import base64
import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from sixnet.grid.scram import SaslFailure, ScramCredentials, ScramExchange, decode_saslname
from tests.support.properties import bounded

SECRET = b"s" * 32
BINDINGS = {"tls-exporter": b"\x01" * 32, "tls-server-end-point": b"\x02" * 32}
CREDENTIALS = ScramCredentials.derive("SHA-256", "pencil", 4096, b"salt" * 4)

#: Bytes that look like SCRAM: the grammar's pieces, shuffled and mixed with noise.
pieces = st.sampled_from(["n", "y", "p=tls-exporter", "p=", "a=", "n=", "r=", "c=", "p=",
                          "m=", "s=", "i=", ",", "=", "=2C", "=3D", "=2", "user", "biws",
                          "\u00e9", "\x00", "\x7f"])
scram_like = st.lists(st.one_of(pieces, st.text(max_size=6)), max_size=16).map(
    lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))
messages = st.one_of(st.binary(max_size=200), scram_like)
exchanges = st.builds(lambda hash_name, plus, bound: ScramExchange(
    hash_name, plus, BINDINGS if bound else {}, SECRET, 4096),
    st.sampled_from(["SHA-1", "SHA-256"]), st.booleans(), st.booleans())


def step(call, data: bytes):
    return bounded(lambda: call(data), len(data), errors=(SaslFailure,))


@given(exchanges, messages)
def test_client_first_gives_a_user_name_or_sasl_failure(exchange: ScramExchange,
                                                        data: bytes) -> None:
    outcome = step(exchange.client_first, data)
    assert isinstance(outcome, str | SaslFailure)
    if isinstance(outcome, SaslFailure):
        # a second client-first is refused too: one exchange, one attempt
        assert isinstance(step(exchange.client_first, data), SaslFailure)


@given(exchanges, st.sampled_from([b"n,,n=user,r=abc", b"y,,n=user,r=abc",
                                   b"p=tls-exporter,,n=user,r=abc"]),
       st.booleans(), messages)
def test_client_final_never_lets_noise_in(exchange: ScramExchange, first: bytes,
                                          known: bool, final: bytes) -> None:
    if not isinstance(step(exchange.client_first, first), str):
        return
    exchange.server_first(CREDENTIALS if known else None)
    outcome = step(exchange.client_final, final)
    assert isinstance(outcome, SaslFailure)


def _client_final(exchange: ScramExchange, server_first: bytes, bare: str, gs2: bytes,
                  password: str, binding: bytes) -> str:
    algo = exchange.algo
    attrs = dict(p.split("=", 1) for p in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac(algo, password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    without = f"c={base64.b64encode(gs2 + binding).decode()},r={attrs['r']}"
    auth = f"{bare},{server_first.decode()},{without}".encode()
    client_key = hmac.digest(salted, b"Client Key", algo)
    signature = hmac.digest(hashlib.new(algo, client_key).digest(), auth, algo)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without},p={base64.b64encode(proof).decode()}"


user_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                     max_size=20)
nonces = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                               exclude_characters=","), min_size=1, max_size=30)


@given(st.sampled_from(["SHA-1", "SHA-256"]), user_names, st.text(max_size=20), nonces,
       st.sampled_from([None, "tls-exporter", "tls-server-end-point"]),
       st.one_of(st.none(), st.integers(0, 400)))
def test_a_correct_client_gets_in_and_a_changed_one_does_not(
        hash_name: str, user: str, password: str, nonce: str, binding: str | None,
        flip: int | None) -> None:
    exchange = ScramExchange(hash_name, binding is not None, BINDINGS, SECRET, 4096)
    saslname = user.replace("=", "=3D").replace(",", "=2C")
    gs2 = f"p={binding},," if binding else "y,,"
    bare = f"n={saslname},r={nonce}"
    first = (gs2 + bare).encode()
    if binding is None:  # a client that cannot bind, on a server that could: a downgrade
        assert isinstance(step(exchange.client_first, first), SaslFailure)
        exchange = ScramExchange(hash_name, False, {}, SECRET, 4096)
    assert step(exchange.client_first, first) == user
    credentials = ScramCredentials.derive(hash_name, password, 4096)
    server_first = exchange.server_first(credentials)
    final = _client_final(exchange, server_first, bare, gs2.encode(), password,
                          BINDINGS[binding] if binding else b"").encode()
    if flip is not None:
        index = flip % len(final)
        changed = final[:index] + bytes([final[index] ^ 0x01]) + final[index + 1:]
        outcome = step(exchange.client_final, changed)
        if not isinstance(outcome, SaslFailure):
            # only the unused low bits of the proof's last base64 character changed: the
            # proof is the same bytes (RFC 4648 3.5 lets a decoder accept that)
            head, _, proof = final.rpartition(b",p=")
            assert changed.startswith(head + b",p=")
            assert base64.b64decode(changed[len(head) + 3:]) == base64.b64decode(proof)
    else:
        assert step(exchange.client_final, final).startswith(b"v=")


@given(st.text(max_size=60))
def test_saslnames_decode_or_fail_and_round_trip(text: str) -> None:
    encoded = text.replace("=", "=3D").replace(",", "=2C")
    assert decode_saslname(encoded) == text
    outcome = bounded(lambda: decode_saslname(text), len(text) * 4, errors=(SaslFailure,))
    assert isinstance(outcome, str | SaslFailure)
