"""The broker's storage: one interface, one SQL implementation for SQLite and PostgreSQL.

Writes are the engine's change lists (`sixnet.grid.pubsub.changes`), committed in order; while
one transaction runs, the next requests' changes queue up and go in the following transaction
together (`GroupCommit`), so a busy topic costs one disk flush per batch, not per publish. A
change list's Deferred fires only once its transaction is committed: the broker replies after.
The tables are declared in `sixnet.grid.storage.schema`; revoked platforms are not here but in
the grid's one revocation table (`sixnet.grid.storage.revocations`).

On a shared database (PostgreSQL) each change list is also announced, in its transaction, on
`changes.CHANNEL`; `watch` hands the lists other instances committed to the broker, in commit
order, so that several broker instances on one database hold the same state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from sixnet.core.storage.batch import GroupCommit
from sixnet.core.storage.database import Cursor, Database
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.storage.revocations import RevocationStore
from sixnet.grid.storage.schema import prepare_broker


class IPubSubStore(Interface):
    """Where topics, configuration, items, affiliations and subscriptions (pending ones too)
    live between restarts."""

    def open() -> defer.Deferred:
        """Create or upgrade the schema."""

    def load() -> defer.Deferred:
        """Everything stored, as a `Snapshot`."""

    def apply(changes: Sequence[ch.Change]) -> defer.Deferred:
        """Commit changes after every change list applied before; fires when on disk."""

    def watch(heard: Callable[[list[ch.Change]], object],
              gap: Callable[[], object]) -> defer.Deferred:
        """From now on call ``heard(changes)`` with every change list another instance
        commits, in commit order; ``gap()`` when some may have been missed (re-read all).
        Fires once listening has started."""

    def close() -> None:
        """Release the database."""


log = Logger(namespace="sixnet.grid.pubsub")


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
    return snapshot


@implementer(IPubSubStore)
class SQLPubSubStore:
    """The store on a `Database` (SQLite by default, or PostgreSQL).

    `revocations` is the grid's revocation table: opening an old broker database moves the
    revocations it kept there (`sixnet.grid.storage.schema.prepare_broker`).
    """

    def __init__(self, database: Database, revocations: RevocationStore) -> None:
        self.database = database
        self.revocations = revocations
        #: This instance's name in its announcements, so that it skips its own.
        self.origin = uuid.uuid4().hex[:16]
        self._announced = 0
        self._writes = GroupCommit(database, "pubsub write", self._write_batch)
        self._heard: defer.DeferredLock = defer.DeferredLock()

    def _write_batch(self, cursor: Cursor,
                     batch: list[tuple[Sequence[ch.Change]]]) -> list[None]:
        """Several requests' change lists, in order, in one transaction (`GroupCommit`)."""
        for (changes,) in batch:
            for change in changes:
                _write(cursor, change)
            if self.database.engine.shared:
                for message in ch.encode(self.origin, changes, self._announced):
                    cursor.notify(ch.CHANNEL, message)
                    self._announced += 1
        return [None] * len(batch)

    def open(self) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(prepare_broker(self.database, self.revocations))

    def load(self) -> defer.Deferred[ch.Snapshot]:
        return self.database.run("pubsub load", _read)

    def apply(self, changes: Sequence[ch.Change]) -> defer.Deferred[None]:
        if not changes:
            return defer.succeed(None)
        return self._writes.submit(changes)

    def watch(self, heard: Callable[[list[ch.Change]], object],
              gap: Callable[[], object]) -> defer.Deferred[None]:
        def announced(payload: str) -> None:
            message = ch.decode(payload)
            if message.origin != self.origin:
                # One at a time: a list whose large items are being read keeps its place.
                self._heard.run(lambda: defer.Deferred.fromCoroutine(
                    self._complete(message))).addCallbacks(heard, self._failed, errbackArgs=(gap,))

        return self.database.listen(ch.CHANNEL, announced, gap)

    async def _complete(self, message: ch.Announced) -> list[ch.Change]:
        """The change list with the payloads too large to announce read from the table; an
        item deleted meanwhile is left out (its deletion follows)."""
        if not message.missing:
            return message.changes
        keys = [(item.node, item.item_id) for item in message.missing]
        payloads = await self.database.run("pubsub read announced items", _payloads, keys)
        complete: list[ch.Change] = []
        for change in message.changes:
            if isinstance(change, ch.PutItem) and change in message.missing:
                found = payloads.get((change.node, change.item_id))
                if found is None:
                    continue
                change = ch.PutItem(change.node, change.item_id, change.position,
                                    change.publisher, found, change.published)
            complete.append(change)
        return complete

    @staticmethod
    def _failed(failure: Any, gap: Callable[[], object]) -> None:
        log.failure("applying another instance's changes failed; reloading", failure)
        gap()

    def close(self) -> None:
        self.database.close()


def _payloads(cursor: Cursor, keys: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    found: dict[tuple[str, str], bytes] = {}
    for node, item_id in keys:
        row = cursor.execute("SELECT payload FROM pubsub_item WHERE node = ? AND item_id = ?",
                             (node, item_id)).fetchone()
        if row is not None:
            found[(node, item_id)] = bytes(row[0])
    return found
