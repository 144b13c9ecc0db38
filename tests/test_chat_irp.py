"""Agents that find each other through a real IRP registry on loopback."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.trial import unittest

from sixnet.chat.config import ChatConfig
from sixnet.chat.directory import PeerAddress
from sixnet.chat.irp import IRPDirectory
from sixnet.chat.service import ChatService
from sixnet.core.storage.database import Database
from sixnet.irp.client import connect
from sixnet.irp.config import IRPConfig
from sixnet.irp.service import IRPService, build_service

from .test_chat_agents import ALICE, BOB, until

REGISTRY = "irp.example.test"


class IRPAgentTests(unittest.TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _lab(self, pki: Any) -> None:
        self.pki = pki
        self.host = pki.identity("host", REGISTRY)
        self.store = pki.store(identities=[self.host])

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatirp", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.delivered: list[str] = []
        self.received: list[str] = []

    async def registry(self, port: int = 0) -> IRPService:
        config = dataclasses.replace(IRPConfig(), enabled=True,
                                     listen=[f"tcp:{port}:interface=127.0.0.1"],
                                     database=f"sqlite:{self.dir / 'irp.sqlite3'}")
        service = build_service(config, self.store, self.host, self.dir / "irp", None)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        await service.ready
        await until(lambda: bool(service.listening.ports))
        self.irp_port = service.listening.ports[0].getHost().port
        return service

    async def agent(self, name: str) -> ChatService:
        home = self.dir / name.split("@")[0]
        chat = dataclasses.replace(
            ChatConfig(), enabled=True, listen=["tcp:0:interface=127.0.0.1"],
            irp_server=f"127.0.0.1:{self.irp_port}", irp_server_name=REGISTRY,
            retry_initial=30.0, handshake_timeout=5.0)
        identity = self.pki.identity("user", name)
        directory = IRPDirectory("127.0.0.1", self.irp_port, self.store, identity,
                                 server_name=REGISTRY)
        service = ChatService(chat, identity, self.store,
                              Database(f"sqlite:{home / 'chat.sqlite'}"), directory,
                              home / "control.sock", reactor)
        service.startService()
        await service.ready
        self.addCleanup(lambda: service.stopService() if service.running else None)
        service.agent.listen(self._event)
        return service

    def _event(self, event: str, message: Any) -> None:
        (self.delivered if event == "delivered" else self.received).append(message.body)

    async def test_register_lookup_send_and_follow_a_move(self) -> None:
        await self.registry()
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        await until(lambda: bool(bob.registration.registered))
        record = await alice.directory.lookup(BOB)
        assert record is not None and record.user_id == BOB
        assert record.addresses[0] == PeerAddress("127.0.0.1", bob.ports[0].getHost().port)
        assert record.chain[0] == self.pki.identity("user", BOB).certificate
        await alice.agent.send(BOB, "through the registry")
        await until(lambda: self.delivered == ["through the registry"])

        # bob goes away; alice queues; bob returns on a new port and re-registers: alice's
        # watch (not her 30 s retry timer) brings the message over
        await bob.stopService()
        await until(lambda: BOB not in alice.agent.sessions)
        await alice.agent.send(BOB, "after the move")
        await task.deferLater(reactor, 0.3, lambda: None)
        bob = await self.agent(BOB)
        await until(lambda: "after the move" in self.received, timeout=10)
        await until(lambda: self.delivered == ["through the registry", "after the move"])

    async def test_unknown_person_is_none(self) -> None:
        await self.registry()
        alice = await self.agent(ALICE)
        assert await alice.directory.lookup("nobody@example.test") is None

    async def test_the_directory_reconnects_by_itself_and_watches_again(self) -> None:
        first = await self.registry()
        port = self.irp_port
        alice = await self.agent(ALICE)
        heard: list[Any] = []
        alice.directory.watch(BOB, heard.append)
        await until(lambda: bool(alice.registration.registered))
        await first.stopService()
        await task.deferLater(reactor, 0.2, lambda: None)
        await self.registry(port)
        # nobody asks the directory for anything: ClientService reconnects (2 s backoff, plus
        # jitter) and the watch is made again, so bob's registration reaches alice
        bob = await self.agent(BOB)
        await until(lambda: bool(bob.registration.registered))
        await until(lambda: any(r.addresses for r in heard), timeout=15)
        assert heard[-1].addresses[0] == PeerAddress("127.0.0.1", bob.ports[0].getHost().port)

    async def test_revoking_a_peer_in_the_registry_ends_the_session_at_once(self) -> None:
        await self.registry()
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        await until(lambda: bool(bob.registration.registered))
        ended: list[str] = []
        original = alice.agent.session_ended
        alice.agent.session_ended = lambda s, r: (ended.append(r), original(s, r))  # type: ignore
        await alice.agent.send(BOB, "before the revocation")
        await until(lambda: self.delivered == ["before the revocation"])
        # bob revokes the certificate his agent uses; the registry has no CA here, so no CRL
        # anywhere changes: alice hears of it only through her watch of bob
        client = await connect("127.0.0.1", self.irp_port, self.store,
                               identity=self.pki.identity("user", BOB), server_name=REGISTRY,
                               reactor=reactor)
        await client.revoke()
        client.close()
        await until(lambda: ended == ["certificate-revoked"], timeout=5)
        assert BOB not in alice.agent.sessions
        bob_certificate = self.pki.identity("user", BOB).certificate
        assert self.store.revocation_status(bob_certificate) is None
        assert self.store.verify(self.pki.identity("user", BOB).chain, "client").identity == BOB
        # a new handshake with that certificate is refused by what alice heard
        await alice.agent.send(BOB, "after the revocation")
        await until(lambda: ended.count("certificate-revoked") == 2, timeout=10)
        assert "after the revocation" not in self.received
