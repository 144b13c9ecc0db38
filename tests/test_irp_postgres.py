"""The registry on PostgreSQL: the same behaviour as on SQLite, and two registries on one
database (register through one, look up and watch through the other)."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from sixnet.irp.client import IRPError
from sixnet.irp.engine.credentials import hash_password
from sixnet.irp.service import IRPService
from sixnet.pki.keys import generate_key

from .support.databases import drop_postgres_schema, fresh_postgres_schema, postgres_unavailable
from .test_irp import LabSetup, RegistryHarness, RegistryTests, _fails, wait_for


class OnPostgreSQL(RegistryHarness):
    """Registries on a fresh schema of the machine's PostgreSQL."""

    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())  # type: ignore[attr-defined]

    def database_url(self) -> str:
        url, schema = fresh_postgres_schema()
        self.addCleanup(drop_postgres_schema, schema)  # type: ignore[attr-defined]
        return url


class PostgreSQLRegistryTests(OnPostgreSQL, RegistryTests, unittest.TestCase):
    async def start(self, **settings: object) -> IRPService:
        """The same suite as on SQLite, kept answers included (one registry per test)."""
        settings.setdefault("answer_cache_shared", True)
        return await super().start(**settings)


class TwoRegistriesTests(OnPostgreSQL, unittest.TestCase):
    """Two registry services sharing one PostgreSQL, as on two hosts."""

    async def test_register_on_one_lookup_and_watch_on_the_other(self) -> None:
        url = self.database_url()
        first = await self.start(database=url)
        second = await self.start(database=url)
        alice = await self.client(first, self.lab.person("alice@example.test"))
        bob = await self.client(second, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        record = await bob.lookup("alice@example.test")
        assert record.addresses == [("2001:db8::1", 4605, "phone")]
        seen = []
        await bob.watch("alice@example.test", seen.append)
        started = time.monotonic()
        await alice.register([("2001:db8::2", 4605)], device="phone")
        await wait_for(lambda: seen, timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert seen[-1].addresses == [("2001:db8::2", 4605, "phone")]

    async def test_parallel_guesses_through_both_count_one_each(self) -> None:
        """Guesses sent at once through two registries on one database are counted once
        each (no count lost between the processes' transactions) and stop at the lock."""
        url = self.database_url()
        registries = [await self.start(database=url, lockout_after=4) for _ in range(2)]
        await registries[0].registry.store.set_password("erin@example.test",
                                                        hash_password("right"), 0)
        guessers = [await self.client(r, source="127.0.0.2") for r in registries * 5]
        errors = await defer.gatherResults([defer.Deferred.fromCoroutine(
            _fails(g.enroll("erin@example.test", generate_key(), password="wrong"), IRPError))
            for g in guessers])
        assert sorted(e.condition for e in errors) == ["locked"] * 7 + ["not-authorized"] * 3
        checked = [e["failures"] for r in registries for e in self.audit(r)
                   if e["event"] == "password"]
        assert sorted(checked) == [1, 2, 3, 4]

    async def test_kept_answer_on_the_other_follows_a_registration(self) -> None:
        url = self.database_url()
        first = await self.start(database=url)
        second = await self.start(database=url)
        alice = await self.client(first, self.lab.person("alice@example.test"))
        bob = await self.client(second, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        assert (await bob.lookup("alice@example.test")).addresses[0][0] == "2001:db8::1"
        # PostgreSQL is read through the pool only: no read on the reactor thread
        assert second.registry.store.stored_view(
            "alice@example.test", second.registry.now_ms(),
            second.registry.certificates.revocations) is None
        await alice.register([("2001:db8::2", 4605)], device="phone")
        started = time.monotonic()
        # the second registry kept the first answer; the NOTIFY replaces it
        while (await bob.lookup("alice@example.test")).addresses[0][0] != "2001:db8::2":
            assert time.monotonic() - started < 1.0

    async def test_revocation_on_one_is_refused_by_the_other(self) -> None:
        url = self.database_url()
        first = await self.start(database=url)
        second = await self.start(database=url)
        frank_id = self.lab.person("frank@example.test")
        frank = await self.client(first, frank_id)
        frank_elsewhere = await self.client(second, frank_id)
        await frank.revoke()
        # the session on the other registry ends: it hears of the revocation by NOTIFY
        assert (await frank_elsewhere.lost).condition == "not-authorized"
        # the second process never re-read the CRL file itself: the database tells it
        second.registry.certificates.crl_files = []
        second.registry.certificates.reload_crls()
        again = await self.client(second, frank_id)
        assert again.user is None and again.refused == "revoked"

    async def test_watch_survives_a_lost_database_connection(self) -> None:
        """The listening connection is killed: watchers get the current record again (a
        change may have been missed) and later changes as before."""
        import psycopg

        from .support.databases import postgres_base

        url = self.database_url()
        first = await self.start(database=url)
        second = await self.start(database=url)
        alice = await self.client(first, self.lab.person("alice@example.test"))
        bob = await self.client(second, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        seen = []
        await bob.watch("alice@example.test", seen.append)
        listener = second.registry.store.db._listener
        with psycopg.connect(postgres_base(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)",
                          (listener.connection.info.backend_pid,))
        await alice.register([("2001:db8::2", 4605)], device="phone")  # may be missed
        await wait_for(lambda: seen and seen[-1].addresses[0][0] == "2001:db8::2",
                       timeout=5.0)
        await alice.register([("2001:db8::3", 4605)], device="phone")
        await wait_for(lambda: seen[-1].addresses[0][0] == "2001:db8::3", timeout=2.0)
