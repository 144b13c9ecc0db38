"""Two grid processes' services on one PostgreSQL schema stay one broker.

Each `GridService` here is what a `sixnet grid` process runs, with its own state directory,
ports and sessions, and the same grid and broker database. Clients log in over real loopback
sockets with STARTTLS and SCRAM: the owner and publisher through instance A, the reader
through instance B.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from sixnet.core.storage.database import Database
from sixnet.grid.external import HostRouter
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.pubsub.engine import PubSubEngine
from sixnet.grid.pubsub.request import parse_iq
from sixnet.grid.storage.presence import HEARTBEAT, SILENT, PresenceBoard
from sixnet.grid.storage.revocations import RevocationStore
from tests.grid_harness import RawClient, ports, start_grid, write_config
from tests.support.databases import postgres_schema_url, postgres_unavailable
from tests.support.iodef import IODEF, IODEF_NS
from tests.support.waiting import wait_for
from tests.test_grid_component import NAME as COMPONENT
from tests.test_grid_component import Host, parse

PS = "http://jabber.org/protocol/pubsub"
BROKER = "broker.localhost"
AUTH = "http://jabber.org/protocol/pubsub#subscribe_authorization"


def test_announcements_round_trip_under_the_size_limit() -> None:
    small = ch.PutItem("t", "i", 3, "p@x", b"<a/>", "2026-12-02T00:00:00Z")
    large = ch.PutItem("t", "big", 4, "p@x", b"x" * (ch.INLINE_PAYLOAD + 1), "2026")
    many = [ch.PutAffiliation("t", f"member{n}@x", "member") for n in range(400)]
    messages = ch.encode("origin", [small, large, *many, ch.DeleteNode("t")], 7)
    assert len(messages) > 1 and all(len(m) <= ch.MAX_NOTIFICATION for m in messages)
    assert len(set(messages)) == len(messages)  # PostgreSQL folds identical payloads
    heard = [ch.decode(m) for m in messages]
    assert {h.origin for h in heard} == {"origin"}
    changes = [c for h in heard for c in h.changes]
    assert changes[0] == small and changes[2:] == [*many, ch.DeleteNode("t")]
    assert heard[0].missing == [changes[1]] and changes[1].payload == b""


def test_another_engine_applies_what_one_decided() -> None:
    """The changes of every kind, applied elsewhere, give the same state (twice: idempotent)."""
    def request(body: str, sender: str = "owner@localhost/d") -> Any:
        return parse_iq(etree_iq(f"<iq type='set' from='{sender}' to='{BROKER}' id='x'>"
                                 f"<pubsub xmlns='{PS}'>{body}</pubsub></iq>"))

    here, there = (PubSubEngine(BROKER, BrokerConfig()) for _ in range(2))
    decided: list[ch.Change] = []
    for body, sender in [
            ("<create node='t'/>", "owner@localhost/d"),
            ("<subscribe node='t' jid='reader@localhost'/>", "reader@localhost/d"),
            (f"<publish node='t'><item id='i'><n xmlns='{IODEF_NS}'/></item></publish>",
             "owner@localhost/d")]:
        decided += here.handle(request(body, sender)).changes
    sub = next(iter(here.nodes["t"].subscriptions.values()))
    asked = there.apply(decided)
    assert [n.recipients for n in asked] == [["owner@localhost"]]  # the pending request
    there.apply(decided)
    node = there.nodes["t"]
    assert node.subscriptions[sub.subid].state == "pending" and list(node.items) == ["i"]
    assert node.affiliations == {"owner@localhost": "owner"}
    there.apply([ch.DeleteNode("t")])
    assert there.nodes == {} and there.names == []


def etree_iq(text: str) -> Any:
    return etree.fromstring(text.replace("<iq ", "<iq xmlns='jabber:client' ", 1))


class ChannelScopeTests(unittest.TestCase):
    """PostgreSQL channel names are database-wide: each schema hears only its own."""

    skip = postgres_unavailable()

    async def test_a_schema_does_not_hear_another(self) -> None:
        ours, theirs = Database(postgres_schema_url(self)), Database(postgres_schema_url(self))
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        heard: list[str] = []
        await ours.listen("pubsub_change", heard.append)
        await theirs.run("n", lambda c: c.notify("pubsub_change", "theirs"))
        await ours.run("n", lambda c: c.notify("pubsub_change", "ours"))
        # Committed after theirs: once ours is heard, theirs would have been too.
        await wait_for(lambda: heard)
        assert heard == ["ours"]


def _answer(owner: str, subid: str, node: str, subscriber: str, allow: bool) -> str:
    return (f"<message from='{owner}' to='{BROKER}'><x xmlns='jabber:x:data' type='submit'>"
            f"<field var='FORM_TYPE'><value>{AUTH}</value></field>"
            f"<field var='pubsub#subid'><value>{subid}</value></field>"
            f"<field var='pubsub#node'><value>{node}</value></field>"
            f"<field var='pubsub#subscriber_jid'><value>{subscriber}</value></field>"
            f"<field var='pubsub#allow'><value>{str(allow).lower()}</value></field>"
            f"</x></message>")


def _publish(node: str, item: str, stanza_id: str) -> str:
    return (f"<iq type='set' to='{BROKER}' id='{stanza_id}'><pubsub xmlns='{PS}'>"
            f"<publish node='{node}'><item id='{item}'>{IODEF}</item></publish>"
            f"</pubsub></iq>")


class TwoInstanceTests(unittest.TestCase):
    skip = postgres_unavailable()

    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def start(self) -> None:
        url = postgres_schema_url(self)
        for name in ("a", "b"):
            (self.tmp / name).mkdir()
        self.a, self.b = [
            await start_grid(write_config(self.tmp / name, self.pki, database=url,
                                          broker={"database": url}))
            for name in ("a", "b")]
        for grid in (self.b, self.a):
            self.addCleanup(grid.stopService)
        for user in ("owner", "reader"):
            await self.a.accounts.add(user, f"{user} secret")

    async def login(self, grid: Any, user: str) -> RawClient:
        client = await RawClient.connect(ports(grid)[0])
        self.addCleanup(lambda: client.transport.abortConnection())
        await client.starttls(grid.tls.store)
        await client.open_stream()
        assert b"<success" in await client.scram_login(user, f"{user} secret")
        await client.bind("desk")
        client.send("<presence/>")
        return client

    async def ask(self, client: RawClient, stanza: str, stanza_id: str) -> bytes:
        client.clear()
        client.send(stanza)
        return await client.until(f"id=['\"]{stanza_id}['\"][^>]*/?>".encode())

    async def test_state_and_delivery_across_instances(self) -> None:
        await self.start()
        owner = await self.login(self.a, "owner")
        reader = await self.login(self.b, "reader")

        # Created on A: B knows the topic as soon as the commit is announced.
        started = time.monotonic()
        await self.ask(owner, f"<iq type='set' to='{BROKER}' id='c'><pubsub xmlns='{PS}'>"
                              f"<create node='t'/></pubsub></iq>", "c")
        await wait_for(lambda: "t" in self.b.broker.engine.nodes, what="topic on B")
        self.propagation = time.monotonic() - started
        answer = await self.ask(reader, f"<iq type='get' to='{BROKER}' id='d'>"
                                        f"<query xmlns='http://jabber.org/protocol/disco#items'/>"
                                        f"</iq>", "d")
        assert b"node='t'" in answer or b'node="t"' in answer

        # Subscribed through B (pending): the owner, online at A, is asked by A.
        owner.clear()
        answer = await self.ask(reader, f"<iq type='set' to='{BROKER}' id='s'>"
                                        f"<pubsub xmlns='{PS}'><subscribe node='t' "
                                        f"jid='reader@localhost'/></pubsub></iq>", "s")
        assert b"pending" in answer
        subid = re.search(rb"subid=['\"]([0-9a-f]+)", answer).group(1).decode()
        await owner.until(AUTH.encode())

        # Approved at A: B's state says subscribed, and the reader hears of it through B.
        reader.clear()
        owner.send(_answer("owner@localhost/desk", subid, "t", "reader@localhost", True))
        await reader.until(b"subscription='subscribed'|subscription=\"subscribed\"")
        sub = self.b.broker.engine.nodes["t"].subscriptions[subid]
        assert sub.state == "subscribed"

        # Published at A, delivered once to the reader connected to B.
        reader.clear()
        for n in range(3):
            await self.ask(owner, _publish("t", f"i{n}", f"p{n}"), f"p{n}")
        await reader.until(b"id=['\"]i2['\"]")
        await self.b.broker.idle()
        await self.a.broker.idle()
        received = reader.received.decode()
        assert [received.count(f"id='i{n}'") + received.count(f'id="i{n}"')
                for n in range(3)] == [1, 1, 1]
        assert received.index("i0") < received.index("i1") < received.index("i2")
        # ... and the items are on B for retrieval.
        answer = await self.ask(reader, f"<iq type='get' to='{BROKER}' id='g'>"
                                        f"<pubsub xmlns='{PS}'><items node='t'/></pubsub></iq>",
                                "g")
        assert answer.count(IODEF_NS.encode()) == 3

        # Revoked (the operator's command writes the table): both instances enforce it.
        await self.a.revocations.store.revoke("reader@localhost", "2026-12-02T00:00:00Z",
                                             "test")
        await wait_for(lambda: "reader@localhost" in self.b.broker.engine.revoked
                       and "reader@localhost" in self.a.broker.engine.revoked)
        await wait_for(lambda: not self.a.broker.engine.nodes["t"].subscriptions
                       and not self.b.broker.engine.nodes["t"].subscriptions)

    async def test_reader_at_a_publisher_at_b_and_deletion(self) -> None:
        """The other direction, an open item id reused, and a deletion seen by both."""
        await self.start()
        owner = await self.login(self.b, "owner")
        reader = await self.login(self.a, "reader")
        await self.ask(owner, f"<iq type='set' to='{BROKER}' id='c'><pubsub xmlns='{PS}'>"
                              f"<create node='w'/><configure><x xmlns='jabber:x:data' "
                              f"type='submit'><field var='FORM_TYPE'><value>{PS}#node_config"
                              f"</value></field><field var='pubsub#access_model'>"
                              f"<value>whitelist</value></field></x></configure></pubsub></iq>",
                       "c")
        await wait_for(lambda: "w" in self.a.broker.engine.nodes)
        await self.ask(owner, f"<iq type='set' to='{BROKER}' id='m'>"
                              f"<pubsub xmlns='{PS}#owner'><affiliations node='w'>"
                              f"<affiliation jid='reader@localhost' affiliation='member'/>"
                              f"</affiliations></pubsub></iq>", "m")
        await wait_for(lambda: self.a.broker.engine.nodes["w"].affiliations.get(
            "reader@localhost") == "member")
        answer = await self.ask(reader, f"<iq type='set' to='{BROKER}' id='s'>"
                                        f"<pubsub xmlns='{PS}'><subscribe node='w' "
                                        f"jid='reader@localhost'/></pubsub></iq>", "s")
        assert b"subscribed" in answer
        await wait_for(lambda: self.b.broker.engine.nodes["w"].receivers)
        reader.clear()
        large = "x" * 5000  # too large to travel with the announcement: read from the table
        owner.send(f"<iq type='set' to='{BROKER}' id='p'><pubsub xmlns='{PS}'>"
                   f"<publish node='w'><item id='big'><n xmlns='urn:t'>{large}</n></item>"
                   f"</publish></pubsub></iq>")
        await reader.until(b"id=['\"]big['\"]")
        await wait_for(lambda: "big" in self.a.broker.engine.nodes["w"].items)
        assert large.encode() in self.a.broker.engine.nodes["w"].items["big"].payload
        await self.ask(owner, f"<iq type='set' to='{BROKER}' id='x'>"
                              f"<pubsub xmlns='{PS}#owner'><delete node='w'/></pubsub></iq>",
                       "x")
        await wait_for(lambda: "w" not in self.a.broker.engine.nodes)
        assert self.a.broker.engine.names == []


class PresenceAcrossComponentInstancesTests(unittest.TestCase):
    """Two broker instances attached for one component name, each on its own scripted
    component stream, on one PostgreSQL schema. The host's presence reaches one of them, or
    both (a copy each), and the logout may reach the other: the owner's pending approval
    requests still go out once, and after the logout neither instance thinks it online."""

    skip = postgres_unavailable()

    async def start(self) -> None:
        url = postgres_schema_url(self)
        self.hosts: list[Host] = []
        self.brokers: list[PubSubBroker] = []
        self.clock = Clock()  # the boards' heartbeats
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir(parents=True)
        for name in ("a", "b"):
            database = Database(url)
            broker = PubSubBroker(BrokerConfig(), "example.test", database,
                                  self.tmp / f"{name}.jsonl", RevocationStore(database))
            await broker.store.open()
            router = HostRouter("example.test", COMPONENT, PresenceBoard(database, self.clock))
            await router.open()
            router.attach(broker)
            await broker.idle()
            host = Host(router)
            host.accept()

            async def detach(broker: PubSubBroker = broker, router: HostRouter = router,
                             database: Database = database) -> None:
                await broker.idle()
                await router.stop()
                await broker.stop()
                database.close()

            self.addCleanup(lambda d=detach: defer.Deferred.fromCoroutine(d()))
            self.hosts.append(host)
            self.brokers.append(broker)

    async def deliver(self, host: Host, stanza: str) -> None:
        host.stream.dataReceived(stanza.encode())
        for other in self.hosts:  # claims first: they may make a broker re-send
            await other.router.drain()
        for broker in self.brokers:
            await broker.idle()

    def requests(self) -> list[str]:
        """``instance>to:subscriber`` for every approval request written to the host."""
        sent = []
        for name, host in zip("ab", self.hosts, strict=True):
            for stanza in parse(host.sent()):
                if stanza.tag.endswith("message") and AUTH.encode() in etree.tostring(stanza):
                    subscriber = stanza.findtext(
                        ".//{*}field[@var='pubsub#subscriber_jid']/{*}value")
                    sent.append(f"{name}>{stanza.get('to')}:{subscriber}")
        return sent

    def pending(self) -> list[str]:
        return sorted(s.jid for s in self.brokers[0].engine.nodes["t"].pending.values())

    def holders(self, jid: str) -> list[bool]:
        return [host.router.is_available(jid) for host in self.hosts]

    async def test_requests_resent_once_and_availability_after_logout(self) -> None:
        await self.start()
        a, b = self.hosts
        owner = "owner@example.test/desk"
        await self.deliver(a, f"<iq type='set' from='{owner}' to='{COMPONENT}' id='c'>"
                              f"<pubsub xmlns='{PS}'><create node='t'/><configure>"
                              f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
                              f"<value>{PS}#node_config</value></field>"
                              f"<field var='pubsub#access_model'><value>authorize</value>"
                              f"</field></x></configure></pubsub></iq>")
        await wait_for(lambda: "t" in self.brokers[1].engine.nodes, what="the topic on B")
        await self.deliver(b, f"<iq type='set' from='r1@example.test/x' to='{COMPONENT}' "
                              f"id='s'><pubsub xmlns='{PS}'><subscribe node='t' "
                              f"jid='r1@example.test'/></pubsub></iq>")
        await wait_for(lambda: all(x.engine.nodes["t"].pending for x in self.brokers))
        assert self.requests() == []  # the owner is online nowhere yet

        for login in range(3):
            # The owner's presence reaches both instances (a host copying it) or one.
            arriving = (a, b) if login == 0 else ((b,) if login == 1 else (a,))
            for host in arriving:
                host.stream.dataReceived(f"<presence from='{owner}' to='{COMPONENT}'/>"
                                         .encode())
            await wait_for(lambda: any(self.holders(owner)), what="a holder")
            await self.deliver(a, "")
            assert self.holders(owner).count(True) == 1
            holder = self.hosts[self.holders(owner).index(True)]
            other = b if holder is a else a
            sender = "ab"[self.hosts.index(holder)]
            # Each pending request once, by the holder, to the session that came online.
            assert sorted(self.requests()) == [f"{sender}>{owner}:{jid}"
                                               for jid in self.pending()]
            # A presence update heard anywhere sends nothing again.
            await self.deliver(other, f"<presence from='{owner}' to='{COMPONENT}'/>")
            await self.deliver(holder, f"<presence from='{owner}' to='{COMPONENT}'>"
                                       f"<show>away</show></presence>")
            assert self.requests() == []
            # A new request, subscribed through the instance that does not hold the owner:
            # the holder sends it (once), as it applies the other's change.
            await self.deliver(other, f"<iq type='set' from='n{login}@example.test/x' "
                                      f"to='{COMPONENT}' id='n'><pubsub xmlns='{PS}'>"
                                      f"<subscribe node='t' jid='n{login}@example.test'/>"
                                      f"</pubsub></iq>")
            await wait_for(lambda n=login: all(
                x.engine.nodes["t"].subscription_of(f"n{n}@example.test")
                for x in self.brokers))
            await self.deliver(holder, "")
            assert self.requests() == [f"{sender}>owner@example.test:n{login}@example.test"]
            # The logout reaches the instance that does not hold the owner.
            await self.deliver(other, f"<presence type='unavailable' from='{owner}' "
                                      f"to='{COMPONENT}'/>")
            await wait_for(lambda: not any(self.holders(owner)), what="the holder lets go")
            assert self.holders("owner@example.test") == [False, False]

        # The holder's link drops: its claims go, and the next login is claimed again.
        a.stream.dataReceived(f"<presence from='{owner}' to='{COMPONENT}'/>".encode())
        await wait_for(lambda: self.holders(owner) == [True, False])
        a.sent()
        a.stream.connectionLost(None)
        assert self.holders(owner) == [False, False]
        await a.router.drain()
        await self.deliver(b, f"<presence from='{owner}' to='{COMPONENT}'/>")
        assert self.holders(owner) == [False, True]
        assert sorted(self.requests()) == [f"b>{owner}:{jid}" for jid in self.pending()]

        # B falls silent (its heartbeat stops, as if it had died): the next presence heard
        # elsewhere takes the claim over, and B, only slow after all, lets go.
        b_board = b.router.board
        assert b_board is not None
        b_board._heartbeat.stop()
        a = self.hosts[0] = Host(a.router)  # A's link is back
        a.accept()
        await self.deliver(a, f"<presence from='{owner}' to='{COMPONENT}'/>")
        assert self.holders(owner) == [False, True]  # B is not silent for long enough yet
        self.clock.advance(SILENT + 1)
        await self.deliver(a, f"<presence from='{owner}' to='{COMPONENT}'/>")
        await wait_for(lambda: self.holders(owner) == [True, False], what="A takes over")
        assert sorted(self.requests()) == [f"a>{owner}:{jid}" for jid in self.pending()]
        b_board._heartbeat.start(HEARTBEAT, now=False)
