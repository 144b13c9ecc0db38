"""The registry's connection state machine, fed bytes over StringTransport with a fake clock."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lxml import etree
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sixnet.core.audit import AuditLog
from sixnet.core.storage.database import Database
from sixnet.core.stream.parser import XMLStreamError
from sixnet.core.timefmt import rfc3339
from sixnet.irp.config import IRPConfig
from sixnet.irp.engine.registry import Registry
from sixnet.irp.protocol import IRPServerFactory, MessageGapParser, PlainLookup
from sixnet.irp.storage import SQLRegistryStore
from sixnet.irp.wire import (
    Address,
    CertificateInfo,
    DeviceRecord,
    IRPError,
    Limits,
    LookupRequest,
    PersonRecord,
    ResponseSigner,
    Statement,
    canonical_bytes,
    canonical_payload,
    chain_element,
    element,
    parse_request,
    parse_user,
    person_payload,
    q,
    read_person,
    request_id,
    serialize,
    signed_data,
)
from sixnet.pki.tls import ServerTLS

HEADER = b'<irp xmlns="urn:sixnet:irp:1" version="1.0" to="irp.example.test">'


class TLSRecordingTransport(StringTransport):
    """StringTransport that notes when TLS would start."""

    tls_started = False

    def startTLS(self, context_factory: object) -> None:
        self.tls_started = True


@pytest.fixture
def factory(tmp_path: Path, pki) -> IRPServerFactory:
    host = pki.identity("host", "irp.example.test")
    clock = Clock()
    config = IRPConfig(stall_timeout=5.0, idle_timeout=60.0, max_connections_per_address=2)
    db = Database(f"sqlite:{tmp_path / 'irp.sqlite3'}")
    registry = Registry(SQLRegistryStore(db), pki.store(), config,
                        AuditLog(tmp_path / "audit.jsonl"), reactor=clock)
    made = IRPServerFactory(registry, ServerTLS(pki.store(), host, "requested"),
                            ResponseSigner(host.key, host.certificate), "irp.example.test",
                            reactor=clock)
    yield made
    db.close()


def audit_records(factory: IRPServerFactory) -> list[dict]:
    return [json.loads(line) for line in factory.registry.audit.path.read_text().splitlines()]


def connect(factory: IRPServerFactory, host: str = "192.0.2.1"):
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    transport = TLSRecordingTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_header_gets_starttls_offer(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER)
    out = transport.value()
    assert b'from="irp.example.test"' in out
    assert b'<starttls required="true"/>' in out
    protocol.dataReceived(b"<starttls/>")
    assert b"<proceed" in transport.value() and transport.tls_started


def test_request_before_starttls_is_a_stream_error(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER + b'<lookup id="1" user="a@example.test"/>')
    assert b'condition="policy-violation"' in transport.value()
    assert transport.disconnecting


def test_plaintext_after_starttls_is_refused(factory) -> None:
    """Bytes after <starttls/> in the same read (whole or half a message) get the
    policy-violation in the clear, after <proceed/>, and TLS is not started."""
    for n, extra in enumerate((b'<lookup id="1" user="a@example.test"/>', b"<look",
                               b' <lookup id="1">')):
        protocol, transport = connect(factory, f"192.0.2.{10 + n}")
        protocol.dataReceived(HEADER + b"<starttls/>" + extra)
        out = transport.value()
        assert out.index(b"<proceed") < out.index(b'condition="policy-violation"'), extra
        assert out.endswith(b"</irp>") and transport.disconnecting
        assert not transport.tls_started


def test_plaintext_after_proceed_is_refused(factory) -> None:
    """Data handed on before the TLS handshake completed can only have come in the clear."""
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER + b"<starttls/>")
    assert transport.tls_started
    protocol.dataReceived(b'<lookup id="1" user="a@example.test"/>')
    assert transport.disconnected  # nothing can be said while TLS is being set up


def test_starttls_split_across_reads_still_starts_tls(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER + b"<startt")
    protocol.dataReceived(b"ls/>  ")
    assert transport.tls_started and not transport.disconnecting


def test_stalled_message_times_out(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER + b"<startt")
    factory.reactor.advance(4.9)
    assert not transport.disconnecting
    factory.reactor.advance(0.2)
    assert b'condition="connection-timeout"' in transport.value()
    assert transport.disconnecting


def test_header_and_handshake_are_due_in_time(factory) -> None:
    silent, transport = connect(factory)
    factory.reactor.advance(5.1)
    assert b'condition="connection-timeout"' in transport.value()
    protocol, transport = connect(factory, "192.0.2.9")
    protocol.dataReceived(HEADER + b"<starttls/>")
    assert transport.tls_started
    factory.reactor.advance(4.9)
    assert not transport.disconnecting
    factory.reactor.advance(0.2)  # no handshake, no new header
    # Nothing can be written inside a TLS session that never started: the connection is cut
    # (a stream error would wait for the handshake forever in the TLS layer's buffer).
    assert transport.disconnected
    assert any(e["event"] == "timeout" for e in audit_records(factory))


def test_complete_messages_stop_the_stall_clock(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER[:20])
    factory.reactor.advance(3)
    protocol.dataReceived(HEADER[20:])
    factory.reactor.advance(10)
    assert b"connection-timeout" not in transport.value()


def test_idle_connection_times_out_and_whitespace_keeps_it(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER)
    for _ in range(5):
        factory.reactor.advance(50)
        protocol.dataReceived(b" ")
    assert not transport.disconnecting
    factory.reactor.advance(59.5)  # 60 s after the last byte, not after the first
    assert not transport.disconnecting
    factory.reactor.advance(1)
    assert b'condition="connection-timeout"' in transport.value()


def test_connections_per_address_are_limited(factory) -> None:
    first, _ = connect(factory)
    connect(factory)
    _, refused = connect(factory)
    assert b'condition="resource-constraint"' in refused.value() and refused.disconnecting
    assert b'from="irp.example.test"' in refused.value()  # a header like any other
    _, other_host = connect(factory, "192.0.2.2")
    assert not other_host.disconnecting
    first.connectionLost()
    _, again = connect(factory)
    assert not again.disconnecting


def test_doctype_is_refused_before_parsing(factory) -> None:
    protocol, transport = connect(factory)
    protocol.dataReceived(b'<!DOCTYPE irp [<!ENTITY x "y">]>' + HEADER)
    out = transport.value()
    assert out.startswith(b"<?xml") and b'condition="restricted-xml"' in out
    assert out.endswith(b"</irp>")


def test_signed_data_is_the_canonical_form_of_the_data_element() -> None:
    """The registry signs and sends `signed_data` bytes; a client canonicalizes the
    ``<data>`` element it parsed: both must be the same bytes."""
    def payload():
        return [element("person", {"id": "a@example.test"}, children=[
            element("address", {"ip": "2001:db8::1", "port": "4605", "device": "d",
                                "registered": "2026-11-22T01:00:00.000Z",
                                "expires": "2026-11-22T02:00:00.000Z"})]),
            element("more", {"after": 'x"&<>\t\n\ry'}, "text & <more> \r")]

    attrib = {"time": "2026-11-22T01:00:00.000Z", "request": "7:a",
              "registry": 'irp "&<> \t\n', "op": "lookup", "subject": "a@example.test",
              "requester": 'b"&<@example.test', "not-after": "2026-11-22T01:05:00.000Z",
              "serial": "1F"}
    expected = canonical_bytes(element("data", attrib, children=payload()))
    made = signed_data(Statement("lookup", "7:a", 'irp "&<> \t\n', "2026-11-22T01:00:00.000Z",
                                 "2026-11-22T01:05:00.000Z", 'b"&<@example.test',
                                 "a@example.test", "1F"),
                       canonical_payload(payload()))
    assert made == expected
    del attrib["requester"], attrib["serial"]  # an anonymous requester; no serial asked
    assert signed_data(Statement("lookup", "7:a", 'irp "&<> \t\n', "2026-11-22T01:00:00.000Z",
                                 "2026-11-22T01:05:00.000Z", subject="a@example.test"),
                       canonical_payload(payload())) == \
        canonical_bytes(element("data", attrib, children=payload()))
    wrapped = b'<result xmlns="urn:sixnet:irp:1" id="7:a">' + made + b"</result>"
    assert canonical_bytes(etree.fromstring(wrapped).find(q("data"))) == made


def test_person_payload_is_the_canonical_person_element(pki) -> None:
    """The registry builds a lookup's ``<person>`` bytes directly: they must be what
    canonicalizing the element gives, and read back as the same record."""
    cert = pki.identity("host", "irp.example.test").certificate  # any certificate
    t = datetime.datetime(2026, 11, 22, 1, 2, 3, 456000, tzinfo=datetime.UTC)
    later = t + datetime.timedelta(hours=1)
    devices = (DeviceRecord("phone", (Address("2001:db8::1", 4605),), later, later),
               DeviceRecord("lap.top_1", (Address("2001:db8::2", 1), Address("192.0.2.7", 9)),
                            t, later))
    for info in (CertificateInfo(format(cert.serial_number, "X"), "valid", (cert,)),
                 CertificateInfo(format(cert.serial_number, "X"), "revoked", (cert,), t),
                 None):
        record = PersonRecord("alice@example.test", devices, info)
        expected = element("person", {"id": record.person}, children=[
            element("address", {"ip": a.ip, "port": str(a.port), "device": d.device,
                                "registered": rfc3339(d.registered),
                                "expires": rfc3339(d.expires)})
            for d in devices for a in d.addresses] + ([chain_element(info)] if info else []))
        made = person_payload(record)
        assert made == canonical_payload([expected])
        assert read_person(etree.fromstring(b'<data xmlns="urn:sixnet:irp:1">' + made +
                                            b"</data>")[0]) == record
    removed = PersonRecord('odd"&<name@example.test', removed=True)
    assert person_payload(removed) == canonical_payload([
        element("person", {"id": removed.person, "removed": "true"})])


def test_text_between_messages_is_bad_format_when_it_arrives(factory) -> None:
    """libxml2 keeps text back until the next ``<``: the registry must not wait for it."""
    cases = ((HEADER + b"hello",), (HEADER, b"hello"), (HEADER, b" \r\n x"),
             (HEADER + b"  ", b"x"), (HEADER, b"&amp;"))
    for n, reads in enumerate(cases):
        protocol, transport = connect(factory, f"192.0.2.{20 + n}")
        for data in reads:
            protocol.dataReceived(data)
        out = transport.value()
        assert b'condition="bad-format"' in out and transport.disconnecting, reads
        assert not transport.tls_started
    protocol, transport = connect(factory, "192.0.2.30")  # text after <starttls/>: in the clear
    protocol.dataReceived(HEADER + b"<starttls/>hello")
    assert b'condition="policy-violation"' in transport.value() and not transport.tls_started


def test_text_inside_a_half_sent_message_is_not_a_gap(factory) -> None:
    """A ``>`` in an attribute value, or text inside an element, is not between messages."""
    protocol, transport = connect(factory)
    protocol.dataReceived(HEADER + b'<starttls x="a>b')
    protocol.dataReceived(b' c"/>')
    assert b"bad-format" not in transport.value()
    assert b"<proceed" in transport.value() and transport.tls_started


_LOOKUP_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)


@given(st.one_of(_LOOKUP_TEXT, st.sampled_from(["1", "a.b:c-d_9", "x" * 64, "x" * 65])),
       st.one_of(_LOOKUP_TEXT, st.sampled_from(["Bob@Example.Test", "bob@example.test.",
                                                "bob@nodot", "a@b@c.test", "xn--a@b.test"])),
       st.sampled_from(["", ' xmlns="urn:sixnet:irp:1"', ' xmlns="urn:other"']))
@settings(max_examples=300, deadline=None)
@example("1", "bob@example.test", ' xmlns="urn:sixnet:irp:1"')
def test_a_plain_lookup_means_what_libxml2_makes_of_it(rid: str, user: str,
                                                       xmlns: str) -> None:
    """Whatever the id and user, the namespace declared again or not: bytes taken as a
    `PlainLookup` make the same request (or the same error) as the element libxml2 parses
    from them."""
    data = f'<lookup{xmlns} id="{rid}" user="{user}"/>'.encode()
    plain, full = MessageGapParser(max_depth=8), MessageGapParser(max_depth=8)
    for parser in (plain, full):
        parser.feed(HEADER)
    plain.plain_lookups = True

    def events(parser: MessageGapParser) -> list | XMLStreamError:
        try:
            return parser.feed(data)
        except XMLStreamError as error:
            return error

    taken, parsed = events(plain), events(full)
    if not (isinstance(taken, list) and taken and isinstance(taken[0], PlainLookup)):
        return  # not plain: parsed by libxml2 exactly as without plain lookups
    [fast] = taken
    assert isinstance(parsed, list), parsed  # libxml2 takes every plain lookup
    [node] = parsed
    assert fast.id == request_id(node)

    def outcome(make):
        try:
            return make()
        except IRPError as error:
            return error.condition, error.text

    assert outcome(lambda: LookupRequest(fast.id, parse_user(fast.user))) == \
        outcome(lambda: parse_request(node, Limits(8, 86400, 3600, 32768)))


def test_a_plain_lookup_is_taken_only_between_messages_of_an_open_stream() -> None:
    data = b'<lookup id="1" user="bob@example.test"/>'
    parser = MessageGapParser(max_depth=8)
    parser.feed(HEADER)
    assert not isinstance(parser.feed(data)[0], PlainLookup)  # not enabled: libxml2's
    parser.plain_lookups = True
    assert parser.feed(data) == [PlainLookup("1", "bob@example.test")]
    # as the sixnet client writes it, the namespace declared again
    assert parser.feed(serialize(element("lookup", {"id": "2", "user": "bob@example.test"}))) \
        == [PlainLookup("2", "bob@example.test")]
    # inside a half-sent message the same bytes are a child element, not a lookup
    assert parser.feed(b'<backup-put id="2">') == []
    assert parser.feed(data) == []
    [backup] = parser.feed(b"</backup-put>")
    assert backup[0].get("user") == "bob@example.test"
    # two lookups in one feed, or one with spaces around, go through libxml2 as before
    assert [n.get("id") for n in parser.feed(data + data)] == ["1", "1"]
    # the stream's end: nothing is taken any more
    parser.feed(b"</irp>")
    with pytest.raises(XMLStreamError):
        parser.feed(data)
    parser.reset()
    assert not parser.plain_lookups  # a new stream decides again
