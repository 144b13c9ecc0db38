"""IRP 1.2 signed records (docs/irp.rst, "Signed records"): a person's record is signed once
per version and the same statement serves every caller until the record changes or its
window ends; what the client library checks of one; a 1.1 client still gets per-request
statements."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

from lxml import etree
from twisted.trial import unittest

from sixnet.core.timefmt import parse_rfc3339, rfc3339
from sixnet.irp.client import connect
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
        reads: list[str] = []
        original = registry.store.person_view

        def counted(person: str, now: int, *crls: str):
            reads.append(person)
            return original(person, now, *crls)

        registry.store.person_view = counted
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
