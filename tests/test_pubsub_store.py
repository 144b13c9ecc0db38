"""The broker's store, the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from sixnet.core.storage.database import Database
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.pubsub.engine import PubSubEngine
from sixnet.grid.pubsub.request import PubSubRequest
from sixnet.grid.pubsub.store import SQLPubSubStore
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.storage.schema import BROKER_MIGRATIONS, GRID_MIGRATIONS

from .support.databases import postgres_schema_url, postgres_unavailable


class StoreTests:
    url: str

    def open_store(self) -> SQLPubSubStore:
        database = Database(self.url, base=self.base)
        store = SQLPubSubStore(database, RevocationStore(database))
        self.addCleanup(store.close)
        return store

    async def test_every_kind_of_change_round_trips(self) -> None:
        store = self.open_store()
        await store.open()
        await store.apply([
            ch.PutNode("n", '{"title": "T"}', "2026-01-01T00:00:00Z", "o@x"),
            ch.PutNode("gone", "{}", "2026-01-01T00:00:00Z", "o@x"),
            ch.PutAffiliation("n", "o@x", "owner"),
            ch.PutAffiliation("n", "m@x", "member"),
            ch.PutAffiliation("n", "p@x", "publisher"),
            ch.PutSubscription("n", "s1", "m@x", "pending", True, 1),
            ch.PutSubscription("n", "s2", "k@x/r", "subscribed", False, 2),
            ch.PutItem("n", "i1", 3, "o@x", b"<a xmlns='urn:x'>\x00</a>", "t1"),
            ch.PutItem("n", "i2", 4, "o@x", b"<b/>", "t2"),
            ch.PutItem("gone", "i9", 5, "o@x", b"<c/>", "t3"),
        ])
        await store.apply([
            ch.PutSubscription("n", "s1", "m@x", "subscribed", True, 1),  # approved
            ch.PutAffiliation("n", "p@x", "none"),
            ch.PutItem("n", "i1", 6, "o@x", b"<a2/>", "t5"),  # republished: now newest
            ch.DeleteNode("gone"),
        ])
        snapshot = await self.open_store().load()
        assert [n.name for n in snapshot.nodes] == ["n"]
        assert sorted((a.jid, a.affiliation) for a in snapshot.affiliations) == [
            ("m@x", "member"), ("o@x", "owner")]
        assert [(s.subid, s.jid, s.state, s.deliver) for s in snapshot.subscriptions] == [
            ("s1", "m@x", "subscribed", True), ("s2", "k@x/r", "subscribed", False)]
        assert [(i.item_id, i.payload) for i in snapshot.items] == [
            ("i2", b"<b/>"), ("i1", b"<a2/>")]
        await store.apply([ch.DeleteItem("n", "i2"), ch.DeleteSubscription("n", "s2")])
        await store.apply([ch.PurgeItems("n")])
        snapshot = await store.load()
        assert snapshot.items == [] and len(snapshot.subscriptions) == 1

    async def test_group_commit_keeps_order_and_acknowledges_each(self) -> None:
        store = self.open_store()
        await store.open()
        await store.apply([ch.PutNode("n", "{}", "t", "o@x")])
        pending = []
        for i in range(200):
            pending.append(store.apply([ch.PutItem("n", "same", i, "o@x", b"<v>%d</v>" % i,
                                                   "t")]))
            if i % 3 == 0:
                pending.append(store.apply([ch.DeleteItem("n", "same")]))
        await defer.gatherResults(pending)
        snapshot = await store.load()
        assert [i.payload for i in snapshot.items] == [b"<v>199</v>"]

    async def test_engine_state_survives_a_restart(self) -> None:
        store = self.open_store()
        await store.open()
        engine = PubSubEngine("broker.x", BrokerConfig())
        requests = [
            PubSubRequest("create", "owner@x/1", node="topic"),
            PubSubRequest("subscribe", "c@x/2", node="topic", jid="c@x"),
        ]
        for request in requests:
            await store.apply(engine.handle(request).changes)
        engine2 = PubSubEngine("broker.x", BrokerConfig())
        engine2.load(await self.open_store().load())
        before, after = engine.nodes["topic"], engine2.nodes["topic"]
        assert after.config == before.config and after.affiliations == before.affiliations
        assert [(s.subid, s.state) for s in after.subscriptions.values()] == \
            [(s.subid, s.state) for s in before.subscriptions.values()] != []
        assert engine2.position == engine.position

    async def test_an_old_broker_database_moves_its_revocations_to_the_one_table(self) -> None:
        """Before the one revocation table, the broker kept its own (``pubsub_revoked``) and
        ``grid_revoked`` was a component of its own: both tables' rows end up in the one."""
        database = Database(self.url, base=self.base)
        self.addCleanup(database.close)
        await database.migrate("grid", {1: GRID_MIGRATIONS[1]})
        await database.migrate("grid_revocations", {1: [
            "CREATE TABLE grid_revoked (jid TEXT PRIMARY KEY, revoked TEXT NOT NULL,"
            " reason TEXT NOT NULL)"]})
        await database.migrate("grid.pubsub", {1: BROKER_MIGRATIONS[1]})

        def old_rows(cursor) -> None:
            cursor.execute("INSERT INTO grid_revoked VALUES ('cli@x', 't1', 'key leaked')")
            cursor.execute("INSERT INTO pubsub_revoked VALUES ('cli@x', 't0')")
            cursor.execute("INSERT INTO pubsub_revoked VALUES ('broker@x', 't2')")

        await database.run("old revocations", old_rows)
        revocations = RevocationStore(database)
        store = SQLPubSubStore(database, revocations)
        assert await store.open() == 3
        assert await store.open() == 3  # idempotent
        assert [(r.jid, r.revoked, r.reason) for r in await revocations.list()] == [
            ("broker@x", "t2", ""), ("cli@x", "t1", "key leaked")]

        def tables(cursor) -> list:
            return cursor.execute("SELECT component, version FROM schema_version"
                                  " ORDER BY component").fetchall()

        assert [tuple(r) for r in await database.run("versions", tables)] == [
            ("grid", 3), ("grid.pubsub", 3)]
        with self.assertRaises(Exception):  # noqa: B017 - each driver has its own class
            await database.run("gone", lambda c: c.execute("SELECT * FROM pubsub_revoked"))


class SQLiteStoreTests(StoreTests, unittest.TestCase):
    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sixnet-pubsub-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.url = "sqlite:broker.sqlite3"


class PostgreSQLStoreTests(StoreTests, unittest.TestCase):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.base = Path(".")
        self.url = postgres_schema_url(self)
