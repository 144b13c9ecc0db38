"""The broker's storage: one interface, one SQL implementation for SQLite and PostgreSQL.

Writes are the engine's change lists (`sixnet.grid.pubsub.changes`), committed in order; while
one transaction runs, the next requests' changes queue up and go in the following transaction
together (group commit), so a busy topic costs one disk flush per batch, not per publish. A
change list's Deferred fires only once its transaction is committed: the broker replies after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from sixnet.core.storage.database import Cursor, Database
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.pubsub.policy import bare

MIGRATIONS = {
    1: [
        "CREATE TABLE pubsub_node (name TEXT PRIMARY KEY, config TEXT NOT NULL, "
        "created TEXT NOT NULL, creator TEXT NOT NULL)",
        "CREATE TABLE pubsub_affiliation (node TEXT NOT NULL, jid TEXT NOT NULL, "
        "affiliation TEXT NOT NULL, PRIMARY KEY (node, jid))",
        "CREATE TABLE pubsub_subscription (node TEXT NOT NULL, subid TEXT NOT NULL, "
        "jid TEXT NOT NULL, state TEXT NOT NULL, deliver INTEGER NOT NULL, "
        "position {bigint} NOT NULL, PRIMARY KEY (node, subid))",
        "CREATE TABLE pubsub_item (node TEXT NOT NULL, item_id TEXT NOT NULL, "
        "position {bigint} NOT NULL, publisher TEXT NOT NULL, payload {blob} NOT NULL, "
        "published TEXT NOT NULL, PRIMARY KEY (node, item_id))",
        "CREATE TABLE pubsub_revoked (jid TEXT PRIMARY KEY, revoked TEXT NOT NULL)",
    ],
}


class IPubSubStore(Interface):
    """Where topics, configuration, items, affiliations, subscriptions (pending ones too) and
    revoked platforms live between restarts."""

    def open() -> defer.Deferred:
        """Create or upgrade the schema."""

    def load() -> defer.Deferred:
        """Everything stored, as a `Snapshot`."""

    def apply(changes: Sequence[ch.Change]) -> defer.Deferred:
        """Commit changes after every change list applied before; fires when on disk."""

    def close() -> None:
        """Release the database."""


def _upsert(cursor: Cursor, table: str, keys: dict[str, Any], values: dict[str, Any]) -> None:
    """Insert or replace one row, the same way on both dialects."""
    columns = {**keys, **values}
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{k} = excluded.{k}" for k in values)
    cursor.execute(f"INSERT INTO {table} ({names}) VALUES ({marks}) "  # noqa: S608 - names are ours
                   f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}",
                   list(columns.values()))


def _write(cursor: Cursor, change: ch.Change) -> None:
    match change:
        case ch.PutNode(name, config, created, creator):
            _upsert(cursor, "pubsub_node", {"name": name},
                    {"config": config, "created": created, "creator": creator})
        case ch.DeleteNode(name):
            for table in ("pubsub_affiliation", "pubsub_subscription", "pubsub_item"):
                cursor.execute(f"DELETE FROM {table} WHERE node = ?", (name,))  # noqa: S608
            cursor.execute("DELETE FROM pubsub_node WHERE name = ?", (name,))
        case ch.PutAffiliation(node, jid, "none"):
            cursor.execute("DELETE FROM pubsub_affiliation WHERE node = ? AND jid = ?",
                           (node, jid))
        case ch.PutAffiliation(node, jid, affiliation):
            _upsert(cursor, "pubsub_affiliation", {"node": node, "jid": jid},
                    {"affiliation": affiliation})
        case ch.PutSubscription(node, subid, jid, state, deliver, position):
            _upsert(cursor, "pubsub_subscription", {"node": node, "subid": subid},
                    {"jid": jid, "state": state, "deliver": int(deliver),
                     "position": position})
        case ch.DeleteSubscription(node, subid):
            cursor.execute("DELETE FROM pubsub_subscription WHERE node = ? AND subid = ?",
                           (node, subid))
        case ch.PutItem(node, item_id, position, publisher, payload, published):
            _upsert(cursor, "pubsub_item", {"node": node, "item_id": item_id},
                    {"position": position, "publisher": publisher, "payload": payload,
                     "published": published})
        case ch.DeleteItem(node, item_id):
            cursor.execute("DELETE FROM pubsub_item WHERE node = ? AND item_id = ?",
                           (node, item_id))
        case ch.PurgeItems(node):
            cursor.execute("DELETE FROM pubsub_item WHERE node = ?", (node,))
        case ch.PutRevoked(jid, revoked):
            _upsert(cursor, "pubsub_revoked", {"jid": jid}, {"revoked": revoked})
        case ch.DeleteRevoked(jid):
            cursor.execute("DELETE FROM pubsub_revoked WHERE jid = ?", (jid,))


def _write_all(cursor: Cursor, batch: Sequence[ch.Change]) -> None:
    for change in batch:
        _write(cursor, change)


def _read(cursor: Cursor) -> ch.Snapshot:
    snapshot = ch.Snapshot()
    snapshot.nodes = [ch.PutNode(*row) for row in cursor.execute(
        "SELECT name, config, created, creator FROM pubsub_node").fetchall()]
    snapshot.affiliations = [ch.PutAffiliation(*row) for row in cursor.execute(
        "SELECT node, jid, affiliation FROM pubsub_affiliation").fetchall()]
    snapshot.subscriptions = [
        ch.PutSubscription(node, subid, jid, state, bool(deliver), position)
        for node, subid, jid, state, deliver, position in cursor.execute(
            "SELECT node, subid, jid, state, deliver, position FROM pubsub_subscription "
            "ORDER BY position").fetchall()]
    snapshot.items = [
        ch.PutItem(node, item_id, position, publisher, bytes(payload), published)
        for node, item_id, position, publisher, payload, published in cursor.execute(
            "SELECT node, item_id, position, publisher, payload, published FROM pubsub_item "
            "ORDER BY position").fetchall()]
    snapshot.revoked = [ch.PutRevoked(*row) for row in cursor.execute(
        "SELECT jid, revoked FROM pubsub_revoked").fetchall()]
    return snapshot


@implementer(IPubSubStore)
class SQLPubSubStore:
    """The store on a `Database` (SQLite by default, or PostgreSQL)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._queued: list[tuple[Sequence[ch.Change], defer.Deferred[None]]] = []
        self._writing = False

    def open(self) -> defer.Deferred[int]:
        return self.database.migrate("grid.pubsub", MIGRATIONS)

    def load(self) -> defer.Deferred[ch.Snapshot]:
        return self.database.run("pubsub load", _read)

    def apply(self, changes: Sequence[ch.Change]) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        if not changes:
            done.callback(None)
            return done
        self._queued.append((changes, done))
        if not self._writing:
            self._flush()
        return done

    def _flush(self) -> None:
        """Commit everything queued in one transaction, then whatever queued meanwhile."""
        batch, self._queued = self._queued, []
        if not batch:
            self._writing = False
            return
        self._writing = True
        merged = [change for changes, _ in batch for change in changes]
        d = self.database.run("pubsub write", _write_all, merged)

        def finished(result: object) -> None:
            for _, done in batch:
                if isinstance(result, Failure):
                    done.errback(result)
                else:
                    done.callback(None)
            self._flush()

        d.addBoth(finished)

    def close(self) -> None:
        self.database.close()


#: Channel on which `revoke_in_store` tells running brokers (`Database.listen`).
REVOKE_CHANNEL = "grid_pubsub_revoke"


def revoke_in_store(database: Database, jid: str, when: str) -> defer.Deferred[None]:
    """Record a revocation in the broker's database, from any process (`sixnet grid revoke`).

    A broker running on the same database applies it at once (on PostgreSQL from any process,
    on SQLite when it shares this `Database`); otherwise the broker refuses the platform from
    its next start.
    """
    platform = bare(jid)

    def revoke(cursor: Cursor) -> None:
        _upsert(cursor, "pubsub_revoked", {"jid": platform}, {"revoked": when})
        # The bare JID and every full JID under it ('/' sorts just before '0').
        cursor.execute("DELETE FROM pubsub_subscription WHERE jid = ? OR "
                       "(jid >= ? AND jid < ?)", (platform, platform + "/", platform + "0"))
        cursor.notify(REVOKE_CHANNEL, platform)

    return database.run("pubsub revoke", revoke)


def revoked_platforms(database: Database) -> defer.Deferred[list[str]]:
    """Every revoked platform (to catch up after missed notifications)."""
    return database.run("pubsub revoked", lambda cursor: [
        row[0] for row in cursor.execute("SELECT jid FROM pubsub_revoked").fetchall()])
