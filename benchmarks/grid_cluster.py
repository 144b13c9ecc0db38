"""How fast two broker instances on one PostgreSQL agree; prints JSON.

    .venv/bin/python benchmarks/grid_cluster.py [--publishes 500] [--database URL]

Two `PubSubBroker`s in this process on a fresh schema (dropped afterwards), with a router
that discards what they send. Instance A handles publishes one at a time; for each, the time
from A's reply (the commit done) to B having applied the item is recorded (p50, p99, max),
then publishes per second on A with B listening against A alone on another schema: the cost
of announcing the changes.

    .venv/bin/python benchmarks/grid_cluster.py --handover 1000 [--items 5]

The hand-over of shape 2 instead: two grid routers on one schema, process B holding
`--handover` available sessions and process A none. Each of `--items` notifications is fanned
out on A in chunks of 64 (as the broker's delivery does), stored in the shared offline table
and taken by B, which hands it to its sessions. Recorded: the time until B's sessions have
every copy, copies per second, and the transactions each side ran.
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
from sixnet.grid.jid import parse_jid
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.router import Router
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.storage.schema import prepare_grid

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


class Counted:
    """A session's connection that only counts what it is given."""

    received = 0

    def send_stanza(self, data: bytes) -> None:
        Counted.received += 1

    def close_with_error(self, condition: str, text: str = "") -> None:
        pass

    def drop(self) -> None:
        pass


def counting(db: Database) -> list[int]:
    """Count the transactions `db` runs."""
    count = [0]
    run = db.run

    def counted(*args: object, **kwargs: object) -> defer.Deferred:
        count[0] += 1
        return run(*args, **kwargs)  # type: ignore[arg-type]

    db.run = counted  # type: ignore[method-assign]
    return count


async def handover(reactor: object, args: argparse.Namespace) -> None:
    url, name = schema(args.database)
    try:
        db_a, db_b = Database(url), Database(url)
        await prepare_grid(db_a)
        users = [f"h{n}" for n in range(args.handover)]
        await db_a.run("accounts", lambda c: c.executemany(
            "INSERT INTO grid_accounts (username, kind, created) VALUES (?, 'password', '-')",
            [(u,) for u in users]))
        a = Router("example.test", OfflineStore(db_a, 10000), reactor)  # type: ignore[arg-type]
        b = Router("example.test", OfflineStore(db_b, 10000), reactor)  # type: ignore[arg-type]
        for router in (a, b):
            await router.offline.watch(router.relay_offline)
        for user in users:
            b.bind(Counted(), parse_jid(f"{user}@example.test"), "r").available = True
        recipients = [f"{u}@example.test" for u in users]
        on_a, on_b = counting(db_a), counting(db_b)
        started = time.monotonic()
        for item in range(args.items):
            message = etree.fromstring(
                f"<message xmlns='jabber:client' from='broker.example.test' id='m{item}'>"
                f"<event xmlns='http://jabber.org/protocol/pubsub#event'><items node='t'>"
                f"<item id='i{item}'><x xmlns='urn:bench'>{item}</x></item></items></event>"
                f"</message>")
            for start in range(0, len(recipients), 64):
                a.route_fanout(message, recipients[start:start + 64])
                await task.deferLater(reactor, 0, lambda: None)  # type: ignore[arg-type]
        expected = args.items * len(users)
        while Counted.received < expected and time.monotonic() - started < 120:
            await task.deferLater(reactor, 0.005, lambda: None)  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        await a.drain()
        await b.drain()
        print(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "remote_subscribers": len(users),
            "items": args.items, "copies_received_on_b": Counted.received,
            "seconds": round(elapsed, 3), "copies_per_s": round(Counted.received / elapsed),
            "transactions": {"a_storing": on_a[0], "b_taking": on_b[0]},
        }, indent=2))
        db_a.close()
        db_b.close()
    finally:
        drop(args.database, name)


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
    parser.add_argument("--handover", type=int, default=0,
                        help="measure the hand-over to this many remote subscribers instead")
    parser.add_argument("--items", type=int, default=5)
    options = parser.parse_args()
    run = handover if options.handover else main
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, options)))
