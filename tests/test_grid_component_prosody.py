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
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

import tests.test_pubsub_conversations as conversations
from sixnet.core.storage.database import Database
from sixnet.grid.client import PubSubClient, connect
from sixnet.grid.client.session import XMPPClientSession
from sixnet.grid.external import HostRouter, component_service
from sixnet.grid.jid import parse_jid
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.xmpp import NS_CLIENT, XML_LANG
from tests.support.conversation import run_conversation
from tests.support.iodef import IODEF
from tests.support.prosody import ProsodyHost, password, prosody  # noqa: F401 (fixture)
from tests.support.pubsub import CONSUMER, PROVIDER
from tests.support.waiting import pause, wait_for

SERVICE = "broker.example.test"
_IQ, _MESSAGE = f"{{{NS_CLIENT}}}iq", f"{{{NS_CLIENT}}}message"
#: Seconds to wait for a stanza that should not come (when none is expected, or after the
#: expected ones), and for offline leftovers of earlier tests at login.
QUIET = 0.15
AFTER = 0.04


def local_only(why: str) -> Any:
    """A conversation test that cannot run through a host, and why."""

    def test(self: Any) -> None:
        raise unittest.SkipTest(f"in-memory only: {why}")

    return test


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


def _items(messages: list[etree._Element]) -> list[str]:
    return [i.get("id") for m in messages
            for i in m.iter("{http://jabber.org/protocol/pubsub#event}item")]

