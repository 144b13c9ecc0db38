"""Every detection the services make reaches the event bus as one `SecurityEvent`.

Each scenario is the real one (loopback sockets, real TLS, the attacker's bytes on the wire)
with a subscriber collecting what the service emitted; it checks the kind, the person or
platform, the peer's address, the facts, and that no secret and no message text is in the
event. `SCENARIOS` names the test that drives each kind of the catalogue, so the bridge can
rely on every kind being emitted somewhere (`test_every_kind_has_a_scenario`).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import protocol, reactor, threads
from twisted.trial import unittest

from sixnet.chat.config import ChatConfig
from sixnet.chat.directory import PeerAddress
from sixnet.chat.irp import IRPDirectory
from sixnet.chat.service import ChatService
from sixnet.core.events import CATALOGUE, EventBus, EventSpool, SecurityEvent
from sixnet.core.storage.database import Database
from sixnet.core.timefmt import rfc3339
from sixnet.grid.client.errors import IQError
from sixnet.grid.client.pubsub import PubSubClient
from sixnet.grid.pubsub.config import RateLimitConfig
from sixnet.grid.pubsub.policy import RateLimits
from sixnet.irp.client import IRPError, connect
from sixnet.irp.engine.access import Caller
from sixnet.irp.engine.credentials import hash_password, invite_hash, new_invite_code
from sixnet.irp.service import EVENT_SPOOL
from sixnet.pki.ca import LabCA, serial_hex
from sixnet.pki.keys import generate_key
from sixnet.pki.store import NodeIdentity

from .support.chat import SharedDirectory
from .test_chat_agents import ALICE, BOB, MALLORY, AgentHarness, Relay, RelayRecord, until
from .test_grid_c2s import HEADER, GridTestCase
from .test_irp import LabSetup, RegistryHarness, _fails, _identity

#: The test that drives each kind of the catalogue (checked against the catalogue below).
SCENARIOS = {
    "irp.login-failed": "IRPEventTests.test_wrong_passwords_and_codes_then_the_lockout",
    "irp.locked-out": "IRPEventTests.test_wrong_passwords_and_codes_then_the_lockout",
    "irp.certificate-refused": "IRPEventTests.test_foreign_expired_and_revoked_certificates",
    "irp.certificate-issued": "IRPEventTests.test_issued_then_revoked",
    "irp.certificate-revoked": "IRPEventTests.test_issued_then_revoked",
    "irp.user-removed": "IRPEventTests.test_the_removal_command_in_another_process",
    "chat.mitm": "ChatDirectoryEventTests.test_a_certificate_the_registry_does_not_publish",
    "chat.identity-mismatch": "ChatEventTests.test_another_person_answers_the_call",
    "chat.certificate-revoked": "ChatEventTests.test_a_revoked_certificate",
    "chat.record-tampered": "ChatEventTests.test_a_tampered_record",
    "chat.record-replayed": "ChatEventTests.test_a_replayed_record",
    "chat.record-dropped": "ChatEventTests.test_a_dropped_record",
    "chat.downgrade": "ChatEventTests.test_a_stripped_offer_is_a_downgrade",
    "grid.platform-revoked": "GridEventTests.test_the_operator_revokes_a_platform",
    "grid.rate-limited": "GridEventTests.test_stanza_and_publish_rates",
    "grid.login-failed": "GridEventTests.test_wrong_passwords_then_the_lockout",
    "grid.locked-out": "GridEventTests.test_wrong_passwords_then_the_lockout",
    "grid.hostile-input": "GridEventTests.test_hostile_input",
}


class Collected:
    """What a bus delivered, by kind."""

    def __init__(self, bus: Any) -> None:
        self.events: list[SecurityEvent] = []
        bus.subscribe(self.events.append)

    def of(self, kind: str) -> list[SecurityEvent]:
        return [e for e in self.events if e.kind == kind]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def assert_clean(events: list[SecurityEvent], *secrets: str) -> None:
    """No secret and no message text in any event, and each is a well-formed one."""
    for event in events:
        text = repr(event)
        for secret in secrets:
            assert secret not in text, (secret, event)
        assert event.detail and "\n" not in event.detail
        assert all(isinstance(v, str) and len(v) < 400 for v in event.facts.values()), event


# -- the bus itself -----------------------------------------------------------------------------


def test_every_kind_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(CATALOGUE)
    for name in SCENARIOS.values():
        cls, method = name.split(".")
        assert callable(getattr(getattr(sys.modules[__name__], cls), method)), name


def test_the_bus_delivers_in_order_to_every_subscriber() -> None:
    bus = EventBus()
    seen: list[tuple[str, str | None]] = []
    bus.subscribe(lambda e: seen.append(("first", e.subject)))
    unsubscribe = bus.subscribe(lambda e: seen.append(("second", e.subject)))
    for who in ("a", "b"):
        bus.emit(SecurityEvent("irp.login-failed", subject=who))
    assert seen == [("first", "a"), ("second", "a"), ("first", "b"), ("second", "b")]
    unsubscribe()
    bus.emit(SecurityEvent("irp.login-failed", subject="c"))
    assert seen[-1] == ("first", "c") and len(seen) == 5


def test_a_failing_subscriber_does_not_stop_the_others(caplog: Any) -> None:
    from twisted.logger import globalLogPublisher

    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        bus = EventBus()
        got: list[SecurityEvent] = []

        def broken(event: SecurityEvent) -> None:
            raise RuntimeError("listener bug")

        bus.subscribe(broken)
        bus.subscribe(got.append)
        event = SecurityEvent("grid.hostile-input", source="192.0.2.1")
        bus.emit(event)  # does not raise
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert got == [event]
    assert any(e.get("log_failure") is not None and e.get("kind") == "grid.hostile-input"
               for e in logged)


def test_an_event_is_closed_and_frozen() -> None:
    with pytest.raises(ValueError, match="unknown security event kind 'irp.typo'"):
        SecurityEvent("irp.typo")
    facts = {"serial": "01AB"}
    event = SecurityEvent("chat.mitm", subject="bob@example.test", facts=facts)
    facts["serial"] = "changed"
    assert event.facts == {"serial": "01AB"} and event.service == "chat"
    with pytest.raises(TypeError):
        event.facts["x"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.kind = "chat.downgrade"  # type: ignore[misc]
    assert abs(event.time - datetime.datetime.now(datetime.UTC).timestamp()) < 5


def test_an_alert_names_only_kinds_of_the_catalogue() -> None:
    from sixnet.chat.alerts import Alert

    with pytest.raises(ValueError, match="chat.typo"):
        Alert("bad-record-mac", "x", event="chat.typo")
    assert Alert("bad-record-mac", "x", event="chat.record-tampered").event is not None


def test_records_opened_under_another_sequence_number_are_told_apart() -> None:
    """The record layer's classification, without sockets: the same bytes fail as the
    expected record, open as an earlier (replayed) or later (dropped) one, or not at all."""
    from sixnet.chat.keyschedule import KeySchedule
    from sixnet.chat.records import RecordLayer

    schedule = KeySchedule(b"\x01" * 32)
    schedule.handshake_traffic(b"\x00" * 32)
    mine, theirs = schedule.application_traffic(b"\x02" * 32)
    sender = RecordLayer("aes-256-gcm", mine, theirs)
    records = [sender.seal(23, f"record {i}".encode()) for i in range(4)]

    def alert(*fed: bytes) -> Any:
        receiver = RecordLayer("aes-256-gcm", theirs, mine)
        opened, problem = receiver.feed(b"".join(fed))
        assert problem is not None
        return problem

    replayed = alert(records[0], records[1], records[0])
    assert (replayed.event, dict(replayed.facts)) == \
        ("chat.record-replayed", {"expected": "2", "found": "0"})
    dropped = alert(records[0], records[3])
    assert (dropped.event, dict(dropped.facts)) == \
        ("chat.record-dropped", {"expected": "1", "found": "3"})
    flipped = bytearray(records[1])
    flipped[-1] ^= 1
    tampered = alert(records[0], bytes(flipped))
    assert (tampered.event, dict(tampered.facts)) == ("chat.record-tampered", {"expected": "1"})
    assert all(a.condition == "bad-record-mac" for a in (replayed, dropped, tampered))


def test_handshake_alerts_name_their_event(pki: Any) -> None:
    """In memory: a responder made to choose what was not offered, and a Finished changed
    on the way, are downgrades; the session keeps the alert that ended it."""
    from .test_chat_session import Pair

    store = pki.store()
    from sixnet.chat.handshake import HandshakePolicy

    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store,
             policy_a=HandshakePolicy(ciphers=("aes-256-gcm",)))
    p.b_to_a = lambda d: d.replace(b'<cipher name="aes-256-gcm"/>',
                                   b'<cipher name="chacha20-poly1305"/>')
    p.pump()
    alert = p.session_a.end_alert
    assert alert is not None and (alert.condition, alert.event) == \
        ("handshake-failure", "chat.downgrade")
    assert alert.facts == {"check": "choice", "chosen-method": "x25519",
                           "chosen-cipher": "chacha20-poly1305"}

    p = Pair(pki.identity("user", ALICE), pki.identity("user", BOB), store)

    def spoil_finished(data: bytes) -> bytes:
        return re.sub(rb"(<finished[^>]*>)(.)", lambda m: m[1] + (b"B" if m[2] != b"B"
                                                                   else b"C"), data)

    p.b_to_a = spoil_finished
    p.pump()
    alert = p.session_a.end_alert
    assert alert is not None and (alert.event, dict(alert.facts)) == \
        ("chat.downgrade", {"check": "finished"})


# -- IRP -------------------------------------------------------------------------------------------


class IRPEventTests(RegistryHarness, unittest.TestCase):
    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())

    async def _start(self, **settings: Any) -> tuple[Any, Collected]:
        service = await self.start(**settings)
        return service, Collected(service.registry.events)

    async def test_wrong_passwords_and_codes_then_the_lockout(self) -> None:
        service, got = await self._start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test",
                                                  hash_password("the right one"), 0)
        stranger = await self.client(service, source="127.0.0.2")
        for attempt in range(3):
            await _fails(stranger.enroll("erin@example.test", generate_key(),
                                         password=f"guess-{attempt}-xyzzy"), IRPError)
        failed = got.of("irp.login-failed")
        assert [e.subject for e in failed] == ["erin@example.test"] * 3
        assert {e.source for e in failed} == {"127.0.0.2"}
        assert [e.facts["failures"] for e in failed] == ["1", "2", "3"]
        assert failed[0].facts["operation"] == "enroll"
        assert failed[0].facts["credential"] == "password"
        assert failed[0].facts["network"] == "127.0.0.2"
        [locked] = got.of("irp.locked-out")
        assert got.kinds()[-2:] == ["irp.login-failed", "irp.locked-out"]
        assert (locked.subject, locked.source) == ("erin@example.test", "127.0.0.2")
        assert locked.facts["limit"] == "lockout_after" and locked.facts["failures"] == "3"
        # an unknown user id is reported like a real one (the registry answers alike)
        await _fails(stranger.get_backup("nobody@example.test", "hunter2-secret"), IRPError)
        assert got.events[-1].subject == "nobody@example.test"
        assert got.events[-1].facts["operation"] == "backup-get"
        # a wrong enrollment code is a wrong credential too; the code is not in the event
        code = new_invite_code()
        now = service.registry.now_ms()
        await service.registry.store.add_invite(invite_hash(code), "dave@example.test", now,
                                                now + 60_000)
        wrong = new_invite_code()
        owner = await self.client(service)
        await _fails(owner.enroll("dave@example.test", generate_key(), code=wrong), IRPError)
        assert got.events[-1].facts["credential"] == "code"
        assert got.events[-1].source == "127.0.0.1"
        assert_clean(got.events, "xyzzy", "hunter2", "the right one", wrong, code,
                     wrong.replace("-", ""))

    async def test_issued_then_revoked(self) -> None:
        service, got = await self._start()
        await service.registry.store.set_password("frank@example.test", hash_password("pw1"), 0)
        key = generate_key()
        chain = await (await self.client(service)).enroll("frank@example.test", key,
                                                          password="pw1")
        [issued] = got.of("irp.certificate-issued")
        serial = serial_hex(chain[0].serial_number)
        assert (issued.subject, issued.source) == ("frank@example.test", "127.0.0.1")
        assert issued.facts["serial"] == serial
        assert issued.facts["issuer"] == self.lab.ca.certificate.subject.rfc4514_string()
        assert issued.facts["operation"] == "enroll"
        assert issued.facts["names"] == "frank@example.test"
        frank = await self.client(service, _identity(self.mktemp(), "frank", chain, key))
        await frank.revoke()
        [revoked] = got.of("irp.certificate-revoked")
        assert (revoked.subject, revoked.source) == ("frank@example.test", "127.0.0.1")
        assert revoked.facts["serial"] == serial and revoked.facts["by"] == "frank@example.test"
        assert revoked.facts["issuer"] == issued.facts["issuer"]
        assert_clean(got.events, "pw1")

    async def test_foreign_expired_and_revoked_certificates(self) -> None:
        service, got = await self._start()
        foreign_ca = LabCA.init(Path(self.mktemp()) / "foreign", name="Some other CA")
        cert, key_path, _ = foreign_ca.issue("user", "eve@example.test",
                                             out=Path(self.mktemp()) / "eve")
        eve = await self.client(service, NodeIdentity.load("eve", cert, key_path),
                                source="127.0.0.3")
        assert eve.user is None
        [foreign] = got.of("irp.certificate-refused")
        assert (foreign.subject, foreign.source) == ("eve@example.test", "127.0.0.3")
        assert foreign.facts["check"] in ("unknown-issuer", "untrusted-root")
        assert foreign.facts["issuer"] == foreign_ca.certificate.subject.rfc4514_string()

        key = generate_key()
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired_chain = self.lab.ca.sign_user("olga@example.test", key.public_key(), days=2,
                                              not_before=past)
        await self.client(service, _identity(self.mktemp(), "olga", expired_chain, key))
        expired = got.of("irp.certificate-refused")[-1]
        assert expired.facts["check"] == "expired" and expired.subject == "olga@example.test"
        assert expired.facts["serial"] == serial_hex(expired_chain[0].serial_number)

        bob = self.lab.person("bob@example.test")
        await self.client(service, bob)  # the registry learns his certificate
        root = await self.client(service, self.lab.person("root@example.test"))
        await root.revoke(format(bob.certificate.serial_number, "X"))
        assert (await self.client(service, bob)).refused == "revoked"
        revoked = got.of("irp.certificate-refused")[-1]
        assert (revoked.subject, revoked.facts["check"]) == ("bob@example.test", "revoked")
        assert revoked.facts["serial"] == serial_hex(bob.certificate.serial_number)
        assert got.of("irp.certificate-revoked")[-1].facts["by"] == "root@example.test"
        assert_clean(got.events)

    async def test_an_operator_removes_a_person(self) -> None:
        service, got = await self._start()
        alice = self.lab.person("alice@example.test")
        await self.client(service, alice)  # the registry learns her certificate
        root = await self.client(service, self.lab.person("root@example.test"))
        await root.remove("alice@example.test")
        [removed] = got.of("irp.user-removed")
        assert (removed.subject, removed.source) == ("alice@example.test", "127.0.0.1")
        assert removed.facts["by"] == "root@example.test"
        serial = format(alice.certificate.serial_number, "X")
        assert removed.facts["revoked"] == serial
        [revoked] = got.of("irp.certificate-revoked")
        assert revoked.facts["reason"] == "IRP user removed"
        assert got.kinds()[-2:] == ["irp.certificate-revoked", "irp.user-removed"]
        # ``sixnet irp user remove`` runs `Registry.remove` as the command line (no address)
        await service.registry.store.ensure_person("bob@example.test", 0)
        await service.registry.remove(Caller(None), "bob@example.test")
        last = got.events[-1]
        assert (last.kind, last.subject, last.source) == \
            ("irp.user-removed", "bob@example.test", None)
        assert last.facts["revoked"] == ""

    async def test_the_removal_command_in_another_process(self) -> None:
        """``sixnet irp user remove`` has no bus of its own worth the name: it spools its
        events under the state directory, and the running registry emits them."""
        state = Path(self.mktemp()).absolute()
        ca = self.lab.ca.directory
        config = state / "sixnet.toml"
        state.mkdir(parents=True)
        config.write_text(f"""
[sixnet]
state_dir = "{state}"
[pki]
trust_anchors = ["{ca / 'ca.pem'}"]
crls = ["{ca / 'crl.pem'}"]
lab_ca = "{ca}"
[pki.identities.host]
subject = "irp.example.test"
certificate = "{self.lab.base / 'host/cert.pem'}"
key = "{self.lab.base / 'host/key.pem'}"
[irp]
enabled = true
database = "sqlite:irp.sqlite3"
""")
        service, got = await self._start(database=f"sqlite:{state / 'irp.sqlite3'}")
        service.spool = EventSpool(state / EVENT_SPOOL)
        alice = self.lab.person("alice@example.test")
        await self.client(service, alice)
        done = await threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "sixnet", "irp", "user", "remove",
                             "alice@example.test", "--config", str(config)],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        await until(lambda: bool(got.of("irp.user-removed")), timeout=5)
        assert got.kinds() == ["irp.certificate-revoked", "irp.user-removed"]
        removed = got.events[-1]
        assert (removed.subject, removed.source) == ("alice@example.test", None)
        assert removed.facts["by"] == "operator (command line)"
        assert removed.facts["revoked"] == format(alice.certificate.serial_number, "X")
        assert list((state / EVENT_SPOOL).iterdir()) == []


def test_the_spool_keeps_order_and_drops_what_it_cannot_read(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path / "spool")
    assert spool.deliver(EventBus()) == 0  # nothing spooled yet: no directory
    first = SecurityEvent("irp.user-removed", subject="a@example.test", detail="one",
                          facts={"by": "operator"}, time=1.5)
    spool.emit(first)
    spool.emit(SecurityEvent("irp.certificate-revoked", subject="b@example.test"))
    (tmp_path / "spool" / "00000000000000000000-junk.json").write_text("{not json")
    (tmp_path / "spool" / "00000000000000000001-odd.json").write_text('{"kind": "x.y"}')
    bus = EventBus()
    got = Collected(bus)
    assert spool.deliver(bus) == 2
    assert got.events[0] == first and got.kinds() == ["irp.user-removed",
                                                      "irp.certificate-revoked"]
    assert list((tmp_path / "spool").iterdir()) == []
    assert spool.deliver(bus) == 0 and len(got.events) == 2  # each event once


# -- chat ------------------------------------------------------------------------------------------


class RecordTamper:
    """Changes alice's records (after her ``</sixchat>``) on her first connection only."""

    def __init__(self, action: Any) -> None:
        self.action = action
        self.phase = "xml"
        self.buffer = b""
        self.index = 0

    def __call__(self, direction: str, data: bytes) -> bytes:
        if direction != "out" or self.phase == "done":
            return data
        head = b""
        if self.phase == "xml":
            end = data.find(b"</sixchat>")
            if end < 0:
                return data
            head, data = data[:end + 10], data[end + 10:]
            self.phase = "records"
        self.buffer += data
        out = b""
        while len(self.buffer) >= 4 and self.phase == "records":
            length = int.from_bytes(self.buffer[1:4], "big")
            if len(self.buffer) < 4 + length:
                break
            record, self.buffer = self.buffer[:4 + length], self.buffer[4 + length:]
            result = self.action(self.index, record)
            self.index += 1
            if result is not None:
                out += result
                self.phase = "done"
                out += self.buffer
                self.buffer = b""
        return head + out


class ChatEventTests(AgentHarness):
    async def agent(self, name: str, **overrides: Any) -> ChatService:  # type: ignore[override]
        service = await super().agent(name, **overrides)
        self.got = getattr(self, "got", {})
        self.got[name] = Collected(service.agent.events)
        return service

    def _only(self, name: str, kind: str) -> SecurityEvent:
        events = self.got[name].of(kind)
        assert events, self.got[name].events
        return events[0]

    async def test_another_person_answers_the_call(self) -> None:
        """Mallory's agent answers at bob's address with her own (valid) certificate."""
        alice, mallory = await self.agent(ALICE), await self.agent(MALLORY)
        make_session = mallory.agent._new_session

        def pretend(transport: Any) -> Any:
            session = make_session(transport)
            session.me = BOB
            return session

        mallory.agent._new_session = pretend  # type: ignore[method-assign]
        self.shared.register(BOB, [PeerAddress("127.0.0.1", self.port(mallory))], 60)
        await alice.agent.send(BOB, "for bob only, the vault code")
        await until(lambda: bool(self.got[ALICE].of("chat.identity-mismatch")))
        event = self._only(ALICE, "chat.identity-mismatch")
        assert (event.subject, event.source) == (BOB, "127.0.0.1")
        certificate = mallory.agent.identity.certificate
        assert event.facts["names"] == MALLORY and event.facts["dialled"] == BOB
        assert event.facts["serial"] == serial_hex(certificate.serial_number)
        assert event.facts["issuer"] == certificate.issuer.rfc4514_string()
        assert event.facts["alert"] == "identity-mismatch" and event.facts["role"] == "initiator"
        assert_clean(self.got[ALICE].events + self.got[MALLORY].events, "vault code")
        assert self.got[MALLORY].events == []  # she only heard alice's alert

    async def test_a_revoked_certificate(self) -> None:
        await self.agent(ALICE)
        bob = await self.agent(BOB)
        self.shared.revoke(BOB, bob.agent.identity.certificate)
        await bob.agent.send(ALICE, "from a revoked certificate")
        await until(lambda: bool(self.got[ALICE].of("chat.certificate-revoked")))
        event = self._only(ALICE, "chat.certificate-revoked")
        assert (event.subject, event.source) == (BOB, "127.0.0.1")
        assert event.facts["check"] == "registry" and event.facts["role"] == "responder"
        assert event.facts["serial"] == serial_hex(bob.agent.identity.certificate.serial_number)
        assert_clean(self.got[ALICE].events, "from a revoked certificate")

    async def _records(self, action: Any, texts: list[str]) -> tuple[Any, Any]:
        alice, bob, record = await self._relayed(RecordTamper(action))
        for text in texts:
            await alice.agent.send(BOB, text)
        return alice, bob

    async def _record_event(self, kind: str, action: Any, texts: list[str]) -> SecurityEvent:
        await self._records(action, texts)
        await until(lambda: bool(self.got[BOB].of(kind)))
        await until(lambda: sorted(self.received(BOB)) == sorted(set(texts)))  # the retry
        event = self._only(BOB, kind)
        assert (event.subject, event.source) == (ALICE, "127.0.0.1")
        assert event.facts["alert"] == "bad-record-mac" and event.facts["role"] == "responder"
        assert event.facts["cipher"] in ("aes-256-gcm", "chacha20-poly1305")
        assert_clean(self.got[BOB].events + self.got[ALICE].events, *texts)
        return event

    async def test_a_tampered_record(self) -> None:
        def flip(index: int, record: bytes) -> bytes:
            return record[:-1] + bytes([record[-1] ^ 0x40])

        event = await self._record_event("chat.record-tampered", flip, ["attack at dawn"])
        assert event.facts["expected"] == "0"

    async def test_a_replayed_record(self) -> None:
        event = await self._record_event("chat.record-replayed",
                                         lambda index, record: record + record,
                                         ["pay the invoice"])
        assert (event.facts["expected"], event.facts["found"]) == ("1", "0")

    async def test_a_dropped_record(self) -> None:
        def drop_first(index: int, record: bytes) -> bytes | None:
            return None if index == 0 else record

        event = await self._record_event("chat.record-dropped", drop_first,
                                         ["first secret", "second secret"])
        assert (event.facts["expected"], event.facts["found"]) == ("0", "1")

    async def test_a_relay_swapping_the_callers_certificate(self) -> None:
        """A relay puts mallory's (valid) chain in alice's hello: bob answers mallory, and
        alice, who dialled bob, sees a hello for someone else."""
        from cryptography.hazmat.primitives.serialization import Encoding

        alice_chain = self.pki.identity("user", ALICE).chain
        mallory = self.pki.identity("user", MALLORY)

        def der(cert: Any) -> bytes:
            return base64.b64encode(cert.public_bytes(Encoding.DER))

        def swap(direction: str, data: bytes) -> bytes:
            if direction == "out":
                for mine, hers in zip(alice_chain, mallory.chain, strict=True):
                    data = data.replace(der(mine), der(hers))
            return data

        alice, _, _ = await self._relayed(swap)
        await alice.agent.send(BOB, "meet at the usual place")
        got = self.got[ALICE]
        await until(lambda: bool(got.of("chat.mitm")))
        event = got.of("chat.mitm")[0]
        assert (event.subject, event.source) == (BOB, "127.0.0.1")
        assert event.facts["check"] == "hello-to" and event.facts["names"] == BOB
        assert event.facts["alert"] == "handshake-failure"
        assert_clean(got.events + self.got[BOB].events, "usual place")

    async def test_a_stripped_offer_is_a_downgrade(self) -> None:
        """A relay strips alice's x25519 offer: bob chooses RSA key transport, and alice's
        check of his signature over the transcript fails."""
        state = {"stripped": False}

        def strip(direction: str, data: bytes) -> bytes:
            if direction != "out" or state["stripped"] or b"x25519" not in data:
                return data
            state["stripped"] = True
            return re.sub(rb'<offer method="x25519"><share>[^<]*</share></offer>', b"", data)

        alice = await self.agent(ALICE, key_type="rsa2048")
        bob = await self.agent(BOB)
        record = RelayRecord(tamper=strip)
        factory = protocol.Factory.forProtocol(lambda: Relay(self.port(bob), record))
        relay_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(relay_port.stopListening)
        self.shared.register(BOB, [PeerAddress("127.0.0.1", relay_port.getHost().port)], 60)
        await alice.agent.send(BOB, "the merger is off")
        await until(lambda: bool(self.got[ALICE].of("chat.downgrade")))
        assert state["stripped"]
        event = self._only(ALICE, "chat.downgrade")
        assert (event.subject, event.source) == (BOB, "127.0.0.1")
        assert event.facts["check"] == "certificate-verify"
        assert event.facts["method"] == "rsa-oaep"  # what bob was made to choose
        assert_clean(self.got[ALICE].events, "merger")
        await until(lambda: self.delivered(ALICE) == ["the merger is off"])  # the retry


class ChatDirectoryEventTests(unittest.TestCase):
    """An agent asking a real registry about a certificate issued outside it."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _lab(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.dir = tmp_path
        self.host = pki.identity("host", "irp.example.test")
        self.store = pki.store(identities=[self.host])

    async def test_a_certificate_the_registry_does_not_publish(self) -> None:
        from sixnet.irp.config import IRPConfig
        from sixnet.irp.service import build_service

        config = dataclasses.replace(IRPConfig(), enabled=True,
                                     listen=["tcp:0:interface=127.0.0.1"],
                                     database=f"sqlite:{self.dir / 'irp.sqlite3'}")
        registry = build_service(config, self.store, self.host, self.dir / "irp", None)
        registry.startService()
        self.addCleanup(registry.stopService)
        await registry.ready
        await until(lambda: bool(registry.listening.ports))
        irp_port = registry.listening.ports[0].getHost().port

        def service(name: str, identity: Any, directory: Any) -> ChatService:
            home = self.dir / name
            chat = dataclasses.replace(ChatConfig(), enabled=True,
                                       listen=["tcp:0:interface=127.0.0.1"],
                                       retry_initial=30.0, handshake_timeout=5.0)
            s = ChatService(chat, identity, self.store,
                            Database(f"sqlite:{home / 'chat.sqlite'}"), directory,
                            home / "control.sock", reactor)
            s.startService()
            self.addCleanup(lambda: s.stopService() if s.running else None)
            return s

        # Mallory holds a certificate for bob that the CA issued but the registry never saw,
        # and answers at the address the registry gives for bob.
        rogue = self.pki.identity("user", BOB, key_type="ed25519")
        mallory = service("mallory", rogue, SharedDirectory(reactor.seconds).for_person(BOB))
        await mallory.ready
        bob = await connect("127.0.0.1", irp_port, self.store,
                            identity=self.pki.identity("user", BOB),
                            server_name="irp.example.test", reactor=reactor)
        await bob.register([("127.0.0.1", mallory.ports[0].getHost().port)])
        bob.close()
        alice_identity = self.pki.identity("user", ALICE)
        alice = service("alice", alice_identity, IRPDirectory(
            "127.0.0.1", irp_port, self.store, alice_identity, server_name="irp.example.test"))
        await alice.ready
        got = Collected(alice.agent.events)
        await alice.agent.send(BOB, "the new door code")
        await until(lambda: bool(got.of("chat.mitm")))
        [event] = got.of("chat.mitm")
        assert (event.subject, event.source) == (BOB, "127.0.0.1")
        assert event.facts["check"] == "directory" and event.facts["names"] == BOB
        assert event.facts["serial"] == serial_hex(rogue.certificate.serial_number)
        assert event.facts["alert"] == "bad-certificate" and event.facts["role"] == "initiator"
        assert_clean(got.events, "door code")


# -- grid ------------------------------------------------------------------------------------------


class GridEventTests(GridTestCase):
    async def _events(self, **settings: Any) -> Collected:
        await self._grid(**settings)
        return Collected(self.grid.events)

    async def test_wrong_passwords_then_the_lockout(self) -> None:
        got = await self._events(lockout_after=2, lockout_seconds=60)
        from .grid_harness import RawClient

        stranger = await RawClient.connect(self.port, source="127.0.0.2")
        self.addCleanup(lambda: stranger.transport.abortConnection())
        await stranger.starttls(self.grid.tls.store)
        await stranger.open_stream()
        for guess in ("guess-one-plugh", "guess-two-plugh"):
            assert b"<not-authorized/>" in await stranger.scram_login("alice", guess)
        assert b"<account-disabled/>" in await stranger.scram_login("alice", "alice secret")
        failed = got.of("grid.login-failed")
        assert [(e.subject, e.source, e.facts["condition"]) for e in failed] == [
            ("alice@localhost", "127.0.0.2", "not-authorized"),
            ("alice@localhost", "127.0.0.2", "not-authorized"),
            ("alice@localhost", "127.0.0.2", "account-disabled")]
        assert failed[0].facts["mechanism"] == "SCRAM-SHA-256"
        [locked] = got.of("grid.locked-out")
        assert (locked.subject, locked.source) == ("alice@localhost", "127.0.0.2")
        assert locked.facts["limit"] == "lockout_after" and locked.facts["seconds"] == "60"
        assert got.kinds()[:3] == ["grid.login-failed", "grid.login-failed", "grid.locked-out"]
        assert_clean(got.events, "plugh", "alice secret")

    async def test_hostile_input(self) -> None:
        got = await self._events(max_stanza_bytes=10_000)
        alice = await self._login("alice")
        alice.send(HEADER[21:])  # a stream header inside the session
        await self._refused(alice, "invalid-xml")
        [inside] = got.of("grid.hostile-input")
        assert (inside.subject, inside.source) == ("alice@localhost", "127.0.0.1")
        assert inside.facts == {"condition": "invalid-xml"}
        c = await self._connect()
        c.send(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><x/>")
        await c.closed
        dtd = got.of("grid.hostile-input")[-1]
        assert (dtd.subject, dtd.facts["condition"]) == (None, "restricted-xml")
        bob = await self._login("bob")
        bob.send("<message to='alice@localhost'><body>" + "x" * 20_000 + "</body></message>")
        await self._refused(bob, "policy-violation")
        big = got.of("grid.hostile-input")[-1]
        assert (big.subject, big.facts["condition"]) == ("bob@localhost", "policy-violation")
        assert len(got.of("grid.hostile-input")) == 3
        assert_clean(got.events, "xxxxxxxxxx")

    async def test_stanza_and_publish_rates(self) -> None:
        got = await self._events(stanzas_per_second=5.0, stanza_burst=5)
        c = await self._login("alice")
        c.send("".join(f"<message to='bob@localhost' id='{i}'><body>hello {i}</body></message>"
                       for i in range(20)))
        await self._refused(c, "policy-violation")
        [stanzas] = got.of("grid.rate-limited")
        assert (stanzas.subject, stanzas.source) == ("alice@localhost", "127.0.0.1")
        assert stanzas.facts == {"limit": "stanzas_per_second", "value": "5", "burst": "5"}
        assert_clean(got.events, "hello")

        engine = self.grid.broker.engine
        engine.rate_limits = RateLimits(RateLimitConfig(publishes_per_second=0.01,
                                                        publish_burst=1))
        bob = await self._login("bob")
        ps = "http://jabber.org/protocol/pubsub"
        bob.send(f"<iq type='set' id='c' to='broker.localhost'><pubsub xmlns='{ps}'>"
                 "<create node='feed'/></pubsub></iq>")
        await bob.until(rb"id=.c.")
        for i in range(2):
            bob.send(f"<iq type='set' id='p{i}' to='broker.localhost'><pubsub xmlns='{ps}'>"
                     f"<publish node='feed'><item><x xmlns='urn:x'>report {i}</x></item>"
                     "</publish></pubsub></iq>")
        await bob.until(rb"id=.p1.[^>]*>.*?policy-violation")
        publish = got.of("grid.rate-limited")[-1]
        assert (publish.subject, publish.source) == ("bob@localhost", "127.0.0.1")
        assert publish.facts["operation"] == "publish" and publish.facts["burst"] == "1"
        assert "origin" not in publish.facts
        assert_clean(got.events, "report")

    async def test_a_rate_limited_local_session_says_it_has_no_address(self) -> None:
        """The bridge's session inside the process has no address: the event says what it
        is instead, as the command line's events name the operator."""
        got = await self._events()
        self.grid.broker.engine.rate_limits = RateLimits(RateLimitConfig(
            publishes_per_second=0.01, publish_burst=1))
        session = await self.grid.local_session("sixnet-bridge")
        self.addCleanup(session.close)
        broker = PubSubClient(session, self.grid.pubsub_service)
        await broker.create("incidents")
        await broker.publish("incidents", etree.fromstring("<x xmlns='urn:x'>first</x>"))
        with pytest.raises(IQError) as refused:
            await broker.publish("incidents", etree.fromstring("<x xmlns='urn:x'>second</x>"))
        assert refused.value.condition == "policy-violation"
        [limited] = got.of("grid.rate-limited")
        assert (limited.subject, limited.source) == ("sixnet-bridge@localhost", None)
        assert limited.facts["origin"] == "local session (in this process)"
        assert "no address: local session" in limited.detail

    async def test_the_operator_revokes_a_platform(self) -> None:
        got = await self._events()
        bob = await self._login("bob")
        await self.grid.revocations.store.revoke("bob@localhost", rfc3339(), "key leaked")
        await self._refused(bob, "policy-violation")  # the server read the table
        [revoked] = got.of("grid.platform-revoked")
        assert revoked.subject == "bob@localhost"
        assert revoked.facts == {"by": "operator", "sessions": "1"}
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        assert b"<not-authorized/>" in await c.scram_login("bob", "bob secret")
        assert got.events[-1].kind == "grid.login-failed"  # refused from now on
        assert_clean(got.events, "bob secret")

    async def _external(self, name: str) -> Any:
        c = await self._connect()
        await c.starttls(self.grid.tls.store, self.pki.identity("user", name))
        await c.open_stream()
        c.clear()
        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        await c.until(rb"<success|</failure>")
        return c

    async def test_a_platform_certificate_revoked_while_connected(self) -> None:
        got = await self._events()
        name = "platform-events@localhost"
        c = await self._external(name)
        await c.bind()
        certificate = self.pki.identity("user", name).certificate
        self.pki.root.revoke(certificate.serial_number, "compromised")
        self.grid.store.reload_crls()  # what the CRL refresh timer or SIGHUP does
        await self._refused(c, "reset")
        [revoked] = got.of("grid.platform-revoked")
        assert (revoked.subject, revoked.source) == (name, "127.0.0.1")
        assert revoked.facts["check"] == "revoked"
        assert revoked.facts["serial"] == serial_hex(certificate.serial_number)
        again = await self._external(name)
        assert b"<not-authorized/>" in again.received
        failed = got.events[-1]
        assert (failed.kind, failed.subject, failed.source) == \
            ("grid.login-failed", name, "127.0.0.1")
        assert failed.facts["mechanism"] == "EXTERNAL" and failed.facts["names"] == name
        assert failed.facts["serial"] == revoked.facts["serial"] and "revoked" in failed.detail
