"""How fast two broker instances on one PostgreSQL agree; prints JSON.

    .venv/bin/python benchmarks/grid_cluster.py [--publishes 500] [--database URL]

Two `PubSubBroker`s in this process on a fresh schema (dropped afterwards), with a router
that discards what they send. Instance A handles publishes one at a time; for each, the time
from A's reply (the commit done) to B having applied the item is recorded (p50, p99, max),
then publishes per second on A with B listening against A alone on another schema: the cost
of announcing the changes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from lxml import etree
from twisted.internet import defer, task
from zope.interface import implementer

from sixnet.core.storage.database import Database
from sixnet.grid.component import IRouter
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.storage.revocations import RevocationStore

PS = "http://jabber.org/protocol/pubsub"
OWNER = "owner@example.test/o"


@implementer(IRouter)
class Discard:
    domain = "example.test"

    def __init__(self) -> None:
        self.replies: dict[str, float] = {}

    def route(self, stanza: etree._Element) -> None:
        if stanza.get("id"):
            self.replies[stanza.get("id") or ""] = time.monotonic()

    def route_fanout(self, stanza: etree._Element, recipients: Sequence[str]) -> None:
        pass

    def is_available(self, jid: str) -> bool:
        return False


def schema(base: str) -> tuple[str, str]:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={name}')}", name


def drop(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def iq(stanza_id: str, body: str) -> etree._Element:
    return etree.fromstring(f"<iq xmlns='jabber:client' type='set' from='{OWNER}' "
                            f"to='broker.example.test' id='{stanza_id}'>"
                            f"<pubsub xmlns='{PS}'>{body}</pubsub></iq>")


async def broker(url: str, work: Path, name: str) -> tuple[PubSubBroker, Discard, Database]:
    database = Database(url)
    b = PubSubBroker(BrokerConfig(), "example.test", database, work / f"{name}.jsonl",
                     RevocationStore(database))
    router = Discard()
    b.attach(router)
    await b.idle()
    return b, router, database


async def publish_all(b: PubSubBroker, count: int, prefix: str) -> float:
    started = time.monotonic()
    for n in range(count):
        b.receive(iq(f"{prefix}{n}", f"<publish node='t'><item id='{prefix}{n}'>"
                                     f"<x xmlns='urn:bench'>{n}</x></item></publish>"))
        await b.idle()
    return count / (time.monotonic() - started)


async def main(reactor: object, args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp())
    url, name = schema(args.database)
    alone_url, alone_name = schema(args.database)
    try:
        a, router_a, db_a = await broker(url, work, "a")
        b, _, db_b = await broker(url, work, "b")
        applied: dict[str, float] = {}
        apply = b.engine.apply

        def recording(changes: list) -> list:
            result = apply(changes)
            now = time.monotonic()
            for change in changes:
                applied.setdefault(getattr(change, "item_id", ""), now)
            return result

        b.engine.apply = recording  # type: ignore[method-assign]
        a.receive(iq("c", "<create node='t'/>"))
        await a.idle()
        rate_two = await publish_all(a, args.publishes, "i")
        waited = 0.0
        while len([k for k in applied if k.startswith("i")]) < args.publishes and waited < 10:
            await task.deferLater(reactor, 0.01, lambda: None)
            waited += 0.01
        lags = sorted((applied[f"i{n}"] - router_a.replies[f"i{n}"]) * 1000
                      for n in range(args.publishes) if f"i{n}" in applied)
        alone, _, db_alone = await broker(alone_url, work, "alone")
        alone.receive(iq("c", "<create node='t'/>"))
        await alone.idle()
        rate_one = await publish_all(alone, args.publishes, "j")
        for x, db in ((a, db_a), (b, db_b), (alone, db_alone)):
            await x.stop()
            db.close()
        print(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "publishes": args.publishes,
            "applied_on_b": len(lags),
            "reply_to_applied_ms": {"p50": round(statistics.median(lags), 2),
                                    "p99": round(lags[int(len(lags) * 0.99) - 1], 2),
                                    "max": round(lags[-1], 2)},
            "publishes_per_s": {"two_instances": round(rate_two), "alone": round(rate_one),
                                "ratio": round(rate_two / rate_one, 2)},
        }, indent=2))
    finally:
        drop(args.database, name)
        drop(args.database, alone_name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=500)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/test")
    options = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
