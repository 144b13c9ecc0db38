"""The broker component in literal XML: every XEP-0060 use case RFC 8600 needs, and hostile input.

Each test plays a script against `PubSubBroker` attached to an in-memory router, on a real
SQLite database; ``>>>`` is sent, each ``<<<`` must come back (any order), nothing else may.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from lxml import etree
from twisted.internet import defer
from twisted.trial import unittest

from sixnet.core.storage.database import Database
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.pubsub.config import BrokerConfig, RateLimitConfig, RoleConfig
from sixnet.grid.storage.revocations import RevocationStore
from tests.support.conversation import RecordingRouter, parse_stanza, run_conversation
from tests.support.iodef import IODEF, IODEF_NS
from tests.support.pubsub import (
    CONSUMER,
    PROVIDER,
    approval_request,
    create_topic,
    error,
    publish,
    pubsub_error,
    set_affiliation,
    subscribe,
)


class BrokerTestCase(unittest.TestCase):
    """A broker on SQLite with a recording router; `talk` plays a script."""

    config = BrokerConfig()

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="sixnet-pubsub-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.now = 1_700_000_000.0
        self.start_broker()

    def start_broker(self, config: BrokerConfig | None = None) -> None:
        self.database = Database(f"sqlite:{self.directory / 'broker.sqlite3'}")
        self.addCleanup(self.database.close)
        self.revocations = RevocationStore(self.database)
        self.broker = PubSubBroker(config or self.config, "example.test", self.database,
                                   self.directory / "audit.jsonl", self.revocations,
                                   clock=lambda: self.now)
        self.router = RecordingRouter("example.test", {PROVIDER, CONSUMER})
        self.broker.attach(self.router)
        self.addCleanup(lambda: self.broker.stop())

    async def restart(self, config: BrokerConfig | None = None) -> None:
        await self.broker.stop()
        self.database.close()
        self.start_broker(config)
        await self.broker.idle()

    async def send(self, stanza: etree._Element, expected: int = 0) -> None:
        self.broker.receive(stanza)
        await self.broker.idle()

    async def talk(self, *scripts: str) -> None:
        self.matcher = await run_conversation(
            "\n".join(scripts), self.send, self.router.take, getattr(self, "matcher", None))

    def audit(self) -> list[dict]:
        path = self.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    async def revoke(self, jid: str, *, tell_the_broker: bool = True) -> None:
        """What `sixnet grid revoke` does, then the grid service's RevocationWatch."""
        await self.revocations.prepare()
        await self.revocations.revoke(jid, "2026-01-01T00:00:00Z", "test")
        if tell_the_broker:
            await self.broker.revoke(jid)


class DiscoveryTests(BrokerTestCase):
    async def test_rfc8600_discovery_of_topics_and_their_type(self) -> None:
        await self.talk(create_topic("MILEHost"), create_topic("NEA1"), """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='items1'>
      <query xmlns='http://jabber.org/protocol/disco#items'/></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='items1'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <item node='MILEHost' name='MILE Host Data' jid='broker.example.test'/>
        <item node='NEA1' name='MILE Host Data' jid='broker.example.test'/>
      </query></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='info1'>
      <query xmlns='http://jabber.org/protocol/disco#info' node='MILEHost'/></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='info1'>
      <query xmlns='http://jabber.org/protocol/disco#info' node='MILEHost'>
        <identity category='pubsub' type='leaf'/>
        <feature var='http://jabber.org/protocol/disco#info'/>
        <feature var='http://jabber.org/protocol/disco#items'/>
        <feature var='http://jabber.org/protocol/pubsub'/>
        <x xmlns='jabber:x:data' type='result'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#meta-data</value></field>
          <field var='pubsub#type' label='Payload type' type='text-single'>
            <value>urn:ietf:params:xml:ns:iodef-2.0</value></field>
          <field var='pubsub#title' type='text-single' label='*'>
            <value>MILE Host Data</value></field>
          <field var='pubsub#access_model' type='list-single' label='*'>
            <value>authorize</value></field>
          <field var='pubsub#owner' type='jid-multi' label='*'>
            <value>provider@example.test</value></field>
          <field var='pubsub#creation_date' type='text-single' label='*'>
            <value>2023-11-14T22:13:20Z</value></field>
        </x></query></iq>
""")

    async def test_service_info_lists_the_features_that_work(self) -> None:
        self.broker.receive(etree.fromstring(
            "<iq xmlns='jabber:client' type='get' from='consumer@example.test/c' "
            "to='broker.example.test' id='i'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"))
        await self.broker.idle()
        (reply,) = self.router.take()
        ns = "{http://jabber.org/protocol/disco#info}"
        identity = reply.find(f"{ns}query/{ns}identity")
        assert (identity.get("category"), identity.get("type")) == ("pubsub", "service")
        features = {f.get("var") for f in reply.iter(ns + "feature")}
        assert "http://jabber.org/protocol/pubsub#access-authorize" in features
        assert "http://jabber.org/protocol/pubsub#access-whitelist" in features
        assert "http://jabber.org/protocol/pubsub#access-open" not in features
        assert "http://jabber.org/protocol/rsm" in features
        assert "http://jabber.org/protocol/pubsub#auto-create" not in features

    async def test_ten_thousand_topics_stay_paged_and_fast(self) -> None:
        names = [f"topic-{i:05d}" for i in range(10_000)]
        await self.broker.idle()  # the stored state is loaded
        engine = self.broker.engine
        for name in names:  # created through the engine: the conversation is about disco
            from sixnet.grid.pubsub.request import PubSubRequest
            outcome = engine.handle(PubSubRequest("create", PROVIDER, node=name))
            await self.broker.store.apply(outcome.changes)
        started = time.perf_counter()
        await self.talk("""
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='d1'>
      <query xmlns='http://jabber.org/protocol/disco#items'/></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='d1'>
      <query xmlns='http://jabber.org/protocol/disco#items'>""" + "".join(
            f"<item node='{n}' jid='broker.example.test'/>" for n in names[:100]) + """
        <set xmlns='http://jabber.org/protocol/rsm'>
          <first index='0'>topic-00000</first><last>topic-00099</last>
          <count>10000</count></set></query></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='d2'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <set xmlns='http://jabber.org/protocol/rsm'><max>3</max>
          <after>topic-05000</after></set></query></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='d2'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <item node='topic-05001' jid='broker.example.test'/>
        <item node='topic-05002' jid='broker.example.test'/>
        <item node='topic-05003' jid='broker.example.test'/>
        <set xmlns='http://jabber.org/protocol/rsm'>
          <first index='5001'>topic-05001</first><last>topic-05003</last>
          <count>10000</count></set></query></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='d3'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <set xmlns='http://jabber.org/protocol/rsm'><max>2</max><before/></set></query></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='d3'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <item node='topic-09998' jid='broker.example.test'/>
        <item node='topic-09999' jid='broker.example.test'/>
        <set xmlns='http://jabber.org/protocol/rsm'>
          <first index='9998'>topic-09998</first><last>topic-09999</last>
          <count>10000</count></set></query></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='d4'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <set xmlns='http://jabber.org/protocol/rsm'><max>1000000</max>
          <after>no-such-topic</after></set></query></iq>
""" + error(CONSUMER, "d4", "cancel", "item-not-found", text=True))
        # Three pages and an error over 10,000 topics, parsing and matching included.
        assert time.perf_counter() - started < 5.0
        from sixnet.grid.pubsub.request import PubSubRequest
        from sixnet.grid.pubsub.rsm import PageRequest
        started = time.perf_counter()
        for _ in range(100):
            engine.handle(PubSubRequest("disco-items", CONSUMER,
                                        page=PageRequest(max=50, after="topic-07777")))
        assert (time.perf_counter() - started) / 100 < 0.02  # ~0.2 ms measured; load margin


class CreateConfigureDeleteTests(BrokerTestCase):
    async def test_create_with_defaults_and_instant_node(self) -> None:
        await self.talk("""
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='c1'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='plain'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='c1'/>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='c2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><create/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='c2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='$instant'/></pubsub></iq>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='c3'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='plain'/></pubsub></iq>
""" + error(PROVIDER, "c3", "cancel", "conflict", text=True))
        node = self.broker.engine.nodes["plain"]
        assert node.config.access_model == "authorize"  # the service default
        assert node.config.notification_type == "normal"
        assert self.matcher.captured["instant"] in self.broker.engine.nodes

    async def test_configure_get_and_set_with_notify_config(self) -> None:
        await self.talk(create_topic("t", "open_is_off", "") .replace(
            "<field var='pubsub#access_model'><value>open_is_off</value></field>", "")
            .replace("<field var='pubsub#title'><value>MILE Host Data</value></field>",
                     "<field var='pubsub#notify_config'><value>1</value></field>"),
            set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"), """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='t'/></pubsub>
    </iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='t'>
        <x xmlns='jabber:x:data' type='form'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#node_config</value></field>
          <field var='pubsub#title' type='text-single' label='*'><value/></field>
          <field var='pubsub#type' type='text-single' label='*'>
            <value>urn:ietf:params:xml:ns:iodef-2.0</value></field>
          <field var='pubsub#access_model' type='list-single' label='*'>
            <value>authorize</value>
            <option><value>authorize</value></option>
            <option><value>whitelist</value></option></field>
          <field var='pubsub#persist_items' type='boolean' label='*'><value>1</value></field>
          <field var='pubsub#max_items' type='text-single' label='*'><value>100</value></field>
          <field var='pubsub#deliver_payloads' type='boolean' label='*'><value>1</value></field>
          <field var='pubsub#send_last_published_item' type='list-single' label='*'>
            <value>never</value>
            <option><value>never</value></option><option><value>on_sub</value></option></field>
          <field var='pubsub#notify_retract' type='boolean' label='*'><value>1</value></field>
          <field var='pubsub#notify_delete' type='boolean' label='*'><value>1</value></field>
          <field var='pubsub#notify_config' type='boolean' label='*'><value>1</value></field>
          <field var='pubsub#notification_type' type='list-single' label='*'>
            <value>normal</value>
            <option><value>normal</value></option><option><value>headline</value></option>
          </field>
        </x></configure></pubsub></iq>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='t'>
        <x xmlns='jabber:x:data' type='submit'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#node_config</value></field>
          <field var='pubsub#max_items'><value>max</value></field>
          <field var='pubsub#title'><value>Renamed</value></field>
        </x></configure></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='s'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <configuration node='t'/></event></message>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='g2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='t'/></pubsub>
    </iq>
""" + error(CONSUMER, "g2", "auth", "forbidden"))
        config = self.broker.engine.nodes["t"].config
        assert (config.title, config.max_items) == ("Renamed", 1000)

    async def test_malformed_forms_get_the_right_errors(self) -> None:
        def configure(stanza_id: str, form: str) -> str:
            return f"""
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='{stanza_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='t'>
        {form}</configure></pubsub></iq>
"""
        form_type = ("<field var='FORM_TYPE'><value>"
                     "http://jabber.org/protocol/pubsub#node_config</value></field>")
        await self.talk(
            create_topic("t"),
            configure("nf", ""),
            error(PROVIDER, "nf", "modify", "bad-request", text=True),
            configure("wt", "<x xmlns='jabber:x:data' type='form'>" + form_type + "</x>"),
            error(PROVIDER, "wt", "modify", "bad-request", text=True),
            configure("ft", "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
                            "<value>urn:other</value></field></x>"),
            error(PROVIDER, "ft", "modify", "bad-request", text=True),
            configure("nv", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                            "<field><value>1</value></field></x>"),
            error(PROVIDER, "nv", "modify", "bad-request", text=True),
            configure("uk", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                            "<field var='pubsub#collection'><value>x</value></field></x>"),
            error(PROVIDER, "uk", "modify", "not-acceptable", text=True),
            configure("bb", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                            "<field var='pubsub#persist_items'><value>yes</value></field></x>"),
            error(PROVIDER, "bb", "modify", "not-acceptable", text=True),
            configure("op", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                            "<field var='pubsub#access_model'><value>open</value></field></x>"),
            error(PROVIDER, "op", "modify", "not-acceptable", text=True),
            configure("mi", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                            "<field var='pubsub#max_items'><value>-5</value></field></x>"),
            error(PROVIDER, "mi", "modify", "not-acceptable", text=True),
            configure("two", "<x xmlns='jabber:x:data' type='submit'>" + form_type +
                             "<field var='pubsub#title'><value>a</value><value>b</value>"
                             "</field></x>"),
            error(PROVIDER, "two", "modify", "not-acceptable", text=True),
            configure("cancel", "<x xmlns='jabber:x:data' type='cancel'/>"),
            "<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' "
            "id='cancel'/>",
        )
        assert self.broker.engine.nodes["t"].config.persist_items is True

    async def test_delete_notifies_subscribers_and_purge(self) -> None:
        await self.talk(
            create_topic("t"), set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            publish("t", "i1", ["consumer@example.test"]), """
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='purge'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><purge node='t'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='purge'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'><purge node='t'/></event>
    </message>
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='del0'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='t'/></pubsub></iq>
""" + error(CONSUMER, "del0", "auth", "forbidden") + """
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='del'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='t'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='del'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'><delete node='t'/></event>
    </message>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='del2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='t'/></pubsub></iq>
""" + error(PROVIDER, "del2", "cancel", "item-not-found"))
        assert "t" not in self.broker.engine.nodes
        actions = [e["event"] for e in self.audit()]
        assert actions[-4:] == ["purge", "delete", "delete", "delete"]
        assert ["refused" in e for e in self.audit()[-3:]] == [True, False, True]

    async def test_default_configuration(self) -> None:
        self.broker.receive(etree.fromstring(
            "<iq xmlns='jabber:client' type='get' from='provider@example.test/p' "
            "to='broker.example.test' id='d'><pubsub "
            "xmlns='http://jabber.org/protocol/pubsub#owner'><default/></pubsub></iq>"))
        await self.broker.idle()
        (reply,) = self.router.take()
        values = {f.get("var"): f.findtext("{jabber:x:data}value")
                  for f in reply.iter("{jabber:x:data}field")}
        assert values["pubsub#access_model"] == "authorize"
        assert values["pubsub#notification_type"] == "normal"


class ApprovalWorkflowTests(BrokerTestCase):
    """XEP-0060 section 8.6 under the `authorize` model (RFC 8600 section 8.3.3)."""

    def approval_request(self, to: str = "provider@example.test") -> str:
        return approval_request(to)

    def decision(self, allow: str, sender: str = PROVIDER) -> str:
        return f"""
>>> <message from='{sender}' to='broker.example.test'>
      <x xmlns='jabber:x:data' type='submit'>
        <field var='FORM_TYPE' type='hidden'>
          <value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>
        <field var='pubsub#subid'><value>$subid</value></field>
        <field var='pubsub#node'><value>t</value></field>
        <field var='pubsub#subscriber_jid'><value>consumer@example.test</value></field>
        <field var='pubsub#allow'><value>{allow}</value></field>
      </x></message>
"""

    async def test_owner_approves_and_subscriber_is_told_then_receives(self) -> None:
        await self.talk(create_topic("t"), subscribe("t", CONSUMER, "pending"),
                        self.approval_request(), publish("t", "before", []), """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='items'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='t'/></pubsub></iq>
""" + error(CONSUMER, "items", "auth", "not-authorized", pubsub_error("not-subscribed")) +
            subscribe("t", CONSUMER, "pending", stanza_id="again").replace(
                "<<< <iq type='result'", "<<< <iq type='ignored'").split("<<<")[0] +
            error(CONSUMER, "again", "auth", "not-authorized",
                  pubsub_error("pending-subscription")) +
            self.decision("true") + """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='subscribed'/>
      </event></message>
""" + publish("t", "after", ["consumer@example.test"]))
        decisions = [e for e in self.audit()
                     if e["event"] in ("subscribe", "approve") and "refused" not in e]
        assert [d.get("decision", d["event"]) for d in decisions] == ["pending", "approve"]

    async def test_owner_denies(self) -> None:
        await self.talk(create_topic("t"), subscribe("t", CONSUMER, "pending"),
                        self.approval_request(), self.decision("false"), """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='none'/>
      </event></message>
""", publish("t", "i", []))

    async def test_only_an_owner_decides(self) -> None:
        await self.talk(create_topic("t"), subscribe("t", CONSUMER, "pending"),
                        self.approval_request(), self.decision("true", sender=CONSUMER), """
<<< <message from='broker.example.test' to='consumer@example.test/c' type='error'>
      <error type='auth'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>
    </message>
""")

    async def test_pending_request_persists_and_is_resent_when_owner_comes_online(
            self) -> None:
        self.router.available.discard(PROVIDER)
        await self.talk(create_topic("t"), subscribe("t", CONSUMER, "pending"))
        await self.restart()
        self.router.available.discard(PROVIDER)
        self.broker.session_available("provider@example.test/laptop")
        await self.broker.idle()
        await run_conversation(
            ">>> <iq type='get' from='x@example.test/x' to='broker.example.test' id='n'>"
            "<query xmlns='http://jabber.org/protocol/disco#items' node='nothing'/></iq>" +
            error("x@example.test/x", "n", "cancel", "item-not-found") +
            self.approval_request("provider@example.test/laptop"),
            self.send, self.router.take, self.matcher)

    async def test_policy_service_owner_approves_automatically(self) -> None:
        """An owner that is a policy service answers each form as it arrives."""
        policy = "policy@example.test/engine"
        self.router.available.add(policy)
        await self.talk(create_topic("t"), set_affiliation(
            "t", "policy@example.test", "owner"))
        self.broker.receive(etree.fromstring(
            "<iq xmlns='jabber:client' type='set' from='consumer@example.test/c' "
            "to='broker.example.test' id='s'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
            "<subscribe node='t' jid='consumer@example.test'/></pubsub></iq>"))
        await self.broker.idle()
        forms = [m for m in self.router.take() if m.get("to") == "policy@example.test"]
        assert len(forms) == 1
        answer = forms[0].find("{jabber:x:data}x")
        answer.set("type", "submit")
        for field in answer.iter("{jabber:x:data}field"):
            if field.get("var") == "pubsub#allow":
                field.find("{jabber:x:data}value").text = "1"
        message = etree.Element("{jabber:client}message",
                                {"from": policy, "to": "broker.example.test"})
        message.append(answer)
        self.broker.receive(message)
        await self.broker.idle()
        sub = self.broker.engine.nodes["t"].subscription_of("consumer@example.test")
        assert sub.state == "subscribed"

    async def test_owner_approves_through_subscription_management(self) -> None:
        await self.talk(create_topic("t"), subscribe("t", CONSUMER, "pending"),
                        self.approval_request(), """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='l'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='t'/>
      </pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='l'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='t'>
        <subscription jid='consumer@example.test' subid='$subid' subscription='pending'/>
      </subscriptions></pubsub></iq>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='m'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='t'>
        <subscription jid='consumer@example.test' subscription='subscribed'/>
      </subscriptions></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='m'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='subscribed'/>
      </event></message>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='r'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><subscriptions node='t'>
        <subscription jid='consumer@example.test' subscription='none'/>
      </subscriptions></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='r'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='none'/>
      </event></message>
""")


class SubscriptionTests(BrokerTestCase):
    async def test_subscribe_for_another_jid_is_refused(self) -> None:
        await self.talk(create_topic("t"), """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscribe node='t' jid='victim@example.test'/></pubsub></iq>
""" + error(CONSUMER, "s", "modify", "bad-request", pubsub_error("invalid-jid")))

    async def test_whitelist_refuses_platforms_not_on_it(self) -> None:
        await self.talk(create_topic("w", "whitelist"),
                        subscribe("w", CONSUMER, "x").split("<<<")[0] +
                        error(CONSUMER, "sub", "cancel", "not-allowed",
                              pubsub_error("closed-node")),
                        set_affiliation("w", "consumer@example.test", "member"),
                        subscribe("w", CONSUMER, "subscribed", stanza_id="ok"))

    async def test_demoted_member_stops_receiving_and_leftover_none_is_not_whitelisted(
            self) -> None:
        await self.talk(
            create_topic("w", "whitelist"),
            set_affiliation("w", "consumer@example.test", "member"),
            subscribe("w", CONSUMER, "subscribed"),
            publish("w", "i1", ["consumer@example.test"]),
            set_affiliation("w", "consumer@example.test", "none", """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='w' jid='consumer@example.test' subscription='none'/>
      </event></message>
"""),
            publish("w", "i2", []),
            subscribe("w", CONSUMER, "x", stanza_id="back").split("<<<")[0] +
            error(CONSUMER, "back", "cancel", "not-allowed", pubsub_error("closed-node")), """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='items'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='w'/></pubsub></iq>
""" + error(CONSUMER, "items", "cancel", "not-allowed", pubsub_error("closed-node")))

    async def test_demoted_member_stops_receiving_on_authorize_too(self) -> None:
        await self.talk(
            create_topic("t"), set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            set_affiliation("t", "consumer@example.test", "none", """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='none'/>
      </event></message>
"""),
            publish("t", "i", []),
            subscribe("t", CONSUMER, "pending", stanza_id="again"),
            approval_request(subid="*"))

    async def test_outcast_is_cut_off_on_any_model(self) -> None:
        await self.talk(
            create_topic("t"), set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            set_affiliation("t", "consumer@example.test", "outcast", """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='t' jid='consumer@example.test' subscription='none'/>
      </event></message>
"""),
            publish("t", "i", []),
            subscribe("t", CONSUMER, "x", stanza_id="s2").split("<<<")[0] +
            error(CONSUMER, "s2", "auth", "forbidden"))

    async def test_unsubscribe_with_subids_and_errors(self) -> None:
        await self.talk(
            create_topic("t"), set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed").replace("subid='*'", "subid='$subid'"), """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='u0'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <unsubscribe node='t' jid='consumer@example.test' subid='wrong'/></pubsub></iq>
""" + error(CONSUMER, "u0", "modify", "not-acceptable", pubsub_error("invalid-subid")) + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='u1'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <unsubscribe node='t' jid='consumer@example.test' subid='$subid'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='u1'/>
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='u2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <unsubscribe node='t' jid='consumer@example.test'/></pubsub></iq>
""" + error(CONSUMER, "u2", "cancel", "unexpected-request", pubsub_error("not-subscribed")),
            publish("t", "i", []))

    async def test_subscription_options_and_own_lists(self) -> None:
        await self.talk(
            create_topic("t"), set_affiliation("t", "consumer@example.test", "member"), """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscribe node='t' jid='consumer@example.test'/>
        <options><x xmlns='jabber:x:data' type='submit'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>
          <field var='pubsub#deliver'><value>0</value></field></x></options>
      </pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscription node='t' jid='consumer@example.test' subid='$subid'
                      subscription='subscribed'/></pubsub></iq>
""", publish("t", "quiet", []), """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='o'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <options node='t' jid='consumer@example.test'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='o'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <options node='t' jid='consumer@example.test' subid='$subid'>
          <x xmlns='jabber:x:data' type='form'>
            <field var='FORM_TYPE' type='hidden'>
              <value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>
            <field var='pubsub#deliver' type='boolean' label='*'><value>0</value></field>
          </x></options></pubsub></iq>
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='o2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <options node='t' jid='consumer@example.test'>
          <x xmlns='jabber:x:data' type='submit'>
            <field var='FORM_TYPE' type='hidden'>
              <value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>
            <field var='pubsub#deliver'><value>1</value></field></x></options></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='o2'/>
""", publish("t", "loud", ["consumer@example.test"]), """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='mine'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscriptions/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='mine'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscriptions>
        <subscription node='t' jid='consumer@example.test' subid='$subid'
                      subscription='subscribed'/></subscriptions></pubsub></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='affs'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><affiliations/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='affs'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><affiliations>
        <affiliation node='t' affiliation='member'/></affiliations></pubsub></iq>
""")

    async def test_send_last_published_item_on_subscription(self) -> None:
        await self.talk(
            create_topic("t", extra="<field var='pubsub#send_last_published_item'>"
                                     "<value>on_sub</value></field>"),
            publish("t", "one", []), publish("t", "two", []),
            set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"), f"""
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='t'><item id='two'>{IODEF}</item></items></event></message>
""")


class PublishTests(BrokerTestCase):
    async def test_rfc8600_publish_reaches_every_subscriber(self) -> None:
        others = [f"c{i}@example.test" for i in range(5)]
        await self.talk(create_topic("MILEHost", "whitelist"),
                        *[set_affiliation("MILEHost", j, "member") for j in others],
                        *[subscribe("MILEHost", j + "/r", "subscribed", stanza_id=j)
                          for j in others],
                        publish("MILEHost", "8bh1g27skbga47fh9wk7", others))

    async def test_the_result_follows_the_notifications_when_the_commit_is_quicker(self) -> None:
        """A commit done before the delivery task's next step (a quick database, a busy
        reactor) must not let the result out first: the publisher's next publish, through
        another instance, would then reach a subscriber before this one."""
        subscriber = "c0@example.test"
        await self.talk(create_topic("t", "whitelist"),
                        set_affiliation("t", subscriber, "member"),
                        subscribe("t", subscriber + "/r", "subscribed"))
        self.broker.store.apply = lambda changes: defer.succeed(None)  # committed at once
        await self.send(parse_stanza(publish("t", "i0", []).split("<<<")[0].split(">>>")[1]))
        assert [(e.tag.split("}")[1], e.get("to")) for e in self.router.take()] == [
            ("message", subscriber), ("iq", PROVIDER)]

    async def test_publish_without_id_gets_one(self) -> None:
        await self.talk(create_topic("t"), f"""
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='p'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='t'><item>{IODEF}</item></publish></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='p'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='t'><item id='$generated'/></publish></pubsub></iq>
""")
        assert list(self.broker.engine.nodes["t"].items) == [self.matcher.captured["generated"]]

    async def test_publishing_where_one_may_not(self) -> None:
        stranger = "stranger@example.test/s"
        await self.talk(create_topic("t"),
                        publish("t", "x", [], sender=stranger).split("<<<")[0] +
                        error(stranger, "pub-x", "auth", "forbidden"),
                        set_affiliation("t", "consumer@example.test", "member"),
                        publish("t", "y", [], sender=CONSUMER).split("<<<")[0] +
                        error(CONSUMER, "pub-y", "auth", "forbidden"),
                        set_affiliation("t", "consumer@example.test", "publish-only"),
                        publish("t", "z", [], sender=CONSUMER),
                        publish("nosuch", "q", []).split("<<<")[0] +
                        error(PROVIDER, "pub-q", "cancel", "item-not-found"))

    async def test_wrong_namespace_multiple_payloads_and_oversized_items(self) -> None:
        await self.talk(
            create_topic("t"),
            publish("t", "ns", [], payload="<x xmlns='urn:other'/>").split("<<<")[0] +
            error(PROVIDER, "pub-ns", "modify", "bad-request", pubsub_error("invalid-payload"),
                  text=True),
            publish("t", "two", [], payload=IODEF + IODEF).split("<<<")[0] +
            error(PROVIDER, "pub-two", "modify", "bad-request",
                  pubsub_error("invalid-payload"), text=True),
            publish("t", "none", [], payload="").split("<<<")[0] +
            error(PROVIDER, "pub-none", "modify", "bad-request",
                  pubsub_error("payload-required")),
            publish("t", "big", [], payload=IODEF.replace(
                "492382", "9" * 300_000)).split("<<<")[0] +
            error(PROVIDER, "pub-big", "modify", "not-acceptable",
                  pubsub_error("payload-too-big"), text=True),
            publish("t", "fine", []))
        assert list(self.broker.engine.nodes["t"].items) == ["fine"]

    async def test_publish_options_preconditions(self) -> None:
        def with_options(stanza_id: str, field: str) -> str:
            return f"""
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='{stanza_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='t'><item id='{stanza_id}'>{IODEF}</item></publish>
        <publish-options><x xmlns='jabber:x:data' type='submit'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#publish-options</value></field>
          {field}</x></publish-options></pubsub></iq>
"""
        await self.talk(
            create_topic("t"),
            with_options("ok", "<field var='pubsub#access_model'><value>authorize</value>"
                               "</field><field var='pubsub#persist_items'><value>true</value>"
                               "</field>"),
            """<<< <iq type='result' from='broker.example.test' to='provider@example.test/p'
                 id='ok'><pubsub xmlns='http://jabber.org/protocol/pubsub'>
                 <publish node='t'><item id='ok'/></publish></pubsub></iq>""",
            with_options("no", "<field var='pubsub#access_model'><value>whitelist</value>"
                               "</field>"),
            error(PROVIDER, "no", "cancel", "conflict", pubsub_error("precondition-not-met")),
            with_options("unk", "<field var='pubsub#bogus'><value>1</value></field>"),
            error(PROVIDER, "unk", "modify", "not-acceptable", text=True))

    async def test_retract_with_notify_and_max_items(self) -> None:
        await self.talk(
            create_topic("t", extra="<field var='pubsub#max_items'><value>2</value></field>"),
            set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            publish("t", "a", ["consumer@example.test"]),
            publish("t", "b", ["consumer@example.test"]),
            publish("t", "c", ["consumer@example.test"]), """
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='r'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <retract node='t' notify='true'><item id='b'/></retract></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='r'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='t'><retract id='b'/></items></event></message>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='r2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <retract node='t'><item id='a'/></retract></pubsub></iq>
""" + error(PROVIDER, "r2", "cancel", "item-not-found") + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='r3'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <retract node='t'><item id='c'/></retract></pubsub></iq>
""" + error(CONSUMER, "r3", "auth", "forbidden"))
        assert list(self.broker.engine.nodes["t"].items) == ["c"]

    async def test_never_cached_topic_sends_headlines(self) -> None:
        await self.talk(
            create_topic("t", extra="<field var='pubsub#notification_type'>"
                                    "<value>headline</value></field>"),
            set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            publish("t", "h", ["consumer@example.test"], kind="headline"))

    async def test_deliver_payloads_off_sends_bare_notifications(self) -> None:
        await self.talk(
            create_topic("t", extra="<field var='pubsub#deliver_payloads'><value>0</value>"
                                    "</field>"),
            set_affiliation("t", "consumer@example.test", "member"),
            subscribe("t", CONSUMER, "subscribed"),
            publish("t", "p", []), """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='t'><item id='p'/></items></event></message>
""")

    async def test_audit_records_metadata_not_payload(self) -> None:
        await self.talk(create_topic("t"), publish("t", "secret", []))
        entry = self.audit()[-1]
        assert entry["event"] == "publish" and entry["item"] == "secret"
        assert entry["namespace"] == IODEF_NS and entry["actor"] == "provider@example.test"
        assert "492382" not in (self.directory / "audit.jsonl").read_text()


class ItemsRetrievalTests(BrokerTestCase):
    async def test_all_latest_by_id_and_paged(self) -> None:
        await self.talk(create_topic("t"),
                        *[publish("t", f"i{n}", [], payload=f"<n xmlns='{IODEF_NS}'>{n}</n>")
                          for n in range(5)],
                        set_affiliation("t", "consumer@example.test", "member"))

        def items(xml: str) -> str:
            return f"""
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>{xml}</pubsub></iq>
"""

        def result(ids: list[int], rsm: str = "") -> str:
            body = "".join(f"<item id='i{n}'><n xmlns='{IODEF_NS}'>{n}</n></item>"
                           for n in ids)
            return f"""
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='t'>{body}</items>{rsm}
      </pubsub></iq>
"""
        rsm = "<set xmlns='http://jabber.org/protocol/rsm'>"
        await self.talk(
            items("<items node='t'/>"), result([0, 1, 2, 3, 4]),
            items("<items node='t' max_items='2'/>"), result([3, 4]),
            items("<items node='t'><item id='i1'/><item id='gone'/></items>"), result([1]),
            items(f"<items node='t'/>{rsm}<max>2</max></set>"),
            result([0, 1], f"{rsm}<first index='0'>i0</first><last>i1</last>"
                           "<count>5</count></set>"),
            items(f"<items node='t'/>{rsm}<max>2</max><after>i1</after></set>"),
            result([2, 3], f"{rsm}<first index='2'>i2</first><last>i3</last>"
                           "<count>5</count></set>"),
            items("<items node='t' max_items='x'/>"),
            error(CONSUMER, "g", "modify", "bad-request", text=True))

    async def test_retrieval_page_is_capped(self) -> None:
        await self.restart(dataclasses.replace(self.config, items_page_max=2))
        await self.talk(create_topic("t"),
                        *[publish("t", f"i{n}", []) for n in range(3)], """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='t'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='t'>
        <item id='i0'>*</item><item id='i1'>*</item></items>
        <set xmlns='http://jabber.org/protocol/rsm'>
          <first index='0'>i0</first><last>i1</last><count>3</count></set>
      </pubsub></iq>
""".replace("<item id='i0'>*</item><item id='i1'>*</item>",
            f"<item id='i0'>{IODEF}</item><item id='i1'>{IODEF}</item>"))


class OwnerManagementTests(BrokerTestCase):
    async def test_affiliations_list_and_last_owner(self) -> None:
        await self.talk(create_topic("t"),
                        set_affiliation("t", "consumer@example.test", "publisher"), """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='l'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='t'/>
      </pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='l'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='t'>
        <affiliation jid='consumer@example.test' affiliation='publisher'/>
        <affiliation jid='provider@example.test' affiliation='owner'/>
      </affiliations></pubsub></iq>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='x'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='t'>
        <affiliation jid='provider@example.test' affiliation='none'/></affiliations>
      </pubsub></iq>
""" + error(PROVIDER, "x", "modify", "not-acceptable", text=True) + """
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='y'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='t'>
        <affiliation jid='a@example.test' affiliation='emperor'/></affiliations>
      </pubsub></iq>
""" + error(PROVIDER, "y", "modify", "not-acceptable", text=True) + """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='z'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><affiliations node='t'/>
      </pubsub></iq>
""" + error(CONSUMER, "z", "auth", "forbidden"))


class HostileInputTests(BrokerTestCase):
    async def test_unknown_and_malformed_requests(self) -> None:
        await self.talk("""
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='a'>
      <query xmlns='jabber:iq:version'/></iq>
""" + error(CONSUMER, "a", "cancel", "service-unavailable") + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='b'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'/></iq>
""" + error(CONSUMER, "b", "modify", "bad-request", text=True) + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='c'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><frobnicate node='x'/></pubsub></iq>
""" + error(CONSUMER, "c", "cancel", "feature-not-implemented",
            pubsub_error("unsupported", "frobnicate")) + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='d'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='x' jid='c@e'/>
        <publish node='x'/></pubsub></iq>
""" + error(CONSUMER, "d", "modify", "bad-request", text=True) + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='e'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure/></pubsub></iq>
""" + error(CONSUMER, "e", "modify", "bad-request", pubsub_error("nodeid-required")) + """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='f'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='x'/></pubsub></iq>
""" + error(CONSUMER, "f", "modify", "bad-request", pubsub_error("item-required"),
            text=True) + """
>>> <iq type='result' from='consumer@example.test/c' to='broker.example.test' id='g'/>
>>> <message from='consumer@example.test/c' to='broker.example.test'><body>hi</body>
    </message>
>>> <presence from='consumer@example.test/c' to='broker.example.test'/>
""")

    async def test_roles_decide_who_creates_publishes_subscribes(self) -> None:
        config = dataclasses.replace(self.config, default_operations=["subscribe"], roles={
            "providers": RoleConfig(platforms=["provider@example.test"],
                                    operations=["create", "publish", "subscribe"]),
            "sensors": RoleConfig(platforms=["*@sensors.example.test"],
                                  operations=["publish"]),
        })
        await self.restart(config)
        sensor = "s1@sensors.example.test/x"
        await self.talk(create_topic("t"),
                        create_topic("u", sender=CONSUMER).split("<<<")[0] +
                        error(CONSUMER, "create-u", "auth", "forbidden", text=True),
                        set_affiliation("t", "s1@sensors.example.test", "publisher"),
                        publish("t", "ok", [], sender=sensor),
                        subscribe("t", sensor, "x").split("<<<")[0] +
                        error(sensor, "sub", "auth", "forbidden", text=True),
                        subscribe("t", CONSUMER, "pending", stanza_id="c"),
                        approval_request(subid="*"))

    async def test_rate_limits_refuse_and_alert_once(self) -> None:
        config = dataclasses.replace(self.config, rate_limits=RateLimitConfig(
            publishes_per_second=1.0, publish_burst=2))
        await self.restart(config)
        events: list[dict] = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.talk(create_topic("t"), publish("t", "a", []), publish("t", "b", []),
                        publish("t", "c", []).split("<<<")[0] +
                        error(PROVIDER, "pub-c", "wait", "policy-violation", text=True),
                        publish("t", "d", []).split("<<<")[0] +
                        error(PROVIDER, "pub-d", "wait", "policy-violation", text=True))
        alerts = [e for e in events if e.get("alert") == "rate-limit"]
        assert len(alerts) == 1 and alerts[0]["platform"] == "provider@example.test"
        self.now += 1.0  # the engine's rate limits use their own monotonic clock
        self.broker.engine.rate_limits._clock = lambda: 1e12
        await self.talk(publish("t", "e", []))

    async def test_revoked_platform_is_cut_off_and_stays_cut_off(self) -> None:
        await self.talk(create_topic("t"),
                        set_affiliation("t", "consumer@example.test", "member"),
                        subscribe("t", CONSUMER, "subscribed"))
        await self.revoke("consumer@example.test")
        await self.talk(publish("t", "i", []))
        await self.restart()
        await self.talk(publish("t", "j", []),
                        subscribe("t", CONSUMER, "x", stanza_id="back").split("<<<")[0] +
                        error(CONSUMER, "back", "auth", "forbidden", text=True))
        assert self.audit()[-1]["refused"]
        assert [e["event"] for e in self.audit()].count("revoke") == 1  # not again at restart

    async def test_storage_failure_is_internal_server_error_not_a_false_ack(self) -> None:
        await self.talk(create_topic("t"))

        def broken(changes):
            from twisted.internet import defer
            return defer.fail(OSError("disk full"))

        self.broker.store.apply = broken
        await self.talk(publish("t", "lost", []).split("<<<")[0] +
                        error(PROVIDER, "pub-lost", "wait", "internal-server-error"))
        self.flushLoggedErrors(OSError)


class RestartTests(BrokerTestCase):
    async def test_everything_survives_a_restart(self) -> None:
        await self.talk(create_topic("t"),
                        set_affiliation("t", "consumer@example.test", "member"),
                        subscribe("t", CONSUMER, "subscribed"),
                        subscribe("t", "other@example.test/o", "pending", stanza_id="o"),
                        approval_request(subscriber="other@example.test", subid="*"),
                        publish("t", "kept", ["consumer@example.test"]))
        self.router.take()
        before = self.broker.engine.nodes["t"]
        await self.restart()
        after = self.broker.engine.nodes["t"]
        assert after.config == before.config
        assert after.affiliations == before.affiliations
        assert [(s.jid, s.state, s.subid) for s in after.subscriptions.values()] == \
            [(s.jid, s.state, s.subid) for s in before.subscriptions.values()]
        assert list(after.items) == ["kept"]
        await self.talk(publish("t", "next", ["consumer@example.test"]))


class PayloadValidationTests(BrokerTestCase):
    config = BrokerConfig(validate_iodef=True)

    async def test_invalid_iodef_is_refused_when_validation_is_on(self) -> None:
        broken = IODEF.replace('purpose="reporting"', 'purpose="gossip"')
        await self.talk(create_topic("t"),
                        publish("t", "bad", [], payload=broken).split("<<<")[0] +
                        error(PROVIDER, "pub-bad", "modify", "bad-request",
                              pubsub_error("invalid-payload"), text=True),
                        publish("t", "good", []))


class MoreUseCaseTests(BrokerTestCase):
    async def test_disco_items_of_a_topic_and_non_persistent_topics(self) -> None:
        await self.talk(
            create_topic("t"), publish("t", "a", []), publish("t", "b", []), """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='di'>
      <query xmlns='http://jabber.org/protocol/disco#items' node='t'/></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='di'>
      <query xmlns='http://jabber.org/protocol/disco#items' node='t'>
        <item jid='broker.example.test' name='a'/><item jid='broker.example.test' name='b'/>
      </query></iq>
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='dc'>
      <query xmlns='http://jabber.org/protocol/disco#items' node='t'/></iq>
""" + error(CONSUMER, "dc", "auth", "not-authorized", pubsub_error("not-subscribed")),
            create_topic("volatile", extra="<field var='pubsub#persist_items'><value>0</value>"
                                           "</field>"),
            publish("volatile", "gone", []), """
>>> <iq type='get' from='provider@example.test/p' to='broker.example.test' id='v'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='volatile'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='v'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='volatile'/></pubsub></iq>
""")

    async def test_operator_admin_manages_every_topic(self) -> None:
        await self.restart(dataclasses.replace(self.config, admins=["root@example.test"]))
        admin = "root@example.test/console"
        await self.talk(create_topic("t"), f"""
>>> <iq type='set' from='{admin}' to='broker.example.test' id='d'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='t'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='{admin}' id='d'/>
""")

    async def test_subscribing_a_full_jid_delivers_to_that_resource(self) -> None:
        await self.talk(create_topic("t"),
                        set_affiliation("t", "consumer@example.test", "member"), """
>>> <iq type='set' from='consumer@example.test/c' to='broker.example.test' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscribe node='t' jid='consumer@example.test/c'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscription node='t' jid='consumer@example.test/c' subid='*'
                      subscription='subscribed'/></pubsub></iq>
""", publish("t", "i", ["consumer@example.test/c"]))


class RobustnessTests(BrokerTestCase):
    async def test_a_bug_costs_one_request_and_the_broker_keeps_serving(self) -> None:
        await self.talk(create_topic("t"))
        handle = self.broker.engine.handle

        def broken(request):
            if request.verb == "publish":
                raise RuntimeError("simulated bug")
            return handle(request)

        self.broker.engine.handle = broken
        await self.talk(publish("t", "x", []).split("<<<")[0] +
                        error(PROVIDER, "pub-x", "wait", "internal-server-error"))
        self.flushLoggedErrors(RuntimeError)
        self.broker.engine.handle = handle
        await self.talk(publish("t", "y", []))


class RevocationWhileDownTests(BrokerTestCase):
    async def test_a_platform_revoked_while_the_broker_was_down_is_cut_off_at_start(self) -> None:
        await self.talk(create_topic("t"),
                        set_affiliation("t", "consumer@example.test", "member"),
                        subscribe("t", CONSUMER, "subscribed"),
                        subscribe("t", "other@example.test/o", "pending", stanza_id="o"),
                        approval_request(subscriber="other@example.test", subid="*"))
        await self.revoke("consumer@example.test", tell_the_broker=False)
        await self.restart()
        assert "consumer@example.test" in self.broker.engine.revoked
        node = self.broker.engine.nodes["t"]
        assert node.of_platform("consumer@example.test") == []
        assert "consumer@example.test" not in node.affiliations
        stored = await self.broker.store.load()
        assert [s.jid for s in stored.subscriptions] == ["other@example.test"]
        assert [a.jid for a in stored.affiliations] == ["provider@example.test"]
        assert [e["jid"] for e in self.audit() if e["event"] == "revoke"] == [
            "consumer@example.test"]
        await self.talk(publish("t", "after", []),
                        subscribe("t", CONSUMER, "x", stanza_id="back").split("<<<")[0] +
                        error(CONSUMER, "back", "auth", "forbidden", text=True))
        await self.restart()  # carried out once: nothing more to remove, nothing audited
        assert [e["event"] for e in self.audit()].count("revoke") == 1
