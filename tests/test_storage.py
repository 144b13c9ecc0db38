"""The shared database plumbing, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from sixnet.core.storage.database import Database, DatabaseURLError, parse_url

from .support.databases import postgres_database, postgres_schema_url, postgres_unavailable
from .support.waiting import wait_for

MIGRATIONS = {
    1: ["CREATE TABLE note (id {serial}, body TEXT NOT NULL, data {blob})"],
    2: ["ALTER TABLE note ADD COLUMN stamp {bigint}"],
}


class DatabaseTests:
    db: Database

    async def test_migrate_is_idempotent(self) -> None:
        assert await self.db.migrate("notes", MIGRATIONS) == 2
        assert await self.db.migrate("notes", MIGRATIONS) == 2

    async def test_round_trip_with_qmark_placeholders(self) -> None:
        await self.db.migrate("notes", MIGRATIONS)

        def write(cursor, body, data):
            cursor.execute("INSERT INTO note (body, data, stamp) VALUES (?, ?, ?)",
                           (body, data, 2**40))

        await self.db.run("write note", write, "100% sure?", b"\x00\xff")
        rows = await self.db.run(
            "read notes",
            lambda c: c.execute("SELECT body, data, stamp FROM note").fetchall())
        assert [(r[0], bytes(r[1]), r[2]) for r in rows] == [("100% sure?", b"\x00\xff", 2**40)]

    async def test_failed_transaction_rolls_back(self) -> None:
        await self.db.migrate("notes", MIGRATIONS)

        def half(cursor):
            cursor.execute("INSERT INTO note (body) VALUES (?)", ("lost",))
            raise RuntimeError("boom")

        try:
            await self.db.run("half", half)
        except RuntimeError:
            pass
        rows = await self.db.run("count", lambda c: c.execute(
            "SELECT count(*) FROM note").fetchone())
        assert rows[0] == 0


class SQLiteTests(DatabaseTests, unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp()) / "db.sqlite3"
        self.db = Database(f"sqlite:{self.path}")
        self.addCleanup(self.db.close)

    async def test_wal_mode(self) -> None:
        mode = await self.db.run("mode", lambda c: c.execute("PRAGMA journal_mode").fetchone())
        assert mode[0] == "wal"

    async def test_survives_reopen(self) -> None:
        await self.db.migrate("notes", MIGRATIONS)
        await self.db.run("w", lambda c: c.execute("INSERT INTO note (body) VALUES (?)", ("x",)))
        self.db.close()
        again = Database(f"sqlite:{self.path}")
        self.addCleanup(again.close)
        rows = await again.run("r", lambda c: c.execute("SELECT body FROM note").fetchall())
        assert rows == [("x",)]


class PostgreSQLTests(DatabaseTests, unittest.TestCase):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.db = postgres_database(self)


def test_url_parsing() -> None:
    assert parse_url("sqlite:irp.db", Path("/var/lib/sixnet")) == (
        "sqlite", "/var/lib/sixnet/irp.db")
    assert parse_url("postgresql://h/db", Path("/x"))[0] == "postgresql"
    for bad in ("mysql://x", "sqlite:", "irp.db"):
        try:
            parse_url(bad, Path("."))
        except DatabaseURLError:
            continue
        raise AssertionError(bad)


class NotificationTests:
    """Notifications reach listeners after commit, never after a rollback."""

    db: Database

    async def test_notify_after_commit(self) -> None:
        got: list[str] = []
        await self.db.listen("note_changes", got.append)
        await self.db.run("n", lambda c: c.notify("note_changes", "one"))
        await wait_for(lambda: got == ["one"])

        def rolled_back(cursor):
            cursor.notify("note_changes", "lost")
            raise RuntimeError("boom")

        try:
            await self.db.run("rb", rolled_back)
        except RuntimeError:
            pass
        await self.db.run("n", lambda c: c.notify("note_changes", "two"))
        await wait_for(lambda: got[-1:] == ["two"])
        assert got == ["one", "two"]

    def test_bad_channel_name(self) -> None:
        try:
            self.db.listen("no spaces", print)
        except ValueError:
            return
        raise AssertionError("accepted a bad channel name")


class SQLiteNotificationTests(NotificationTests, unittest.TestCase):
    def setUp(self) -> None:
        self.db = Database(f"sqlite:{Path(self.mktemp()) / 'db.sqlite3'}")
        self.addCleanup(self.db.close)


class PostgreSQLNotificationTests(NotificationTests, unittest.TestCase):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.url = postgres_schema_url(self)
        self.db = Database(self.url)
        self.addCleanup(self.db.close)

    async def test_reaches_another_process(self) -> None:
        """A second Database on the same schema (another process's view) hears it."""
        other = Database(self.url)
        self.addCleanup(other.close)
        got: list[str] = []
        await other.listen("note_changes", got.append)
        await self.db.run("n", lambda c: c.notify("note_changes", "across"))
        await wait_for(lambda: got == ["across"])


class PostgreSQLListenerRecoveryTests(unittest.TestCase):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.db = postgres_database(self)

    async def test_listens_again_after_the_connection_is_killed(self) -> None:
        import psycopg

        from .support.databases import postgres_base

        got: list[str] = []
        gaps: list[bool] = []
        await self.db.listen("note_changes", got.append, lambda: gaps.append(True))
        pid = self.db._listener.connection.info.backend_pid
        with psycopg.connect(postgres_base(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await wait_for(lambda: gaps, timeout=5.0)
        await self.db.run("n", lambda c: c.notify("note_changes", "after"))
        await wait_for(lambda: got == ["after"])
