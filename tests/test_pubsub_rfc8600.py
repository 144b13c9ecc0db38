"""The RFC 8600 sections 5-6 workflow end to end: the grid server over loopback TLS, and
slixmpp's XEP-0060 plugin as the real client of Provider, Consumer and owner.

Run as ``python -m tests.test_pubsub_rfc8600 JSON`` this module is that client (in its own
process: slixmpp runs on asyncio): events are JSON lines on stdout, commands JSON lines on
stdin.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.support.iodef import IODEF, IODEF_NS

BROKER = "broker.localhost"


# -- the client (runs in the child process) ---------------------------------------------------


def client_main() -> None:  # pragma: no cover - runs in the slixmpp process
    import asyncio
    import logging
    import xml.etree.ElementTree as ET

    import slixmpp
    from slixmpp.exceptions import IqError, IqTimeout
    from slixmpp.xmlstream.handler import Callback
    from slixmpp.xmlstream.matcher import MatchXPath

    options = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    client = slixmpp.ClientXMPP(options["jid"], options["password"])
    client.ca_certs = options["ca"]
    client.enable_direct_tls = False
    for plugin in ("xep_0004", "xep_0030", "xep_0059", "xep_0060"):
        client.register_plugin(plugin)
    pubsub = client.plugin["xep_0060"]
    last_form: dict[str, Any] = {}

    def emit(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    def on_message(msg: Any) -> None:
        xml = msg.xml
        delay = xml.find("{urn:xmpp:delay}delay")
        stamp = delay.get("stamp") if delay is not None else None
        event = xml.find("{http://jabber.org/protocol/pubsub#event}event")
        if event is not None:
            for items in event.iter("{http://jabber.org/protocol/pubsub#event}items"):
                for item in items.iter("{http://jabber.org/protocol/pubsub#event}item"):
                    payload = list(item)
                    emit(event="item", node=items.get("node"), id=item.get("id"),
                         type=xml.get("type"), delay=stamp,
                         payload=payload[0].tag if payload else None)
            for sub in event.iter("{http://jabber.org/protocol/pubsub#event}subscription"):
                emit(event="subscription", node=sub.get("node"), jid=sub.get("jid"),
                     state=sub.get("subscription"))
            return
        form = xml.find("{jabber:x:data}x")
        if form is not None:
            values = {f.get("var"): f.findtext("{jabber:x:data}value")
                      for f in form.iter("{jabber:x:data}field")}
            last_form.update(values)
            emit(event="authorization", node=values.get("pubsub#node"),
                 subscriber=values.get("pubsub#subscriber_jid"))

    client.register_handler(Callback("messages", MatchXPath("{jabber:client}message"),
                                     on_message))

    async def run(cmd: dict[str, Any]) -> None:
        op = cmd["op"]
        try:
            if op == "create":
                form = client.plugin["xep_0004"].make_form(ftype="submit")
                form.add_field(var="pubsub#access_model", value=cmd["access"])
                form.add_field(var="pubsub#type", value=IODEF_NS)
                form.add_field(var="pubsub#persist_items", value="1")
                form.add_field(var="pubsub#send_last_published_item", value="never")
                await pubsub.create_node(BROKER, cmd["node"], config=form)
                emit(event="created", node=cmd["node"])
            elif op == "discover":
                iq = client.Iq(stype="get", sto=BROKER)
                iq["disco_items"]["node"] = ""
                nodes, pages = [], 0
                async for page in client.plugin["xep_0059"].iterate(
                        iq, "disco_items", amount=cmd["page"]):
                    pages += 1
                    nodes += [node for _, node, _ in page["disco_items"]["items"]]
                emit(event="topics", nodes=nodes, pages=pages)
            elif op == "info":
                info = await client.plugin["xep_0030"].get_info(jid=BROKER, node=cmd["node"])
                query = info["disco_info"]
                form = query.xml.find("{jabber:x:data}x")
                values = {f.get("var"): f.findtext("{jabber:x:data}value")
                          for f in form.iter("{jabber:x:data}field")}
                emit(event="info", node=cmd["node"], type=values.get("pubsub#type"),
                     identities=[list(i[:2]) for i in query["identities"]])
            elif op == "subscribe":
                result = await pubsub.subscribe(BROKER, cmd["node"])
                emit(event="subscribed", node=cmd["node"],
                     state=result["pubsub"]["subscription"]["subscription"])
            elif op == "publish":
                await pubsub.publish(BROKER, cmd["node"], id=cmd["id"],
                                     payload=ET.fromstring(cmd.get("payload", IODEF)))
                emit(event="published", node=cmd["node"], id=cmd["id"])
            elif op == "decide":
                form = client.plugin["xep_0004"].make_form(ftype="submit")
                form.add_field(var="FORM_TYPE", ftype="hidden",
                               value="http://jabber.org/protocol/pubsub#subscribe_authorization")
                for var in ("pubsub#subid", "pubsub#node", "pubsub#subscriber_jid"):
                    form.add_field(var=var, value=last_form[var])
                form.add_field(var="pubsub#allow", value="1" if cmd["allow"] else "0")
                message = client.Message(sto=BROKER)
                message.append(form)
                message.send()
                emit(event="decided")
            elif op == "affiliate":
                await pubsub.modify_affiliations(BROKER, cmd["node"],
                                                 [(cmd["jid"], cmd["affiliation"])])
                emit(event="affiliated", jid=cmd["jid"])
            elif op == "quit":
                client.disconnect()
        except IqError as e:
            emit(event="error", op=op, condition=e.iq["error"]["condition"])
        except IqTimeout:
            emit(event="error", op=op, condition="timeout")

    def on_session(_: Any) -> None:
        client.send_presence()
        emit(event="session", jid=str(client.boundjid))

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await client.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            await run(json.loads(line))

    client.add_event_handler("session_start", on_session)
    client.add_event_handler("disconnected", lambda _: client.loop.call_soon(client.loop.stop))
    # Keep a reference to the task, or the event loop may collect it while it waits.
    tasks = [client.loop.create_task(commands())]
    client.connect(host="127.0.0.1", port=options["port"])
    client.loop.run_forever()
    tasks.clear()


if __name__ == "__main__":  # pragma: no cover
    client_main()
    sys.exit(0)


# -- the tests ---------------------------------------------------------------------------------

import pytest  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.trial import unittest  # noqa: E402

from tests.grid_harness import SlixClient, ports, start_grid, write_config  # noqa: E402
from tests.support.waiting import pause  # noqa: E402

ROOT = Path(__file__).parent.parent


class PubSubClient(SlixClient):
    @classmethod
    def spawn(cls, **options: Any) -> PubSubClient:
        client = cls()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        reactor.spawnProcess(client, sys.executable,
                             [sys.executable, "-m", "tests.test_pubsub_rfc8600",
                              json.dumps(options)], env=env, path=str(ROOT))
        return client


class RFC8600WorkflowTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def start(self) -> None:
        self.grid = await start_grid(self.config)
        self.port, _ = ports(self.grid)

    async def stop(self) -> None:
        if self.grid.running:
            await self.grid.stopService()

    async def login(self, name: str) -> PubSubClient:
        client = PubSubClient.spawn(jid=f"{name}@localhost", password=f"{name} secret",
                                    port=self.port, ca=str(self.pki.root.directory / "ca.pem"))
        self.addCleanup(client.stop)
        await client.expect("session")
        await pause(0.2)  # initial presence routed
        return client

    async def test_sections_5_and_6(self) -> None:
        self.config = write_config(self.tmp, self.pki)
        await self.start()
        self.addCleanup(self.stop)
        for name in ("provider", "consumer", "outsider"):
            await self.grid.accounts.add(name, f"{name} secret")
        provider = await self.login("provider")
        consumer = await self.login("consumer")

        # The Provider creates topics with the authorize model, and one whitelist topic.
        for node in ("MILEHost", "NEA1", "Extra1", "Extra2", "Extra3"):
            provider.command(op="create", node=node, access="authorize")
            await provider.expect("created", node=node)
        provider.command(op="create", node="Closed", access="whitelist")
        await provider.expect("created", node="Closed")

        # The Consumer discovers the topics, two a page, and the payload type of one.
        consumer.command(op="discover", page=2)
        topics = await consumer.expect("topics")
        assert sorted(topics["nodes"]) == sorted(
            ["MILEHost", "NEA1", "Extra1", "Extra2", "Extra3", "Closed"])
        assert topics["pages"] >= 3
        consumer.command(op="info", node="MILEHost")
        info = await consumer.expect("info")
        assert info["type"] == IODEF_NS and ["pubsub", "leaf"] in info["identities"]

        # Subscribe: pending; the owner approves; the Consumer is told.
        consumer.command(op="subscribe", node="MILEHost")
        assert (await consumer.expect("subscribed"))["state"] == "pending"
        request = await provider.expect("authorization")
        assert request["subscriber"] == "consumer@localhost"
        provider.command(op="decide", allow=True)
        await consumer.expect("subscription", state="subscribed", node="MILEHost")

        # Publish the RFC 8600 IODEF example: the Consumer receives it.
        provider.command(op="publish", node="MILEHost", id="8bh1g27skbga47fh9wk7")
        await provider.expect("published")
        item = await consumer.expect("item", id="8bh1g27skbga47fh9wk7")
        assert item["payload"] == f"{{{IODEF_NS}}}IODEF-Document"
        assert item["type"] == "normal" and item["delay"] is None

        # A platform not on a whitelist is refused.
        outsider = await self.login("outsider")
        outsider.command(op="subscribe", node="Closed")
        assert (await outsider.expect("error"))["condition"] == "not-allowed"

        # The Consumer goes offline; a publish; the server restarts; nothing is lost.
        consumer.command(op="quit")
        await consumer.ended
        await pause(0.3)
        provider.command(op="publish", node="MILEHost", id="while-offline")
        await provider.expect("published")
        await provider.stop()
        await outsider.stop()
        await self.stop()
        await self.start()
        consumer = await self.login("consumer")
        late = await consumer.expect("item", id="while-offline")
        assert late["delay"] is not None

        # A revoked platform is cut off: no more items, its requests refused.
        await self.grid.broker.revoke("consumer@localhost")
        provider = await self.login("provider")
        provider.command(op="publish", node="MILEHost", id="after-revocation")
        await provider.expect("published")
        consumer.command(op="subscribe", node="MILEHost")
        assert (await consumer.expect("error", op="subscribe"))["condition"] == "forbidden"
        await pause(0.3)
        assert not [e for e in consumer.events
                    if e.get("event") == "item" and e["id"] == "after-revocation"]
