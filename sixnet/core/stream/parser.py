"""Incremental, hardened XML stream parser shared by the XMPP server and our own protocols.

A stream is one long XML document: a root element (the stream header) whose top-level
children (stanzas) are handed to the caller one by one as they complete. The peer is not
trusted, so the parser refuses, as early as it can and with an RFC 6120 section 4.9.3
condition:

* DOCTYPE, comments and processing instructions (``restricted-xml``). They are found by a
  cheap byte scan *before* libxml2 sees the data, so no internal subset, entity declaration
  or billion-laughs expansion is ever parsed. The XML declaration is allowed only at the very
  start of a stream, and only for UTF-8 (``unsupported-encoding`` otherwise, also for UTF-16
  or UTF-32 byte patterns). CDATA sections are legal and are stepped over, so ``<!``/``<?``
  inside them is not mistaken for markup.
* Undefined entities, malformed XML, namespace errors (undeclared prefix, relative namespace
  URI), NUL bytes and anything but whitespace after the closing root tag
  (``not-well-formed``). libxml2 runs with ``resolve_entities="internal"``: ``False`` would
  silently mis-parse an undefined entity and ``True`` would read local files.
* A top-level child larger than ``max_element_bytes`` raw bytes, or nesting deeper than
  ``max_depth`` (``policy-violation``), checked while the child is still arriving. Large
  feeds are parsed in slices of a quarter of the limit and bytes are charged per slice, so
  a child much bigger than the limit is refused before 1.5 x ``max_element_bytes`` of it
  has been parsed (a 10 MB stanza costs ~80 KB, not 10 MB); a child that completes within
  a slice of the limit is measured exactly (its serialised size), so one just over the
  limit is refused too. The same budget bounds the stream
  header and the bytes between stanzas; whitespace keepalives sent while the stream is idle
  are not charged, so a quiet connection may ping forever.
* Non-whitespace text between stanzas (``bad-format``).

Memory stays flat on an endless stream: every finished top-level child is copied out, cleared
and removed from the root, and whitespace between stanzas is dropped from the root. A quiet
stream can give back its libxml2 parser (about 14 KB) with `release`: the parser is made again
on the next bytes that are not whitespace, and is told the stream's root (its name and
namespace declarations, all its children depend on) without a new stream event. One
growth remains that this module cannot stop: lxml interns every distinct element and
attribute name in a per-thread libxml2 dictionary that is never shrunk, so a peer inventing
new names costs the process roughly their length in bytes, for good.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lxml import etree

__all__ = ["HeaderInStream", "StreamClosed", "StreamOpened", "StreamParser", "XMLStreamError"]

_WS = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"
_MAX_DECL = 1024  # held back whole and re-searched on every feed, so keep it small
_MAX_TAG_TAIL = 4096  # a final tag split across feeds longer than this: idle is not believed
_CDATA_OPEN = b"<![CDATA["
_MARKUP = re.compile(rb"<[!?]")
# A whole tag with balanced quotes, then only whitespace: the candidate for "the last thing
# in this chunk closed a tag" (see _feed_chunk). Linear: the alternatives cannot overlap.
_LAST_TAG = re.compile(rb"<[^<>'\"]*(?:(?:'[^']*'|\"[^\"]*\")[^<>'\"]*)*>[ \t\r\n]*")
_ENCODING = re.compile(rb"\sencoding\s*=\s*(?:'([^']*)'|\"([^\"]*)\")")
#: Root start tags made by `release`, one copy shared by every stream with the same root (all
#: of a server's client streams have one): bounded, so streams inventing roots keep their own.
_ROOT_STARTS: dict[bytes, bytes] = {}
_MAX_ROOT_STARTS = 64


class XMLStreamError(Exception):
    """Raised by feed(); `condition` is an RFC 6120 section 4.9.3 stream error condition name."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text


@dataclass(frozen=True)
class StreamOpened:
    """The stream header (root start tag) arrived; names are in Clark notation."""

    tag: str
    attrib: dict[str, str]
    nsmap: dict[str | None, str]


@dataclass(frozen=True)
class HeaderInStream:
    """A top-level child began with the root's own tag: a new stream header mid-stream.

    Reported when it starts, since it never completes (the peer believes a new stream began);
    parsing goes on with it as an ordinary child, so the protocol decides.
    """

    tag: str
    attrib: dict[str, str]
    nsmap: dict[str | None, str]


@dataclass(frozen=True)
class StreamClosed:
    """The root end tag arrived; nothing but whitespace may follow."""


Event = StreamOpened | HeaderInStream | etree._Element | StreamClosed


def _check_gap(text: str | None) -> None:
    """Only whitespace (keepalives) may appear between stanzas."""
    if text and text.strip(" \t\r\n"):
        raise XMLStreamError("bad-format", "text between stanzas")


_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _check_namespace(prefix: str, uri: str) -> None:
    """libxml2 warns of a relative namespace URI only on ``xmlns=``; on ``xmlns:p=`` it lets
    it through, and canonicalising (chat transcripts, IRP signatures) would then fail."""
    if uri and _ABSOLUTE_URI.match(uri) is None:
        raise XMLStreamError("not-well-formed", f"namespace URI {uri!r} is not absolute")


class StreamParser:
    """Turns raw stream bytes into StreamOpened, stanza elements and StreamClosed events."""

    # One per stream, kept as long as the connection: slots rather than an instance dict.
    __slots__ = ("max_element_bytes", "max_depth", "_slice", "_parser", "_root_start", "_root",
                 "_depth", "_used", "_idle", "_prologue", "_pending", "_in_cdata", "_tag_tail",
                 "_closed", "_failed")

    def __init__(self, *, max_element_bytes: int = 65536, max_depth: int = 32) -> None:
        if max_element_bytes < 1 or not 1 <= max_depth < 256:
            # libxml2 itself stops at depth 256 (huge_tree=False), with a vaguer error.
            raise ValueError("need max_element_bytes >= 1 and 1 <= max_depth <= 255")
        self.max_element_bytes = max_element_bytes
        self.max_depth = max_depth
        # Feeds larger than this are parsed piecewise so the size limit fires mid-stanza.
        self._slice = max(64, max_element_bytes // 4)
        self.reset()

    def reset(self) -> None:
        """Start a fresh stream (after STARTTLS or SASL success: RFC 6120 stream restart)."""
        self._parser: etree.XMLPullParser | None = None  # made by the first feed
        #: The root's start tag as the parser is told it again after `release`.
        self._root_start: bytes | None = None
        self._root: etree._Element | None = None
        self._depth = -1  # root = 0, top-level child = 1; -1 until the header arrives
        self._used = 0  # bytes charged to the current child / header / inter-stanza gap
        self._idle = False  # between stanzas with nothing half-parsed: keepalives are free
        self._prologue: bytes | None = b""  # bytes held back until the XML declaration is seen
        self._pending = b""  # tail of the last feed that may start a `<!`/`<?`/`]]>` token
        self._in_cdata = False
        self._tag_tail: bytes | None = b""  # bytes since the last `<` (None: too many)
        self._closed = False
        self._failed: XMLStreamError | None = None

    @property
    def idle(self) -> bool:
        """True when the last feed ended between top-level elements, nothing half-parsed.

        False also when that cannot be told for sure, so a caller asking "is anything left
        over?" (the STARTTLS restart, the stall timer) errs towards "yes", and once the
        stream has ended or the parser has failed.
        """
        return self._idle and self._failed is None and not self._closed

    @property
    def holding(self) -> bool:
        """Whether a libxml2 parser is alive (`release` can give it back)."""
        return self._parser is not None

    def release(self) -> bool:
        """Drop the libxml2 parser while the stream is between stanzas (True, also when none
        is held); False, nothing done, while a stanza or the header is half-parsed.

        The next feed makes a new parser and gives it the root's start tag again, which
        costs about 35 us: call this on a stream that has gone quiet, not after every feed.
        """
        if self._parser is None:
            return True
        if self._failed is not None or self._closed:
            self._parser = self._root = None
            return True
        root = self._root
        if not self._idle or root is None or self._depth != 0 or self._pending or \
                self._in_cdata:
            return False
        if self._root_start is None:
            name = etree.QName(root).localname
            if root.prefix:
                name = f"{root.prefix}:{name}"
            declarations = "".join(f" xmlns{':' + prefix if prefix else ''}={quoteattr(uri)}"
                                   for prefix, uri in root.nsmap.items())
            start = f"<{name}{declarations}>".encode()
            if len(_ROOT_STARTS) < _MAX_ROOT_STARTS:
                start = _ROOT_STARTS.setdefault(start, start)
            self._root_start = _ROOT_STARTS.get(start, start)
        # Idle, the bytes since the last `<` are a finished tag: no later bytes without a `<`
        # can complete it (see `_feed_chunk`), so they need not be kept either.
        self._parser = self._root = None
        self._tag_tail = b""
        return True

    def _live_parser(self) -> etree.XMLPullParser:
        parser = self._parser
        if parser is None:
            parser = self._parser = etree.XMLPullParser(
                events=("start", "end", "start-ns"),
                encoding="utf-8",
                no_network=True,
                load_dtd=False,
                huge_tree=False,
                resolve_entities="internal",
                collect_ids=False,  # the document lives as long as the stream: no xml:id table
            )
            if self._root_start is not None:  # after `release`: the same root, said again
                parser.feed(self._root_start)
                for event, elem in parser.read_events():
                    if event == "start":
                        self._root = elem
        return parser

    def feed(self, data: bytes) -> list[Event]:
        """Feed raw bytes; return the events completed by them, in order.

        Each complete top-level child of the root is returned once, as a standalone element
        detached from the root that keeps its (possibly inherited default) namespace.
        Raises XMLStreamError on any violation; after an error the parser is unusable until
        reset().
        """
        if self._failed is not None:
            raise XMLStreamError(self._failed.condition, "parser failed earlier; reset() it")
        if not data:
            return []
        try:
            return self._feed(bytes(data))
        except XMLStreamError as exc:
            self._failed = exc
            raise

    # -- internals ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> list[Event]:
        if self._closed:
            if data.strip(_WS):
                raise XMLStreamError("not-well-formed", "data after the end of the stream")
            return []
        start = 0
        if self._prologue is not None:
            data = self._prologue + data
            decided = self._check_prologue(data)
            if decided is None:
                if len(data) > min(self.max_element_bytes, _MAX_DECL):
                    raise XMLStreamError("policy-violation", "XML declaration too long")
                self._prologue = data
                return []
            self._prologue = None
            start = decided
        if b"\x00" in data:  # never legal; libxml2 stalls silently on one in the declaration
            raise XMLStreamError("not-well-formed", "NUL byte")
        self._scan(data, start)
        out: list[Event] = []
        size = self._slice
        if len(data) <= size:
            self._feed_chunk(data, True, out)
        else:
            for offset in range(0, len(data), size):
                self._feed_chunk(data[offset : offset + size], offset + size >= len(data), out)
        return out

    def _check_prologue(self, data: bytes) -> int | None:
        """Validate the stream's first bytes; return where the byte scan starts, None to wait.

        Only an XML declaration at the very start is allowed (it is the one `<?` the scan
        must skip), and it must not name an encoding other than UTF-8.
        """
        if data[:1] in (b"\x00", b"\xfe", b"\xff") or b"\x00" in data[:4]:
            raise XMLStreamError("unsupported-encoding", "only UTF-8 streams are accepted")
        pos = 0
        if len(data) < 3 and _BOM.startswith(data):
            return None
        if data.startswith(_BOM):
            pos = 3
        head = data[pos : pos + 6]
        if len(head) < 6:
            return None if b"<?xml".startswith(head[:5]) else 0
        if not (head.startswith(b"<?xml") and head[5] in _WS):
            return 0  # no declaration; a stray `<?` is refused by the scan
        end = data.find(b"?>", pos)
        if end < 0:
            return None
        match = _ENCODING.search(data, pos, end)
        if match is not None:
            encoding = (match.group(1) or match.group(2) or b"").decode("ascii", "replace")
            if encoding.lower() not in ("utf-8", "utf8"):
                raise XMLStreamError(
                    "unsupported-encoding", f"encoding {encoding!r} is not supported"
                )
        return end + 2

    def _scan(self, data: bytes, start: int) -> None:
        """Refuse DOCTYPE, comments and PIs before libxml2 parses them, stepping over CDATA.

        `self._pending` carries a token prefix split across feeds (`<`, `<![CD`, `]]`).
        """
        buf = self._pending + data[start:] if (self._pending or start) else data
        if not self._in_cdata and b"<!" not in buf and b"<?" not in buf:
            self._pending = b"<" if buf.endswith(b"<") else b""
            return
        pos = 0
        while True:
            if self._in_cdata:
                end = buf.find(b"]]>", pos)
                if end < 0:
                    self._pending = buf[max(pos, len(buf) - 2) :]
                    return
                pos = end + 3
                self._in_cdata = False
                continue
            match = _MARKUP.search(buf, pos)
            if match is None:
                self._pending = b"<" if buf.endswith(b"<") else b""
                return
            at = match.start()
            if buf[at + 1] == 0x3F:  # "?"
                raise XMLStreamError("restricted-xml", "processing instructions are not allowed")
            head = buf[at : at + 9]
            if head == _CDATA_OPEN:
                self._in_cdata = True
                pos = at + 9
            elif _CDATA_OPEN.startswith(head):  # cut short by the end of the data
                self._pending = head
                return
            elif head.startswith(b"<!-"):
                raise XMLStreamError("restricted-xml", "comments are not allowed")
            elif head.startswith(b"<!D"):
                raise XMLStreamError("restricted-xml", "DOCTYPE is not allowed")
            else:
                raise XMLStreamError("restricted-xml", "markup declarations are not allowed")

    def _feed_chunk(self, chunk: bytes, last: bool, out: list[Event]) -> None:
        """Parse one slice, charge it to the byte budget and track whether the stream is idle.

        Idle means "between stanzas, nothing half-parsed"; it is only believed when feeding
        the chunk's final tag on its own produced an event that left us at depth 0. A fake
        tag inside a half-sent attribute value (`<a x='</b> `) produces no event, so it can
        not be used to make an unbounded attribute look like free keepalive whitespace. A
        final tag begun in an earlier feed (`<starttls` then `/>`) is judged the same way on
        the bytes kept since its `<`.
        """
        if self._closed:
            if chunk.strip(_WS):
                raise XMLStreamError("not-well-formed", "data after the end of the stream")
            return
        blank = chunk.isspace()
        if blank and self._idle and self._parser is None:
            return  # a keepalive on a released stream: nothing to parse it with
        if not (blank and self._idle):
            self._used += len(chunk)
        split = -1
        whole = False  # the final tag began in an earlier feed and ends this chunk
        opened = chunk.rfind(b"<")
        if last and not blank:
            tail = chunk.rstrip(_WS) if chunk[-1] in _WS else chunk
            if tail.endswith(b">"):
                split = opened
                if split >= 0 and _LAST_TAG.fullmatch(chunk, split) is None:
                    split = -1
                whole = opened < 0 and self._tag_tail is not None and \
                    _LAST_TAG.fullmatch(self._tag_tail + chunk) is not None
        self._tag_tail = (chunk[opened:] if opened >= 0 else
                          None if self._tag_tail is None else self._tag_tail + chunk)
        if self._tag_tail is not None and len(self._tag_tail) > _MAX_TAG_TAIL:
            self._tag_tail = None
        if whole:
            before = len(out)
            self._push(chunk, out)
            self._idle = len(out) > before and self._depth == 0 and not self._closed
        elif split < 0:
            self._push(chunk, out)
            if not blank:
                self._idle = False
        else:
            if split:
                self._push(chunk[:split], out)
            before = len(out)
            self._push(chunk[split:], out)
            self._idle = len(out) > before and self._depth == 0 and not self._closed
        root = self._root
        if root is not None and not self._closed:
            text = root.text
            if text is not None:
                _check_gap(text)
                root.text = None  # keepalive whitespace must not pile up
        if self._used > self.max_element_bytes:
            what = "stream header" if self._root is None else "element"
            raise XMLStreamError(
                "policy-violation", f"{what} exceeds {self.max_element_bytes} bytes"
            )

    def _push(self, chunk: bytes, out: list[Event]) -> None:
        """Hand bytes to libxml2 and collect the stream events they complete.

        The cyclic garbage collector is off meanwhile: lxml queues an event tuple and an
        element proxy per tag until `_drain` reads them, none of it cyclic, but thousands of
        live allocations would start collections that promote them, and so full
        collections of the whole heap (~100 ms in a big process) every few slices of
        ``<a/><a/>...``. Once drained they are freed and the allocation count is back.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._push_events(chunk, out)
        finally:
            if collecting:
                gc.enable()

    def _push_events(self, chunk: bytes, out: list[Event]) -> None:
        parser = self._live_parser()
        try:
            parser.feed(chunk)
        except etree.XMLSyntaxError as exc:
            # The events parsed before the error may show the real cause: libxml2 gives up
            # at depth 256, but that is our policy-violation, not a syntax error.
            self._drain(out)
            raise XMLStreamError("not-well-formed", str(exc)) from None
        log = parser.feed_error_log
        if len(log):
            # Namespace errors (undeclared prefix, empty xmlns:p) and warnings (relative
            # namespace URI) do not stop libxml2: `<p:x/>` would come out as a tag "p:x" in
            # no namespace. XML-NAMES violations are not-well-formed (RFC 6120 4.9.3.13).
            # libxml2 stops reporting after 100 problems, so none may be let through.
            raise XMLStreamError("not-well-formed", log[0].message)
        self._drain(out)

    def _drain(self, out: list[Event]) -> None:
        """Turn libxml2's start/end events into stream events, enforcing the depth limit."""
        depth = self._depth
        assert self._parser is not None
        try:
            for event, elem in self._parser.read_events():
                if event == "start-ns":
                    _check_namespace(*elem)
                elif event == "start":
                    depth += 1
                    if depth > self.max_depth:
                        raise XMLStreamError(
                            "policy-violation", f"elements nested deeper than {self.max_depth}"
                        )
                    if depth == 0:
                        self._root = elem
                        self._used = 0
                        out.append(StreamOpened(elem.tag, dict(elem.attrib), dict(elem.nsmap)))
                    elif depth == 1 and self._root is not None and elem.tag == self._root.tag:
                        out.append(HeaderInStream(elem.tag, dict(elem.attrib), dict(elem.nsmap)))
                elif depth == 1:
                    depth = 0
                    if self._used + self._slice > self.max_element_bytes:
                        self._check_size(elem)
                    self._used = 0
                    out.append(self._detach(elem))
                else:
                    depth -= 1
                    if depth < 0:
                        self._closed = True
                        _check_gap(elem.text)
                        elem.clear()
                        out.append(StreamClosed())
        finally:
            self._depth = depth

    def _check_size(self, elem: etree._Element) -> None:
        """Measure a child that finished near the limit: slices charge bytes only roughly.

        Part of the slice it ended in may belong to the next child, and the slice it began in
        may have been charged to the previous one; its serialised size settles it. Only
        children within a slice of the limit pay for this.
        """
        size = len(etree.tostring(elem, with_tail=False))
        # lxml repeats the root's namespace declarations on the copy; they were not sent.
        root = self._root
        if root is not None:
            size -= sum(
                len(f' xmlns{":" + prefix if prefix else ""}="{uri}"'.encode())
                for prefix, uri in root.nsmap.items()
            )
        if size > self.max_element_bytes:
            raise XMLStreamError(
                "policy-violation", f"element exceeds {self.max_element_bytes} bytes"
            )

    def _detach(self, elem: etree._Element) -> etree._Element:
        """Return a standalone copy of a finished stanza and drop the original from the root.

        Removing a big subtree from the parser's tree is slow (namespace fix-ups over every
        node), so the original is cleared first and only the empty shell is removed.
        """
        _check_gap(elem.tail)  # text after it that libxml2 already parsed in this chunk
        stanza = elem.__copy__()  # lxml's copy is deep; called directly, without copy's memo
        stanza.tail = None
        elem.clear()
        root = self._root
        assert root is not None
        root.remove(elem)
        return stanza
