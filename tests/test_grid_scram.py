"""SCRAM server exchange against the RFC 5802 and RFC 7677 test vectors, plus refusals."""

from __future__ import annotations

import base64

import pytest

from sixnet.grid.scram import SaslFailure, ScramCredentials, ScramExchange, decode_saslname

VECTORS = {
    # hash: (client nonce, server nonce part, salt, proof, server signature), user "user",
    # password "pencil", 4096 iterations.
    "SHA-1": ("fyko+d2lbbFgONRv9qkxdawL", "3rfcNHYJY1ZVvWVs7j", "QSXCR+Q6sek8bf92",
              "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", "rmF9pqV8S7suAoZWja4dJRkFsKQ="),
    "SHA-256": ("rOprNGfwEbeRWgbNEkqO", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
                "W22ZaJ0SNY7soEsUEjb6gQ==", "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
                "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
}


def _exchange(hash_name: str, plus: bool = False,
              bindings: dict[str, bytes] | None = None) -> ScramExchange:
    return ScramExchange(hash_name, plus, bindings or {}, b"secret", 4096)


@pytest.mark.parametrize("hash_name", sorted(VECTORS))
def test_rfc_vectors(hash_name: str) -> None:
    cnonce, snonce, salt, proof, verifier = VECTORS[hash_name]
    creds = ScramCredentials.derive(hash_name, "pencil", 4096, base64.b64decode(salt))
    ex = _exchange(hash_name)
    assert ex.client_first(f"n,,n=user,r={cnonce}".encode()) == "user"
    first = ex.server_first(creds).decode()
    assert first.startswith(f"r={cnonce}") and f"s={salt},i=4096" in first
    # Pin the server nonce to the vector's, as the RFC's server chose it.
    ex.nonce = cnonce + snonce
    ex.server_first = f"r={ex.nonce},s={salt},i=4096"
    final = ex.client_final(f"c=biws,r={ex.nonce},p={proof}".encode())
    assert final == f"v={verifier}".encode()


def test_wrong_proof_and_unknown_user_fail_alike() -> None:
    cnonce, snonce, salt, proof, _ = VECTORS["SHA-256"]
    for creds in (ScramCredentials.derive("SHA-256", "other", 4096, base64.b64decode(salt)),
                  None):
        ex = _exchange("SHA-256")
        ex.client_first(f"n,,n=user,r={cnonce}".encode())
        ex.server_first(creds)
        with pytest.raises(SaslFailure) as info:
            ex.client_final(f"c=biws,r={ex.nonce},p={proof}".encode())
        assert info.value.condition == "not-authorized"


def test_unknown_user_salt_is_stable() -> None:
    a, b = _exchange("SHA-256"), _exchange("SHA-256")
    for ex in (a, b):
        ex.client_first(b"n,,n=nobody,r=abc")
    assert a.server_first(None).split(b",")[1] == b.server_first(None).split(b",")[1]


def test_channel_binding_checked() -> None:
    """-PLUS: the c= attribute must carry the GS2 header and this connection's binding."""
    import hashlib
    import hmac

    bindings = {"tls-exporter": b"E" * 32}
    creds = ScramCredentials.derive("SHA-256", "pw", 4096, b"salt")
    for sent_binding, ok in ((b"E" * 32, True), (b"X" * 32, False)):
        ex = _exchange("SHA-256", plus=True, bindings=bindings)
        ex.client_first(b"p=tls-exporter,,n=u,r=nonce")
        first = ex.server_first(creds)
        gs2 = b"p=tls-exporter,,"
        without = b"c=" + base64.b64encode(gs2 + sent_binding) + b",r=" + ex.nonce.encode()
        auth = b"n=u,r=nonce," + first + b"," + without
        salted = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 4096)
        ck = hmac.digest(salted, b"Client Key", "sha256")
        sig = hmac.digest(hashlib.sha256(ck).digest(), auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(ck, sig, strict=True))
        msg = without + b",p=" + base64.b64encode(proof)
        if ok:
            assert ex.client_final(msg).startswith(b"v=")
        else:
            with pytest.raises(SaslFailure, match="channel binding mismatch"):
                ex.client_final(msg)


@pytest.mark.parametrize("first, plus, condition", [
    (b"y,,n=u,r=x", False, "not-authorized"),          # downgrade: we offer binding
    (b"p=tls-unique,,n=u,r=x", True, "not-authorized"),  # a binding we do not offer
    (b"p=tls-exporter,,n=u,r=x", False, "malformed-request"),
    (b"n,,n=u,r=x", True, "malformed-request"),
    (b"n,,r=x,n=u", False, "malformed-request"),
    (b"n,,n=u,r=x,m=ext", False, "malformed-request"),
    (b"n,,n=a=2Xb,r=x", False, "malformed-request"),
    (b"n,,n=u,r=x\xff", False, "malformed-request"),
    (b"garbage", False, "malformed-request"),
])
def test_client_first_refusals(first: bytes, plus: bool, condition: str) -> None:
    ex = _exchange("SHA-256", plus=plus, bindings={"tls-exporter": b"E" * 32})
    with pytest.raises(SaslFailure) as info:
        ex.client_first(first)
    assert info.value.condition == condition


def test_saslname_escapes() -> None:
    assert decode_saslname("a=2Cb=3Dc") == "a,b=c"
    with pytest.raises(SaslFailure):
        decode_saslname("a=41")


def test_plain_check_password() -> None:
    creds = ScramCredentials.derive("SHA-256", "pencil", 4096)
    assert creds.check_password("SHA-256", "pencil")
    assert not creds.check_password("SHA-256", "pencil2")
