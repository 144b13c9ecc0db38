"""Issue 10's SixChat findings: failures after the XML phase, revocation, who may talk,
the stream root, ``sent``, and the handshake limits."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from twisted.internet import protocol, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sixnet.chat.agent import MAX_SENT_AHEAD, sent_problem
from sixnet.chat.directory import PeerAddress
from sixnet.chat.policy import PeerPolicy, normalize_entry
from sixnet.chat.protocol import SessionFactory, SessionProtocol
from sixnet.chat.records import ALERT, RecordLayer
from sixnet.chat.session import Session
from sixnet.core.timefmt import rfc3339

from .test_chat_agents import ALICE, BOB, CAROL, AgentHarness, Silent, until
from .test_chat_session import Owner, Pair


@pytest.fixture(scope="module")
def store(pki):
    return pki.store()


# -- a failure after </sixchat> is an alert record -------------------------------------------


def _spoil(element: bytes) -> Any:
    """Change the first base64 character of the initiator's `element` (her second write)."""
    writes = {"n": 0}

    def tamper(data: bytes) -> bytes:
        writes["n"] += 1
        if writes["n"] != 2:
            return data
        return re.sub(rb"(<" + element + rb"[^>]*>)(.)",
                      lambda m: m.group(1) + (b"B" if m.group(2) == b"A" else b"A"), data,
                      count=1)

    return tamper


@pytest.mark.parametrize("element", [b"certificate-verify", b"finished"])
def test_responder_rejecting_the_initiators_proof_sends_an_alert_record(pki, store,
                                                                        element: bytes) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)
    p.a_to_b = _spoil(element)
    p.pump()
    assert p.owner_b.ended == ["decrypt-error"]
    assert p.owner_a.ended == ["peer:decrypt-error"]  # she read it: not unexpected-message
    answer = p.wire[-1]
    assert b"<alert" not in answer and answer[0] == ALERT


def test_the_alert_record_is_sealed_under_the_responders_first_application_keys(pki,
                                                                               store) -> None:
    """What an independent initiator does: open it with r_ap_0, sequence number 0."""
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)
    p.a_to_b = _spoil(b"finished")
    received: list[bytes] = []
    original = p.session_a.records_received
    p.session_a.records_received = lambda data: (received.append(data), original(data))
    p.pump()
    keys = p.session_a.records._receive.keys  # type: ignore[union-attr]
    reader = RecordLayer(p.session_a.cipher or "", keys, keys)
    records, alert = reader.feed(b"".join(received))
    assert alert is None and records == [(ALERT, b"decrypt-error")]


def test_responder_timing_out_after_its_finished_sends_an_alert_record(pki, store) -> None:
    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)
    writes = {"n": 0}

    def drop_second(data: bytes) -> bytes:
        writes["n"] += 1
        return b"" if writes["n"] == 2 else data

    p.a_to_b = drop_second
    p.pump()
    p.clock.advance(10.1)
    p.pump()
    assert p.owner_b.ended == ["handshake-timeout"]
    assert p.owner_a.ended == ["peer:handshake-timeout"]


# -- the stream root ---------------------------------------------------------------------------


def _responder(pki, store) -> tuple[SessionProtocol, Owner]:
    owner = Owner()
    proto = SessionProtocol(lambda t: Session(pki.identity("user", BOB), store, t, owner),
                            Clock())
    proto.makeConnection(StringTransport())
    return proto, owner


@pytest.mark.parametrize("header", [
    b'<s:sixchat xmlns:s="urn:sixnet:sixchat:1" version="1">',
    b'<s:sixchat xmlns:s="urn:sixnet:sixchat:1" xmlns="urn:sixnet:sixchat:1" version="1">',
    b'<?xml version="1.0"?>\n<s:sixchat xmlns:s="urn:sixnet:sixchat:1" version="1">',
])
def test_a_prefixed_root_is_protocol_version(pki, store, header: bytes) -> None:
    proto, owner = _responder(pki, store)
    proto.dataReceived(header)
    assert owner.ended == ["protocol-version"]


@pytest.mark.parametrize("header", [
    b'<sixchat xmlns="urn:sixnet:sixchat:1" version="1">',
    b"<?xml version='1.0' encoding='UTF-8'?>\n<sixchat version='1' xmlns='urn:sixnet:sixchat:1'>",
])
def test_the_unprefixed_root_is_accepted_in_pieces(pki, store, header: bytes) -> None:
    proto, owner = _responder(pki, store)
    for i in range(len(header)):
        proto.dataReceived(header[i:i + 1])
    assert owner.ended == []


def test_canonical_form_keeps_prefixes_as_the_spec_says() -> None:
    from lxml import etree

    from sixnet.chat.messages import canonical

    plain = etree.fromstring(b'<finished xmlns="urn:sixnet:sixchat:1">AA==</finished>')
    declared_above = etree.fromstring(
        b'<x xmlns="urn:sixnet:sixchat:1"><finished>AA==</finished></x>')[0]
    prefixed = etree.fromstring(b'<s:finished xmlns:s="urn:sixnet:sixchat:1">AA==</s:finished>')
    assert canonical(plain) == canonical(declared_above)  # where it is declared: no matter
    assert canonical(prefixed) != canonical(plain)  # the prefix: it matters


# -- sent ---------------------------------------------------------------------------------------


NOW = datetime.datetime(2026, 12, 2, 12, 0, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize("sent,ok", [
    ("2026-12-02T12:00:00.000Z", True),
    ("2026-12-02T11:59:59Z", True),
    ("2020-01-01T00:00:00.5Z", True),
    (rfc3339(NOW + MAX_SENT_AHEAD.total_seconds() - 1), True),
    (rfc3339(NOW + MAX_SENT_AHEAD.total_seconds() + 1), False),
    ("9999-12-31T23:59:59Z", False),
    ("2026-12-02T12:00:00+00:00", False),
    ("2026-12-02T13:00:00+01:00", False),
    ("2026-12-02", False),
    ("2026-12-02T12:00:00", False),
    ("2026-13-02T12:00:00Z", False),
    ("t", False),
    ("", False),
])
def test_sent_must_be_rfc3339_utc_and_not_far_ahead(sent: str, ok: bool) -> None:
    assert (sent_problem(sent, NOW) is None) is ok, sent_problem(sent, NOW)



@pytest.mark.parametrize("text", ["192.0.2.1:\u0664\u0666\u0660\u0665", "[2001:db8::1]:\u00b2",
                                  "h:\uff14\uff16\uff10\uff15", "h:+4605", "h: 4605", "h:0",
                                  "h:65536", "h:"])
def test_a_peer_port_is_ascii_digits_only(text: str) -> None:
    """Arabic-Indic, superscript and fullwidth digits pass ``str.isdigit``: refused, with
    the one message, never read as another number or failing inside `int`."""
    with pytest.raises(ValueError, match="the port must be 1-65535 in ASCII digits"):
        PeerAddress.parse(text)
    assert PeerAddress.parse("[2001:db8::1]:4605") == PeerAddress("2001:db8::1", 4605)

# -- who may talk -------------------------------------------------------------------------------


def test_policy_entries_and_precedence() -> None:
    assert normalize_entry("Bob@Example.TEST") == BOB
    assert normalize_entry("Example.TEST.") == "example.test"
    for bad in ("bob@", "@example.test", "nodot", "a b.test", "x@y@z.test"):
        with pytest.raises(ValueError):
            normalize_entry(bad)
    everyone = PeerPolicy()
    assert everyone.permits(BOB) and everyone.permits("x@elsewhere.test")
    policy = PeerPolicy.from_lists(allow=["example.test", "eve@evil.test"],
                                   deny=["mallory@example.test", "evil.test"])
    assert policy.permits(BOB)
    assert not policy.permits("mallory@example.test")  # her entry beats her domain's
    assert policy.permits("eve@evil.test")
    assert not policy.permits("x@evil.test") and not policy.permits("x@other.test")
    both = PeerPolicy.from_lists(allow=[BOB], deny=[BOB])
    assert not both.permits(BOB)


# -- the global handshake limit ---------------------------------------------------------------


class _Addr:
    def __init__(self, host: str) -> None:
        self.host = host


def test_handshakes_are_limited_per_address_and_in_all() -> None:
    built: list[SessionProtocol] = []

    def make(_: str | None) -> SessionProtocol:
        proto = SessionProtocol(lambda t: None, Clock())  # type: ignore[arg-type,return-value]
        built.append(proto)
        return proto

    factory = SessionFactory(make, max_handshakes_per_address=2, max_handshakes=3)
    assert factory.buildProtocol(_Addr("192.0.2.1")) is not None
    assert factory.buildProtocol(_Addr("192.0.2.1")) is not None
    assert factory.buildProtocol(_Addr("192.0.2.1")) is None  # per address
    assert factory.buildProtocol(_Addr("192.0.2.2")) is not None
    assert factory.buildProtocol(_Addr("192.0.2.3")) is None  # in all
    assert factory.refused == 1  # since the last one admitted
    built[0].handshake_over.callback(None)
    assert factory.under_way == 2
    assert factory.buildProtocol(_Addr("192.0.2.3")) is not None
    assert factory.refused == 0



def test_handshakes_from_one_ipv6_64_count_together() -> None:
    """An IPv6 host has a whole /64 to pick source addresses from: one allowance for it."""
    factory = SessionFactory(lambda _: SessionProtocol(lambda t: None, Clock()),  # type: ignore[arg-type,return-value]
                             max_handshakes_per_address=2, max_handshakes=10)
    assert factory.buildProtocol(_Addr("2001:db8:0:1::1")) is not None
    assert factory.buildProtocol(_Addr("2001:db8:0:1::2")) is not None
    assert factory.buildProtocol(_Addr("2001:db8:0:1:abcd::3")) is None
    assert factory.buildProtocol(_Addr("2001:db8:0:2::1")) is not None  # another /64

# -- between two agents -----------------------------------------------------------------------


class HardenedAgentTests(AgentHarness):
    """Whole agents on loopback (the harness of test_chat_agents)."""

    def _endings(self, service: Any) -> list[str]:
        ended: list[str] = []
        original = service.agent.session_ended
        service.agent.session_ended = lambda s, r: (ended.append(r), original(s, r))
        return ended

    async def test_a_refused_finished_reaches_the_initiator_as_an_alert(self) -> None:
        state = {"spoiled": False}

        def spoil(direction: str, data: bytes) -> bytes:
            """Alice's first finished (the relay's first chance after bob's answer)."""
            if direction != "out" or state["spoiled"] or b"<finished" not in data:
                return data
            state["spoiled"] = True
            return re.sub(rb"(<finished[^>]*>)(.)",
                          lambda m: m.group(1) + (b"B" if m.group(2) == b"A" else b"A"), data)

        alice, bob, _ = await self._relayed(spoil)
        alice_ended, bob_ended = self._endings(alice), self._endings(bob)
        await alice.agent.send(BOB, "after a spoiled finished")
        await until(lambda: "peer:decrypt-error" in alice_ended)
        assert bob_ended[0] == "decrypt-error"
        assert "unexpected-message" not in alice_ended
        await until(lambda: self.delivered(ALICE) == ["after a spoiled finished"])

    async def test_revocation_ends_the_session_and_refuses_the_next_handshake(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        alice_ended, bob_ended = self._endings(alice), self._endings(bob)
        await alice.agent.send(BOB, "before")
        await until(lambda: self.delivered(ALICE) == ["before"])
        assert BOB in alice.agent.sessions
        self.shared.revoke(BOB, bob.agent.identity.certificate)
        await until(lambda: BOB not in alice.agent.sessions)
        assert alice_ended == ["certificate-revoked"]
        await until(lambda: bob_ended == ["peer:certificate-revoked"])
        # the CRL says nothing yet: alice refuses bob's certificate from what she heard
        assert self.store.revocation_status(bob.agent.identity.certificate) is None
        await bob.agent.send(ALICE, "after")
        await until(lambda: bob_ended.count("peer:certificate-revoked") >= 2)
        assert self.received(ALICE) == [] and BOB not in alice.agent.sessions

    async def test_a_certificate_revoked_before_the_session_is_refused_at_once(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        self.shared.revoke(BOB, bob.agent.identity.certificate)
        alice_ended = self._endings(alice)
        await bob.agent.send(ALICE, "from a revoked certificate")
        await until(lambda: "certificate-revoked" in alice_ended)
        assert self.received(ALICE) == []  # held until the directory answered, then dropped
        await until(lambda: BOB not in alice.agent.sessions)

    async def test_deny_and_allow_in_the_handshake(self) -> None:
        await self.agent(BOB, deny=[ALICE], allow=[])
        alice, carol = await self.agent(ALICE), await self.agent(CAROL)
        alice_ended = self._endings(alice)
        await alice.agent.send(BOB, "let me in")
        await until(lambda: "peer:access-denied" in alice_ended)
        await carol.agent.send(BOB, "from carol")
        await until(lambda: self.received(BOB) == ["from carol"])

    async def test_only_allowed_people_and_domains(self) -> None:
        bob = await self.agent(BOB, allow=["carol@example.test", "elsewhere.test"])
        alice = await self.agent(ALICE)
        alice_ended = self._endings(alice)
        await alice.agent.send(BOB, "let me in")
        await until(lambda: "peer:access-denied" in alice_ended)
        from sixnet.chat.agent import MessageRefused

        with pytest.raises(MessageRefused, match="not allowed"):
            await bob.agent.send(ALICE, "to a person bob does not talk with")
        assert self.received(BOB) == []

    async def test_a_flood_from_many_addresses_meets_the_global_limit(self) -> None:
        bob = await self.agent(BOB, max_handshakes=2, max_handshakes_per_address=8)
        closed: list[str] = []
        silent = [await protocol.ClientCreator(reactor, Silent, f"s{i}", closed).connectTCP(
            "127.0.0.1", self.port(bob), bindAddress=(f"127.0.0.{i + 2}", 0))
            for i in range(3)]
        await until(lambda: closed == ["s2"], timeout=5)
        silent[0].transport.loseConnection()
        await until(lambda: "s0" in closed)
        alice = await self.agent(ALICE)
        await alice.agent.send(BOB, "through the global limit")
        await until(lambda: self.received(BOB) == ["through the global limit"])
        silent[1].transport.loseConnection()
