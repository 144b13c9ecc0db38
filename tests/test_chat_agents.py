"""Two or three user agents on loopback: real sockets, real storage, lab CA certificates."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import protocol, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from sixnet.chat.config import ChatConfig
from sixnet.chat.directory import PeerAddress
from sixnet.chat.service import ChatService
from sixnet.chat.store import StoredMessage
from sixnet.core.storage.database import Database

from .support.chat import SharedDirectory

ALICE, BOB, CAROL, MALLORY = ("alice@example.test", "bob@example.test", "carol@example.test",
                              "mallory@example.test")


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait (on the real reactor) until predicate() is true."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


class Relay(protocol.Protocol):
    """A TCP relay between an agent and a real agent port; may rewrite what passes."""

    def __init__(self, target: int, recorder: RelayRecord) -> None:
        self.target = target
        self.record = recorder
        self.peer: Relay | None = None
        self.buffer: list[bytes] = []
        self.outbound = False

    def connectionMade(self) -> None:
        if self.outbound:
            return
        self.transport.pauseProducing()
        other = Relay(self.target, self.record)
        other.outbound = True
        other.peer = self
        self.peer = other
        d = protocol.ClientCreator(reactor, lambda: other).connectTCP("127.0.0.1", self.target)
        d.addCallback(lambda _: self.transport.resumeProducing())

    def dataReceived(self, data: bytes) -> None:
        direction = "in" if self.outbound else "out"
        self.record.chunks.append((direction, data))
        data = self.record.tamper(direction, data)
        if data and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class Silent(protocol.Protocol):
    """A caller that never says anything; its name goes to `closed` when it is hung up on."""

    def __init__(self, name: str, closed: list[str]) -> None:
        self.name = name
        self.closed = closed

    def connectionLost(self, reason: Any) -> None:
        self.closed.append(self.name)


@dataclasses.dataclass
class RelayRecord:
    chunks: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    tamper: Any = lambda direction, data: data

    def wire(self) -> bytes:
        return b"".join(d for _, d in self.chunks)


class AgentHarness(unittest.TestCase):
    """Agents on loopback sharing one in-memory directory; no tests of its own."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _lab(self, pki: Any) -> None:
        self.pki = pki
        self.store = pki.store()

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chat", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.shared = SharedDirectory(reactor.seconds)
        self.events: dict[str, list[tuple[str, StoredMessage]]] = {}

    async def agent(self, name: str, *, key_type: str = "ecdsa-p256",
                    **overrides: Any) -> ChatService:
        home = self.dir / name.split("@")[0]
        settings: dict[str, Any] = {
            "enabled": True, "listen": ["tcp:0:interface=127.0.0.1"],
            "control_socket": str(home / "control.sock"), "retry_initial": 0.2,
            "retry_max": 0.5, "handshake_timeout": 2.0, **overrides}
        chat = dataclasses.replace(ChatConfig(), **settings)
        service = ChatService(chat, self.pki.identity("user", name, key_type=key_type),
                              self.store, Database(f"sqlite:{home / 'chat.sqlite'}"),
                              self.shared.for_person(name), home / "control.sock", reactor)
        service.startService()
        await service.ready
        self.addCleanup(self._stop, service)
        events = self.events.setdefault(name, [])
        service.agent.listen(lambda e, m: events.append((e, m)))
        return service

    @staticmethod
    async def _stop(service: ChatService) -> None:
        if service.running:
            await service.stopService()

    def port(self, service: ChatService) -> int:
        return service.ports[0].getHost().port

    def delivered(self, name: str) -> list[str]:
        return [m.body for e, m in self.events.get(name, []) if e == "delivered"]

    def received(self, name: str) -> list[str]:
        return [m.body for e, m in self.events.get(name, []) if e == "received"]

    async def _relayed(self, tamper: Any = None) -> tuple[ChatService, ChatService,
                                                          RelayRecord]:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        record = RelayRecord()
        if tamper is not None:
            record.tamper = tamper
        factory = protocol.Factory.forProtocol(lambda: Relay(self.port(bob), record))
        relay_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(relay_port.stopListening)
        # the relay's address is what the directory now says is bob's newest
        self.shared.register(BOB, [PeerAddress("127.0.0.1", relay_port.getHost().port)], 60)
        return alice, bob, record


class AgentTests(AgentHarness):
    async def test_send_and_receipt(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        assert self.shared.record(BOB).addresses == (PeerAddress("127.0.0.1", self.port(bob)),)
        message = await alice.agent.send(BOB, "hello bob")
        assert message.state == "queued"
        await until(lambda: self.delivered(ALICE) == ["hello bob"])
        assert self.received(BOB) == ["hello bob"]
        [stored] = await bob.agent.messages.messages(direction="in")
        assert (stored.peer, stored.body, stored.id) == (ALICE, "hello bob", message.id)
        [sent] = await alice.agent.messages.messages(direction="out")
        assert sent.state == "delivered"
        assert list(alice.agent.sessions) == [BOB] and list(bob.agent.sessions) == [ALICE]
        # bob answers on the same session
        await bob.agent.send(ALICE, "hi alice")
        await until(lambda: self.delivered(BOB) == ["hi alice"])
        assert alice.agent.sessions[BOB].role == "initiator"

    async def test_offline_peer_gets_queued_message_on_a_new_port(self) -> None:
        alice = await self.agent(ALICE)
        bob = await self.agent(BOB)
        old_port = self.port(bob)
        await bob.stopService()
        await alice.agent.send(BOB, "while you were away")
        await task.deferLater(reactor, 0.5, lambda: None)  # a few failed retries
        assert self.delivered(ALICE) == []
        # alice restarts too: the outbox is on disk
        await alice.stopService()
        alice = await self.agent(ALICE)
        bob = await self.agent(BOB)  # same database, new port; registers, alice is told
        assert self.port(bob) != old_port
        assert self.shared.record(BOB).addresses[0].port == self.port(bob)
        await until(lambda: "while you were away" in self.received(BOB))
        await until(lambda: self.delivered(ALICE) == ["while you were away"])
        assert self.received(BOB) == ["while you were away"]  # once, not twice

    async def test_simultaneous_dial_yields_one_session(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        for i in range(3):
            # both queue while neither can dial, then both dial at once
            for s in (alice, bob):
                s.agent._stopping = True
            await alice.agent.send(BOB, f"a{i}")
            await bob.agent.send(ALICE, f"b{i}")
            for s in (alice, bob):
                s.agent._stopping = False
            alice.agent.deliver(BOB)
            bob.agent.deliver(ALICE)
            await until(lambda i=i: len(self.delivered(ALICE)) == i + 1
                        and len(self.delivered(BOB)) == i + 1)
            await until(lambda: len(alice.agent._protocols) == 1
                        and len(bob.agent._protocols) == 1)
            a, b = alice.agent.sessions[BOB], bob.agent.sessions[ALICE]
            assert a.initiator_id == b.initiator_id == ALICE  # the smaller user id dialed it
            assert (a.role, b.role) == ("initiator", "responder")
            for s in (alice, bob):
                for proto in list(s.agent._protocols.values()):
                    proto.close()
            await until(lambda: not alice.agent._protocols and not bob.agent._protocols)
        assert sorted(self.received(BOB)) == ["a0", "a1", "a2"]
        assert sorted(self.received(ALICE)) == ["b0", "b1", "b2"]

    async def test_ipv6_and_key_transport(self) -> None:
        """Bob listens on ::1 and requires RSA key transport; alice has an RSA certificate."""
        alice = await self.agent(ALICE, key_type="rsa2048")
        bob = await self.agent(BOB, listen=["tcp6:0:interface=\\:\\:1"],
                               key_agreement=["rsa-oaep"])
        assert self.shared.record(BOB).addresses == (PeerAddress("::1", self.port(bob)),)
        await alice.agent.send(BOB, "over IPv6")
        await until(lambda: self.delivered(ALICE) == ["over IPv6"])
        session = bob.agent.sessions[ALICE]
        assert (session.method, session.cipher) == ("rsa-oaep", "aes-256-gcm")

    async def test_dead_newest_address_falls_back_to_the_next(self) -> None:
        alice, _ = await self.agent(ALICE), await self.agent(BOB)
        dead = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        dead_port = dead.getHost().port
        await dead.stopListening()
        self.shared.register(BOB, [PeerAddress("127.0.0.1", dead_port)], 60)
        assert self.shared.record(BOB).addresses[0].port == dead_port  # newest first
        await alice.agent.send(BOB, "via the older address")
        await until(lambda: self.delivered(ALICE) == ["via the older address"])

    async def test_text_never_on_the_wire(self) -> None:
        alice, bob, record = await self._relayed()
        secret = "the eagle lands at midnight " * 20
        await alice.agent.send(BOB, secret)
        await until(lambda: self.delivered(ALICE) == [secret])
        wire = record.wire()
        assert b"eagle" not in wire and b"midnight" not in wire
        assert b"<hello" in wire  # the handshake is XML; the records are not

    async def test_flipped_bit_ends_the_session_and_the_message_still_arrives(self) -> None:
        state = {"records": False, "flipped": False}

        def flip(direction: str, data: bytes) -> bytes:
            """Flip one bit in alice's first record (after her ``</sixchat>``)."""
            if direction != "out" or state["flipped"]:
                return data
            if not state["records"]:
                end = data.find(b"</sixchat>")
                if end < 0:
                    return data
                state["records"] = True
                if end + 10 == len(data):
                    return data
            state["flipped"] = True
            return data[:-1] + bytes([data[-1] ^ 0x40])

        alice, bob, record = await self._relayed(flip)
        ended: list[str] = []
        original = bob.agent.session_ended
        bob.agent.session_ended = lambda s, r: (ended.append(r), original(s, r))  # type: ignore
        await alice.agent.send(BOB, "first")
        await until(lambda: "bad-record-mac" in ended)
        # the retry runs a fresh session through the (now honest) relay
        await until(lambda: self.delivered(ALICE) == ["first"])
        assert self.received(BOB) == ["first"]

    async def test_mallory_relaying_with_her_certificate_fails(self) -> None:
        """Mallory's agent answers alice's call for bob; alice refuses her certificate."""
        alice = await self.agent(ALICE)
        mallory = await self.agent(MALLORY)
        make_session = mallory.agent._new_session

        def pretend(transport: Any) -> Any:  # her agent claims to act for bob
            session = make_session(transport)
            session.me = BOB
            return session

        mallory.agent._new_session = pretend  # type: ignore[method-assign]
        self.shared.register(BOB, [PeerAddress("127.0.0.1", self.port(mallory))], 60)
        ended: list[str] = []
        original = alice.agent.session_ended
        alice.agent.session_ended = lambda s, r: (ended.append(r), original(s, r))  # type: ignore
        await alice.agent.send(BOB, "for bob only")
        await until(lambda: "identity-mismatch" in ended)
        assert self.received(MALLORY) == [] and BOB not in alice.agent.sessions

    async def test_stalled_and_garbage_peers_do_not_stop_the_agent(self) -> None:
        alice, bob, carol = (await self.agent(ALICE), await self.agent(BOB),
                             await self.agent(CAROL))
        got: dict[str, bytes] = {"stalled": b"", "garbage": b""}

        class Peer(protocol.Protocol):
            def __init__(self, name: str) -> None:
                self.name = name

            def dataReceived(self, data: bytes) -> None:
                got[self.name] += data

        stalled = await protocol.ClientCreator(reactor, Peer, "stalled").connectTCP(
            "127.0.0.1", self.port(bob))
        garbage = await protocol.ClientCreator(reactor, Peer, "garbage").connectTCP(
            "127.0.0.1", self.port(bob))
        garbage.transport.write(b"<sixchat xmlns='urn:sixnet:sixchat:1' version='1'>"
                                + b"<hello>" + b"x" * 60000)
        await alice.agent.send(BOB, "from alice")
        await carol.agent.send(BOB, "from carol")
        await until(lambda: sorted(self.received(BOB)) == ["from alice", "from carol"])
        await until(lambda: b'reason="decode-error"' in got["garbage"])
        await until(lambda: b'reason="handshake-timeout"' in got["stalled"], timeout=5)
        for p in (stalled, garbage):
            p.transport.loseConnection()

    async def test_handshakes_from_one_address_are_limited(self) -> None:
        bob = await self.agent(BOB, max_handshakes_per_address=2)
        closed: list[str] = []
        silent = [await protocol.ClientCreator(reactor, Silent, f"s{i}", closed).connectTCP(
            "127.0.0.1", self.port(bob)) for i in range(3)]
        await until(lambda: closed == ["s2"], timeout=5)  # the third, at once
        silent[0].transport.loseConnection()
        await until(lambda: "s0" in closed)
        alice = await self.agent(ALICE)  # a slot is free again: a real handshake gets in
        await alice.agent.send(BOB, "through the limit")
        await until(lambda: self.received(BOB) == ["through the limit"])
        silent[1].transport.loseConnection()

    async def test_foreign_ca_caller_is_refused(self) -> None:
        await self.agent(BOB)
        foreign = self.pki.identity("user", ALICE, ca=self.pki.foreign)
        home = self.dir / "intruder"
        service = ChatService(dataclasses.replace(
            ChatConfig(), enabled=True, listen=["tcp:0:interface=127.0.0.1"],
            control_socket=str(home / "c.sock"), retry_initial=60.0),
            foreign, self.store, Database(f"sqlite:{home / 'chat.sqlite'}"),
            self.shared.for_person(ALICE), home / "c.sock", reactor)
        service.startService()
        await service.ready
        self.addCleanup(self._stop, service)
        ended: list[str] = []
        original = service.agent.session_ended
        service.agent.session_ended = lambda s, r: (ended.append(r), original(s, r))  # type: ignore
        await service.agent.send(BOB, "let me in")
        await until(lambda: "peer:unknown-ca" in ended)
        assert self.received(BOB) == []

    async def test_control_socket_and_commands(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        sock = str(alice.control_path)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))

        async def sixnet(*args: str) -> tuple[int, str, str]:
            out, err, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "sixnet", "chat", *args], env=env)
            return code, out.decode(), err.decode()

        code, out, err = await sixnet("send", "--socket", sock, "--json", BOB, "hi there")
        assert code == 0, err
        sent = json.loads(out)
        assert (sent["peer"], sent["body"], sent["state"]) == (BOB, "hi there", "queued")
        await until(lambda: self.received(BOB) == ["hi there"])
        await until(lambda: self.delivered(ALICE) == ["hi there"])
        code, out, err = await sixnet("inbox", "--socket", str(bob.control_path), "--json")
        assert code == 0, err
        [shown] = json.loads(out)
        assert (shown["body"], shown["peer"], shown["direction"]) == ("hi there", ALICE, "in")
        code, out, err = await sixnet("history", "--socket", sock)
        assert code == 0 and out.endswith(f"-> {BOB}: hi there  [delivered]\n"), out
        code, out, err = await sixnet("peers", "--socket", sock)
        assert code == 0 and out.startswith(BOB) and "connected (initiator, x25519" in out
        code, out, err = await sixnet("send", "--socket", sock, "not-a-user", "x")
        assert code == 1 and err.startswith("sixnet: the agent refused:") and "\n" == err[-1:]
        assert err.count("\n") == 1
        code, out, err = await sixnet("inbox", "--socket", str(self.dir / "nothing.sock"))
        assert code == 1 and "the chat agent is not running" in err and err.count("\n") == 1

    async def test_follow_streams_received_messages(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        lines: list[str] = []

        class Collect(protocol.ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                lines.extend(data.decode().splitlines())

        env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
        follower = reactor.spawnProcess(
            Collect(), sys.executable,
            [sys.executable, "-m", "sixnet", "chat", "follow", "--socket",
             str(bob.control_path), "--json"], env=env)
        self.addCleanup(lambda: follower.signalProcess("KILL") if follower.pid else None)
        await until(lambda: bob.agent._listeners and len(bob.agent._listeners) == 2)
        await alice.agent.send(BOB, "live one")
        await until(lambda: any("live one" in line for line in lines))
        data = json.loads(lines[0])
        assert (data["event"], data["peer"], data["body"]) == ("received", ALICE, "live one")
        follower.signalProcess("KILL")
        await task.deferLater(reactor, 0.2, lambda: None)



class RegistrationTests(unittest.TestCase):
    """Registering at start, before the lifetime ends, and when the address changes."""

    def test_registers_renews_and_follows_address_changes(self) -> None:
        from twisted.internet.task import Clock

        from sixnet.chat.service import Registration

        clock = Clock()
        shared = SharedDirectory(clock.seconds)
        announced: list[tuple[list[PeerAddress], float]] = []
        directory = shared.for_person(ALICE)
        original = directory.announce
        directory.announce = lambda a, t: (announced.append((list(a), t)),  # type: ignore
                                           original(a, t))[1]
        current = [PeerAddress("192.0.2.1", 4605)]
        registration = Registration(directory, lambda: list(current), lifetime=300,
                                    check_interval=60, clock=clock)
        registration.start()
        assert announced == [([PeerAddress("192.0.2.1", 4605)], 300)]
        clock.advance(60)
        assert len(announced) == 1  # nothing changed, lifetime far away
        current[:] = [PeerAddress("2001:db8::5", 4605)]
        clock.advance(60)
        assert announced[-1] == ([PeerAddress("2001:db8::5", 4605)], 300)
        assert shared.record(ALICE).addresses[0] == PeerAddress("2001:db8::5", 4605)
        for _ in range(3):
            clock.advance(60)
        assert len(announced) == 2  # 180 s since the last: not yet two thirds of 300
        clock.advance(60)
        assert len(announced) == 3  # 240 s >= 200 s: renewed before it expires
        registration.stop()
        assert not clock.getDelayedCalls()

    def test_a_failed_registration_is_retried_with_backoff_up_to_the_interval(self) -> None:
        from twisted.internet import defer
        from twisted.internet.task import Clock

        from sixnet.chat.service import Registration

        clock = Clock()
        attempts: list[float] = []

        class Unreachable:
            def announce(self, addresses: Any, lifetime: float) -> Any:
                attempts.append(clock.seconds())
                return defer.fail(ConnectionRefusedError("the registry is down"))

        registration = Registration(Unreachable(), lambda: [PeerAddress("192.0.2.1", 4605)],
                                    lifetime=300, check_interval=10, clock=clock)
        registration.start()
        for _ in range(200):
            clock.advance(0.25)
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:], strict=False)]
        assert len(gaps) >= 5, gaps
        # 2 s, 4 s, 8 s, then the check interval (each plus under a second of jitter)
        for gap, base in zip(gaps, [2, 4, 8, 10, 10], strict=False):
            assert base <= gap <= base + 1.25, gaps
        registration.stop()
        assert not clock.getDelayedCalls()

    def test_local_addresses_resolve_wildcards(self) -> None:
        from sixnet.chat.service import local_addresses

        class Port:
            def __init__(self, host: str, port: int) -> None:
                self.host, self.port = host, port

            def getHost(self) -> Any:
                return self

        found = local_addresses([Port("0.0.0.0", 4605), Port("127.0.0.1", 4606)],
                                "127.0.0.1")
        assert found == [PeerAddress("127.0.0.1", 4605), PeerAddress("127.0.0.1", 4606)]
