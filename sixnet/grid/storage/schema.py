"""Every table of the grid, in two databases: ``[grid] database`` and ``[grid.broker] database``.

The grid database (component ``grid``) holds accounts, offline messages, failed logins and the
one table of revoked platforms (``grid_revoked``), which the CLI writes and SASL, the streams
and the broker all read. The broker database (component ``grid.pubsub``) holds topics, items,
affiliations, subscriptions, and in component mode which instance holds each platform's
presence; the two may be one database (a shared PostgreSQL) or two.

Migrations are never edited once released, only added. History kept for existing databases:
``grid_revoked`` was once its own component (``grid_revocations``), and the broker kept a
second revocation table (``pubsub_revoked``) whose rows `prepare_broker` moves into
``grid_revoked`` before dropping it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer

from sixnet.core.storage.database import Database

if TYPE_CHECKING:
    from sixnet.grid.storage.revocations import RevocationStore

GRID = "grid"
GRID_MIGRATIONS = {
    1: [
        "CREATE TABLE grid_accounts ("
        " username TEXT PRIMARY KEY,"
        " kind TEXT NOT NULL,"
        " created TEXT NOT NULL,"
        " sha1_salt {blob}, sha1_iterations INTEGER, sha1_stored {blob}, sha1_server {blob},"
        " sha256_salt {blob}, sha256_iterations INTEGER, sha256_stored {blob},"
        " sha256_server {blob})",
        "CREATE TABLE grid_offline ("
        " id {serial},"
        " username TEXT NOT NULL,"
        " stamp TEXT NOT NULL,"
        " stanza {blob} NOT NULL)",
        "CREATE INDEX grid_offline_user ON grid_offline (username, id)",
    ],
    2: [
        # Made by the old ``grid_revocations`` component where that ran already.
        "CREATE TABLE IF NOT EXISTS grid_revoked ("
        " jid TEXT PRIMARY KEY, revoked TEXT NOT NULL, reason TEXT NOT NULL)",
        "DELETE FROM schema_version WHERE component = 'grid_revocations'",
        # Any name, account or not: a lockout must not tell which accounts exist.
        "CREATE TABLE grid_lockout ("
        " username TEXT PRIMARY KEY,"
        " failures INTEGER NOT NULL,"
        " locked_until {bigint} NOT NULL,"
        " updated {bigint} NOT NULL)",
        "CREATE INDEX grid_lockout_updated ON grid_lockout (updated)",
    ],
    3: [
        # Failed logins per account *and source network* (sixnet/core/lockout.py), so a
        # stranger cannot lock the owner out; the old per-account counts are dropped.
        "DROP TABLE grid_lockout",
        "CREATE TABLE grid_lockout ("
        " username TEXT NOT NULL,"
        " source TEXT NOT NULL,"
        " failures INTEGER NOT NULL,"
        " locked_until {bigint} NOT NULL,"
        " updated {bigint} NOT NULL,"
        " PRIMARY KEY (username, source))",
        "CREATE INDEX grid_lockout_updated ON grid_lockout (updated)",
    ],
}

BROKER = "grid.pubsub"
BROKER_MIGRATIONS = {
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
    # Its rows are in grid_revoked by now (`prepare_broker`).
    2: ["DROP TABLE pubsub_revoked"],
    # Which instance holds each available platform (component mode, storage/presence.py).
    3: [
        "CREATE TABLE pubsub_presence (jid TEXT PRIMARY KEY, bare TEXT NOT NULL, "
        "holder TEXT NOT NULL, token TEXT NOT NULL)",
        "CREATE INDEX pubsub_presence_bare ON pubsub_presence (bare)",
        "CREATE INDEX pubsub_presence_holder ON pubsub_presence (holder)",
        # Each instance's last heartbeat: a claim of an instance silent for long is taken.
        "CREATE TABLE pubsub_instance (origin TEXT PRIMARY KEY, seen {bigint} NOT NULL)",
    ],
}


def prepare_grid(db: Database) -> defer.Deferred[int]:
    """Create or upgrade the grid database's tables."""
    return db.migrate(GRID, GRID_MIGRATIONS)


async def prepare_broker(db: Database, revocations: RevocationStore) -> int:
    """Create or upgrade the broker database's tables; a broker database from before the one
    revocation table has its revocations moved into `revocations` first."""
    await prepare_grid(revocations.db)
    if await db.migrate(BROKER, {1: BROKER_MIGRATIONS[1]}) < 2:
        rows = await db.run("pubsub revoked to move", lambda cursor: [
            (jid, revoked) for jid, revoked in cursor.execute(
                "SELECT jid, revoked FROM pubsub_revoked").fetchall()])
        await revocations.adopt(rows)
    return await db.migrate(BROKER, BROKER_MIGRATIONS)

