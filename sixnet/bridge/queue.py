"""The bridge's outgoing queue: incidents are stored before they are sent and removed only
once the target acknowledged them, so they survive a restart and an unreachable controller.

One table in ``[bridge] database`` (component ``bridge``), read oldest first: delivery is in
the order incidents were queued. Every operation runs after the one before it (one lock), so
queued order is commit order. The queue is bounded: when `max_items` are waiting, each new
incident pushes out the oldest, which is counted as dropped (a responder is better served by
the latest incidents than by the first ones of a long outage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet import defer

from sixnet.core.storage.database import Cursor, Database
from sixnet.core.timefmt import rfc3339

T = TypeVar("T")

COMPONENT = "bridge"
MIGRATIONS = {
    1: [
        "CREATE TABLE bridge_queue ("
        " id {serial},"
        " topic TEXT NOT NULL,"
        " item_id TEXT NOT NULL,"
        " kind TEXT NOT NULL,"
        " payload {blob} NOT NULL,"
        " queued TEXT NOT NULL)",
    ],
}


@dataclass(frozen=True)
class Queued:
    """One incident waiting: its position, topic, item id, event kind, IODEF document."""

    id: int
    topic: str
    item_id: str
    kind: str
    payload: bytes


class IncidentQueue:
    def __init__(self, db: Database, max_items: int) -> None:
        self.db = db
        self.max_items = max_items
        #: Incidents waiting, as of the last operation (the queue-depth gauge reads it).
        self.depth = 0
        self._lock = defer.DeferredLock()

    def _serial(self, op: Callable[[], defer.Deferred[T]]) -> defer.Deferred[T]:
        return self._lock.run(op)

    def open(self) -> defer.Deferred[int]:
        """Create or upgrade the table; read how many incidents wait from the last run."""

        def count(cursor: Cursor) -> int:
            row = cursor.execute("SELECT COUNT(*) FROM bridge_queue").fetchone()
            self.depth = int(row[0]) if row else 0
            return self.depth

        async def op() -> int:
            await self.db.migrate(COMPONENT, MIGRATIONS)
            return await self.db.run("bridge queue count", count)

        return self._serial(lambda: defer.Deferred.fromCoroutine(op()))

    def put(self, topic: str, item_id: str, kind: str,
            payload: bytes) -> defer.Deferred[int]:
        """Store one incident at the end; return how many old ones were dropped for it."""
        limit = self.max_items

        def txn(cursor: Cursor) -> int:
            cursor.execute("INSERT INTO bridge_queue (topic, item_id, kind, payload, queued) "
                           "VALUES (?, ?, ?, ?, ?)", (topic, item_id, kind, payload, rfc3339()))
            row = cursor.execute("SELECT COUNT(*) FROM bridge_queue").fetchone()
            waiting = int(row[0]) if row else 0
            dropped = max(0, waiting - limit)
            if dropped:
                cursor.execute("DELETE FROM bridge_queue WHERE id IN (SELECT id FROM "
                               "bridge_queue ORDER BY id LIMIT ?)", (dropped,))
            self.depth = waiting - dropped
            return dropped

        return self._serial(lambda: self.db.run("bridge queue put", txn))

    def peek(self, after: int = 0, limit: int = 1) -> defer.Deferred[list[Queued]]:
        """The oldest `limit` incidents queued after position `after`, oldest first."""

        def txn(cursor: Cursor) -> list[Queued]:
            rows = cursor.execute("SELECT id, topic, item_id, kind, payload FROM bridge_queue "
                                  "WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
            return [Queued(int(r[0]), r[1], r[2], r[3], bytes(r[4])) for r in rows]

        return self._serial(lambda: self.db.run("bridge queue peek", txn))

    def remove(self, done: Sequence[Queued]) -> defer.Deferred[None]:
        """The target acknowledged `done`, consecutive incidents read by `peek`: forget them.

        One range: every position between the first and the last was read with them (puts
        commit in position order), or was dropped already."""
        first, last = done[0].id, done[-1].id

        def txn(cursor: Cursor) -> None:
            self.depth -= cursor.execute("DELETE FROM bridge_queue WHERE id >= ? AND id <= ?",
                                         (first, last)).rowcount

        return self._serial(lambda: self.db.run("bridge queue remove", txn))

    def idle(self) -> defer.Deferred[None]:
        """Fires once every operation asked for so far has finished."""
        return self._serial(lambda: defer.succeed(None))
