"""IRP 1.2 signed records (docs/irp.rst, "Signed records"): a person's record is signed once
per version and the same statement serves every caller until the record changes or its
window ends; what the client library checks of one; a 1.1 client still gets per-request
statements."""

from __future__ import annotations

import copy
import datetime
import threading
import time
from pathlib import Path

from lxml import etree
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from sixnet.core.timefmt import parse_rfc3339, rfc3339
from sixnet.irp.client import connect
from sixnet.irp.storage import StoredRecord
from sixnet.irp.wire import (
    IRPError,
    RecordStatement,
    ResponseSigner,
    q,
    signed_parts,
    signed_record,
)

from .test_irp import HOST, LabSetup, RegistryHarness, _fails, wait_for


class SignedRecordTests(RegistryHarness, unittest.TestCase):
    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())

    def capture(self, client) -> list:
        captured: list = []
        original = client._response

        def capture(node):
            captured.append(copy.deepcopy(node))
            original(node)

        client._response = capture
        return captured

    async def test_one_signature_serves_every_caller_until_the_record_changes(self) -> None:
        service = await self.start(answer_validity=60)
        records = service.factory.records
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)], lifetime=3600)
        alice = await self.client(service, self.lab.person("alice@example.test"))
        carol = await self.client(service, self.lab.person("carol@example.test"))
        seen_a, seen_c = self.capture(alice), self.capture(carol)
        before = records.signatures
        await alice.lookup("bob@example.test")
        await carol.lookup("bob@example.test")
        await alice.lookup("bob@example.test")
        assert records.signatures == before + 1
        signed = [etree.tostring(n.find(q("record"))) + etree.tostring(n.find(q("signature")))
                  for n in (seen_a[0], seen_c[0], seen_a[1])]
        assert signed[0] == signed[1] == signed[2]
        record = seen_a[0].find(q("record"))
        assert record.get("subject") == "bob@example.test" and record.get("requester") is None
        assert parse_rfc3339(record.get("not-after")) - parse_rfc3339(record.get("time")) == \
            datetime.timedelta(seconds=60)
        version = int(record.get("version"))
        # a change: a new version, signed once again
        await bob.register([("2001:db8::2", 4605)])
        assert (await carol.lookup("bob@example.test")).addresses[0][0] == "2001:db8::2"
        assert records.signatures == before + 2
        assert int(seen_c[-1].find(q("record")).get("version")) > version
        assert carol.versions["bob@example.test"] > version

    async def test_a_record_is_never_vouched_for_past_its_first_expiry(self) -> None:
        service = await self.start(answer_validity=300)
        bob = await self.client(service, self.lab.person("bob@example.test"))
        record = await bob.register([("2001:db8::1", 4605)], lifetime=20)
        seen = self.capture(bob)
        await bob.lookup("bob@example.test")
        statement = seen[-1].find(q("record"))
        assert parse_rfc3339(statement.get("not-after")) == record.devices[0].expires

    async def test_watch_notifications_carry_the_signed_record(self) -> None:
        service = await self.start()
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        alice = await self.client(service, self.lab.person("alice@example.test"))
        heard = []
        notes: list = []
        original = alice._notification
        alice._notification = lambda node: (notes.append(copy.deepcopy(node)), original(node))
        await alice.watch("bob@example.test", heard.append)
        await bob.register([("2001:db8::2", 4605)])
        await wait_for(lambda: heard)
        assert heard[-1].addresses[0][0] == "2001:db8::2"
        assert notes[-1].find(q("record")).get("subject") == "bob@example.test"
        assert notes[-1].get("request") is not None

    async def test_the_client_refuses_records_it_must_not_use(self) -> None:
        service = await self.start()
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.lookup("bob@example.test")
        seen = alice.versions["bob@example.test"]
        signer = ResponseSigner(self.lab.host.key, self.lab.host.certificate)
        now = datetime.datetime.now(datetime.UTC)
        good = {"subject": "bob@example.test", "version": seen, "registry": HOST,
                "time": rfc3339(now), "not_after": rfc3339(now + datetime.timedelta(minutes=1))}
        payload = b'<person id="bob@example.test"></person>'
        cases = [
            ({"subject": "carol@example.test"}, payload, "subject is 'carol@example.test'"),
            ({}, b'<person id="carol@example.test"></person>', "does not hold"),
            ({"version": seen - 1}, payload, f"older than version {seen}"),
            ({"not_after": rfc3339(now - datetime.timedelta(seconds=1))}, payload, "expired"),
            ({"time": rfc3339(now + datetime.timedelta(hours=1))}, payload, "in the future"),
        ]
        for change, body, refused in cases:
            answer = alice.lookup("bob@example.test")
            rid = max(alice._pending, key=int)
            record = signed_record(RecordStatement(**{**good, **change}), body)
            alice._response(etree.fromstring(
                f'<result xmlns="urn:sixnet:irp:1" id="{rid}">'.encode() + record +
                signer.signature(record) + b"</result>"))
            error = await _fails(answer, IRPError)
            assert error.condition == "bad-request" and refused in error.text, (change, error)
        # a changed byte does not verify
        answer = alice.lookup("bob@example.test")
        rid = max(alice._pending, key=int)
        record = signed_record(RecordStatement(**good), payload)
        alice._response(etree.fromstring(
            f'<result xmlns="urn:sixnet:irp:1" id="{rid}">'.encode() +
            record.replace(b'version="', b'version="1', 1) +
            signer.signature(record) + b"</result>"))
        error = await _fails(answer, IRPError)
        assert "does not verify" in error.text
        # a per-request <data> where a 1.2 lookup must get a record
        answer = alice.lookup("bob@example.test")
        rid = max(alice._pending, key=int)
        alice._response(etree.fromstring(
            f'<result xmlns="urn:sixnet:irp:1" id="{rid}"><data/><signature/></result>'.encode()))
        error = await _fails(answer, IRPError)
        assert "not a signed record" in error.text

    async def test_a_1_1_client_gets_per_request_statements(self) -> None:
        service = await self.start()
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        old = await connect("127.0.0.1", self.port(service), self.lab.client_store(),
                            identity=self.lab.person("alice@example.test"), server_name=HOST,
                            version="1.1")
        self.addCleanup(old.close)
        seen = self.capture(old)
        record = await old.lookup("bob@example.test")
        assert record.addresses[0][0] == "2001:db8::1"
        data, _ = signed_parts(seen[-1])
        assert data.tag == q("data")
        assert (data.get("op"), data.get("requester"), data.get("subject")) == \
            ("lookup", "alice@example.test", "bob@example.test")
        heard = []
        await old.watch("bob@example.test", heard.append)
        await bob.register([("2001:db8::2", 4605)])
        await wait_for(lambda: heard)
        assert heard[-1].addresses[0][0] == "2001:db8::2"

    async def test_a_kept_answer_is_sent_at_once_but_only_where_the_full_path_would(
            self) -> None:
        """A lookup of a kept answer skips the store (and the request machinery) but not
        the access policy, its refusal, the audit or the counters."""
        service = await self.start(lookup_access="same-domain")
        registry = service.registry
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.lookup("bob@example.test")
        reads = self.count_reads(service)
        ok_before = registry.counters.ok["lookup"].value
        assert (await alice.lookup("bob@example.test")).addresses[0][0] == "2001:db8::1"
        assert reads == [] and registry.counters.ok["lookup"].value == ok_before + 1
        eve = await self.client(service, self.lab.person("eve@other.test"))
        error = await _fails(eve.lookup("bob@example.test"), IRPError)
        assert error.condition == "forbidden"
        refused = [e for e in self.audit(service) if e["outcome"] == "refused"]
        assert refused[-1]["event"] == "lookup" and refused[-1]["actor"] == "eve@other.test"
        # a change is seen at once: the kept answer is dropped, the next lookup reads
        await bob.register([("2001:db8::2", 4605)])
        assert (await alice.lookup("bob@example.test")).addresses[0][0] == "2001:db8::2"
        assert reads == ["bob@example.test"]


class StoredRecordTests(RegistryHarness, unittest.TestCase):
    """A signed record is kept in the database for the other workers and for restarts
    (``irp_record``), and used only while it is still good."""

    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())

    async def stored(self, service) -> dict:
        rows = await service.registry.store.db.run("read", lambda c: c.execute(
            "SELECT person, version, statement FROM irp_record").fetchall())
        return {r[0]: (r[1], bytes(r[2])) for r in rows}

    async def test_a_restarted_registry_answers_from_the_stored_signature(self) -> None:
        database = self.database_url()
        first = await self.start(database=database)
        bob = await self.client(first, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        alice = await self.client(first, self.lab.person("alice@example.test"))
        seen = (await alice.lookup("bob@example.test")).addresses
        await wait_for(lambda: first.factory.records.signatures == 1)
        stored = {}
        while "bob@example.test" not in stored:
            stored = await self.stored(first)
        bob.close()
        alice.close()
        await first.stopService()

        second = await self.start(database=database)
        alice = await self.client(second, self.lab.person("alice@example.test"))
        assert (await alice.lookup("bob@example.test")).addresses == seen
        assert second.factory.records.signatures == 0  # verified by the client, not re-signed
        # a change makes the stored signature useless at once: the next lookup signs anew
        bob = await self.client(second, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::2", 4605)])
        assert (await alice.lookup("bob@example.test")).addresses[0][0] == "2001:db8::2"
        assert second.factory.records.signatures == 1

    async def test_a_stored_record_is_used_only_while_version_crls_and_time_hold(self) -> None:
        service = await self.start()
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        store = service.registry.store
        now = service.registry.now_ms()
        view = await store.person_view("bob@example.test", now)
        record = StoredRecord(b"<record>signed</record>", now + 60_000, now + 50_000)
        await store.keep_record("bob@example.test", view.version, "crls-a", record)
        good = await store.person_view("bob@example.test", now, "crls-a")
        assert good.record == record and good.version == view.version
        # other CRLs, or past its re-signing time: the rows are read instead
        assert (await store.person_view("bob@example.test", now, "crls-b")).record is None
        late = await store.person_view("bob@example.test", now + 50_000, "crls-a")
        assert late.record is None and late.devices
        # an older version never replaces a newer one
        older = StoredRecord(b"<record>old</record>", now + 60_000, now + 50_000)
        await store.keep_record("bob@example.test", view.version - 1, "crls-a", older)
        assert (await store.person_view("bob@example.test", now, "crls-a")).record == record
        # a change raises the version: the stored record is not used
        await bob.register([("2001:db8::2", 4605)])
        changed = await store.person_view("bob@example.test", now, "crls-a")
        assert changed.record is None and changed.devices[0].addresses[0][0] == "2001:db8::2"
        # expired records go with the expired devices; a removed person's record goes too
        await store.keep_record("bob@example.test", changed.version, "crls-a", record)
        await store.purge_expired(now + 50_000)
        assert "bob@example.test" not in await self.stored(service)
        await store.keep_record("bob@example.test", changed.version, "crls-a", record)
        assert await store.remove_person("bob@example.test")
        assert await self.stored(service) == {}

    async def test_on_sqlite_a_stored_record_is_read_at_once_as_last_committed(
            self) -> None:
        """`stored_view` reads on the reactor thread: the same record the batched read
        gives, every commit before it seen, and no wait while a write holds the lock."""
        service = await self.start()
        bob = await self.client(service, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)])
        store, person = service.registry.store, "bob@example.test"
        now = service.registry.now_ms()
        assert store.stored_view(person, now, "crls-a") is None  # nothing stored yet
        view = await store.person_view(person, now)
        record = StoredRecord(b"<record>signed</record>", now + 60_000, now + 50_000)
        await store.keep_record(person, view.version, "crls-a", record)
        at_once = store.stored_view(person, now, "crls-a")
        assert at_once == await store.person_view(person, now, "crls-a")
        assert at_once.record == record and at_once.version == view.version
        assert store.stored_view(person, now, "crls-b") is None
        assert store.stored_view(person, now + 50_000, "crls-a") is None
        holding, release = threading.Event(), threading.Event()

        def change(cursor) -> None:
            cursor.execute("UPDATE irp_person SET version = version + 1 WHERE id = ?",
                           (person,))
            holding.set()
            release.wait(10)

        written = store.db.run("a change holding the write lock", change)
        await deferToThread(holding.wait, 10)
        started = time.monotonic()
        assert store.stored_view(person, now, "crls-a") == at_once  # not committed yet
        assert time.monotonic() - started < 0.5
        release.set()
        await written
        assert store.stored_view(person, now, "crls-a") is None  # its version moved on

    async def test_the_crl_digest_changes_with_the_crls(self) -> None:
        store = self.lab.server_store()
        before = store.revocations
        assert before == self.lab.server_store().revocations  # same files, same digest
        self.lab.ca.revoke(self.lab.person("bob@example.test").certificate.serial_number)
        store.reload_crls()
        assert store.revocations != before
