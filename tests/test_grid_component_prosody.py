"""The broker as an XEP-0114 component of a real Prosody 0.12: the conversation tests of
tests/test_pubsub_conversations.py replayed through the host, and the RFC 8600 workflow.

Each script's senders are real clients (the project's own, `sixnet.grid.client`) logged in
to Prosody's c2s; the broker runs in this process behind Prosody's component port. What the
clients receive is what the script expects: the same XML as with the in-memory router,
having crossed Prosody twice. The conversations that cannot run through a host say why
(`local_only`): they drive the broker or its recording router directly, or set the clock
of a session the host owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

import tests.test_pubsub_conversations as conversations
from sixnet.core.storage.database import Database
from sixnet.grid.client import PubSubClient, connect
from sixnet.grid.client.session import XMPPClientSession
from sixnet.grid.external import ComponentStream, HostRouter, component_service
from sixnet.grid.jid import parse_jid
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.service import GridService
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.xmpp import NS_CLIENT, XML_LANG
from sixnet.pki.store import store_from_config
from tests.grid_harness import write_config
from tests.support.conversation import run_conversation
from tests.support.iodef import IODEF
from tests.support.prosody import ProsodyHost, password, prosody  # noqa: F401 (fixture)
from tests.support.pubsub import CONSUMER, PROVIDER
from tests.support.waiting import pause, wait_for
from tests.test_grid_component import RecordingComponent

SERVICE = "broker.example.test"
_IQ, _MESSAGE = f"{{{NS_CLIENT}}}iq", f"{{{NS_CLIENT}}}message"
#: Seconds to wait for a stanza that should not come (when none is expected, or after the
#: expected ones), and for offline leftovers of earlier tests at login.
QUIET = 0.15
AFTER = 0.04


def local_only(why: str) -> None:
    """A conversation test that cannot run through a host, for the reason given: it is left
    out of the hosted class (unittest collects no attribute that is None), not skipped, so
    the suite's summary counts only tests that ran. It runs in memory in its own module."""
    assert why


class HostedBroker:
    """Mixin for `BrokerTestCase`: the broker behind Prosody; `talk` sends from clients."""

    prosody: ProsodyHost
    pki: Any

    @pytest.fixture(autouse=True)
    def _host(self, prosody: ProsodyHost, pki: Any) -> None:  # noqa: F811
        self.prosody = prosody
        self.pki = pki

    def start_broker(self: Any, config: Any = None) -> None:
        self.database = Database(f"sqlite:{self.directory / 'broker.sqlite3'}")
        self.addCleanup(self.database.close)
        self.revocations = RevocationStore(self.database)
        self.broker = PubSubBroker(config or self.config, "example.test", self.database,
                                   self.directory / "audit.jsonl", self.revocations,
                                   clock=lambda: self.now)
        self.addCleanup(lambda: self.broker.stop())
        self.host_router = HostRouter("example.test", SERVICE)
        self.host_router.attach(self.broker)
        self.link = component_service(
            self.host_router, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.prosody.component_port),
            self.prosody.secret, reactor)
        self.link.startService()
        self.addCleanup(self.stop_link)
        if not hasattr(self, "sessions"):
            self.sessions: dict[str, XMPPClientSession] = {}
            self.arrived: list[etree._Element] = []

    async def stop_link(self: Any) -> None:
        if self.link.running:
            await self.broker.idle()
            self.host_router.close()
            await self.link.stopService()

    async def restart(self: Any, config: Any = None) -> None:
        await self.stop_link()
        await conversations.BrokerTestCase.restart(self, config)

    async def session(self: Any, full: str, *, available: bool) -> XMPPClientSession:
        """A client logged in as `full` on Prosody; `available`: it tells the broker."""
        if full in self.sessions:
            return self.sessions[full]
        jid = parse_jid(full)
        assert jid.local is not None
        session = await connect(reactor, "127.0.0.1", self.prosody.c2s_port, full,
                                password=password(jid.local), store=self.pki.store(),
                                presence=True, keepalive=0, timeout=10)
        self.sessions[full] = session
        self.addCleanup(session.close)
        await pause(QUIET)  # messages Prosody kept offline for it (earlier tests) go first
        original = session._stanza

        def collect(stanza: etree._Element) -> None:
            if stanza.tag in (_IQ, _MESSAGE):
                # Prosody stamps its stream's language on what it routes; the broker
                # never sets one, so it is the host's and not part of the conversation.
                stanza.attrib.pop(XML_LANG, None)
                self.arrived.append(stanza)
            original(stanza)

        session._stanza = collect  # type: ignore[method-assign]
        if available:
            session.send(etree.fromstring(f"<presence xmlns='jabber:client' to='{SERVICE}'/>"))
            await wait_for(lambda: self.host_router.is_available(full), timeout=10,
                           what=f"the broker sees {full}")
        return session

    async def send(self: Any, stanza: etree._Element, expected: int = 0) -> None:
        await self.host_router.when_connected()
        for full in (PROVIDER, CONSUMER):  # available, as with the recording router
            await self.session(full, available=True)
        sender = stanza.attrib.pop("from")
        (await self.session(sender, available=False)).send(stanza)
        if expected:
            await wait_for(lambda: len(self.arrived) >= expected, timeout=10,
                           what=f"{expected} stanzas through Prosody")
        await self.broker.idle()
        await pause(AFTER if expected else QUIET)  # anything unexpected has time to arrive

    def take(self: Any) -> list[etree._Element]:
        taken, self.arrived = self.arrived, []
        return taken

    async def talk(self: Any, *scripts: str) -> None:
        self.matcher = await run_conversation(
            "\n".join(scripts), self.send, self.take, getattr(self, "matcher", None))


_DIRECT = "it hands stanzas to broker.receive and reads the recording router"


class HostedDiscoveryTests(HostedBroker, conversations.DiscoveryTests):
    test_service_info_lists_the_features_that_work = local_only(_DIRECT)
    test_ten_thousand_topics_stay_paged_and_fast = local_only(
        "10,000 topics are made through the engine; the paging itself runs here "
        "(test_rfc8600_workflow_through_prosody)")


class HostedApprovalWorkflowTests(HostedBroker, conversations.ApprovalWorkflowTests):
    test_pending_request_persists_and_is_resent_when_owner_comes_online = local_only(
        "it fakes the owner's login; the real one is in test_rfc8600_workflow_through_prosody")
    test_policy_service_owner_approves_automatically = local_only(_DIRECT)


class HostedSubscriptionTests(HostedBroker, conversations.SubscriptionTests):
    pass


class HostedPublishTests(HostedBroker, conversations.PublishTests):
    test_publish_without_id_gets_one = local_only("it reads the engine's item ids")
    test_wrong_namespace_multiple_payloads_and_oversized_items = local_only(
        "it sets the engine's limits after the broker started")
    test_retract_with_notify_and_max_items = local_only("it reads the engine's items")
    test_the_result_follows_the_notifications_when_the_commit_is_quicker = local_only(
        "it replaces the store and reads the order the router was handed the two in; "
        "through the host they reach two sessions, whose arrivals have no order")


class HostedItemsRetrievalTests(HostedBroker, conversations.ItemsRetrievalTests):
    pass


class HostedOwnerManagementTests(HostedBroker, conversations.OwnerManagementTests):
    pass


class HostedHostileInputTests(HostedBroker, conversations.HostileInputTests):
    test_storage_failure_is_internal_server_error_not_a_false_ack = local_only(
        "it breaks the broker's store in process")


class HostedMoreUseCaseTests(HostedBroker, conversations.MoreUseCaseTests):
    pass


# -- RFC 8600 sections 5 and 6 through Prosody ------------------------------------------------


class RFC8600ThroughProsodyTests(unittest.TestCase):
    """Provider, Consumer and an outsider on Prosody's c2s; the broker as its component."""

    @pytest.fixture(autouse=True)
    def _setup(self, prosody: ProsodyHost, pki: Any, tmp_path: Path) -> None:  # noqa: F811
        self.prosody = prosody
        self.pki = pki
        self.tmp = tmp_path

    def start_broker(self) -> None:
        self.database = Database(f"sqlite:{self.tmp / 'broker.sqlite3'}")
        self.revocations = RevocationStore(self.database)
        self.broker = PubSubBroker(conversations.BrokerConfig(), "example.test", self.database,
                                   self.tmp / "audit.jsonl", self.revocations)
        self.host_router = HostRouter("example.test", SERVICE)
        self.host_router.attach(self.broker)
        self.link = component_service(
            self.host_router, TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                 self.prosody.component_port),
            self.prosody.secret, reactor)
        self.link.startService()

    async def stop_broker(self) -> None:
        await self.broker.idle()
        self.host_router.close()
        await self.link.stopService()
        await self.broker.stop()
        self.database.close()

    async def login(self, local: str, *, tell_broker: bool = True
                    ) -> tuple[XMPPClientSession, list[etree._Element]]:
        session = await connect(reactor, "127.0.0.1", self.prosody.c2s_port,
                                f"{local}@example.test/wf", password=password(local),
                                store=self.pki.store(), keepalive=0, timeout=10)
        self.addCleanup(session.close)
        messages: list[etree._Element] = []
        session.add_message_handler(messages.append)
        session.send(etree.Element(f"{{{NS_CLIENT}}}presence", nsmap={None: NS_CLIENT}))
        if tell_broker:
            session.send(etree.fromstring(f"<presence xmlns='jabber:client' to='{SERVICE}'/>"))
            await wait_for(lambda: self.host_router.is_available(session.jid), timeout=10)
        return session, messages

    async def test_rfc8600_workflow_through_prosody(self) -> None:
        self.start_broker()
        await self.host_router.when_connected()
        provider, provider_inbox = await self.login("provider")
        consumer, consumer_inbox = await self.login("consumer")
        await pause(QUIET)
        provider_inbox.clear()
        consumer_inbox.clear()  # leftovers Prosody kept for earlier tests
        owner = PubSubClient(provider, SERVICE)
        for node in ("MILEHost", "NEA1", "Extra1", "Extra2", "Extra3"):
            await owner.create(node, access_model="authorize")
        await owner.create("Closed", access_model="whitelist")

        # Discovery through the host, paged with RSM (two a page), and the payload type.
        platform = PubSubClient(consumer, SERVICE)
        names, after, pages = [], None, 0
        while True:
            page = await platform.topics(max=2, after=after)
            pages += 1
            names += [t.node for t in page.topics]
            if not page.page.last or len(names) >= page.page.count:
                break
            after = page.page.last
        assert sorted(names) == sorted(["MILEHost", "NEA1", "Extra1", "Extra2", "Extra3",
                                        "Closed"]) and pages == 3
        info = await platform.info("MILEHost")
        assert ("pubsub", "leaf") in info.identities
        assert info.value("pubsub#access_model") == "authorize"

        # Subscribe: pending; the owner, online, gets the request and approves.
        assert (await platform.subscribe("MILEHost")).state == "pending"
        await wait_for(lambda: provider_inbox, what="the approval request")
        await owner.approve("MILEHost", "consumer@example.test")
        await wait_for(lambda: any(m.find(".//{*}subscription") is not None
                                   for m in consumer_inbox), what="the subscription notice")

        # Publish the IODEF example: the Consumer receives it at once.
        await owner.publish("MILEHost", etree.fromstring(IODEF), item_id="online")
        await wait_for(lambda: _items(consumer_inbox) == ["online"], what="the item")

        # Whitelist: an outsider is refused, through the host.
        outsider, _ = await self.login("outsider", tell_broker=False)
        with pytest.raises(Exception, match="not-allowed"):
            await PubSubClient(outsider, SERVICE).subscribe("Closed")

        # The Consumer goes offline: Prosody keeps the notification (type normal, to the
        # bare JID) and hands it over at the next login with its delay stamp.
        await consumer.close()
        await wait_for(lambda: not self.host_router.is_available("consumer@example.test"),
                       what="the broker sees the consumer leave")
        await owner.publish("MILEHost", etree.fromstring(IODEF), item_id="while-offline")

        # The broker restarts (its component connection too): state and pending work survive.
        await owner.create("Later", access_model="authorize")
        await provider.close()
        await wait_for(lambda: not self.host_router.is_available("provider@example.test"))
        await self.stop_broker()
        self.start_broker()
        await self.host_router.when_connected()
        consumer, consumer_inbox = await self.login("consumer")
        await wait_for(lambda: _items(consumer_inbox) == ["while-offline"], what="late item")
        delay = consumer_inbox[0].find("{urn:xmpp:delay}delay")
        assert delay is not None and delay.get("stamp")
        platform = PubSubClient(consumer, SERVICE)
        assert (await platform.subscribe("Later")).state == "pending"
        await pause(QUIET)
        # The owner is offline: the request waits for the owner's login, then comes.
        provider, provider_inbox = await self.login("provider")
        await wait_for(lambda: provider_inbox, what="the pending request at login")
        form = provider_inbox[0].find("{jabber:x:data}x")
        fields = {f.get("var"): f.findtext("{jabber:x:data}value")
                  for f in form.iter("{jabber:x:data}field")}
        assert (fields["pubsub#node"], fields["pubsub#subscriber_jid"]) == (
            "Later", "consumer@example.test")
        assert provider_inbox[0].find("{urn:xmpp:delay}delay") is None  # not stored offline

        # Revocation: the Consumer is cut off: no more items, its requests refused.
        await self.revocations.prepare()
        await self.revocations.revoke("consumer@example.test", "2026-01-01T00:00:00Z", "test")
        await self.broker.revoke("consumer@example.test")
        owner = PubSubClient(provider, SERVICE)
        await owner.publish("MILEHost", etree.fromstring(IODEF), item_id="after-revocation")
        with pytest.raises(Exception, match="forbidden"):
            await platform.subscribe("MILEHost")
        await pause(QUIET)
        assert "after-revocation" not in _items(consumer_inbox)
        audit = (self.tmp / "audit.jsonl").read_text()
        assert '"revoke"' in audit and '"approve"' in audit
        await self.stop_broker()


class HostLinkTests(unittest.TestCase):
    """The component connection itself against Prosody: a wrong secret, presence learnt
    through a roster subscription and after a reconnect, and the grid service's
    component mode from its configuration."""

    @pytest.fixture(autouse=True)
    def _setup(self, prosody: ProsodyHost, pki: Any, tmp_path: Path) -> None:  # noqa: F811
        self.prosody = prosody
        self.pki = pki
        self.tmp = tmp_path

    def endpoint(self) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.prosody.component_port)

    async def test_a_wrong_secret_is_refused_by_the_host(self) -> None:
        router = HostRouter("example.test", SERVICE)
        stream = ComponentStream(router, "not the secret", reactor)
        await connectProtocol(self.endpoint(), stream)
        await wait_for(lambda: stream.closed, timeout=10, what="the host ends the stream")
        assert stream.failure is not None and stream.failure.condition == "not-authorized"
        assert router.stream is None

    async def test_presence_through_a_subscription_and_after_a_reconnect(self) -> None:
        router = HostRouter("example.test", SERVICE)
        seen: list[tuple[str, str]] = []

        class Watcher(RecordingComponent):
            def session_available(self, full_jid: str) -> None:
                seen.append(("available", full_jid))

            def session_unavailable(self, full_jid: str) -> None:
                seen.append(("unavailable", full_jid))

        router.attach(Watcher())
        link = component_service(router, self.endpoint(), self.prosody.secret, reactor)
        link.startService()
        self.addCleanup(lambda: link.stopService() if link.running else None)
        await router.when_connected()
        # The owner adds the broker to its roster once; the broker asks back, it agrees.
        owner = await connect(reactor, "127.0.0.1", self.prosody.c2s_port,
                              "root@example.test/console", password=password("root"),
                              store=self.pki.store(), keepalive=0, timeout=10)
        inbox: list[etree._Element] = []
        original = owner._stanza
        owner._stanza = lambda s: (inbox.append(s), original(s))  # type: ignore[method-assign]
        owner.send(etree.fromstring("<presence xmlns='jabber:client'/>"))
        owner.send(etree.fromstring(
            f"<presence xmlns='jabber:client' type='subscribe' to='{SERVICE}'/>"))
        await wait_for(lambda: any(p.get("type") == "subscribe" for p in inbox),
                       what="the broker asks back")
        owner.send(etree.fromstring(
            f"<presence xmlns='jabber:client' type='subscribed' to='{SERVICE}'/>"))
        # The host now sends the broker the owner's presence, no directed presence needed.
        await wait_for(lambda: router.is_available("root@example.test/console"),
                       what="the broker learns the owner's presence")
        await owner.close()
        await wait_for(lambda: not router.is_available("root@example.test"),
                       what="logout seen")
        owner = await connect(reactor, "127.0.0.1", self.prosody.c2s_port,
                              "root@example.test/console", password=password("root"),
                              store=self.pki.store(), keepalive=0, timeout=10, presence=True)
        await wait_for(lambda: router.is_available("root@example.test/console"),
                       what="the next login is seen from a plain initial presence")
        # The host goes away and comes back: the broker probes, the host answers.
        assert router.stream is not None
        router.stream.transport.loseConnection()
        await wait_for(lambda: ("unavailable", "root@example.test/console") in seen)
        await wait_for(lambda: router.stream is not None, timeout=10, what="reconnected")
        await wait_for(lambda: router.is_available("root@example.test/console"),
                       what="the probe answered")
        await owner.close()
        await wait_for(lambda: not router.is_available("root@example.test"),
                       what="logout seen")
        # Leave the roster as it was for the other tests.
        cleanup = await connect(reactor, "127.0.0.1", self.prosody.c2s_port,
                                "root@example.test/console", password=password("root"),
                                store=self.pki.store(), keepalive=0, timeout=10)
        remove = etree.fromstring(
            "<iq xmlns='jabber:client' type='set'><query xmlns='jabber:iq:roster'>"
            f"<item jid='{SERVICE}' subscription='remove'/></query></iq>")
        await cleanup.iq(remove)
        await cleanup.close()
        router.close()
        await link.stopService()

    async def test_the_grid_service_in_component_mode(self) -> None:
        secret = self.tmp / "component-secret"
        secret.write_text(self.prosody.secret + "\n")
        config = write_config(self.tmp, self.pki, domain="example.test", mode="component",
                              component_host=f"127.0.0.1:{self.prosody.component_port}",
                              component_secret_file=str(secret))
        grid = GridService(config, store_from_config(config))
        grid.startService()
        self.addCleanup(lambda: grid.stopService() if grid.running else None)
        await grid.ready
        assert grid.host_router is not None
        await wait_for(lambda: grid.host_router.stream is not None, timeout=10,
                       what="the service's component connection")
        session = await connect(reactor, "127.0.0.1", self.prosody.c2s_port,
                                "other@example.test/o", password=password("other"),
                                store=self.pki.store(), keepalive=0, timeout=10)
        assert b"sixnet_grid_component_connected 1" in grid.metrics.render()
        client = PubSubClient(session, grid.pubsub_service)
        await client.create("from-the-service", access_model="whitelist")
        assert [t.node for t in (await client.topics()).topics] == ["from-the-service"]
        # The host lists the component among its services (RFC 8600 8.1 discovery).
        query = etree.fromstring(
            "<iq xmlns='jabber:client' type='get' to='example.test'>"
            "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        items = await session.iq(query)
        assert SERVICE in {i.get("jid") for i in items.iter("{*}item")}
        # `sixnet grid revoke` writes the table; the service's watch tells the broker.
        await grid.revocations.store.revoke("other@example.test", "2026-01-01T00:00:00Z", "t")
        await wait_for(lambda: "other@example.test" in grid.broker.engine.revoked,
                       timeout=10, what="the revocation reaches the broker")
        with pytest.raises(Exception, match="forbidden"):
            await client.create("after-revocation")
        await session.close()
        await grid.stopService()
        assert grid.host_router.stream is None


def _items(messages: list[etree._Element]) -> list[str]:
    return [i.get("id") for m in messages
            for i in m.iter("{http://jabber.org/protocol/pubsub#event}item")]

