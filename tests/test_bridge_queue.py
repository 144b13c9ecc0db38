"""The bridge's durable queue: in order, after a restart, bounded; SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from sixnet.bridge.queue import IncidentQueue
from sixnet.core.storage.database import Database

from .support.databases import postgres_database, postgres_unavailable


class QueueTests:
    db: Database

    def reopen(self) -> Database:
        return self.db

    async def test_in_order_and_removed_only_when_asked(self) -> None:
        queue = IncidentQueue(self.db, 100)
        assert await queue.open() == 0
        for n in range(5):
            assert await queue.put("t", f"id{n}", "irp.login-failed", b"<x%d/>" % n) == 0
        assert queue.depth == 5
        first = await queue.peek(0, 2)
        assert await queue.peek(0, 2) == first  # reading does not consume
        rest = await queue.peek(first[-1].id, 10)
        seen = [(q.item_id, q.payload) for q in first + rest]
        assert seen == [(f"id{n}", b"<x%d/>" % n) for n in range(5)]
        await queue.remove(first)
        assert queue.depth == 3
        assert await queue.peek(0, 10) == rest
        await queue.remove(rest)
        assert queue.depth == 0 and await queue.peek() == []

    async def test_bounded_the_oldest_dropped(self) -> None:
        queue = IncidentQueue(self.db, 3)
        await queue.open()
        dropped = [await queue.put("t", f"id{n}", "k", b"<x/>") for n in range(5)]
        assert dropped == [0, 0, 0, 1, 1]
        assert queue.depth == 3
        assert [q.item_id for q in await queue.peek(0, 10)] == ["id2", "id3", "id4"]

    async def test_removing_what_was_dropped_meanwhile_is_harmless(self) -> None:
        queue = IncidentQueue(self.db, 1)
        await queue.open()
        await queue.put("t", "a", "k", b"<x/>")
        in_flight = await queue.peek()
        await queue.put("t", "b", "k", b"<x/>")  # pushes "a" out while it is in flight
        await queue.remove(in_flight)
        assert queue.depth == 1
        assert [q.item_id for q in await queue.peek()] == ["b"]

    async def test_puts_commit_in_the_order_asked(self) -> None:
        queue = IncidentQueue(self.db, 1000)
        await queue.open()
        puts = [queue.put("t", f"id{n:03}", "k", b"<x/>") for n in range(40)]  # not awaited
        for d in puts:
            await d
        order = [q.item_id for q in await queue.peek(0, 100)]
        assert order == sorted(order) and len(order) == 40


class SQLiteQueueTests(QueueTests, unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "bridge.sqlite3"
        self.path.parent.mkdir(parents=True)
        self.db = Database(f"sqlite:{self.path}")
        self.addCleanup(lambda: self.db.close())

    async def test_survives_a_restart(self) -> None:
        queue = IncidentQueue(self.db, 100)
        await queue.open()
        await queue.put("t", "first", "k", b"<a/>")
        await queue.put("t", "second", "k", b"<b/>")
        self.db.close()
        self.db = Database(f"sqlite:{self.path}")
        again = IncidentQueue(self.db, 100)
        assert await again.open() == 2
        [head, _] = await again.peek(0, 5)
        assert (head.item_id, head.payload) == ("first", b"<a/>")


class PostgreSQLQueueTests(QueueTests, unittest.TestCase):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.db = postgres_database(self)
