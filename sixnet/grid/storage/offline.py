"""Offline storage (XEP-0160, RFC 6121 8.5.2.1.1): messages for an account with no available
resource, kept in the grid database and handed out in order at the next initial presence.

Operations on one account are chained, so a message stored just before the account comes
online is either in the batch being delivered or stored after it, never overtaken.

Every stored message is announced on `CHANNEL` (the account's name) once committed. Several
grid processes on one PostgreSQL database each hold their own sessions: a process with no
session of the account stores the message, and the process that has one hears it and hands
it over (`watch`, `Router.relay_offline`); taking is atomic, so it is delivered once.

A notification to many subscribers connected to another process is one store per
subscriber: the stores (and the takes on the other side) submitted while a transaction runs
go together in the next one (`GroupCommit`), as one multi-row statement each, and one
announcement names every account of the batch. One account has one operation in flight at a
time (the chain), so a batch holds at most one message per account and order is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet import defer

from sixnet.core.storage.batch import GroupCommit
from sixnet.core.storage.database import Cursor, Database

T = TypeVar("T")
#: Where stored messages are announced, with the account's name as payload.
CHANNEL = "grid_offline"


class _Batches(GroupCommit):
    """Larger batches than the default: a fan-out hands over one row per subscriber."""

    MAX = 1024


#: Bytes of account names in one announcement (PostgreSQL's payload limit is 8,000).
ANNOUNCEMENT = 7000


class OfflineStore:
    def __init__(self, db: Database, max_per_account: int) -> None:
        self.db = db
        self.max_per_account = max_per_account
        self._locks: dict[str, defer.DeferredLock] = {}
        self._stores = _Batches(db, "grid offline store", self._store_batch)
        self._takes = _Batches(db, "grid offline take", _take_batch)

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
        return self._chained(username, lambda: self._stores.submit(username, stamp, stanza))

    def _store_batch(self, cursor: Cursor, batch: list[tuple[str, str, bytes]]) -> list[str]:
        names = sorted({username for username, _, _ in batch})
        marks = ", ".join("?" for _ in names)
        known = {row[0] for row in cursor.execute(
            f"SELECT username FROM grid_accounts WHERE username IN ({marks})",  # noqa: S608
            names).fetchall()}
        counts = dict(cursor.execute(
            f"SELECT username, COUNT(*) FROM grid_offline WHERE username IN ({marks}) "  # noqa: S608
            "GROUP BY username", names).fetchall())
        outcomes, rows = [], []
        for username, stamp, stanza in batch:
            if username not in known:
                outcomes.append("no-account")
            elif counts.get(username, 0) >= self.max_per_account:
                outcomes.append("full")
            else:
                counts[username] = counts.get(username, 0) + 1
                rows.append((username, stamp, stanza))
                outcomes.append("stored")
        if rows:
            cursor.execute("INSERT INTO grid_offline (username, stamp, stanza) VALUES "  # noqa: S608
                           + ", ".join("(?, ?, ?)" for _ in rows),
                           [value for row in rows for value in row])
            _announce(cursor, [username for username, _, _ in rows])
        return outcomes

    def watch(self, stored: Callable[[str], object]) -> defer.Deferred[None]:
        """Call ``stored(username)`` whenever a message for an account has been stored, by
        this process or by another on the same database."""
        def heard(payload: str) -> None:
            for username in payload.split(" "):
                stored(username)

        return self.db.listen(CHANNEL, heard)

    def take(self, username: str) -> defer.Deferred[list[tuple[str, bytes]]]:
        """Remove and return every stored message of an account, oldest first."""
        return self._chained(username, lambda: self._takes.submit(username))

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


def _announce(cursor: Cursor, usernames: list[str]) -> None:
    """One notification per `ANNOUNCEMENT` bytes of names (names have no spaces)."""
    chunk: list[str] = []
    size = 0
    for username in usernames:
        if chunk and size + len(username.encode()) + 1 > ANNOUNCEMENT:
            cursor.notify(CHANNEL, " ".join(chunk))
            chunk, size = [], 0
        chunk.append(username)
        size += len(username.encode()) + 1
    if chunk:
        cursor.notify(CHANNEL, " ".join(chunk))


def _take_batch(cursor: Cursor, batch: list[tuple[str]]) -> list[list[tuple[str, bytes]]]:
    """Every stored message of each account in the batch, removed in one statement: a row
    is returned to one taker only, whichever process asks."""
    names = [username for (username,) in batch]
    marks = ", ".join("?" for _ in names)
    rows = cursor.execute(f"DELETE FROM grid_offline WHERE username IN ({marks}) "  # noqa: S608
                          "RETURNING id, username, stamp, stanza", names).fetchall()
    taken: dict[str, list[tuple[str, bytes]]] = {name: [] for name in names}
    for _, username, stamp, stanza in sorted(rows):
        taken[username].append((stamp, bytes(stanza)))
    return [taken[name] for name in names]
