"""Accounts and offline storage on both databases (SQLite here, PostgreSQL when it answers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.trial import unittest

from sixnet.core.storage.database import Database
from sixnet.grid.accounts import AccountError, AccountStore, LoginGuard
from sixnet.grid.offline import OfflineStore
from sixnet.grid.scram import ScramCredentials
from tests.databases import (
    drop_postgres_schema,
    fresh_postgres_schema,
    postgres_unavailable,
)


class SQLiteStorageTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def database(self) -> Database:
        db = Database("sqlite:grid.sqlite3", base=self.tmp)
        self.addCleanup(db.close)
        return db

    async def test_accounts(self) -> None:
        db = self.database()
        accounts = AccountStore(db, 4096)
        await accounts.prepare()
        await accounts.prepare()  # idempotent
        await accounts.add("Alice", "pencil")
        creds = await accounts.credentials("alice", "SHA-256")
        assert isinstance(creds, ScramCredentials) and creds.iterations == 4096
        assert creds.check_password("SHA-256", "pencil")
        assert (await accounts.credentials("alice", "SHA-1")).check_password("SHA-1", "pencil")
        with pytest.raises(AccountError):
            await accounts.add("alice", "again")
        await accounts.add("alice", "new", replace=True)
        assert (await accounts.credentials("alice", "SHA-256")).check_password("SHA-256", "new")
        await accounts.record_certificate_login("sensor")
        assert await accounts.credentials("sensor", "SHA-256") is None
        assert [(a.username, a.kind) for a in await accounts.list()] == [
            ("alice", "password"), ("sensor", "certificate")]
        await accounts.remove("sensor")
        with pytest.raises(AccountError):
            await accounts.remove("sensor")

    async def test_offline(self) -> None:
        db = self.database()
        accounts = AccountStore(db, 4096)
        await accounts.prepare()
        await accounts.add("bob", "pw")
        offline = OfflineStore(db, 2)
        results = [await offline.store("bob", f"t{i}", f"<m{i}/>".encode()) for i in range(3)]
        assert results == ["stored", "stored", "full"]
        assert await offline.store("nobody", "t", b"<m/>") == "no-account"
        assert await offline.take("bob") == [("t0", b"<m0/>"), ("t1", b"<m1/>")]
        assert await offline.take("bob") == []


class PostgresStorageTests(SQLiteStorageTests):
    skip = postgres_unavailable()

    def database(self) -> Database:
        url, schema = fresh_postgres_schema()
        db = Database(url)
        self.addCleanup(drop_postgres_schema, schema)
        self.addCleanup(db.close)
        return db


def test_login_guard_locks_and_expires() -> None:
    now = [0.0]
    guard = LoginGuard(3, 60, clock=lambda: now[0], size=2)
    assert not guard.failed("a") and not guard.failed("a")
    assert guard.failed("a") and guard.locked("a")
    now[0] = 61
    assert not guard.locked("a")
    guard.failed("b")
    guard.failed("c")
    guard.failed("d")  # the table is bounded
    assert len(guard._failures) == 2
    guard.succeeded("d")
    assert "d" not in guard._failures
