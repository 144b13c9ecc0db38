"""Conversation scripts against the live grid server over real sockets (STARTTLS, SCRAM).

The same literal-XML runner as `test_pubsub_conversations`, but each ``>>>`` stanza is written
to the socket of the client named in its 'from', and ``<<<`` stanzas are whatever any client's
socket received, parsed from the stream.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.trial import unittest

from tests.grid_harness import RawClient, ports, start_grid, write_config
from tests.support.conversation import run_conversation
from tests.support.iodef import IODEF, IODEF_NS
from tests.support.pubsub import (
    create_topic,
    error,
    publish,
    pubsub_error,
    set_affiliation,
    subscribe,
)
from tests.support.waiting import pause, wait_for

OWNER = "owner@localhost/desk"
READER = "reader@localhost/desk"
#: Time allowed, once the expected answers are in, for an unexpected extra one to show.
SETTLE = 0.15


class StreamReader:
    """Parses a client's received bytes into top-level stanzas."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.offset = len(client.received)
        self.parser = etree.XMLPullParser(events=("end",), resolve_entities=False,
                                          no_network=True)
        self.parser.feed(b"<stream:stream xmlns='jabber:client' "
                         b"xmlns:stream='http://etherx.jabber.org/streams'>")

    def stanzas(self) -> list[etree._Element]:
        data = self.client.received[self.offset:]
        self.offset = len(self.client.received)
        self.parser.feed(data)
        found = []
        for _, element in self.parser.read_events():
            parent = element.getparent()
            if parent is not None and parent.getparent() is None:
                found.append(element)
        return found


class LiveConversationTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def asyncSetUp(self) -> None:
        self.config = write_config(self.tmp, self.pki)
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, _ = ports(self.grid)
        self.clients: dict[str, RawClient] = {}
        self.readers: list[StreamReader] = []
        self.pending: list[etree._Element] = []
        for jid in (OWNER, READER, "provider@localhost/p", "consumer@localhost/c"):
            user, resource = jid.split("@")[0], jid.split("/")[1]
            await self.grid.accounts.add(user, f"{user} secret")
            client = await RawClient.connect(self.port)
            self.addCleanup(lambda c=client: c.transport.abortConnection())
            await client.starttls(self.grid.tls.store)
            await client.open_stream()
            assert b"<success" in await client.scram_login(user, f"{user} secret")
            assert await client.bind(resource) == jid
            client.send("<presence/>")
            self.clients[jid] = client
        await pause(SETTLE)
        for client in self.clients.values():
            self.readers.append(StreamReader(client))

    async def send(self, stanza: etree._Element, expected: int) -> None:
        """Send, wait until `expected` stanzas arrived (10 s at most), then a quiet spell."""
        self.clients[stanza.get("from")].send(etree.tostring(stanza))

        def arrived() -> bool:
            self.pending += [s for reader in self.readers for s in reader.stanzas()]
            return len(self.pending) >= expected

        with contextlib.suppress(AssertionError):  # too few: the conversation shows which
            await wait_for(arrived, timeout=10, interval=0.02)
        await pause(SETTLE)

    def collect(self) -> list[etree._Element]:
        arrived = self.pending + [s for reader in self.readers for s in reader.stanzas()]
        self.pending = []
        return arrived

    async def talk(self, script: str) -> None:
        await run_conversation(script, self.send, self.collect)

    async def test_approval_publish_and_refusals_over_sockets(self) -> None:
        await self.asyncSetUp()
        await self.talk(f"""
>>> <iq type='set' from='{OWNER}' to='broker.localhost' id='c'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='MILEHost'/>
        <configure><x xmlns='jabber:x:data' type='submit'>
          <field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#node_config</value>
          </field>
          <field var='pubsub#type'><value>urn:ietf:params:xml:ns:iodef-2.0</value></field>
        </x></configure></pubsub></iq>
<<< <iq type='result' from='broker.localhost' to='{OWNER}' id='c'/>
>>> <iq type='set' from='{READER}' to='broker.localhost' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscribe node='MILEHost' jid='reader@localhost'/></pubsub></iq>
<<< <iq type='result' from='broker.localhost' to='{READER}' id='s'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscription node='MILEHost' jid='reader@localhost' subid='$subid'
                      subscription='pending'/></pubsub></iq>
<<< <message from='broker.localhost' to='owner@localhost' type='normal' id='*'>
      <x xmlns='jabber:x:data' type='form'><title>*</title>
        <field var='FORM_TYPE' type='hidden'>
          <value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>
        <field var='pubsub#subid' type='hidden'><value>$subid</value></field>
        <field var='pubsub#node' type='text-single' label='*'><value>MILEHost</value></field>
        <field var='pubsub#subscriber_jid' type='jid-single' label='*'>
          <value>reader@localhost</value></field>
        <field var='pubsub#allow' type='boolean' label='*'><value>false</value></field>
      </x></message>
>>> <message from='{OWNER}' to='broker.localhost'>
      <x xmlns='jabber:x:data' type='submit'>
        <field var='FORM_TYPE'>
          <value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>
        <field var='pubsub#subid'><value>$subid</value></field>
        <field var='pubsub#node'><value>MILEHost</value></field>
        <field var='pubsub#subscriber_jid'><value>reader@localhost</value></field>
        <field var='pubsub#allow'><value>true</value></field></x></message>
<<< <message from='broker.localhost' to='reader@localhost' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='MILEHost' jid='reader@localhost' subscription='subscribed'/>
      </event></message>
>>> <iq type='set' from='{OWNER}' to='broker.localhost' id='p'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='MILEHost'><item id='i1'>{IODEF}</item></publish></pubsub></iq>
<<< <iq type='result' from='broker.localhost' to='{OWNER}' id='p'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='MILEHost'><item id='i1'/></publish></pubsub></iq>
<<< <message from='broker.localhost' to='reader@localhost' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='MILEHost'><item id='i1'>{IODEF}</item></items></event></message>
>>> <iq type='set' from='{READER}' to='broker.localhost' id='p2'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='MILEHost'><item id='i2'>{IODEF}</item></publish></pubsub></iq>
""" + error(READER, "p2", "auth", "forbidden").replace("broker.example.test",
                                                        "broker.localhost") + f"""
>>> <iq type='set' from='{OWNER}' to='broker.localhost' id='p3'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='MILEHost'><item id='i3'><x xmlns='urn:wrong'/></item></publish>
      </pubsub></iq>
""" + error(OWNER, "p3", "modify", "bad-request", pubsub_error("invalid-payload"),
            text=True).replace("broker.example.test", "broker.localhost") + f"""
>>> <iq type='get' from='{READER}' to='broker.localhost' id='d'>
      <query xmlns='http://jabber.org/protocol/disco#items'/></iq>
<<< <iq type='result' from='broker.localhost' to='{READER}' id='d'>
      <query xmlns='http://jabber.org/protocol/disco#items'>
        <item jid='broker.localhost' node='MILEHost'/></query></iq>
""")

    async def test_in_memory_scripts_replayed_over_sockets(self) -> None:
        """Scripts of the in-memory conversation tests, addressed to the live server."""
        await self.asyncSetUp()
        c = "consumer@example.test"
        items = "".join(f"<item id='i{n}'><n xmlns='{IODEF_NS}'>{n}</n></item>"
                        for n in range(3))
        script = "\n".join([
            create_topic("w", "whitelist"),
            subscribe("w", "consumer@example.test/c", "x").split("<<<")[0] +
            error("consumer@example.test/c", "sub", "cancel", "not-allowed",
                  pubsub_error("closed-node")),
            set_affiliation("w", c, "member"),
            subscribe("w", "consumer@example.test/c", "subscribed", stanza_id="ok"),
            *[publish("w", f"i{n}", [c], payload=f"<n xmlns='{IODEF_NS}'>{n}</n>")
              for n in range(3)],
            """
>>> <iq type='get' from='consumer@example.test/c' to='broker.example.test' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='w'/>
        <set xmlns='http://jabber.org/protocol/rsm'><max>2</max><after>i0</after></set>
      </pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='consumer@example.test/c' id='g'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='w'>ITEMS</items>
        <set xmlns='http://jabber.org/protocol/rsm'><first index='1'>i1</first>
          <last>i2</last><count>3</count></set></pubsub></iq>
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='r'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <retract node='w' notify='1'><item id='i0'/></retract></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='r'/>
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='w'><retract id='i0'/></items></event></message>
""".replace("ITEMS", items.split("</item>", 1)[1]),
            set_affiliation("w", c, "none", """
<<< <message from='broker.example.test' to='consumer@example.test' type='normal' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <subscription node='w' jid='consumer@example.test' subscription='none'/>
      </event></message>
"""),
            publish("w", "i9", []),
            """
>>> <iq type='set' from='provider@example.test/p' to='broker.example.test' id='del'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><delete node='w'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='provider@example.test/p' id='del'/>
""",
            publish("w", "x", [], sender="consumer@example.test/c").split("<<<")[0] +
            error("consumer@example.test/c", "pub-x", "cancel", "item-not-found"),
        ])
        await self.talk(script.replace("example.test", "localhost"))
