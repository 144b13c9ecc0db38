"""The SixChat handshake, key schedule and record layer, driven in memory (no sockets)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from lxml import etree
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sixnet.chat import keyschedule
from sixnet.chat.handshake import HandshakePolicy
from sixnet.chat.protocol import SessionProtocol
from sixnet.chat.records import APPLICATION, RecordLayer
from sixnet.chat.session import Session
from sixnet.pki.store import CertificateStore, NodeIdentity

ALICE, BOB, MALLORY = "alice@example.test", "bob@example.test", "mallory@example.test"


@dataclass
class Owner:
    """Records what a session tells the agent."""

    established: list[str] = field(default_factory=list)
    stanzas: list[tuple[str, str | None]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def session_established(self, session: Session) -> None:
        self.established.append(session.peer_id or "")

    def stanza_received(self, session: Session, element: etree._Element) -> None:
        self.stanzas.append((etree.QName(element).localname, element.text))

    def session_ended(self, session: Session, reason: str) -> None:
        self.ended.append(reason)


Tamper = Callable[[bytes], bytes]


class Pair:
    """Two protocols joined by memory; `a_to_b`/`b_to_a` may rewrite bytes in flight."""

    def __init__(self, a: NodeIdentity, b: NodeIdentity, store: CertificateStore, *,
                 dial: str = BOB, store_b: CertificateStore | None = None,
                 policy_a: HandshakePolicy | None = None,
                 policy_b: HandshakePolicy | None = None, key_update_bytes: int = 1 << 30) -> None:
        self.clock = Clock()
        self.owner_a, self.owner_b = Owner(), Owner()
        self.a = SessionProtocol(lambda t: Session(a, store, t, self.owner_a, policy=policy_a,
                                                   key_update_bytes=key_update_bytes),
                                 self.clock, dial_to=dial)
        self.b = SessionProtocol(lambda t: Session(b, store_b or store, t, self.owner_b,
                                                   policy=policy_b), self.clock)
        self.ta, self.tb = StringTransport(), StringTransport()
        self.wire: list[bytes] = []
        self.a_to_b: Tamper = lambda d: d
        self.b_to_a: Tamper = lambda d: d
        self.b.makeConnection(self.tb)
        self.a.makeConnection(self.ta)

    def pump(self, rounds: int = 6) -> None:
        for _ in range(rounds):
            for src, proto, tamper in ((self.ta, self.b, self.a_to_b),
                                       (self.tb, self.a, self.b_to_a)):
                data = src.value()
                src.clear()
                if data:
                    self.wire.append(data)
                    proto.dataReceived(tamper(data))
            for t, proto in ((self.ta, self.a), (self.tb, self.b)):
                if t.disconnecting and proto.session and proto.session.end_reason is None:
                    proto.connectionLost()

    @property
    def session_a(self) -> Session:
        assert self.a.session is not None
        return self.a.session

    @property
    def session_b(self) -> Session:
        assert self.b.session is not None
        return self.b.session


@pytest.fixture(scope="module")
def store(pki) -> CertificateStore:
    return pki.store()


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa2048"])
@pytest.mark.parametrize("cipher", ["aes-256-gcm", "chacha20-poly1305"])
def test_handshake_and_messages(pki, store, key_type: str, cipher: str) -> None:
    policy = HandshakePolicy(ciphers=(cipher,))
    p = Pair(pki.identity("user", ALICE, key_type=key_type),
             pki.identity("user", BOB, key_type="ecdsa-p256"), store, policy_b=policy)
    p.pump()
    assert p.owner_a.established == [BOB] and p.owner_b.established == [ALICE]
    assert p.session_a.method == p.session_b.method == "x25519"
    assert p.session_a.cipher == p.session_b.cipher == cipher
    assert p.session_b.initiator_id == p.session_a.initiator_id == ALICE
    assert p.session_a.send_stanza(b'<message id="1" sent="t">secret words</message>')
    assert p.session_b.send_stanza(b'<receipt id="1"/>')
    p.pump()
    assert p.owner_b.stanzas == [("message", "secret words")]
    assert p.owner_a.stanzas == [("receipt", None)]
    assert not any(b"secret words" in chunk for chunk in p.wire)


def test_p521_certificates_sign_with_sha512(pki, store) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    alice = NodeIdentity(ALICE, pki.root.sign_user(ALICE, key.public_key()), key)
    p = Pair(alice, pki.identity("user", BOB), store)
    p.pump()
    assert p.owner_a.established == [BOB] and p.owner_b.established == [ALICE]
    assert b'algorithm="ecdsa-sha512"' in b"".join(p.wire)


def test_intermediate_issued_certificates(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE, ca=pki.sub), pki.identity("user", BOB, ca=pki.sub),
             store)
    p.pump()
    assert p.owner_a.established == [BOB]


def test_rsa_key_transport_when_the_responder_requires_it(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE, key_type="rsa2048"), pki.identity("user", BOB), store,
             policy_b=HandshakePolicy(key_agreements=("rsa-oaep",)))
    p.pump()
    assert p.session_a.method == p.session_b.method == "rsa-oaep"
    assert p.session_a.send_stanza(b'<message id="1" sent="t">hi</message>')
    p.pump()
    assert p.owner_b.stanzas == [("message", "hi")]


def test_key_transport_impossible_without_an_rsa_initiator(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store,
             policy_b=HandshakePolicy(key_agreements=("rsa-oaep",)))
    p.pump()
    assert p.owner_a.ended == ["peer:insufficient-security"]
    assert p.owner_b.ended == ["insufficient-security"]


def _strip_x25519(data: bytes) -> bytes:
    return re.sub(rb'<offer method="x25519"><share>[^<]*</share></offer>', b"", data)


def test_downgrade_to_key_transport_is_detected(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE, key_type="rsa2048"), pki.identity("user", BOB), store)
    p.a_to_b = _strip_x25519
    p.pump()
    # bob saw only rsa-oaep offered and chose it; alice's transcript differs: the signature fails
    assert p.session_b.method == "rsa-oaep"
    assert p.owner_a.established == [] and p.owner_b.established == []
    assert p.owner_a.ended == ["decrypt-error"]
    assert p.owner_b.ended == ["peer:decrypt-error"]


def test_changed_cipher_choice_is_detected(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)
    p.b_to_a = lambda d: d.replace(b'<cipher name="aes-256-gcm"/>',
                                   b'<cipher name="chacha20-poly1305"/>')
    p.pump()
    assert p.owner_a.ended == ["decrypt-error"]


def test_dialer_refuses_another_identity(pki, store) -> None:
    """Mallory answers a call for bob with her own (valid) certificate."""
    p = Pair(pki.identity("user", ALICE), pki.identity("user", MALLORY), store)
    p.session_b.me = BOB  # her agent pretends to act for bob
    p.pump()
    assert p.owner_a.ended == ["identity-mismatch"]
    assert p.owner_b.ended == ["peer:identity-mismatch"]


def test_responder_refuses_a_call_for_someone_else(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store, dial=MALLORY)
    p.pump()
    assert p.owner_b.ended == ["unknown-identity"]
    assert p.owner_a.ended == ["peer:unknown-identity"]


def test_relay_substituting_its_certificate_fails(pki, store) -> None:
    """Mallory (valid certificate) rewrites alice's chain to hers when relaying to bob."""
    from sixnet.chat import messages as m

    alice, mallory = pki.identity("user", ALICE), pki.identity("user", MALLORY)
    p = Pair(alice, pki.identity("user", BOB), store)

    def swap_chain(data: bytes) -> bytes:
        for a_cert, m_cert in zip(alice.chain, mallory.chain, strict=True):
            data = data.replace(m._b64(a_cert.public_bytes(m.Encoding.DER)).encode(),
                                m._b64(m_cert.public_bytes(m.Encoding.DER)).encode())
        return data

    p.a_to_b = swap_chain
    p.pump()
    assert p.session_b.peer_id == MALLORY  # bob believes mallory called ...
    assert p.owner_a.ended == ["handshake-failure"]  # ... so bob's hello names mallory
    assert p.owner_b.established == []


@pytest.mark.parametrize("ca", ["foreign", "revoked"])
def test_bad_certificates(pki, ca: str) -> None:
    if ca == "foreign":
        alice = pki.identity("user", ALICE, ca=pki.foreign)
        expected = "unknown-ca"
    else:
        alice = pki.identity("user", "revoked@example.test")
        pki.root.revoke(alice.certificate.serial_number)
        pki.root.write_crl()
        expected = "certificate-revoked"
    p = Pair(alice, pki.identity("user", BOB), pki.store())
    p.pump()
    assert p.owner_b.ended == [expected]
    assert p.owner_a.ended == [f"peer:{expected}"]


def _established(pki, store, **kwargs) -> Pair:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store, **kwargs)
    p.pump()
    assert p.owner_b.established == [ALICE]
    return p


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def test_flipped_bit_is_detected(pki, store) -> None:
    p = _established(pki, store)
    p.a_to_b = _flip_last_byte
    p.session_a.send_stanza(b'<message id="1" sent="t">x</message>')
    p.pump()
    assert p.owner_b.ended == ["bad-record-mac"] and p.owner_b.stanzas == []
    assert p.owner_a.ended == ["peer:bad-record-mac"]


def test_replayed_record_is_detected(pki, store) -> None:
    p = _established(pki, store)
    seen: list[bytes] = []

    def replay(data: bytes) -> bytes:
        seen.append(data)
        return data + seen[-2] if len(seen) == 2 else data

    p.a_to_b = replay
    p.session_a.send_stanza(b'<message id="1" sent="t">x</message>')
    p.pump()
    p.session_a.send_stanza(b'<message id="2" sent="t">y</message>')
    p.pump()
    assert p.owner_b.stanzas == [("message", "x"), ("message", "y")]
    assert p.owner_b.ended == ["bad-record-mac"]


def test_dropped_and_reordered_records_are_detected(pki, store) -> None:
    for mode in ("drop", "reorder"):
        p = _established(pki, store)
        held: list[bytes] = []

        def relay(data: bytes, mode: str = mode, held: list[bytes] = held) -> bytes:
            held.append(data)
            if len(held) == 1:
                return b""
            return data if mode == "drop" else data + held[0]

        p.a_to_b = relay
        p.session_a.send_stanza(b'<message id="1" sent="t">x</message>')
        p.pump()
        p.session_a.send_stanza(b'<message id="2" sent="t">y</message>')
        p.pump()
        assert p.owner_b.stanzas == [] and p.owner_b.ended == ["bad-record-mac"], mode


def test_key_update_both_ways(pki, store) -> None:
    p = _established(pki, store, key_update_bytes=100)
    for i in range(3):
        assert p.session_a.send_stanza(f'<message id="{i}" sent="t">{"z" * 80}</message>'
                                       .encode())
        p.pump()
    p.session_a.request_key_update()
    p.pump()
    assert p.session_b.send_stanza(b'<receipt id="2"/>')
    p.pump()
    assert [text for _, text in p.owner_b.stanzas] == ["z" * 80] * 3
    assert p.owner_a.stanzas == [("receipt", None)]
    assert p.owner_a.ended == p.owner_b.ended == []


def test_clean_close_and_records_after_close(pki, store) -> None:
    p = _established(pki, store)
    p.a.close()
    p.pump()
    assert p.owner_a.ended == ["close-notify"] and p.owner_b.ended == ["close-notify"]

    p = _established(pki, store)
    p.b.close()  # bob sent close-notify; alice keeps sending application data
    p.b_to_a = lambda d: b""  # ... because she never sees bob's close-notify
    p.pump()
    p.session_a.send_stanza(b'<message id="1" sent="t">late</message>')
    p.pump()
    assert p.owner_b.stanzas == [] and p.owner_b.ended == ["unexpected-message"]


@pytest.mark.parametrize("garbage,alert", [
    (b"hello world\r\n", "decode-error"),
    (b'<other xmlns="urn:x">', "protocol-version"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="2">', "protocol-version"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1"><finished>AAAA</finished>',
     "decode-error"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1"><hello role="x"/>', "decode-error"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1"><?pi x?>', "decode-error"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1"><hello>' + b"A" * 70000,
     "decode-error"),
    (b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1"></sixchat>\x17\x00\x00\x20',
     "unexpected-message"),
])
def test_garbage_and_oversized_handshakes(pki, store, garbage: bytes, alert: str) -> None:
    clock = Clock()
    owner = Owner()
    proto = SessionProtocol(lambda t: Session(pki.identity("user", BOB), store, t, owner), clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(garbage)
    assert owner.ended == [alert]
    assert transport.disconnecting
    assert f'reason="{alert}"/></sixchat>'.encode() in transport.value()


def test_stalled_handshake_times_out(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)
    p.b_to_a = lambda d: b""  # bob's answer never arrives
    p.pump()
    p.clock.advance(9.9)
    assert p.owner_a.ended == []
    p.clock.advance(0.2)
    assert p.owner_a.ended == ["handshake-timeout"]
    assert p.owner_b.ended == ["handshake-timeout"]  # bob never got alice's finished either


def test_key_schedule_matches_rfc8448(monkeypatch) -> None:
    """With the TLS 1.3 label prefix, the schedule reproduces RFC 8448's derived secret."""
    monkeypatch.setattr(keyschedule, "LABEL_PREFIX", b"tls13 ")
    early = keyschedule.hkdf_extract(bytes(32), bytes(32))
    assert early.hex() == "33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a"
    derived = keyschedule.derive_secret(early, "derived", keyschedule.empty_hash())
    assert derived.hex() == "6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba"


def test_record_layer_round_trip_and_limits() -> None:
    keys = keyschedule.TrafficKeys.from_secret(bytes(range(32)))
    sender = RecordLayer("aes-256-gcm", keys, keys)
    receiver = RecordLayer("aes-256-gcm", keys, keys)
    big = bytes(300_000)
    wire = b"".join(sender.seal_application(big))
    got, alert = receiver.feed(wire[:1000])
    assert got == [] and alert is None
    got, alert = receiver.feed(wire[1000:])
    assert alert is None and b"".join(p for _, p in got) == big
    assert all(t == APPLICATION for t, _ in got)
    got, alert = receiver.feed(b"\x17\xff\xff\xff")
    assert alert is not None and alert.condition == "record-overflow"
