"""The IRP registry over real TLS on loopback, with certificates from a lab CA.

`RegistryTests` runs on SQLite here and on PostgreSQL in test_irp_postgres.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from sixnet.core.storage.database import Database
from sixnet.irp.client import IRPConnectionError, IRPError, connect
from sixnet.irp.config import IRPConfig
from sixnet.irp.engine.credentials import hash_password, invite_hash, new_invite_code
from sixnet.irp.service import IRPService, build_service
from sixnet.irp.storage import MIGRATIONS, CertificateRow
from sixnet.pki.ca import LabCA
from sixnet.pki.keys import certificates_pem, generate_key
from sixnet.pki.store import CertificateStore, NodeIdentity

HOST = "irp.example.test"


async def wait_for(condition, timeout: float = 3.0) -> None:
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


class LabSetup:
    """A fresh CA, the registry's host identity and a client-side trust store."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ca = LabCA.init(base / "ca", name="IRP test CA")
        cert, key, _ = self.ca.issue("host", HOST, out=base / "host")
        self.host = NodeIdentity.load("host", cert, key)

    def server_store(self) -> CertificateStore:
        return CertificateStore.from_files([self.ca.directory / "ca.pem"],
                                           [self.ca.directory / "crl.pem"],
                                           identities=[self.host])

    def client_store(self) -> CertificateStore:
        return CertificateStore.from_files([self.ca.directory / "ca.pem"])

    def person(self, user: str, name: str = "") -> NodeIdentity:
        out = self.base / "people" / (name or user)
        if not (out / "cert.pem").exists():
            self.ca.issue("user", user, out=out)
        return NodeIdentity.load(user, out / "cert.pem", out / "key.pem")


class RegistryHarness:
    """Starts registries and connects clients; subclasses choose the database."""

    lab: LabSetup

    def database_url(self) -> str:
        return f"sqlite:{Path(self.mktemp()).absolute() / 'irp.sqlite3'}"  # type: ignore[attr-defined]

    async def start(self, *, database: str | None = None, ca: bool = True,
                    clock: task.Clock | None = None, **settings: object) -> IRPService:
        """A running registry; with `clock`, its own timers and time follow that clock."""
        state = Path(self.mktemp()).absolute()  # type: ignore[attr-defined]
        config = dataclasses.replace(IRPConfig(), **{
            "enabled": True, "listen": ["tcp:0:interface=127.0.0.1"],
            "database": database or self.database_url(), "failure_delay": 0.05,
            "operators": ["root@example.test"], **settings})
        service = build_service(config, self.lab.server_store(), self.lab.host, state,
                                self.lab.ca if ca else None, reactor=clock)
        if clock is not None:
            service.registry.clock = clock.seconds
        service.startService()
        self.addCleanup(service.stopService)  # type: ignore[attr-defined]
        await service.ready
        await wait_for(lambda: bool(service.listening.ports))
        return service

    def port(self, service: IRPService) -> int:
        return service.listening.ports[0].getHost().port

    async def client(self, service: IRPService, identity: NodeIdentity | None = None,
                     source: str | None = None):
        """A client of `service`, connecting from the loopback address `source` if given."""
        client = await connect("127.0.0.1", self.port(service), self.lab.client_store(),
                               identity=identity, server_name=HOST, source=source)
        client.clock = lambda: service.registry.clock()  # the registry's time, faked or not
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    def count_reads(self, service: IRPService) -> list[str]:
        """The persons whose record the store reads from now on (the rows or a stored
        signed record, through the thread pool or at once)."""
        store, reads = service.registry.store, []
        person_view, stored_view = store.person_view, store.stored_view

        def read(person: str, now: int, *crls: str):
            reads.append(person)
            return person_view(person, now, *crls)

        def read_stored(person: str, now: int, crls: str):
            view = stored_view(person, now, crls)
            if view is not None:
                reads.append(person)
            return view

        store.person_view, store.stored_view = read, read_stored
        return reads

    def audit(self, service: IRPService) -> list[dict]:
        return [json.loads(line) for line in
                service.registry.audit.path.read_text().splitlines()]


class RegistryTests(RegistryHarness):
    """Behaviour every storage backend must show."""

    async def test_register_two_devices_lookup_most_recent_first(self) -> None:
        service = await self.start()
        alice = self.lab.person("alice@example.test")
        bob = self.lab.person("bob@example.test")
        phone = await self.client(service, alice)
        laptop = await self.client(service, alice)
        assert phone.user == "alice@example.test"
        await laptop.register([("2001:db8::1", 4605), ("192.0.2.1", 4605)], device="laptop")
        await phone.register([("2001:db8::2", 4605)], device="phone")
        looker = await self.client(service, bob)
        record = await looker.lookup("Alice@Example.TEST")
        assert record.person == "alice@example.test"
        assert record.addresses == [("2001:db8::2", 4605, "phone"),
                                    ("2001:db8::1", 4605, "laptop"),
                                    ("192.0.2.1", 4605, "laptop")]
        assert record.certificate is not None and record.certificate.status == "valid"
        assert record.certificate.chain[0].serial_number == alice.certificate.serial_number
        # registering the laptop again makes it the most recent
        await laptop.register([("2001:db8::3", 4605)], device="laptop")
        record = await looker.lookup("alice@example.test")
        assert [a[:2] for a in record.addresses] == [("2001:db8::3", 4605),
                                                    ("2001:db8::2", 4605)]

    async def test_expired_registration_is_never_returned(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="short", lifetime=1)
        await alice.register([("2001:db8::9", 4605)], device="long", lifetime=600)
        assert len((await alice.lookup("alice@example.test")).addresses) == 2
        clock = service.registry.clock
        service.registry.clock = lambda: clock() + 2
        record = await alice.lookup("alice@example.test")
        assert record.addresses == [("2001:db8::9", 4605, "long")]
        assert await service.registry.store.purge_expired(service.registry.now_ms()) == 1

    async def test_lookup_answer_kept_until_the_record_changes(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        reads = self.count_reads(service)
        first = await bob.lookup("alice@example.test")
        second = await bob.lookup("alice@example.test")  # signed anew, verified by the client
        assert second == first and first.addresses == [("2001:db8::1", 4605, "phone")]
        assert reads == ["alice@example.test"]
        # every change through the registry is seen by the next lookup (no wait)
        await alice.register([("2001:db8::2", 4605)], device="phone")
        assert (await bob.lookup("alice@example.test")).addresses == [
            ("2001:db8::2", 4605, "phone")]
        await alice.unregister()
        assert (await bob.lookup("alice@example.test")).addresses == []
        await alice.revoke()
        record = await bob.lookup("alice@example.test")
        assert record.certificate is not None and record.certificate.status == "revoked"
        assert len(reads) == 4

    async def test_lookups_read_together_each_get_their_own_record(self) -> None:
        service = await self.start()
        for i, name in enumerate(("alice", "bob", "carol"), 1):
            person = await self.client(service, self.lab.person(f"{name}@example.test"))
            await person.register([(f"2001:db8::{i}", 4605)], device=name)
            if name == "alice":
                await person.register([("2001:db8::a", 4605)], device="second", lifetime=1)
        store = service.registry.store
        users = ["alice@example.test", "bob@example.test", "nobody@example.test",
                 "carol@example.test", "alice@example.test"]
        now = service.registry.now_ms()
        # the first read runs at once, the four submitted meanwhile share one transaction
        views = await defer.gatherResults([store.person_view(u, t) for u, t in zip(
            users, [now, now, now, now, now + 1500], strict=True)])
        assert [v.person for v in views] == users
        assert [v.exists for v in views] == [True, True, False, True, True]
        assert [[d.device for d in v.devices] for v in views] == [
            ["second", "alice"], ["bob"], [], ["carol"], ["alice"]]
        assert [len(v.certificates) for v in views] == [1, 1, 0, 1, 1]

    async def test_notification_gap_drops_kept_answers(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        assert (await alice.lookup("alice@example.test")).addresses[0][0] == "2001:db8::1"
        # a change whose notification was lost (the version is raised with it, as always)
        store = service.registry.store

        def change(cursor):
            cursor.execute("UPDATE irp_device SET addresses = ? WHERE person = ?",
                           ('[["2001:db8::9",4605]]', "alice@example.test"))
            cursor.execute("UPDATE irp_person SET version = version + 1 WHERE id = ?",
                           ("alice@example.test",))

        await store.db.run("unannounced", change)
        assert (await alice.lookup("alice@example.test")).addresses[0][0] == "2001:db8::1"
        store._gap()
        assert (await alice.lookup("alice@example.test")).addresses[0][0] == "2001:db8::9"

    async def test_answer_cache_is_bounded(self) -> None:
        service = await self.start(answer_cache=1)
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await self.client(service, self.lab.person("bob@example.test"))  # bob is known
        reads = self.count_reads(service)
        for user in ("alice", "alice", "bob", "alice"):
            await alice.lookup(f"{user}@example.test")
        assert reads == ["alice@example.test", "bob@example.test", "alice@example.test"]

    async def test_watch_hears_expiry_from_one_timer(self) -> None:
        clock = task.Clock()
        clock.advance(time.time())
        service = await self.start(clock=clock)
        alice = await self.client(service, self.lab.person("alice@example.test"))
        carol = await self.client(service, self.lab.person("carol@example.test"))
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="short", lifetime=5)
        await alice.register([("2001:db8::9", 4605)], device="long", lifetime=600)
        await carol.register([("2001:db8::c", 4605)], lifetime=60)
        about_alice, about_carol = [], []
        await bob.watch("alice@example.test", about_alice.append)
        await bob.watch("carol@example.test", about_carol.append)
        registry = service.registry
        timers = [c for c in clock.getDelayedCalls() if c.func == registry.watches.expire]
        assert len(timers) == 1 and timers[0].getTime() == pytest.approx(clock.seconds() + 5,
                                                                         abs=0.01)
        clock.advance(4)
        await task.deferLater(reactor, 0.1, lambda: None)
        assert about_alice == [] and about_carol == []
        clock.advance(1.01)
        await wait_for(lambda: about_alice)
        assert about_alice[-1].addresses == [("2001:db8::9", 4605, "long")]
        assert about_carol == []
        clock.advance(55)
        await wait_for(lambda: about_carol)
        assert about_carol[-1].addresses == []
        assert len(about_alice) == 1
        # a registration moves the next expiry: the timer follows it
        await alice.register([("2001:db8::2", 4605)], device="short", lifetime=10)
        await wait_for(lambda: len(about_alice) == 2)
        clock.advance(10.01)
        await wait_for(lambda: len(about_alice) == 3)
        assert about_alice[-1].addresses == [("2001:db8::9", 4605, "long")]
        await bob.unwatch("alice@example.test")
        clock.advance(600)
        await task.deferLater(reactor, 0.1, lambda: None)
        assert len(about_alice) == 3

    async def test_watch_hears_certificate_expiry(self) -> None:
        """An expired certificate does not hide the next expiry of a valid one."""
        clock = task.Clock()
        clock.advance(time.time() + 2 * 86400)
        # (the connection's idle timeout follows the same clock: keep it beyond 30 days)
        service = await self.start(clock=clock, idle_timeout=60 * 86400.0)
        registry = service.registry
        for days in (1, 30):  # the first expired a day ago (registry time)
            chain = self.lab.ca.sign_user("dora@example.test", generate_key().public_key(),
                                          days=days)
            not_after = chain[0].not_valid_after_utc.timestamp()
            await registry.store.add_certificate(CertificateRow(
                format(chain[0].serial_number, "X"), "dora@example.test",
                registry.now_ms() + days, int(not_after * 1000), certificates_pem(chain), None))
        bob = await self.client(service, self.lab.person("bob@example.test"))
        seen = []
        first = await bob.watch("dora@example.test", seen.append)
        assert first.certificate is not None and first.certificate.status == "valid"
        timers = [c for c in clock.getDelayedCalls() if c.func == registry.watches.expire]
        assert len(timers) == 1 and timers[0].getTime() == pytest.approx(not_after, abs=0.01)
        clock.advance(timers[0].getTime() - clock.seconds() + 0.001)
        await wait_for(lambda: seen)
        assert seen[-1].certificate is not None and seen[-1].certificate.status == "expired"

    async def test_unregister(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="a")
        await alice.register([("2001:db8::2", 4605)], device="b")
        record = await alice.unregister(device="a")
        assert record.addresses == [("2001:db8::2", 4605, "b")]
        assert (await alice.unregister()).addresses == []

    async def test_cannot_change_anothers_record_refused_and_audited(self) -> None:
        service = await self.start()
        mallory = await self.client(service, self.lab.person("mallory@example.test"))
        d = mallory.request("register", {"user": "alice@example.test", "device": "x"},
                            [_address("2001:db8::66", 4605)])
        error = await _fails(d, IRPError)
        assert error.condition == "forbidden"
        refused = [e for e in self.audit(service) if e["outcome"] == "refused"]
        assert refused[-1]["event"] == "register"
        assert refused[-1]["actor"] == "mallory@example.test"
        assert refused[-1]["target"] == "alice@example.test"

    async def test_watch_sees_change_within_a_second(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await alice.register([("2001:db8::1", 4605)], device="phone")
        seen = []
        first = await bob.watch("alice@example.test", seen.append)
        assert first.addresses[0][:2] == ("2001:db8::1", 4605)
        started = time.monotonic()
        await alice.register([("2001:db8::2", 4605)], device="phone")
        await wait_for(lambda: seen, timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert seen[-1].addresses == [("2001:db8::2", 4605, "phone")]
        await bob.unwatch("alice@example.test")
        await alice.register([("2001:db8::3", 4605)], device="phone")
        await alice.lookup("alice@example.test")
        await task.deferLater(reactor, 0.1, lambda: None)
        assert len(seen) == 1

    async def test_enroll_by_password_then_use_certificate(self) -> None:
        service = await self.start()
        await service.registry.store.set_password("carol@example.test",
                                                  hash_password("correct horse"), 0)
        anonymous = await self.client(service)
        assert anonymous.user is None
        key = generate_key()
        chain = await anonymous.enroll("carol@example.test", key, password="correct horse")
        assert chain[0].public_key() == key.public_key()
        carol = await self.client(service, _identity(self.mktemp(), "carol", chain, key))
        assert carol.user == "carol@example.test"
        await carol.register([("2001:db8::c", 4605)])
        certs = await carol.certificates(user="carol@example.test")
        assert [c.status for c in certs] == ["valid"]

    async def test_enroll_by_code_once(self) -> None:
        service = await self.start()
        code = new_invite_code()
        now = service.registry.now_ms()
        await service.registry.store.add_invite(invite_hash(code), "dave@example.test", now,
                                                now + 60_000)
        anonymous = await self.client(service)
        chain = await anonymous.enroll("dave@example.test", generate_key(), code=code)
        assert chain
        error = await _fails(anonymous.enroll("dave@example.test", generate_key(), code=code),
                             IRPError)
        assert error.condition == "not-authorized"
        assert [e["event"] for e in self.audit(service) if e["outcome"] == "refused"] == \
            ["enroll"]

    async def test_wrong_password_delayed_counted_locked_out(self) -> None:
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        anonymous = await self.client(service)
        for attempt in range(3):
            started = time.monotonic()
            error = await _fails(anonymous.enroll("erin@example.test", generate_key(),
                                                  password="wrong"), IRPError)
            assert time.monotonic() - started >= 0.05
            assert error.condition == ("locked" if attempt == 2 else "not-authorized")
        error = await _fails(anonymous.enroll("erin@example.test", generate_key(),
                                              password="right"), IRPError)
        assert error.condition == "locked"
        refused = [e for e in self.audit(service) if e["event"] == "password"]
        assert [e["failures"] for e in refused] == [1, 2, 3]

    async def test_parallel_guesses_count_one_each(self) -> None:
        """Wrong passwords sent at once on several connections are counted before their hash
        is checked: the first ``lockout_after`` are checked and counted, the rest are refused
        as locked without a check, however the hashes interleave."""
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        guessers = [await self.client(service, source="127.0.0.2") for _ in range(8)]
        errors = await defer.gatherResults([defer.Deferred.fromCoroutine(
            _fails(g.enroll("erin@example.test", generate_key(), password="wrong"), IRPError))
            for g in guessers])
        assert sorted(e.condition for e in errors) == ["locked"] * 6 + ["not-authorized"] * 2
        checked = [e for e in self.audit(service) if e["event"] == "password"]
        assert sorted(e["failures"] for e in checked) == [1, 2, 3]
        error = await _fails(guessers[0].enroll("erin@example.test", generate_key(),
                                                password="right"), IRPError)
        assert error.condition == "locked"

    async def test_parallel_right_passwords_are_all_accepted(self) -> None:
        """More right passwords than ``lockout_after`` sent at once from one network: one that
        would reach the lock waits for those still being checked, which clear the count, so
        none is refused by the others' counts; and right ones among guesses are accepted."""
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        clients = [await self.client(service, source="127.0.0.2") for _ in range(6)]
        chains = await defer.gatherResults([
            c.enroll("erin@example.test", generate_key(), password="right") for c in clients])
        assert len(chains) == 6 and all(chains)
        assert not [e for e in self.audit(service) if e["event"] == "password"]
        passwords = ["wrong", "right", "wrong", "right", "right", "right"]
        outcomes = await defer.gatherResults([defer.Deferred.fromCoroutine(_outcome(
            c.enroll("erin@example.test", generate_key(), password=password)))
            for c, password in zip(clients, passwords, strict=True)])
        assert outcomes == ["ok" if p == "right" else "not-authorized" for p in passwords]

    async def test_a_right_password_takes_its_count_back(self) -> None:
        """The attempt that reaches ``lockout_after`` is still checked, and a right password
        clears the count its own attempt reserved with the earlier ones."""
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        anonymous = await self.client(service)
        for _ in range(2):
            await _fails(anonymous.enroll("erin@example.test", generate_key(),
                                          password="wrong"), IRPError)
        assert await anonymous.enroll("erin@example.test", generate_key(), password="right")
        for _ in range(2):
            error = await _fails(anonymous.enroll("erin@example.test", generate_key(),
                                                  password="wrong"), IRPError)
            assert error.condition == "not-authorized"
        assert [e["failures"] for e in self.audit(service) if e["event"] == "password"] == \
            [1, 2, 1, 2]

    async def test_a_stranger_cannot_lock_the_owner_out(self) -> None:
        """Failures lock the user id for the guesser's address only: the owner's right
        password from another address is accepted, and the guesser stays locked out."""
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        stranger = await self.client(service, source="127.0.0.2")
        for attempt in range(3):
            error = await _fails(stranger.enroll("erin@example.test", generate_key(),
                                                 password="wrong"), IRPError)
            assert error.condition == ("locked" if attempt == 2 else "not-authorized")
        owner = await self.client(service)  # from 127.0.0.1
        assert await owner.enroll("erin@example.test", generate_key(), password="right")
        error = await _fails(stranger.enroll("erin@example.test", generate_key(),
                                             password="right"), IRPError)
        assert error.condition == "locked"  # the owner's success cleared only its own address
        again = await self.client(service, source="127.0.0.2")
        error = await _fails(again.enroll("erin@example.test", generate_key(),
                                          password="right"), IRPError)
        assert error.condition == "locked"
        refused = [e for e in self.audit(service) if e["event"] == "password"]
        assert {e["source"] for e in refused} == {"127.0.0.2"}

    async def test_an_unknown_user_id_is_answered_like_a_real_one(self) -> None:
        """The same wrong passwords give the same answers, ``locked`` included, and take
        about as long, whether or not the user id has an account."""
        service = await self.start(lockout_after=3)
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        anonymous = await self.client(service)
        answers: dict[str, list[tuple[str, str]]] = {}
        took: dict[str, float] = {}
        for user in ("erin@example.test", "nobody@example.test"):
            started = time.monotonic()
            answers[user] = []
            for _ in range(4):
                error = await _fails(anonymous.enroll(user, generate_key(), password="wrong"),
                                     IRPError)
                answers[user].append((error.condition, error.text.replace(user, "USER")))
            took[user] = time.monotonic() - started
        assert answers["erin@example.test"] == answers["nobody@example.test"]
        assert [c for c, _ in answers["nobody@example.test"]] == \
            ["not-authorized", "not-authorized", "locked", "locked"]
        assert abs(took["erin@example.test"] - took["nobody@example.test"]) < \
            0.4 * max(took.values())
        error = await _fails(anonymous.get_backup("nobody@example.test", "wrong"), IRPError)
        assert error.condition == "locked"  # one count for every password operation

    async def test_lockout_records_are_bounded(self) -> None:
        service = await self.start()
        store, policy = service.registry.store, service.registry.lockout
        store.lockout.size = 3
        for now, user in enumerate(["a", "b", "c", "d", "e"]):
            await store.reserve_attempt(f"{user}@example.test", "192.0.2.1", policy, now)
        await store.reserve_attempt("c@example.test", "192.0.2.1", policy, 9)
        kept = [(await store.db.run("read", store.lockout.read, f"{user}@example.test",
                                    "192.0.2.1")).count for user in ["a", "b", "c", "d", "e"]]
        assert kept == [0, 0, 2, 1, 1]  # the oldest went; counting again is no new record

    async def test_a_version_1_database_keeps_its_accounts_not_their_counters(self) -> None:
        url = self.database_url()
        db = Database(url)
        await db.migrate("irp", {1: MIGRATIONS[1]})
        locked_until = int(time.time() * 1000) + 600_000

        def old_account(cursor) -> None:
            cursor.execute("INSERT INTO irp_person (id, created) VALUES (?, 0)",
                           ("erin@example.test",))
            cursor.execute("INSERT INTO irp_account (person, password_hash, failures,"
                           " locked_until, created) VALUES (?, ?, 5, ?, 0)",
                           ("erin@example.test", hash_password("right"), locked_until))

        await db.run("a version 1 account", old_account)
        db.close()
        service = await self.start(database=url)
        anonymous = await self.client(service)
        assert await anonymous.enroll("erin@example.test", generate_key(), password="right")

    async def test_revoked_certificate_is_refused(self) -> None:
        service = await self.start()
        await service.registry.store.set_password("frank@example.test", hash_password("pw"), 0)
        key = generate_key()
        chain = await (await self.client(service)).enroll("frank@example.test", key,
                                                          password="pw")
        frank_id = _identity(self.mktemp(), "frank", chain, key)
        frank = await self.client(service, frank_id)
        serial = await frank.revoke()
        assert serial == format(chain[0].serial_number, "X")
        # the same connection lost its authentication
        error = await _fails(frank.lookup("frank@example.test"), IRPError)
        assert error.condition == "not-authorized"
        again = await self.client(service, frank_id)
        assert again.user is None and again.refused == "revoked"
        assert self.lab.ca.is_revoked(chain[0].serial_number)
        bob = await self.client(service, self.lab.person("bob@example.test"))
        record = await bob.lookup("frank@example.test")
        assert record.certificate is not None and record.certificate.status == "revoked"

    async def test_backup_round_trip_to_second_device(self) -> None:
        service = await self.start()
        await service.registry.store.set_password("gina@example.test", hash_password("pw"), 0)
        from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

        first = self.lab.person("gina@example.test")
        gina = await self.client(service, first)
        blob = pkcs12.serialize_key_and_certificates(
            b"gina", first.key, first.certificate, None, BestAvailableEncryption(b"passphrase"))
        await gina.put_backup(blob)
        assert await gina.get_backup() == blob
        second_device = await self.client(service)
        error = await _fails(second_device.get_backup("gina@example.test", "nope"), IRPError)
        assert error.condition == "not-authorized"
        fetched = await second_device.get_backup("gina@example.test", "pw")
        key, cert, _ = pkcs12.load_key_and_certificates(fetched, b"passphrase")
        restored = _identity(self.mktemp(), "gina-phone", [cert], key)
        phone = await self.client(service, restored)
        assert phone.user == "gina@example.test"
        await phone.register([("2001:db8::6", 4605)], device="phone")

    async def test_lookup_unknown_and_operator_only_operations(self) -> None:
        service = await self.start()
        alice = await self.client(service, self.lab.person("alice@example.test"))
        error = await _fails(alice.lookup("nobody@example.test"), IRPError)
        assert error.condition == "item-not-found"
        error = await _fails(alice.list_users(), IRPError)
        assert error.condition == "forbidden"
        await alice.register([("2001:db8::1", 4605)])
        root = await self.client(service, self.lab.person("root@example.test"))
        assert root.role == "operator"
        await root.register([("2001:db8::2", 4605)])
        users, after = await root.list_users(limit=1)
        assert [u["id"] for u in users] == ["alice@example.test"] and after
        users, after = await root.list_users(after=after, limit=1)
        assert [u["id"] for u in users] == ["root@example.test"] and after is None
        bob_id = self.lab.person("bob@example.test")
        bob = await self.client(service, bob_id)
        bob_serial = format(bob_id.certificate.serial_number, "X")
        error = await _fails(alice.revoke(bob_serial), IRPError)
        assert error.condition == "forbidden"
        assert await root.revoke(bob_serial) == bob_serial
        assert (await self.client(service, bob_id)).refused == "revoked"
        error = await bob.lost  # the session authenticated by it ends
        assert error.condition == "not-authorized"
        await root.remove("alice@example.test")
        assert (await alice.lost).condition == "not-authorized"  # her certificate is revoked
        error = await _fails(root.lookup("alice@example.test"), IRPError)
        assert error.condition == "item-not-found"

    async def test_renew_and_certificates_by_serial(self) -> None:
        service = await self.start()
        alice_id = self.lab.person("alice@example.test")
        alice = await self.client(service, alice_id)
        key = generate_key("ed25519")
        chain = await alice.renew(key)
        assert chain[0].public_key() == key.public_key()
        serial = format(chain[0].serial_number, "X")
        (info,) = await alice.certificates(serial=serial)
        assert info.status == "valid" and info.chain[0] == chain[0]
        infos = await alice.certificates(user="alice@example.test")
        assert [i.serial for i in infos][0] == serial and len(infos) == 2
        error = await _fails(alice.certificates(serial="ABCDEF0123"), IRPError)
        assert error.condition == "item-not-found"
        # the renewed certificate works, and the old one is still valid
        renewed = await self.client(service, _identity(self.mktemp(), "alice2", chain, key))
        assert renewed.user == "alice@example.test"

    async def test_policy_same_domain(self) -> None:
        service = await self.start(lookup_access="same-domain", watch_access="operators")
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.register([("192.0.2.1", 4605)])
        outsider = await self.client(service, self.lab.person("eve@elsewhere.test"))
        error = await _fails(outsider.lookup("alice@example.test"), IRPError)
        assert error.condition == "forbidden"
        # refused by serial: the error must not say whose certificate it is
        serial = format(self.lab.person("alice@example.test").certificate.serial_number, "X")
        error = await _fails(outsider.certificates(serial=serial), IRPError)
        assert error.condition == "forbidden" and "alice" not in error.text
        assert serial in error.text
        colleague = await self.client(service, self.lab.person("bob@example.test"))
        assert (await colleague.lookup("alice@example.test")).addresses
        error = await _fails(colleague.watch("alice@example.test", print), IRPError)
        assert error.condition == "forbidden"

    async def test_ca_certificates_anonymous(self) -> None:
        service = await self.start()
        anonymous = await self.client(service)
        certs = await anonymous.ca_certificates()
        assert self.lab.ca.certificate in certs
        error = await _fails(anonymous.lookup("alice@example.test"), IRPError)
        assert error.condition == "not-authorized"


def _address(ip: str, port: int):
    from sixnet.irp.wire import element

    return element("address", {"ip": ip, "port": str(port)})


def _identity(base: str, name: str, chain, key) -> NodeIdentity:
    from sixnet.pki.keys import certificates_pem, write_private_key, write_public_file

    directory = Path(base) / name
    write_public_file(directory / "cert.pem", certificates_pem(chain))
    write_private_key(directory / "key.pem", key)
    return NodeIdentity.load(name, directory / "cert.pem", directory / "key.pem")


async def _outcome(d: defer.Deferred) -> str:
    """"ok", or the condition of the IRPError `d` fails with."""
    try:
        await d
    except IRPError as e:
        return e.condition
    return "ok"


async def _fails(d: defer.Deferred, kind: type[Exception]) -> Exception:
    try:
        await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")


class SQLiteRegistryTests(RegistryTests, unittest.TestCase):
    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())


__all__ = ["IRPConnectionError", "LabSetup", "RegistryHarness", "RegistryTests"]


class FakeResolver:
    """Answers SRV queries from a table, as twisted.names.client would."""

    def __init__(self, records: dict[str, list[tuple[int, int, int, str]]]) -> None:
        self.records = records

    def lookupService(self, name: str):
        from twisted.names import dns, error

        if name not in self.records:
            return defer.fail(error.DNSNameError(name))
        answers = [dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(prio, weight, port,
                                                                       target))
                   for prio, weight, port, target in self.records[name]]
        return defer.succeed((answers, [], []))


class DiscoveryTests(unittest.TestCase):
    async def test_srv_in_priority_order(self) -> None:
        from sixnet.irp.client import find_registry

        resolver = FakeResolver({"_irp._tcp.example.test": [
            (20, 0, 4604, "backup.example.test"), (10, 0, 14604, "irp.example.test")]})
        assert await find_registry("example.test", resolver) == [
            ("irp.example.test", 14604), ("backup.example.test", 4604)]

    async def test_no_srv_means_the_domain_on_4604(self) -> None:
        from sixnet.irp.client import find_registry

        assert await find_registry("other.test", FakeResolver({})) == [("other.test", 4604)]

    async def test_dot_target_means_no_registry(self) -> None:
        from sixnet.irp.client import find_registry

        resolver = FakeResolver({"_irp._tcp.none.test": [(0, 0, 0, "")]})
        assert await find_registry("none.test", resolver) == []
