"""Which broker instance holds each platform's availability, when several instances attach
to one host for one component name (component mode, XEP-0114).

The host hands each presence stanza for the name to one of the component's connections
(ejabberd balances them; another host may copy them to each), so an owner's available
presence may reach instance A and its unavailable presence instance B. The instances agree
through one table of the broker database: the instance whose insert records a full JID
first *holds* it (one atomic ``INSERT ... ON CONFLICT DO NOTHING``, a fresh token per
claim). Only the holder counts the platform as online: it alone re-sends the pending
approval requests when the platform comes online, and sends it new ones, so each goes out
once for the whole cluster. Whoever hears the unavailable presence deletes the row and
announces the deleted claim's token on `CHANNEL`; the holder hears it and lets go. A token
names one claim, so a release heard late never undoes a newer login.

An instance that dies holding claims cannot release them. Each instance writes a heartbeat
every `HEARTBEAT` seconds; a claim whose holder has been silent for `SILENT` seconds is taken
over by the next instance that hears the platform's presence (a compare-and-swap on the
token, so two instances never both win), and the old token is announced as released in case
its holder was only slow. The instances' clocks are compared: keep them in step (NTP).

All operations of one instance run in submission order through one `GroupCommit` (a burst
of presence after a reconnect shares transactions). On SQLite (one process) the rows of an
earlier run are cleared at `open`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sixnet.core.storage.batch import GroupCommit
from sixnet.core.storage.database import Cursor, Database

log = Logger(namespace="sixnet.grid.pubsub")
#: Where released claims are announced: ``<token> <full JID>``.
CHANNEL = "pubsub_presence"
#: Seconds between an instance's heartbeats.
HEARTBEAT = 30.0
#: Seconds without a heartbeat after which an instance's claims may be taken over.
SILENT = 3 * HEARTBEAT


class PresenceBoard:
    """The shared table of held full JIDs, seen from one broker instance."""

    def __init__(self, db: Database, clock: IReactorTime) -> None:
        self.db = db
        self.clock = clock
        #: This instance's name in the holder column.
        self.origin = uuid.uuid4().hex[:16]
        self._ops = GroupCommit(db, "pubsub presence", self._batch)
        self._heartbeat = task.LoopingCall(self._beat_logged)
        self._heartbeat.clock = clock

    async def open(self, released: Callable[[str, str], object]) -> None:
        """From now on call ``released(token, full_jid)`` for every claim released (by any
        instance); the broker schema must exist."""
        def heard(payload: str) -> None:
            token, _, full = payload.partition(" ")
            released(token, full)

        await self.db.listen(CHANNEL, heard)
        if not self.db.engine.shared:  # one process: whatever is there is from an old run
            await self.db.run("pubsub presence reset", _reset)
        await self._beat()
        self._heartbeat.start(HEARTBEAT, now=False)

    async def close(self) -> None:
        """Release every claim of this instance and leave the heartbeat table (stopping)."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        await self.release_mine()
        await self._ops.submit("leave", "")

    def claim(self, full: str) -> defer.Deferred[str | None]:
        """Record `full` as available: its token if this instance holds it now, None if
        another live instance (or an earlier presence) holds it already."""
        return self._ops.submit("claim", full)

    def release(self, jid: str) -> defer.Deferred[None]:
        """`jid` (a full JID, or a bare one: all its resources) is no longer available."""
        return self._ops.submit("release", jid)

    def release_mine(self) -> defer.Deferred[None]:
        """Let go of every claim this instance holds (its link to the host is gone)."""
        return self._ops.submit("release-mine", "")

    def _beat(self) -> defer.Deferred[None]:
        return self._ops.submit("beat", "")

    def _beat_logged(self) -> defer.Deferred[None]:
        """A heartbeat that failed (the database away) is logged; the next one is due."""
        return self._beat().addErrback(
            lambda f: log.failure("presence heartbeat of {origin} failed", f,
                                  origin=self.origin))

    def _batch(self, cursor: Cursor, items: list[tuple[str, str]]) -> list[Any]:
        now = int(self.clock.seconds())
        results: list[Any] = []
        for kind, jid in items:
            if kind == "claim":
                results.append(self._claim(cursor, jid, now))
                continue
            if kind == "beat":
                cursor.execute("INSERT INTO pubsub_instance (origin, seen) VALUES (?, ?) "
                               "ON CONFLICT (origin) DO UPDATE SET seen = excluded.seen",
                               (self.origin, now))
            elif kind == "leave":
                cursor.execute("DELETE FROM pubsub_instance WHERE origin = ?",
                               (self.origin,))
            else:
                column, key = ("holder", self.origin) if kind == "release-mine" else \
                    ("jid", jid) if "/" in jid else ("bare", jid)
                rows = cursor.execute(f"DELETE FROM pubsub_presence WHERE {column} = ? "  # noqa: S608
                                      "RETURNING token, jid", (key,)).fetchall()
                for token, full in rows:
                    cursor.notify(CHANNEL, f"{token} {full}")
            results.append(None)
        return results

    def _claim(self, cursor: Cursor, full: str, now: int) -> str | None:
        token = uuid.uuid4().hex
        cursor.execute("INSERT INTO pubsub_presence (jid, bare, holder, token) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (jid) DO NOTHING",
                       (full, full.split("/", 1)[0], self.origin, token))
        if cursor.rowcount == 1:
            return token
        row = cursor.execute("SELECT holder, token FROM pubsub_presence WHERE jid = ?",
                             (full,)).fetchone()
        if row is None:
            return None  # released by another instance meanwhile: its presence decides
        holder, old = row
        alive = cursor.execute("SELECT 1 FROM pubsub_instance "
                               "WHERE origin = ? AND seen >= ?",
                               (holder, now - SILENT)).fetchone()
        if alive is not None:
            return None
        # Only if nobody took it first: the token is compared as the row is updated.
        cursor.execute("UPDATE pubsub_presence SET holder = ?, token = ? "
                       "WHERE jid = ? AND token = ?", (self.origin, token, full, old))
        if cursor.rowcount != 1:
            return None
        cursor.notify(CHANNEL, f"{old} {full}")
        return token


def _reset(cursor: Cursor) -> None:
    cursor.execute("DELETE FROM pubsub_presence")
    cursor.execute("DELETE FROM pubsub_instance")
