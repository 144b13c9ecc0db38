"""The grid's tables on both databases (SQLite here, PostgreSQL when it answers): accounts,
failed logins, offline messages, revoked platforms; and the lockout policy and its keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial import unittest

from sixnet.app.config import load_config
from sixnet.core.errors import ConfigError
from sixnet.core.lockout import Failures, LockoutPolicy
from sixnet.core.storage.database import Database
from sixnet.grid.scram import ScramCredentials
from sixnet.grid.storage.accounts import AccountError, AccountStore, LockoutStore
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.storage.presence import HEARTBEAT, SILENT, PresenceBoard
from sixnet.grid.storage.revocations import RevocationStore, RevocationWatch
from sixnet.grid.storage.schema import prepare_broker
from tests.support.databases import (
    drop_postgres_schema,
    fresh_postgres_schema,
    postgres_unavailable,
)
from tests.support.waiting import wait_for


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

    async def test_a_fanout_burst_shares_transactions(self) -> None:
        """Stores for many accounts at once (a notification handed over to subscribers on
        another process) share transactions, and so do the takes; outcomes stay per
        message, and one announcement names many accounts."""
        db = self.database()
        accounts = AccountStore(db, 4096)
        await accounts.prepare()
        names = [f"s{n}" for n in range(300)]
        await db.run("accounts", lambda c: c.executemany(
            "INSERT INTO grid_accounts (username, kind, created) VALUES (?, 'password', '-')",
            [(name,) for name in names]))
        offline = OfflineStore(db, 2)
        assert await offline.store("s0", "t", b"<old/>") == "stored"
        assert await offline.store("s0", "t", b"<old/>") == "stored"  # s0 is full now
        heard: list[str] = []
        await offline.watch(heard.append)
        runs = []
        run = db.run
        db.run = lambda name, *a, **k: (runs.append(name), run(name, *a, **k))[1]  # type: ignore[method-assign]
        outcomes = await defer.gatherResults(
            [offline.store(name, "t1", f"<m{name}/>".encode()) for name in names]
            + [offline.store("nobody", "t1", b"<m/>")])
        assert outcomes == ["full"] + ["stored"] * 299 + ["no-account"]
        assert len(runs) <= 3, runs  # the first at once, the rest behind it
        await wait_for(lambda: len(heard) >= 299)
        assert sorted(heard) == sorted(names[1:])
        runs.clear()
        taken = await defer.gatherResults([offline.take(name) for name in names])
        assert len(runs) <= 3
        assert taken[0] == [("t", b"<old/>"), ("t", b"<old/>")]
        assert taken[1:] == [[("t1", f"<m{name}/>".encode())] for name in names[1:]]
        assert await offline.take("s5") == []


    async def test_presence_board(self) -> None:
        """Claims, releases heard by the holder, bare and per-instance releases, and the
        takeover of a silent holder's claim, in this dialect's SQL."""
        db = self.database()
        await prepare_broker(db, RevocationStore(db))
        clock = Clock()
        heard: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
        a, b = PresenceBoard(db, clock), PresenceBoard(db, clock)
        for name, board in (("a", a), ("b", b)):
            await board.open(lambda token, full, name=name: heard[name].append((token, full)))
        await a._beat()  # on SQLite, b's open cleared the table, as a restarted process does
        self.addCleanup(lambda: defer.gatherResults(
            [defer.Deferred.fromCoroutine(x.close()) for x in (a, b)]))
        token = await a.claim("o@x/desk")
        assert token is not None and await b.claim("o@x/desk") is None
        assert await a.claim("o@x/desk") is None  # a presence update: held already
        await b.release("o@x/desk")  # the logout reached the other instance
        await wait_for(lambda: (token, "o@x/desk") in heard["a"])
        phone, laptop = await b.claim("o@x/phone"), await a.claim("o@x/laptop")
        assert phone is not None and laptop is not None
        await a.release("o@x")  # unavailable to the bare JID: every resource
        await wait_for(lambda: (phone, "o@x/phone") in heard["b"]
                       and (laptop, "o@x/laptop") in heard["a"])
        assert await a.claim("o@x/phone") is not None
        mine = await b.claim("p@x/r")
        await b.release_mine()
        await wait_for(lambda: (mine, "p@x/r") in heard["b"])
        assert await a.claim("p@x/r") is not None
        # A falls silent: after SILENT seconds B takes its claims over, and says so.
        taken = await a.claim("q@x/r")
        a._heartbeat.stop()
        clock.advance(SILENT - 1)
        assert await b.claim("q@x/r") is None
        clock.advance(2)
        assert await b.claim("q@x/r") is not None
        await wait_for(lambda: (taken, "q@x/r") in heard["a"])
        a._heartbeat.start(HEARTBEAT, now=False)

    async def test_lockout_records(self) -> None:
        db = self.database()
        now = [1_000.0]
        lockout = LockoutStore(db, LockoutPolicy(2, 60), clock=lambda: now[0], size=3)
        await AccountStore(db, 4096).prepare()
        here, there = "192.0.2.1", "2001:db8::1"
        assert await lockout.failures("alice", here) == Failures()
        assert not lockout.locked(await lockout.failed("alice", here))
        record = await lockout.failed("alice", here)
        assert record == Failures(2, 1_060_000) and lockout.locked(record)
        assert await lockout.failures("alice", here) == record  # in the database, not memory
        assert await lockout.failures("alice", "::ffff:192.0.2.1") == record  # the same source
        assert await lockout.failures("alice", there) == Failures()  # the owner, elsewhere
        await lockout.failed("alice", there)
        assert (await lockout.failures("alice", "2001:db8::ffff")).count == 1  # the same /64
        assert await lockout.failures("alice", "2001:db8:0:1::1") == Failures()
        now[0] = 1_061.0
        assert not lockout.locked(await lockout.failures("alice", here))
        await lockout.succeeded("alice", here)
        assert await lockout.failures("alice", here) == Failures()
        assert (await lockout.failures("alice", there)).count == 1  # its own source only
        for name in ["a", "b", "c", "d"]:  # any name; the table is bounded
            now[0] += 1
            await lockout.failed(name, here)
        assert await lockout.failures("a", here) == Failures()
        assert (await lockout.failures("d", here)).count == 1

    async def test_revocations_seen_from_another_connection(self) -> None:
        """The CLI's connection writes, the server's watch sees it: NOTIFY on PostgreSQL, the
        poll (driven by a fake clock here) on SQLite."""
        server_db = self.database()
        command = RevocationStore(self.other_connection(server_db))
        await command.prepare()
        clock = task.Clock()
        seen: list[tuple[str, str]] = []
        watch = RevocationWatch(RevocationStore(server_db), clock,
                                lambda jid: seen.append(("revoked", jid)),
                                lambda jid: seen.append(("restored", jid)))
        await command.revoke("early@x", "t0", "")
        await watch.start()
        self.addCleanup(watch.stop)
        assert watch.revoked == {"early@x"} and seen == []  # read quietly at start
        assert await command.revoke("bad@x", "t1", "key leaked")
        assert not await command.revoke("bad@x", "t2", "again")
        await command.unrevoke("early@x")
        with pytest.raises(Exception, match="not revoked"):
            await command.unrevoke("early@x")
        for _ in range(200):
            clock.advance(1.0)
            if len(seen) == 2:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert sorted(seen) == [("restored", "early@x"), ("revoked", "bad@x")]
        assert watch.revoked == {"bad@x"}
        assert [(r.jid, r.reason) for r in await command.list()] == [("bad@x", "key leaked")]

    def other_connection(self, db: Database) -> Database:
        other = Database(f"sqlite:{db.target}")
        self.addCleanup(other.close)
        return other


class PostgresStorageTests(SQLiteStorageTests):
    skip = postgres_unavailable()

    def database(self) -> Database:
        url, schema = fresh_postgres_schema()
        db = Database(url)
        self.addCleanup(drop_postgres_schema, schema)
        self.addCleanup(db.close)
        return db

    def other_connection(self, db: Database) -> Database:
        other = Database(db.target)
        self.addCleanup(other.close)
        return other


def test_lockout_policy() -> None:
    """IRP's rule: `after` failures lock for `seconds`; once the lock has run out the count
    stands, so the next failure locks again; a success (the store's record deleted) resets."""
    policy = LockoutPolicy(after=3, seconds=60)
    record = Failures()
    for _ in range(2):
        record = policy.failed(record, 0)
        assert not policy.locked(record, 0)
    record = policy.failed(record, 1_000)
    assert record == Failures(3, 61_000)
    assert policy.locked(record, 60_999) and not policy.locked(record, 61_000)
    assert policy.locked(policy.failed(record, 61_000), 61_000)


@pytest.mark.parametrize(("old", "new"), [("max_failed_logins = 5", "lockout_after"),
                                          ("failed_login_delay = 1.0", "failure_delay")])
def test_old_lockout_keys_name_the_new_ones(tmp_path: Path, old: str, new: str) -> None:
    path = tmp_path / "sixnet.toml"
    path.write_text(f'[pki]\ntrust_anchors = ["ca.pem"]\n[grid]\n{old}\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    key = old.split(" ")[0]
    assert str(info.value) == f"{path}: grid.{key}: renamed: the key is now {new}"


def test_lockout_keys_are_typed_as_irps(tmp_path: Path) -> None:
    path = tmp_path / "sixnet.toml"
    path.write_text('[pki]\ntrust_anchors = ["ca.pem"]\n[grid]\nlockout_after = 3\n'
                    'lockout_seconds = 60\n[irp]\nlockout_after = 3\nlockout_seconds = 60\n')
    config = load_config(path, check_files=False)
    assert (config.grid.lockout_after, config.grid.lockout_seconds) == (3, 60)
    assert (config.irp.lockout_after, config.irp.lockout_seconds) == (3, 60)
    assert type(config.grid.lockout_seconds) is type(config.irp.lockout_seconds) is int
