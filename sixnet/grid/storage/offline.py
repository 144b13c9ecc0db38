"""Offline storage (XEP-0160, RFC 6121 8.5.2.1.1): messages for an account with no available
resource, kept in the grid database and handed out in order at the next initial presence.

Operations on one account are chained, so a message stored just before the account comes
online is either in the batch being delivered or stored after it, never overtaken.

Every stored message is announced on `CHANNEL` (the account's name) once committed. Several
grid processes on one PostgreSQL database each hold their own sessions: a process with no
session of the account stores the message, and the process that has one hears it and hands
it over (`watch`, `Router.relay_offline`); taking is atomic, so it is delivered once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet import defer

from sixnet.core.storage.database import Cursor, Database

T = TypeVar("T")
#: Where stored messages are announced, with the account's name as payload.
CHANNEL = "grid_offline"


class OfflineStore:
    def __init__(self, db: Database, max_per_account: int) -> None:
        self.db = db
        self.max_per_account = max_per_account
        self._locks: dict[str, defer.DeferredLock] = {}

    def _chained(self, username: str, op: Callable[[], defer.Deferred[T]]) -> defer.Deferred[T]:
        """Run `op` after every earlier operation on the same account has finished."""
        lock = self._locks.get(username)
        if lock is None:
            lock = self._locks[username] = defer.DeferredLock()
        d = lock.run(op)

        def forget(value: T) -> T:
            if not lock.locked and not lock.waiting and self._locks.get(username) is lock:
                del self._locks[username]
            return value

        return d.addBoth(forget)

    def store(self, username: str, stamp: str, stanza: bytes) -> defer.Deferred[str]:
        """Store one message: "stored", "full", or "no-account" (there is no such account)."""
        limit = self.max_per_account

        def txn(cursor: Cursor) -> str:
            if cursor.execute("SELECT 1 FROM grid_accounts WHERE username = ?",
                              (username,)).fetchone() is None:
                return "no-account"
            row = cursor.execute("SELECT COUNT(*) FROM grid_offline WHERE username = ?",
                                 (username,)).fetchone()
            if row is not None and row[0] >= limit:
                return "full"
            cursor.execute("INSERT INTO grid_offline (username, stamp, stanza) VALUES (?, ?, ?)",
                           (username, stamp, stanza))
            cursor.notify(CHANNEL, username)
            return "stored"

        return self._chained(username, lambda: self.db.run("grid offline store", txn))

    def watch(self, stored: Callable[[str], object]) -> defer.Deferred[None]:
        """Call ``stored(username)`` whenever a message for an account has been stored, by
        this process or by another on the same database."""
        return self.db.listen(CHANNEL, stored)

    def take(self, username: str) -> defer.Deferred[list[tuple[str, bytes]]]:
        """Remove and return every stored message of an account, oldest first."""

        def txn(cursor: Cursor) -> list[tuple[str, bytes]]:
            rows = cursor.execute("SELECT id, stamp, stanza FROM grid_offline "
                                  "WHERE username = ? ORDER BY id", (username,)).fetchall()
            if rows:
                cursor.execute("DELETE FROM grid_offline WHERE username = ? AND id <= ?",
                               (username, rows[-1][0]))
            return [(r[1], bytes(r[2])) for r in rows]

        return self._chained(username, lambda: self.db.run("grid offline take", txn))

    def count(self, username: str) -> defer.Deferred[int]:
        def txn(cursor: Cursor) -> int:
            row = cursor.execute("SELECT COUNT(*) FROM grid_offline WHERE username = ?",
                                 (username,)).fetchone()
            return int(row[0]) if row else 0

        return self.db.run("grid offline count", txn)

    def totals(self) -> defer.Deferred[tuple[int, int]]:
        """Messages stored, and accounts that have any (one scan of the index; the metrics
        read it at most every few seconds, never per scrape)."""
        def txn(cursor: Cursor) -> tuple[int, int]:
            row = cursor.execute("SELECT COUNT(*), COUNT(DISTINCT username) "
                                 "FROM grid_offline").fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

        return self.db.run("grid offline totals", txn)
