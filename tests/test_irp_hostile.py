"""Hostile and broken input: each gets the protocol's error or a close; others keep working."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path

from lxml import etree
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from sixnet.core.timefmt import parse_rfc3339, rfc3339
from sixnet.irp.client import IRPConnectionError, IRPError, connect
from sixnet.irp.wire import (
    ResponseSigner,
    Statement,
    q,
    signed_data,
    signed_parts,
    verify_signature,
)

from .test_irp import HOST, LabSetup, RegistryHarness, _address, _fails, wait_for


class RawClient(Protocol):
    """Sends bytes in the clear and collects whatever comes back until the close."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(self.received)


class HostileInputTests(RegistryHarness, unittest.TestCase):
    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())

    async def raw(self, service, data: bytes) -> bytes:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port(service))
        client = RawClient()
        await endpoints.connectProtocol(endpoint, client)
        client.transport.write(data)
        timer = reactor.callLater(5, client.transport.abortConnection)
        received = await client.closed
        if timer.active():
            timer.cancel()
        return received

    async def still_serving(self, service) -> None:
        """Another client is unaffected: it registers and looks up as usual."""
        other = await self.client(service, self.lab.person("bystander@example.test"))
        await other.register([("2001:db8::b", 4605)])
        assert (await other.lookup("bystander@example.test")).addresses

    async def stream_error_after_tls(self, service, data: bytes) -> IRPConnectionError:
        client = await self.client(service, self.lab.person("mallory@example.test"))
        client.protocol.transport.write(data)
        error = await client.lost
        return error

    # -- in the clear ---------------------------------------------------------------------------

    async def test_doctype_and_entities_refused(self) -> None:
        service = await self.start()
        reply = await self.raw(service, b'<?xml version="1.0"?><!DOCTYPE irp [<!ENTITY a '
                                        b'"&#38;a;&#38;a;">]><irp xmlns="urn:sixnet:irp:1">')
        assert b'condition="restricted-xml"' in reply
        await self.still_serving(service)

    async def test_request_before_starttls_refused(self) -> None:
        service = await self.start()
        reply = await self.raw(service, b'<irp xmlns="urn:sixnet:irp:1" version="1.0">'
                                        b'<lookup id="1" user="a@example.test"/>')
        assert b"<features" in reply and b'condition="policy-violation"' in reply
        assert reply.endswith(b"</irp>")

    async def test_wrong_namespace_and_version(self) -> None:
        service = await self.start()
        reply = await self.raw(service, b'<irp xmlns="urn:other" version="1.0">')
        assert b'condition="invalid-namespace"' in reply
        reply = await self.raw(service, b'<irp xmlns="urn:sixnet:irp:1" version="2.0">')
        assert b'condition="unsupported-version"' in reply

    async def test_malformed_xml_closes_only_that_stream(self) -> None:
        service = await self.start()
        error = await self.stream_error_after_tls(
            service, b'<lookup id="1" user="a@example.test"></lookupx>')
        assert error.condition == "not-well-formed"
        await self.still_serving(service)

    async def test_text_between_messages_is_refused_at_once(self) -> None:
        service = await self.start(stall_timeout=30)
        client = await self.client(service, self.lab.person("mallory@example.test"))
        client.protocol.transport.write(b'<frobnicate id="1"/>hello')
        started = reactor.seconds()
        error = await client.lost
        assert error.condition == "bad-format"
        assert reactor.seconds() - started < 5
        await self.still_serving(service)

    async def test_oversized_message(self) -> None:
        service = await self.start(max_message_bytes=4096)
        error = await self.stream_error_after_tls(
            service, b'<backup-put id="1">' + b"A" * 20000 + b"</backup-put>")
        assert error.condition == "policy-violation"
        await self.still_serving(service)

    async def test_stalled_client_times_out(self) -> None:
        service = await self.start(stall_timeout=0.3)
        error = await self.stream_error_after_tls(service, b'<lookup id="1" user="a@exa')
        assert error.condition == "connection-timeout"
        assert any(e["event"] == "timeout" for e in self.audit(service))
        await self.still_serving(service)

    async def test_idle_client_times_out_unless_it_keeps_alive(self) -> None:
        service = await self.start(idle_timeout=0.3)
        store = self.lab.client_store()
        quiet = await connect("127.0.0.1", self.port(service), store, server_name=HOST,
                              identity=self.lab.person("idle@example.test"), keepalive=0)
        alive = await connect("127.0.0.1", self.port(service), store, server_name=HOST,
                              identity=self.lab.person("alive@example.test"), keepalive=0.1)
        self.addCleanup(alive.close)
        error = await quiet.lost
        assert error.condition == "connection-timeout"
        await task.deferLater(reactor, 0.4, lambda: None)
        assert (await alive.register([("192.0.2.1", 4605)])).addresses

    async def test_connection_flood_from_one_address(self) -> None:
        service = await self.start(max_connections_per_address=3)
        people = [await self.client(service, self.lab.person(f"p{i}@example.test"))
                  for i in range(3)]
        error = await _fails(self.client(service), IRPConnectionError)
        assert error.condition == "resource-constraint"
        await people[0].register([("192.0.2.7", 4605)])  # the first three still work
        people[2].close()
        await people[2].lost
        await task.deferLater(reactor, 0.05, lambda: None)
        await self.still_serving(service)

    async def test_ipv4_mapped_connections_count_with_their_ipv4_address(self) -> None:
        """127.0.0.1 on the IPv4 port and, IPv4-mapped, on an IPv6 port is one address: both
        ports' connections count against its one allowance."""
        service = await self.start(max_connections_per_address=2, listen=[
            "tcp:0:interface=127.0.0.1", r"tcp6:0:interface=\:\:ffff\:127.0.0.1"])
        await wait_for(lambda: len(service.listening.ports) == 2)
        ports = {type(p.getHost()).__name__: p.getHost().port for p in service.listening.ports}
        store = self.lab.client_store()

        async def client(port: int):
            connected = await connect("127.0.0.1", port, store, server_name=HOST)
            self.addCleanup(connected.close)
            return connected

        await client(ports["IPv4Address"])
        mapped = await client(ports["IPv6Address"])
        for port in ports.values():
            error = await _fails(client(port), IRPConnectionError)
            assert error.condition == "resource-constraint"
        mapped.close()
        await mapped.lost
        await wait_for(lambda: service.factory.per_address.held("127.0.0.1") < 2)
        assert await client(ports["IPv4Address"])

    # -- bad requests inside a good stream --------------------------------------------------------

    async def test_bad_requests_get_errors_and_the_stream_goes_on(self) -> None:
        service = await self.start(max_addresses=2)
        client = await self.client(service, self.lab.person("alice@example.test"))
        cases = [
            ("register", {"device": "x"},
             [_address("2001:db8::1", 1), _address("2001:db8::2", 2),
              _address("2001:db8::3", 3)], "policy-violation"),
            ("register", {}, [_address("2001:db8::zz", 4605)], "bad-request"),
            ("register", {}, [_address("fe80::1%eth0", 4605)], "bad-request"),
            ("register", {}, [_address("192.0.2.300", 4605)], "bad-request"),
            ("register", {}, [_address("192.0.2.3", 70000)], "bad-request"),
            ("register", {"device": "no spaces"}, [_address("192.0.2.3", 1)], "bad-request"),
            ("register", {"lifetime": "999999999"}, [_address("192.0.2.3", 1)],
             "bad-request"),
            ("lookup", {"user": "not-a-user"}, [], "bad-request"),
            ("frobnicate", {}, [], "feature-not-implemented"),
        ]
        for op, attrib, children, condition in cases:
            error = await _fails(client.request(op, attrib, children), IRPError)
            assert error.condition == condition, (op, attrib, error)
        # an element in a foreign namespace
        client.protocol.transport.write(b'<x:lookup xmlns:x="urn:other" id="77"/>')
        d = defer.Deferred()
        client._pending["77"] = ("lookup", d)
        error = await _fails(d, IRPError)
        assert error.condition == "feature-not-implemented"
        record = await client.register([("2001:db8::1", 4605)])
        assert record.addresses == [("2001:db8::1", 4605, "default")]

    async def capture(self, client) -> list:
        """The responses `client` receives from now on, as parsed."""
        captured: list = []
        original = client._response

        def capture(node):
            captured.append(copy.deepcopy(node))
            original(node)

        client._response = capture
        return captured

    async def test_duplicate_id_in_flight_is_refused_without_an_id(self) -> None:
        """The request in flight gets its one answer; the repeat gets an id-less error."""
        service = await self.start()
        client = await self.client(service, self.lab.person("alice@example.test"))
        await client.register([("2001:db8::1", 4605)])
        captured = await self.capture(client)
        d = defer.Deferred()
        client._pending["dup"] = ("certificates", d)
        client._asked["dup"] = ("alice@example.test", None)
        client.protocol.transport.write(
            b'<certificates id="dup" user="alice@example.test"/>' * 2)
        data = await d
        assert data.get("request") == "dup"
        await client.lookup("alice@example.test")  # answered after both
        errors = [n for n in captured if n.tag == q("error")]
        assert [(e.get("id"), e.get("condition")) for e in errors] == [(None, "bad-request")]
        assert [n.get("id") for n in captured if n.tag == q("result")].count("dup") == 1
        # once answered, the id may be used again
        client._pending["dup"] = ("certificates", d := defer.Deferred())
        client._asked["dup"] = ("alice@example.test", None)
        client.protocol.transport.write(b'<certificates id="dup" user="alice@example.test"/>')
        assert (await d).get("request") == "dup"

    async def test_second_watch_of_a_person_is_a_conflict(self) -> None:
        service = await self.start()
        client = await self.client(service, self.lab.person("alice@example.test"))
        await client.register([("2001:db8::1", 4605)])
        heard = []
        await client.watch("alice@example.test", heard.append)
        error = await _fails(client.request("watch", {"user": "alice@example.test"}), IRPError)
        assert error.condition == "conflict"
        # two at once: the second is refused while the first is being answered
        other = await self.client(service, self.lab.person("bob@example.test"))
        first = other.request("watch", {"user": "alice@example.test"})
        error = await _fails(other.request("watch", {"user": "alice@example.test"}), IRPError)
        assert error.condition == "conflict"
        await first
        # the first watch still works, and after unwatch a new one is allowed
        await client.register([("2001:db8::2", 4605)])
        await task.deferLater(reactor, 0.2, lambda: None)
        assert heard and heard[-1].addresses[0][0] == "2001:db8::2"
        await client.unwatch("alice@example.test")
        await client.watch("alice@example.test", heard.append)

    async def test_client_refuses_answers_for_another_query_requester_or_too_old(self) -> None:
        """Answers signed by the registry itself, but not for this request of this caller,
        or no longer valid, are refused by the client library."""
        service = await self.start(answer_validity=60)
        client = await self.client(service, self.lab.person("alice@example.test"))
        await client.register([("2001:db8::1", 4605)])
        captured = await self.capture(client)
        await client.certificates("alice@example.test")
        data = captured[-1].find(q("data"))
        assert (data.get("requester"), data.get("subject"), data.get("op")) == \
            ("alice@example.test", "alice@example.test", "certificates")
        assert parse_rfc3339(data.get("not-after")) - parse_rfc3339(data.get("time")) == \
            datetime.timedelta(seconds=60)
        signer = ResponseSigner(self.lab.host.key, self.lab.host.certificate)
        now = datetime.datetime.now(datetime.UTC)
        good = {"op": "certificates", "registry": HOST, "time": rfc3339(now),
                "not_after": rfc3339(now + datetime.timedelta(seconds=60)),
                "requester": "alice@example.test", "subject": "bob@example.test"}
        payload = b'<person id="bob@example.test"></person>'
        for change, refused in (({"requester": "mallory@example.test"}, "its requester"),
                                ({"subject": "carol@example.test"}, "its subject"),
                                ({"op": "watch"}, "its op"),
                                ({"not_after": rfc3339(now - datetime.timedelta(seconds=1))},
                                 "expired")):
            answer = client.certificates("bob@example.test")
            rid = max(client._pending, key=int)
            data_bytes = signed_data(Statement(request=rid, **{**good, **change}), payload)
            client._response(etree.fromstring(
                f'<result xmlns="urn:sixnet:irp:1" id="{rid}">'.encode() + data_bytes +
                signer.signature(data_bytes) + b"</result>"))
            error = await _fails(answer, IRPError)
            assert error.condition == "bad-request" and refused in error.text, (change, error)
        # the registry's own answer, judged by a clock past its window
        client.clock = lambda: service.registry.clock() + 61
        error = await _fails(client.certificates("alice@example.test"), IRPError)
        assert "expired" in error.text

    async def test_signature_verifies_and_fails_when_a_byte_changes(self) -> None:
        service = await self.start()
        client = await self.client(service, self.lab.person("alice@example.test"))
        captured = []
        original = client._response

        def capture(node):
            captured.append(copy.deepcopy(node))
            original(node)

        client._response = capture
        await client.register([("2001:db8::1", 4605)])
        await client.lookup("alice@example.test")
        node = captured[-1]
        server_cert = self.lab.host.certificate
        verify_signature(*signed_parts(node), server_cert)
        wire = etree.tostring(node)
        assert b'port="4605"' in wire
        for original_bytes, changed in ((b'port="4605"', b'port="4606"'),
                                        (b"2001:db8::1", b"2001:db8::2")):
            tampered = etree.fromstring(wire.replace(original_bytes, changed, 1))
            error = None
            try:
                verify_signature(*signed_parts(tampered), server_cert)
            except IRPError as e:
                error = e
            assert error is not None and "does not verify" in error.text
        # the certificate bytes inside the signed data are covered too
        tampered = etree.fromstring(wire)
        cert = tampered.find(f".//{q('certificate')}")
        cert.text = cert.text[:-8] + ("A" if cert.text[-8] != "A" else "B") + cert.text[-7:]
        try:
            verify_signature(*signed_parts(tampered), server_cert)
        except IRPError:
            return
        raise AssertionError("a changed certificate byte verified")
