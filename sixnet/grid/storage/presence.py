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

All operations of one instance run in submission order through one `GroupCommit` (a burst
of presence after a reconnect shares transactions). On SQLite (one process) the rows of an
earlier run are cleared at `open`; on PostgreSQL an instance clears its own when its link to
the host drops or it stops.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from sixnet.core.storage.batch import GroupCommit
from sixnet.core.storage.database import Cursor, Database

#: Where released claims are announced: ``<token> <full JID>``.
CHANNEL = "pubsub_presence"


class PresenceBoard:
    """The shared table of held full JIDs, seen from one broker instance."""

    def __init__(self, db: Database) -> None:
        self.db = db
        #: This instance's name in the holder column.
        self.origin = uuid.uuid4().hex[:16]
        self._ops = GroupCommit(db, "pubsub presence", self._batch)

    async def open(self, released: Callable[[str, str], object]) -> None:
        """From now on call ``released(token, full_jid)`` for every claim released (by any
        instance); the broker schema must exist."""
        def heard(payload: str) -> None:
            token, _, full = payload.partition(" ")
            released(token, full)

        await self.db.listen(CHANNEL, heard)
        if not self.db.engine.shared:  # one process: whatever is there is from an old run
            await self.db.run("pubsub presence reset",
                              lambda cursor: cursor.execute("DELETE FROM pubsub_presence"))

    def claim(self, full: str) -> defer.Deferred[str | None]:
        """Record `full` as available: its token if this instance holds it now, None if
        another instance (or an earlier presence) holds it already."""
        return self._ops.submit("claim", full)

    def release(self, jid: str) -> defer.Deferred[None]:
        """`jid` (a full JID, or a bare one: all its resources) is no longer available."""
        return self._ops.submit("release", jid)

    def release_mine(self) -> defer.Deferred[None]:
        """Let go of every claim this instance holds (its link to the host is gone)."""
        return self._ops.submit("release-mine", "")

    def _batch(self, cursor: Cursor, items: list[tuple[str, str]]) -> list[Any]:
        results: list[Any] = []
        for kind, jid in items:
            if kind == "claim":
                token = uuid.uuid4().hex
                cursor.execute("INSERT INTO pubsub_presence (jid, bare, holder, token) "
                               "VALUES (?, ?, ?, ?) ON CONFLICT (jid) DO NOTHING",
                               (jid, jid.split("/", 1)[0], self.origin, token))
                results.append(token if cursor.rowcount == 1 else None)
                continue
            if kind == "release":
                column, key = ("jid", jid) if "/" in jid else ("bare", jid)
            else:
                column, key = "holder", self.origin
            rows = cursor.execute(f"DELETE FROM pubsub_presence WHERE {column} = ? "  # noqa: S608
                                  "RETURNING token, jid", (key,)).fetchall()
            for token, full in rows:
                cursor.notify(CHANNEL, f"{token} {full}")
            results.append(None)
        return results
