"""The shared XML stream layer and limits, over StringTransport with a fake clock."""

from __future__ import annotations

from typing import Any

from lxml import etree
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sixnet.core.stream.limits import AddressLimiter, TokenBucket
from sixnet.core.stream.parser import StreamOpened, StreamParser
from sixnet.core.stream.protocol import (
    StreamError,
    StreamFormat,
    XMLStreamProtocol,
    attribute_error,
    child_error,
)

NS = "urn:example:test"
FORMAT = StreamFormat("<?xml version='1.0'?>", "t", (("xmlns", NS),), attribute_error(NS, "err"))
HEADER = f"<t xmlns='{NS}'>".encode()


class TLSTransport(StringTransport):
    tls: object = None

    def startTLS(self, context: object) -> None:
        self.tls = context


class Recorder(XMLStreamProtocol):
    """Answers the header, starts TLS on <starttls/>, refuses <bad/>, records the rest."""

    format = FORMAT

    def __init__(self, clock: Clock, **timeouts: Any) -> None:
        super().__init__(StreamParser(max_element_bytes=1024), clock, **timeouts)
        self.seen: list[str] = []
        self.ended = 0

    def header_attributes(self):
        return (("from", "here"), ("lang", None))

    def stream_opened(self, header: StreamOpened) -> None:
        self.send_header()

    def element_received(self, element: etree._Element) -> None:
        name = etree.QName(element).localname
        if name == "starttls":
            self.start_tls("context", b"<proceed/>")
        elif name == "bad":
            raise StreamError("bad-format", "no <bad/> & no <worse/>")
        else:
            self.seen.append(name)

    def stream_ended(self) -> None:
        self.ended += 1


def connect(**timeouts: Any) -> tuple[Recorder, TLSTransport, Clock]:
    clock = Clock()
    protocol = Recorder(clock, **timeouts)
    transport = TLSTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_formats_write_header_error_and_close() -> None:
    assert FORMAT.header((("a", 'x"<&\n'), ("b", None))) == \
        b"<?xml version='1.0'?><t xmlns=\"urn:example:test\" a=\"x&quot;&lt;&amp;&#10;\">"
    assert FORMAT.close == b"</t>"
    assert FORMAT.error("bad-format", "a & b", b"") == \
        b'<err xmlns="urn:example:test" condition="bad-format">a &amp; b</err>'
    rfc = child_error("stream:error", "urn:ietf:params:xml:ns:xmpp-streams")
    assert rfc("conflict", "", b"<x/>") == (b"<stream:error><conflict xmlns='urn:ietf:params:"
                                            b"xml:ns:xmpp-streams'/><x/></stream:error>")


def test_stream_error_writes_our_header_first_once() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(HEADER + b"<a/><bad/><b/>")
    out = transport.value()
    assert out.count(b"<t ") == 1 and out.startswith(b"<?xml version='1.0'?><t ")
    assert b'condition="bad-format">no &lt;bad/&gt; &amp; no' in out and out.endswith(b"</t>")
    assert protocol.seen == ["a"] and protocol.closed and protocol.ended == 1
    assert transport.disconnecting
    protocol.dataReceived(b"<c/>")  # nothing more is read
    assert protocol.seen == ["a"]


def test_parse_error_before_any_header_still_gets_one() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(b"<!DOCTYPE t>")
    out = transport.value()
    assert out.startswith(b"<?xml version='1.0'?><t ") and b'condition="restricted-xml"' in out


def test_unclean_close_is_aborted_after_the_grace() -> None:
    protocol, transport, clock = connect()
    protocol.send_stream_error("conflict")
    assert transport.disconnecting and not transport.disconnected
    clock.advance(10.1)
    assert transport.disconnected


def test_starttls_restarts_the_stream() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(HEADER + b"<starttls/>")
    assert transport.tls == "context" and protocol.tls_pending
    assert not protocol.header_sent and not protocol.header_received
    protocol.handshakeCompleted()
    transport.clear()
    protocol.dataReceived(HEADER + b"<a/>")  # a new stream, inside TLS
    assert transport.value().startswith(b"<?xml") and protocol.seen == ["a"]


def test_anything_after_starttls_in_the_clear_is_refused() -> None:
    for extra in (b"<a/>", b"<a", b"<a x='>", b" <a>"):
        protocol, transport, _ = connect()
        protocol.dataReceived(HEADER + b"<starttls/>" + extra)
        out = transport.value()
        assert out.index(b"<proceed/>") < out.index(b'condition="policy-violation"'), extra
        assert transport.tls is None and protocol.seen == []
    protocol, transport, _ = connect()
    protocol.dataReceived(HEADER + b"<starttls/>")
    protocol.dataReceived(b"<a/>")  # before the handshake: it came in the clear
    assert transport.disconnected and protocol.seen == []


def test_stall_timer_covers_header_partial_elements_and_the_handshake() -> None:
    protocol, transport, clock = connect(stall_timeout=5.0)
    clock.advance(5.1)
    assert transport.disconnecting  # no header
    protocol, transport, clock = connect(stall_timeout=5.0)
    protocol.dataReceived(HEADER + b"<a/><b")
    clock.advance(4)
    protocol.dataReceived(b" x='1'")  # still the same element: the clock keeps running
    clock.advance(1.1)
    assert b"connection-timeout" in transport.value()
    protocol, transport, clock = connect(stall_timeout=5.0)
    protocol.dataReceived(HEADER + b"<a/>")
    clock.advance(60)
    assert not transport.disconnecting  # nothing is due
    protocol.dataReceived(b"<starttls/>")
    clock.advance(5.1)
    assert transport.disconnected  # the handshake did not come: cut, nothing to say


def test_negotiation_deadline_and_idle_timer() -> None:
    protocol, transport, clock = connect(negotiation_timeout=5.0)
    protocol.dataReceived(HEADER)
    clock.advance(5.1)
    assert b'condition="connection-timeout">stream negotiation' in transport.value()
    protocol, transport, clock = connect(negotiation_timeout=5.0)
    protocol.negotiated()
    clock.advance(60)
    assert not transport.disconnecting
    protocol, transport, clock = connect(idle_timeout=10.0)
    for _ in range(5):
        clock.advance(9)
        protocol.dataReceived(b" ")
    assert not transport.disconnecting
    clock.advance(10.1)
    assert b'condition="connection-timeout">no data' in transport.value()


def test_held_events_wait_for_release() -> None:
    protocol, _, _ = connect()
    protocol.dataReceived(HEADER)
    protocol.hold()
    protocol.dataReceived(b"<a/><b/>")
    assert protocol.seen == []
    protocol.release()
    assert protocol.seen == ["a", "b"]


def test_address_limiter() -> None:
    limiter = AddressLimiter(2)
    assert limiter.acquire("a") and limiter.acquire("a") and not limiter.acquire("a")
    assert limiter.acquire("b") and limiter.held("a") == 2 and len(limiter) == 2
    limiter.release("a")
    assert limiter.acquire("a")
    limiter.release("b")
    assert len(limiter) == 1 and limiter.held("b") == 0



def test_address_limiter_counts_an_ipv6_host_by_its_64() -> None:
    """One IPv6 host picks addresses from a whole /64: they share one allowance. IPv4 counts
    per address, the same whether or not it arrives IPv4-mapped on an IPv6 socket."""
    limiter = AddressLimiter(2)
    assert limiter.acquire("2001:db8:0:1::1") and limiter.acquire("2001:db8:0:1:ffff::2")
    assert not limiter.acquire("2001:db8:0:1::3")  # the same /64
    assert limiter.held("2001:db8:0:1::99") == 2
    assert limiter.acquire("2001:db8:0:2::1")  # the next /64 is another host
    limiter.release("2001:db8:0:1::1")
    assert limiter.acquire("2001:db8:0:1::4")
    assert limiter.acquire("192.0.2.1") and limiter.acquire("::ffff:192.0.2.1")
    assert not limiter.acquire("192.0.2.1") and not limiter.acquire("::ffff:192.0.2.1")
    assert limiter.acquire("192.0.2.2")  # IPv4 stays per address
    for address in ("192.0.2.1", "::ffff:192.0.2.1", "2001:db8:0:1:ffff::2",
                    "2001:db8:0:1::4", "2001:db8:0:2::1", "192.0.2.2"):
        limiter.release(address)
    assert len(limiter) == 0

def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert not bucket.full(1.0) and bucket.full(2.0)
    assert bucket.take(100.0) and bucket.tokens == 2.0  # never more than the burst
