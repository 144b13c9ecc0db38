"""Properties of the hardened XML stream parser (sixnet/core/stream/parser.py).

Whatever bytes arrive, cut wherever the network cuts them: the parser returns events or
raises `XMLStreamError`, nothing else, in bounded time, keeping at most the stanza being
parsed. A stream it accepts, lxml parsing the whole document agrees with, stanza for stanza;
a well-formed stream of generated stanzas comes out unchanged however it is cut; a stanza
over the size limit or the depth limit is refused however it is cut, before much more than
the limit has been read.
"""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError
from tests.support.properties import MAX_SECONDS, xml_text

HEADER = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
          b" to='example.com' version='1.0'>")
CLOSE = b"</stream:stream>"
LIMIT = 4096
DEPTH = 8

names = st.sampled_from(["message", "iq", "body", "x", "a-b", "q.1", "_u", "\u00e9l"])
namespaces = st.sampled_from([None, "urn:example:a", "jabber:x:data"])
attribute_names = st.sampled_from(["id", "to", "type", "xml:lang", "v"])


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> etree._Element:
    namespace = draw(namespaces)
    element = etree.Element(draw(names))
    if namespace:
        element.set("xmlns", namespace)  # written as an attribute: the stream's own default
    for name in draw(st.lists(attribute_names, max_size=3, unique=True)):
        element.set(name.replace("xml:", "{http://www.w3.org/XML/1998/namespace}"),
                    draw(xml_text))
    element.text = draw(xml_text) or None
    if depth < 2:
        for child in draw(st.lists(elements(depth + 1), max_size=3)):
            child.tail = draw(xml_text) or None
            element.append(child)
    return element


def serialized(element: etree._Element) -> bytes:
    text = etree.tostring(element, encoding="utf-8")
    return text.replace(b' xmlns:xml="http://www.w3.org/XML/1998/namespace"', b"")


gaps = st.sampled_from([b"", b" ", b"\n", b"\t \r\n", b"   "])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A well-formed stream: declaration?, header, stanzas with keepalives, close tag."""
    stanzas = draw(st.lists(elements(), max_size=5))
    data = draw(st.sampled_from([b"", b"<?xml version='1.0'?>", b"<?xml version='1.0' "
                                                                b"encoding='UTF-8'?>\n"]))
    data += HEADER
    for stanza in stanzas:
        data += draw(gaps) + serialized(stanza)
    return data + draw(gaps) + CLOSE, len(stanzas)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


cuts = st.lists(st.integers(0, 1 << 16), max_size=12)


def run(chunks: list[bytes], **limits: int) -> tuple[list[object], XMLStreamError | None]:
    """Feed every chunk; the events, and the error that stopped the stream (if any)."""
    parser = StreamParser(max_element_bytes=LIMIT, max_depth=DEPTH, **limits)
    events: list[object] = []
    for chunk in chunks:
        started = time.process_time()
        try:
            events += parser.feed(chunk)
        except XMLStreamError as e:
            # once failed, it stays failed, with the same condition
            try:
                parser.feed(b" ")
            except XMLStreamError as again:
                assert again.condition == e.condition
            else:
                raise AssertionError("a failed parser accepted more") from None
            return events, e
        finally:
            assert time.process_time() - started < MAX_SECONDS
        root = parser._root
        assert root is None or len(root) <= 1
    return events, None


def canonical(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


def stanzas(events: list[object]) -> list[bytes]:
    return [canonical(e) for e in events if isinstance(e, etree._Element)]


def oracle(data: bytes) -> list[bytes]:
    """The stanzas lxml finds parsing the whole stream as one document."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    root = etree.fromstring(data, parser)
    return [canonical(child) for child in root]


@given(streams(), cuts)
def test_a_well_formed_stream_comes_out_unchanged_however_it_is_cut(
        stream: tuple[bytes, int], points: list[int]) -> None:
    data, count = stream
    events, error = run(cut(data, points))
    assert error is None, error
    assert isinstance(events[0], StreamOpened) and isinstance(events[-1], StreamClosed)
    assert stanzas(events) == oracle(data)
    assert len(stanzas(events)) == count


hostile = st.sampled_from([
    b"<", b">", b"</", b"/>", b"&", b"&amp;", b"&#0;", b"&#x1F600;", b"&nope;", b"'", b'"',
    b"<!--", b"-->", b"<?pi?>", b"<!DOCTYPE x [<!ENTITY a 'b'>]>", b"<![CDATA[", b"]]>",
    b"\x00", b"\xff\xfe", b"\xc3", b"\xef\xbb\xbf", b"text", b"xmlns:p=''", b"<p:x/>",
    b"<stream:stream>", CLOSE, b"<a><a><a><a><a><a><a><a><a>", b" " * 70,
])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(streams())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            data[at:at] = draw(st.one_of(hostile, st.binary(min_size=1, max_size=8)))
        elif choice == 1:
            del data[at:at + draw(st.integers(1, 8))]
        elif at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@given(mutated(), cuts)
def test_hostile_bytes_give_events_or_a_stream_error_and_agree_with_lxml(
        data: bytes, points: list[int]) -> None:
    events, error = run(cut(data, points))
    if error is None and events and isinstance(events[-1], StreamClosed):
        # accepted whole: a full XML parser reads the same stanzas
        assert stanzas(events) == oracle(data)


@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(HEADER.__add__)), cuts)
def test_arbitrary_bytes_give_events_or_a_stream_error(data: bytes,
                                                       points: list[int]) -> None:
    run(cut(data, points))


@given(st.integers(LIMIT // 2, 3 * LIMIT), cuts)
def test_a_stanza_over_the_limit_is_refused_before_much_more_is_read(
        size: int, points: list[int]) -> None:
    opening, closing = b"<message><body>", b"</body></message>"
    stanza = opening + b"x" * (size - len(opening) - len(closing)) + closing
    chunks = cut(HEADER + stanza + CLOSE, points)
    events, error = run(chunks)
    if size <= LIMIT:
        assert error is None and len(stanzas(events)) == 1
        return
    assert error is not None and error.condition == "policy-violation"
    assert stanzas(events) == []
    # the feed that was refused began before 1.5 x the limit of the stanza had been read
    parser = StreamParser(max_element_bytes=LIMIT, max_depth=DEPTH)
    fed = 0
    for chunk in chunks:
        try:
            parser.feed(chunk)
        except XMLStreamError:
            break
        fed += len(chunk)
    assert fed - len(HEADER) < 1.5 * LIMIT


@given(st.integers(1, 2 * DEPTH), cuts)
def test_nesting_deeper_than_the_limit_is_refused(depth: int, points: list[int]) -> None:
    stanza = b"<a>" * depth + b"</a>" * depth
    events, error = run(cut(HEADER + stanza + CLOSE, points))
    if depth > DEPTH:  # the stream header is depth 0, a stanza depth 1
        assert error is not None and error.condition == "policy-violation"
    else:
        assert error is None and len(stanzas(events)) == 1


@given(st.lists(st.sampled_from([b" ", b"\n", b"\t", b"\r\n", b" " * 5000]), max_size=20),
       st.lists(elements(), max_size=3))
def test_keepalives_between_stanzas_are_free(keepalives: list[bytes],
                                             between: list[etree._Element]) -> None:
    """Whitespace on an idle stream is never charged, however much of it comes."""
    chunks = [HEADER] + keepalives * 4
    for stanza in between:
        chunks += [serialized(stanza)] + keepalives * 4
    events, error = run(chunks)
    assert error is None
    assert len(stanzas(events)) == len(between)


def test_a_relative_namespace_uri_is_refused_on_a_prefix_too() -> None:
    """Found by the properties above: libxml2 only refuses it on a default namespace."""
    for declaration in (b"xmlns:p='rel/x'", b"xmlns:p='//host/x'", b"xmlns='rel'"):
        events, error = run([HEADER, b"<message " + declaration + b"/>"])
        assert error is not None and error.condition == "not-well-formed", declaration
    events, error = run([HEADER, b"<message xmlns=''><x xmlns:p='urn:p'/></message>"])
    assert error is None and len(stanzas(events)) == 1
