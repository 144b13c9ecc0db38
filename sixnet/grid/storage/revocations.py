"""Revoked platforms (RFC 8600 section 8.3): ``sixnet grid revoke`` writes, the server acts.

A revocation is a row in the grid database (``grid_revoked``, the one table of revoked
platforms), written by any process. The running server keeps the set in memory (SASL consults
it on every login, the broker on every request) and refreshes it:

- on PostgreSQL when the writer's ``NOTIFY`` arrives (at once, from any process), and from
  the table again if the listening connection had to be made again (notifications lost);
- on SQLite, which has no notifications across processes, by reading the table every
  `POLL_INTERVAL` seconds (one query on a primary key, a handful of rows).

A refresh compares the table with the set and reports each platform that appeared or left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sixnet.core.storage.database import Cursor, Database
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.grid.storage.schema import prepare_grid

log = Logger(namespace="sixnet.grid")

#: `Database.listen` channel; the payload is the bare JID (the table is read either way).
CHANNEL = "grid_revoked"
#: Seconds between reads of the table on SQLite (the latency of a revocation there).
POLL_INTERVAL = 1.0


class RevocationError(Exception):
    """Not a platform's bare JID, or nothing to undo."""


def platform_jid(text: str, domain: str) -> str:
    """The bare JID of a platform of this server (``alice`` means ``alice@DOMAIN``)."""
    if "@" not in text:
        text = f"{text}@{domain}"
    try:
        jid = parse_jid(text)
    except JIDError as e:
        raise RevocationError(f"{text!r}: {e}") from None
    if jid.resource is not None or jid.local is None:
        raise RevocationError(f"{text!r} is not a bare JID (user@domain)")
    if jid.domain != domain:
        raise RevocationError(f"{text!r} is not a platform of {domain}")
    return str(jid)


@dataclass(frozen=True)
class Revocation:
    jid: str
    revoked: str
    reason: str


class RevocationStore:
    """The ``grid_revoked`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def prepare(self) -> defer.Deferred[int]:
        return prepare_grid(self.db)

    def revoke(self, jid: str, when: str, reason: str) -> defer.Deferred[bool]:
        """Record a revocation; False if the platform was revoked already."""
        def txn(cursor: Cursor) -> bool:
            if cursor.execute("SELECT 1 FROM grid_revoked WHERE jid = ?", (jid,)).fetchone():
                return False
            cursor.execute("INSERT INTO grid_revoked VALUES (?, ?, ?)", (jid, when, reason))
            cursor.notify(CHANNEL, jid)
            return True

        return self.db.run("grid revoke", txn)

    def adopt(self, rows: Iterable[tuple[str, str]]) -> defer.Deferred[None]:
        """Record revocations (bare JID, time) kept elsewhere before, unless already here."""
        def txn(cursor: Cursor) -> None:
            for jid, when in rows:
                if cursor.execute("SELECT 1 FROM grid_revoked WHERE jid = ?",
                                  (jid,)).fetchone() is None:
                    cursor.execute("INSERT INTO grid_revoked VALUES (?, ?, '')", (jid, when))
                    cursor.notify(CHANNEL, jid)

        return self.db.run("grid adopt revocations", txn)

    def unrevoke(self, jid: str) -> defer.Deferred[None]:
        def txn(cursor: Cursor) -> None:
            if not cursor.execute("DELETE FROM grid_revoked WHERE jid = ?", (jid,)).rowcount:
                raise RevocationError(f"{jid} is not revoked")
            cursor.notify(CHANNEL, jid)

        return self.db.run("grid unrevoke", txn)

    def list(self) -> defer.Deferred[list[Revocation]]:
        return self.db.run("grid revocations", lambda cursor: [
            Revocation(*row) for row in cursor.execute(
                "SELECT jid, revoked, reason FROM grid_revoked ORDER BY jid").fetchall()])

    def jids(self) -> defer.Deferred[set[str]]:
        return self.db.run("grid revoked jids", lambda cursor: {
            row[0] for row in cursor.execute("SELECT jid FROM grid_revoked").fetchall()})


class RevocationWatch:
    """The running server's view of the table: `revoked` (a set), kept up to date, and
    ``on_revoked(jid)`` / ``on_restored(jid)`` for each change seen."""

    def __init__(self, store: RevocationStore, clock: IReactorTime,
                 on_revoked: Callable[[str], object],
                 on_restored: Callable[[str], object]) -> None:
        self.store = store
        self.revoked: set[str] = set()
        self.on_revoked = on_revoked
        self.on_restored = on_restored
        self._reading: defer.Deferred[None] | None = None
        self._again = False
        self._poll = task.LoopingCall(self.refresh)
        self._poll.clock = clock

    async def start(self) -> None:
        """Read the table (quietly: these are not news), then follow it."""
        if self.store.db.engine.shared:
            await self.store.db.listen(CHANNEL, self._notified, on_gap=self.refresh)
        else:
            self._poll.start(POLL_INTERVAL, now=False)
        self.revoked |= await self.store.jids()

    def stop(self) -> defer.Deferred[None]:
        """Stop following; fires when a read in progress is over."""
        self.store.db.unlisten(CHANNEL, self._notified)
        if self._poll.running:
            self._poll.stop()
        return self._reading if self._reading is not None else defer.succeed(None)

    def _notified(self, _jid: str) -> None:
        self.refresh()

    def refresh(self) -> defer.Deferred[None]:
        """Read the table; one read at a time (one more is made if asked meanwhile)."""
        if self._reading is not None:
            self._again = True
            return self._reading
        # Never a failure: the poll's LoopingCall would stop on one.
        reading = defer.Deferred.fromCoroutine(self._read()).addErrback(
            lambda f: log.failure("acting on a revocation failed", f))
        if not reading.called:
            self._reading = reading
        return reading

    async def _read(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    current = await self.store.jids()
                except Exception:
                    log.failure("reading the revoked platforms failed")
                    return
                added, removed = current - self.revoked, self.revoked - current
                self.revoked -= removed  # in place: SASL holds this set
                self.revoked |= added
                for jid in sorted(added):
                    self.on_revoked(jid)
                for jid in sorted(removed):
                    self.on_restored(jid)
                if not self._again:
                    return
        finally:
            self._reading = None
