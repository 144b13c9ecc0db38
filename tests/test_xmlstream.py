"""Tests for the shared hardened XML stream parser (sixnet.core.stream.parser)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from lxml import etree

from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError

STREAMS = "http://etherx.jabber.org/streams"
XML_NS = "http://www.w3.org/XML/1998/namespace"
HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    b" to='example.com' version='1.0' xml:lang='en'>"
)
DECL = b"<?xml version='1.0' encoding='UTF-8'?>"
SMALL = b"<message to='a@b' type='chat'><body>hi</body></message>"
CLOSE = b"</stream:stream>"
# Everything the byte-split tests must survive: declaration, header, CDATA holding `<!--`,
# `<?` and a lone `]]`, character and predefined entity references, keepalives, close tag.
FULL = (
    DECL
    + b"\n"
    + HEADER
    + b"<message to='a@b' type='chat' id='m1'><body>a&#x263A;&#65;&lt;&amp;"
    + b"<![CDATA[<!-- not a comment --> <?not a pi?> ]] ]>]]>z</body></message>"
    + b" \n\t "
    + b"<iq type='get' id='i1'><query xmlns='jabber:iq:roster'/></iq>"
    + b" "
    + CLOSE
)
EXPECTED_BODY = "a\u263aA<&<!-- not a comment --> <?not a pi?> ]] ]>z"


def feed_all(parser: StreamParser, chunks: list[bytes]) -> list:
    events: list = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


def describe(events: list) -> list:
    """Comparable form of an event list (elements serialized)."""
    return [etree.tostring(e) if isinstance(e, etree._Element) else e for e in events]


def error_of(data: bytes | list[bytes], **limits: int) -> XMLStreamError:
    parser = StreamParser(**limits)
    chunks = [data] if isinstance(data, bytes) else data
    with pytest.raises(XMLStreamError) as info:
        feed_all(parser, chunks)
    return info.value


# -- normal operation ---------------------------------------------------------------------


def test_stream_events_and_detached_stanzas() -> None:
    events = StreamParser().feed(FULL)
    opened, message, iq, closed = events
    assert opened == StreamOpened(
        tag=f"{{{STREAMS}}}stream",
        attrib={"to": "example.com", "version": "1.0", f"{{{XML_NS}}}lang": "en"},
        nsmap={None: "jabber:client", "stream": STREAMS},
    )
    assert message.tag == "{jabber:client}message"
    assert message.get("id") == "m1"
    assert message[0].tag == "{jabber:client}body"
    assert message[0].text == EXPECTED_BODY
    assert iq.tag == "{jabber:client}iq"
    assert iq[0].tag == "{jabber:iq:roster}query"
    assert closed == StreamClosed()
    for stanza in (message, iq):  # standalone: own document, no parent, no tail
        assert stanza.getparent() is None
        assert stanza.getroottree().getroot() is stanza
        assert stanza.tail is None
    assert etree.tostring(iq) == (
        b'<iq xmlns="jabber:client" type="get" id="i1"><query xmlns="jabber:iq:roster"/></iq>'
    )


def test_prefixed_stanza_keeps_namespace_from_root() -> None:
    parser = StreamParser()
    parser.feed(HEADER)
    (features,) = parser.feed(b"<stream:features><mechanisms/></stream:features>")
    assert features.tag == f"{{{STREAMS}}}features"
    assert features[0].tag == "{jabber:client}mechanisms"
    again = etree.fromstring(etree.tostring(features))
    assert again.tag == features.tag and again[0].tag == features[0].tag


def test_root_without_namespace_for_own_protocols() -> None:
    events = StreamParser().feed(b"<irp version='1'><hello n='1'/></irp>")
    assert events[0] == StreamOpened("irp", {"version": "1"}, {})
    assert events[1].tag == "hello"
    assert events[2] == StreamClosed()


def test_one_byte_at_a_time() -> None:
    parser = StreamParser()
    events = feed_all(parser, [FULL[i : i + 1] for i in range(len(FULL))])
    assert describe(events) == describe(StreamParser().feed(FULL))
    assert events[1][0].text == EXPECTED_BODY


def test_split_at_every_boundary() -> None:
    whole = describe(StreamParser().feed(FULL))
    for cut in range(1, len(FULL)):
        assert describe(feed_all(StreamParser(), [FULL[:cut], FULL[cut:]])) == whole, cut


def test_reset_restarts_stream() -> None:
    parser = StreamParser()
    assert len(parser.feed(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")) == 2
    parser.reset()
    events = parser.feed(DECL + HEADER + SMALL)
    assert isinstance(events[0], StreamOpened)
    assert events[1].tag == "{jabber:client}message"


def test_reset_after_error() -> None:
    parser = StreamParser()
    with pytest.raises(XMLStreamError):
        parser.feed(HEADER + b"<!-- x -->")
    with pytest.raises(XMLStreamError) as info:
        parser.feed(SMALL)  # unusable until reset
    assert info.value.condition == "restricted-xml"
    parser.reset()
    assert len(parser.feed(HEADER + SMALL)) == 2


def test_whitespace_after_close_is_ignored() -> None:
    parser = StreamParser()
    assert parser.feed(HEADER + CLOSE + b" \n")[-1] == StreamClosed()
    assert parser.feed(b"\r\n ") == []


def test_cdata_is_allowed_and_split_cdata_open() -> None:
    parser = StreamParser()
    parser.feed(HEADER + b"<message><body><!")
    parser.feed(b"[CD")
    parser.feed(b"ATA[<?x]")
    parser.feed(b"]<!--]")
    (message,) = parser.feed(b"]></body></message>")
    assert message[0].text == "<?x]]<!--"


# -- hostile input ------------------------------------------------------------------------

LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]><lolz>&lol9;</lolz>"
)


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (LAUGHS, "restricted-xml"),
        (b"<!DOCTYPE stream>" + HEADER, "restricted-xml"),
        ([DECL + b"<", b"!DOCTYPE s SYSTEM 'file:///etc/passwd'>"], "restricted-xml"),
        (HEADER + b"<!-- hi -->", "restricted-xml"),
        ([HEADER + b"<message><", b"!", b"-- hi -->"], "restricted-xml"),
        (HEADER + b"<message><body><![INCLUDE[x]]></body></message>", "restricted-xml"),
        (HEADER + b"<?php evil() ?>", "restricted-xml"),
        ([HEADER + b"<message><", b"?x?></message>"], "restricted-xml"),
        (HEADER + DECL, "restricted-xml"),  # a declaration only at the very start
        (b" " + DECL + HEADER, "restricted-xml"),
        (b"<?xml-stylesheet href='x'?>" + HEADER, "restricted-xml"),
        (b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER, "unsupported-encoding"),
        ([b"<?xml version='1.0' enc", b'oding="utf-16"?>'], "unsupported-encoding"),
        (b"\xff\xfe<\x00s\x00>\x00", "unsupported-encoding"),
        (b"<\x00s\x00>\x00", "unsupported-encoding"),
        (HEADER + b"<message><body>&xxe;</body></message>" + SMALL, "not-well-formed"),
        (HEADER + b"<message><body>\xff\xfe</body></message>", "not-well-formed"),
        (HEADER + b"<message><body></message>", "not-well-formed"),
        (HEADER + b"<message a='<'/>", "not-well-formed"),
        (HEADER + b"<message a='1' a='2'/>", "not-well-formed"),
        (HEADER + b"<p:message/>", "not-well-formed"),
        (HEADER + b"<message p:a='1'/>", "not-well-formed"),
        (HEADER + b"<message xmlns:p=''/>", "not-well-formed"),
        (HEADER + b"<message xmlns='relative'/>", "not-well-formed"),
        (HEADER + CLOSE + b"<message/>", "not-well-formed"),
        ([HEADER + CLOSE, b" x"], "not-well-formed"),
        (HEADER + b"hello" + SMALL, "bad-format"),
        (HEADER + SMALL + b"hello" + SMALL, "bad-format"),
        (HEADER + b"x" + CLOSE, "bad-format"),
        (HEADER + b"<![CDATA[x]]>" + SMALL, "bad-format"),
        ([HEADER, b" &#65; "], "bad-format"),
    ],
)
def test_hostile_input_refused(data: bytes | list[bytes], condition: str) -> None:
    assert error_of(data).condition == condition


def test_undefined_entity_never_misparses_next_stanza() -> None:
    parser = StreamParser()
    parser.feed(HEADER)
    got: list = []
    with pytest.raises(XMLStreamError) as info:
        got += parser.feed(b"<message><body>&nbsp;</body></message>")
        got += parser.feed(SMALL)
    assert info.value.condition == "not-well-formed"
    assert all(e.tag == "{jabber:client}message" for e in got)


def test_billion_laughs_refused_fast() -> None:
    start = time.perf_counter()
    assert error_of(LAUGHS * 10).condition == "restricted-xml"
    assert time.perf_counter() - start < 0.5


def test_stanza_size_limit_fires_while_incomplete() -> None:
    parser = StreamParser(max_element_bytes=65536)
    parser.feed(HEADER)
    parser.feed(b"<message><body>")
    fed = 0
    chunk = b"x" * 4096
    with pytest.raises(XMLStreamError) as info:
        for _ in range(10 * 1024 * 1024 // len(chunk)):
            parser.feed(chunk)
            fed += len(chunk)
    assert info.value.condition == "policy-violation"
    assert "65536" in info.value.text
    assert 60_000 <= fed <= 65536 + 65536 // 4 + len(chunk)


class CountingParser:
    """Wraps the parser's lxml XMLPullParser to count the bytes libxml2 actually gets."""

    def __init__(self, inner: etree.XMLPullParser) -> None:
        self.inner = inner
        self.fed = 0

    def feed(self, data: bytes) -> None:
        self.fed += len(data)
        self.inner.feed(data)

    def read_events(self) -> Iterator[tuple[str, etree._Element]]:
        return self.inner.read_events()

    @property
    def feed_error_log(self) -> etree._ListErrorLog:
        return self.inner.feed_error_log


def test_ten_megabyte_stanza_in_one_feed_is_refused_early() -> None:
    parser = StreamParser()
    counting = CountingParser(parser._live_parser())
    parser._parser = counting  # type: ignore[assignment]
    parser.feed(HEADER)
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"<message><body>" + b"x" * (10 * 1024 * 1024))
    assert info.value.condition == "policy-violation"
    assert counting.fed < 65536 + 2 * 16384 + len(HEADER)


def test_stanza_below_limit_passes_and_budget_resets() -> None:
    parser = StreamParser(max_element_bytes=4096)
    parser.feed(HEADER)
    stanza = b"<message><body>" + b"y" * 3900 + b"</body></message>"
    for _ in range(50):
        assert len(parser.feed(stanza)) == 1
    assert len(parser.feed(stanza * 20)) == 20


def test_huge_attribute_and_header_refused() -> None:
    big = b"v" * 6000  # past the limit plus one slice (a quarter of the limit)
    assert error_of([HEADER, b"<message a='" + big], max_element_bytes=4096).condition == (
        "policy-violation"
    )
    header = b"<stream:stream a='" + big + b"'>"
    assert error_of(header, max_element_bytes=4096).condition == "policy-violation"
    endless_decl = [b"<?xml version='1.0'"] + [b" " * 1000] * 10
    assert error_of(endless_decl, max_element_bytes=4096).condition == "policy-violation"


def test_idle_keepalives_are_free_but_open_elements_pay() -> None:
    parser = StreamParser(max_element_bytes=1024)
    parser.feed(HEADER)
    parser.feed(SMALL + b" ")
    for _ in range(3000):  # far more keepalive bytes than the budget
        assert parser.feed(b" ") == []
    assert parser.feed(b"\n" * 5000) == []
    assert len(parser.feed(SMALL)) == 1
    assert parser._root is not None and parser._root.text is None
    # Whitespace inside an unfinished stanza is charged.
    parser.feed(b"<message>")
    with pytest.raises(XMLStreamError) as info:
        for _ in range(2000):
            parser.feed(b" ")
    assert info.value.condition == "policy-violation"


def test_fake_tag_inside_attribute_is_not_idle() -> None:
    """`</x>` inside a half-sent attribute value must not make the stream look idle."""
    parser = StreamParser(max_element_bytes=1024)
    parser.feed(HEADER + SMALL)
    parser.feed(b"<message a='</x> ")
    with pytest.raises(XMLStreamError) as info:
        for _ in range(2000):
            parser.feed(b" ")
    assert info.value.condition in ("policy-violation", "not-well-formed")


def test_depth_limit() -> None:
    ok = HEADER + b"<a>" * 32 + b"</a>" * 32
    assert len(StreamParser(max_depth=32).feed(ok)) == 2
    too_deep = HEADER + b"<a>" * 33
    assert error_of(too_deep, max_depth=32).condition == "policy-violation"


def test_ten_thousand_nested_tags_fail_fast() -> None:
    start = time.perf_counter()
    assert error_of(HEADER + b"<a>" * 10_000).condition == "policy-violation"
    parser = StreamParser()
    parser.feed(HEADER)
    fed = 0
    with pytest.raises(XMLStreamError) as info:
        for _ in range(10_000):
            parser.feed(b"<a>")
            fed += 1
    assert info.value.condition == "policy-violation"
    assert fed <= 34  # refused as soon as the 33rd level opens (libxml2 may lag one tag)
    assert time.perf_counter() - start < 0.5


def test_memory_stays_flat() -> None:
    parser = StreamParser()
    parser.feed(HEADER)
    batch = (SMALL + b" \n") * 1000
    count = 0
    for _ in range(200):
        count += len(parser.feed(batch))
        parser.feed(b" ")
    assert count == 200_000
    root = parser._root
    assert root is not None
    assert len(root) == 0 and root.text is None
    assert parser._used < 1024


def test_throughput_smoke() -> None:
    """Not a benchmark: 20,000 small stanzas must parse in well under a few seconds."""
    parser = StreamParser()
    parser.feed(HEADER)
    start = time.perf_counter()
    count = sum(len(parser.feed(SMALL)) for _ in range(10_000))
    count += len(parser.feed(SMALL * 10_000))
    assert count == 20_000
    assert time.perf_counter() - start < 3.0


def test_bad_limits_rejected() -> None:
    with pytest.raises(ValueError):
        StreamParser(max_depth=300)
    with pytest.raises(ValueError):
        StreamParser(max_element_bytes=0)


def test_a_stanza_just_over_the_limit_is_refused_in_one_feed() -> None:
    """A stanza ending in the slice that crosses the limit is measured, not waved through."""
    parser = StreamParser(max_element_bytes=10000)
    parser.feed(b"<stream:stream xmlns='jabber:client' "
                b"xmlns:stream='http://etherx.jabber.org/streams'>")
    body = b"x" * 11900
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"<message><body>" + body + b"</body></message>")
    assert info.value.condition == "policy-violation"


def test_a_stanza_just_under_the_limit_passes_among_others() -> None:
    parser = StreamParser(max_element_bytes=10000)
    parser.feed(b"<stream:stream xmlns='jabber:client' "
                b"xmlns:stream='http://etherx.jabber.org/streams'>")
    small = b"<message><body>hi</body></message>"
    near = b"<message><body>" + b"y" * 9900 + b"</body></message>"
    events = parser.feed(small * 3 + near + small * 3)
    assert [len(e.findtext("{jabber:client}body")) for e in events] == [2, 2, 2, 9900, 2, 2, 2]


def test_a_header_inside_the_stream_is_reported_when_it_starts() -> None:
    from sixnet.core.stream.parser import HeaderInStream

    parser = StreamParser()
    root = b"<s:stream xmlns:s='urn:s' xmlns='urn:c'>"
    parser.feed(root)
    events = parser.feed(b"<m/>" + root)
    assert isinstance(events[1], HeaderInStream) and events[1].tag == "{urn:s}stream"
    assert not parser.idle
    child, closed = parser.feed(b"<m/></s:stream></s:stream>")  # an ordinary child
    assert child.tag == "{urn:s}stream" and len(child) == 1 and isinstance(closed, StreamClosed)


# -- releasing the libxml2 parser of a quiet stream -------------------------------------------


def test_released_parser_goes_on_with_the_same_namespaces_and_close_tag() -> None:
    parser = StreamParser()
    assert not parser.holding  # made by the first feed, not by reset()
    assert isinstance(parser.feed(HEADER)[0], StreamOpened)
    assert parser.release() and not parser.holding
    assert parser.feed(b"  \n ") == [] and not parser.holding  # keepalives parse nothing
    (message,) = parser.feed(SMALL)
    assert parser.holding
    assert message.tag == "{jabber:client}message" and message.findtext(
        "{jabber:client}body") == "hi"
    assert parser.release()
    (iq,) = parser.feed(b"<iq type='get' id='i1'><query xmlns='jabber:iq:roster'/></iq>")
    assert iq[0].tag == "{jabber:iq:roster}query"
    assert parser.release()
    assert parser.feed(CLOSE) == [StreamClosed()]


def test_release_waits_for_a_half_parsed_stanza() -> None:
    parser = StreamParser()
    parser.feed(HEADER[:20])
    assert not parser.release() and parser.holding  # the header is not complete
    parser.feed(HEADER[20:] + b"<message to='a@b'><bo")
    assert not parser.release() and parser.holding
    (message,) = parser.feed(b"dy>hi</body></message>")
    assert message.findtext("{jabber:client}body") == "hi"
    assert parser.release()


def test_released_parser_keeps_refusing_what_it_refused() -> None:
    parser = StreamParser(max_element_bytes=1000)
    parser.feed(HEADER)
    parser.release()
    assert describe(parser.feed(b"<p:x xmlns:p='urn:p'/>"))  # prefixes declared anew: fine
    parser.release()
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"<message><body>" + b"x" * 2000 + b"</body></message>")
    assert info.value.condition == "policy-violation"
    parser = StreamParser()
    parser.feed(HEADER)
    parser.release()
    with pytest.raises(XMLStreamError) as info:
        parser.feed(b"text between stanzas<a/>")
    assert info.value.condition == "bad-format"
    parser = StreamParser()
    parser.feed(HEADER)
    parser.release()
    header_inside = parser.feed(HEADER)
    assert [type(e).__name__ for e in header_inside] == ["HeaderInStream"]
