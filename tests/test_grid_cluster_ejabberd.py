"""Two broker instances attached to one ejabberd under the same component name, sharing one
PostgreSQL schema: ejabberd hands each stanza for the name to one of the connections, so
every request may meet either instance. The owner and the reader are ejabberd c2s users;
each notification must reach the reader once, whichever instance sent it, and each pending
approval request the owner once per login, whichever instance heard the owner's presence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

import tests.test_pubsub_conversations as conversations
from sixnet.core.storage.database import Database
from sixnet.grid.client import PubSubClient, connect
from sixnet.grid.client.session import XMPPClientSession
from sixnet.grid.external import HostRouter, component_service
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.storage.presence import PresenceBoard
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.xmpp import NS_CLIENT
from tests.support.databases import postgres_schema_url, postgres_unavailable
from tests.support.ejabberd import EjabberdHost, ejabberd, password  # noqa: F401 (fixture)
from tests.support.iodef import IODEF_NS
from tests.support.waiting import pause, wait_for

SERVICE = "broker.example.test"
EVENT = "{http://jabber.org/protocol/pubsub#event}"
AUTH = "http://jabber.org/protocol/pubsub#subscribe_authorization"


class TwoBrokersBehindEjabberdTests(unittest.TestCase):
    skip = postgres_unavailable()

    @pytest.fixture(autouse=True)
    def _setup(self, ejabberd: EjabberdHost, pki: Any, tmp_path: Path) -> None:  # noqa: F811
        self.host = ejabberd
        self.pki = pki
        self.tmp = tmp_path
        self.routers: list[HostRouter] = []

    async def attach(self, url: str, name: str) -> PubSubBroker:
        database = Database(url)
        broker = PubSubBroker(conversations.BrokerConfig(), "example.test", database,
                              self.tmp / f"audit-{name}.jsonl", RevocationStore(database))
        await broker.store.open()
        router = HostRouter("example.test", SERVICE, PresenceBoard(database, reactor))
        await router.open()
        router.attach(broker)
        self.routers.append(router)
        link = component_service(router, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                            self.host.component_port),
                                 self.host.secret, reactor)
        link.startService()

        async def detach() -> None:
            await broker.idle()
            router.close()
            await link.stopService()
            await router.stop()
            await broker.stop()
            database.close()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(detach()))
        await router.when_connected()
        await broker.idle()
        return broker

    async def login(self, local: str) -> tuple[XMPPClientSession, list[etree._Element]]:
        session = await connect(reactor, "127.0.0.1", self.host.c2s_port,
                                f"{local}@example.test/desk", password=password(local),
                                store=self.pki.store(), keepalive=0, timeout=20,
                                mechanisms=("SCRAM-SHA-256",))
        self.addCleanup(session.close)
        inbox: list[etree._Element] = []
        session.add_message_handler(inbox.append)
        session.send(etree.Element(f"{{{NS_CLIENT}}}presence", nsmap={None: NS_CLIENT}))
        return session, inbox

    async def test_requests_on_either_instance_notifications_once(self) -> None:
        url = postgres_schema_url(self)
        brokers = [await self.attach(url, name) for name in ("a", "b")]
        owner, _ = await self.login("owner")
        reader, inbox = await self.login("reader")
        provider, consumer = PubSubClient(owner, SERVICE), PubSubClient(reader, SERVICE)

        await provider.create("t", access_model="authorize")
        await wait_for(lambda: all("t" in b.engine.nodes for b in brokers))
        await consumer.subscribe("t")
        await wait_for(lambda: all(b.engine.nodes["t"].pending for b in brokers))
        # The owner's listing and approval may each meet the other instance.
        approved = await provider.approve("t", "reader@example.test")
        assert [s.jid for s in approved] == ["reader@example.test"]
        await wait_for(lambda: all(b.engine.nodes["t"].receivers for b in brokers))

        ids = [f"i{n}" for n in range(8)]
        for item_id in ids:
            await provider.publish("t", etree.fromstring(
                f"<n xmlns='{IODEF_NS}'>{item_id}</n>"), item_id=item_id)

        def received() -> list[str]:
            return [i.get("id") for m in inbox for i in m.iter(EVENT + "item")]

        await wait_for(lambda: len(received()) >= len(ids), timeout=20)
        for broker in brokers:
            await broker.idle()
        assert received() == ids  # once each, in publish order
        await wait_for(lambda: all(len(b.engine.nodes["t"].items) == len(ids)
                                   for b in brokers))
        for _ in range(3):  # whichever instance answers, it has every item
            page = await consumer.items("t")
            assert [i.id for i in page.items] == ids
        # Each copy was handed to the host by one instance only: the items and the reader's
        # "subscribed" (the owner told neither instance its presence: no approval request).
        assert sum(b.delivery.delivered for b in brokers) == len(ids) + 1

    async def test_pending_requests_once_per_login_whichever_instance_hears_it(self) -> None:
        url = postgres_schema_url(self)
        brokers = [await self.attach(url, name) for name in ("a", "b")]
        owner, inbox = await self.login("owner")
        reader, _ = await self.login("reader")
        await PubSubClient(owner, SERVICE).create("q", access_model="authorize")
        await wait_for(lambda: all("q" in b.engine.nodes for b in brokers))
        await PubSubClient(reader, SERVICE).subscribe("q")
        await wait_for(lambda: all(b.engine.nodes["q"].pending for b in brokers))
        full = "owner@example.test/desk"

        def requests() -> list[str]:
            return [f.findtext("{*}value") or "" for m in inbox
                    for f in m.iter("{jabber:x:data}field")
                    if f.get("var") == "pubsub#subscriber_jid"]

        def held() -> list[bool]:
            return [r.is_available(full) for r in self.routers]

        def directed(kind: str | None) -> None:
            presence = etree.Element(f"{{{NS_CLIENT}}}presence", {"to": SERVICE},
                                     nsmap={None: NS_CLIENT})
            if kind:
                presence.set("type", kind)
            owner.send(presence)

        await pause(0.5)
        assert requests() == []  # nobody has heard of the owner yet
        for _ in range(6):  # ejabberd picks a connection per stanza: both get some
            inbox.clear()
            directed(None)
            await wait_for(lambda: requests(), timeout=10, what="the request at login")
            await pause(0.5)  # a second copy, if any instance sent one, has time to arrive
            assert requests() == ["reader@example.test"]
            assert held().count(True) == 1
            directed("unavailable")
            await wait_for(lambda: not any(held()), timeout=10, what="every instance lets go")
            assert not any(r.is_available("owner@example.test") for r in self.routers)
        # The session ends with directed presence out: the host sends the unavailable.
        directed(None)
        await wait_for(lambda: any(held()), timeout=10)
        await owner.close()
        await wait_for(lambda: not any(held()), timeout=10, what="the logout seen")
