"""The XML stream protocol that the IRP server, the IRP client and the grid's c2s stream share.

As in Twisted's ``twisted.words.protocols.jabber.xmlstream``, the stream is apart from the
negotiation: `XMLStreamProtocol` feeds bytes to the hardened parser and hands whole events to
the subclass that decides (`stream_opened`, `element_received`, `stream_closed`, `malformed`),
keeps the header bookkeeping (ours sent, the peer's seen), writes the one kind of stream error
and runs the timers. What a stream says lives in a `StreamFormat`, one per protocol.

Rules every stream keeps:

* A stream error is written inside a stream the peer can parse: our header first when none
  was sent, then the error, then our closing tag, then the connection closes (aborted if the
  peer does not let it drain within `CLOSE_GRACE`). While a TLS handshake is under way
  nothing can be said, so the connection is cut instead.
* STARTTLS restart: the answer to ``<starttls/>`` must be the last thing in the clear. Bytes
  the peer sent after ``<starttls/>`` and that are already here (parsed or half-parsed) are a
  ``policy-violation``, answered in the clear, and TLS is not started; data delivered before
  the TLS handshake completes can only have come in the clear (Twisted's TLS layer hands on
  nothing before `handshakeCompleted`) and gets the same error. After the handshake the
  parser starts a new stream.
* Stall timer (`stall_timeout`): armed while something is due from the peer: the stream
  header after connecting, a half-received element, and the TLS handshake plus the new header
  after the STARTTLS answer; complete elements stop it.
* Negotiation deadline (`negotiation_timeout`): from connecting until the subclass calls
  `negotiated()`, however the time is spent.
* Idle timer (`idle_timeout`): any received byte (whitespace keepalives too) restarts it.
* Fair parsing: at most `feed_slice` bytes are parsed in one reactor turn. The rest of a big
  read waits for the next turn with the socket paused, so a stanza of a hundred thousand tiny
  elements costs its sender turns of about a millisecond each, while the other connections
  are served in between, and the size limit is found within one slice of being crossed.

Every timer is on the injected `IReactorTime`; a timeout is `connection-timeout`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.errors import ConditionError
from sixnet.core.stream.parser import (
    HeaderInStream,
    StreamClosed,
    StreamOpened,
    StreamParser,
    XMLStreamError,
)

__all__ = ["CLOSE_GRACE", "STREAM_ERROR_CONDITIONS", "StreamError", "StreamFormat",
           "XMLStreamProtocol", "attribute_error", "child_error", "escape_attribute",
           "escape_text"]

log = Logger(namespace="sixnet.stream")

#: Seconds a closing connection gets to flush what was written before it is aborted.
CLOSE_GRACE = 10.0

#: RFC 6120 4.9.3: the stream error conditions (IRP uses the same names).
STREAM_ERROR_CONDITIONS = frozenset({
    "bad-format", "bad-namespace-prefix", "conflict", "connection-timeout", "host-gone",
    "host-unknown", "improper-addressing", "internal-server-error", "invalid-from",
    "invalid-namespace", "invalid-xml", "not-authorized", "not-well-formed", "policy-violation",
    "remote-connection-failed", "reset", "resource-constraint", "restricted-xml",
    "see-other-host", "system-shutdown", "undefined-condition", "unsupported-encoding",
    "unsupported-feature", "unsupported-stanza-type", "unsupported-version",
})

TIMEOUT_TEXTS = {
    "stall": "a message (or the TLS handshake) was not completed in time",
    "negotiation": "stream negotiation took too long",
    "idle": "no data for too long",
}


class StreamError(ConditionError):
    """Raised while handling an event: the stream ends with this condition.

    `extra` is protocol-defined XML placed inside the error (XEP-0198's handled-count-too-high).
    """

    conditions = STREAM_ERROR_CONDITIONS

    def __init__(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        super().__init__(condition, text)
        self.extra = extra


def escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_attribute(value: str) -> str:
    """For a double-quoted attribute; whitespace escaped so it survives normalisation."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            .replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;"))


def attribute_error(namespace: str, tag: str) -> Callable[[str, str, bytes], bytes]:
    """A stream error naming its condition in an attribute (IRP: ``<stream-error
    condition='...'>text</stream-error>``)."""

    def build(condition: str, text: str, extra: bytes) -> bytes:
        node = etree.Element(f"{{{namespace}}}{tag}", nsmap={None: namespace})
        node.set("condition", condition)
        node.text = text
        return etree.tostring(node, encoding="utf-8", xml_declaration=False)

    return build


def child_error(tag: str, namespace: str) -> Callable[[str, str, bytes], bytes]:
    """A stream error naming its condition as a child element (RFC 6120 4.9.2)."""

    def build(condition: str, text: str, extra: bytes) -> bytes:
        body = f"<{condition} xmlns='{namespace}'/>"
        if text:
            body += f"<text xmlns='{namespace}' xml:lang='en'>{escape_text(text)}</text>"
        return f"<{tag}>{body}".encode() + extra + f"</{tag}>".encode()

    return build


@dataclass(frozen=True)
class StreamFormat:
    """How one protocol writes its stream: declaration, root, header, error and close tag."""

    declaration: str
    #: The root element as written (``irp``, ``stream:stream``).
    root: str
    #: Attributes every header of ours starts with (namespace declarations, version).
    fixed: tuple[tuple[str, str], ...]
    #: Builds the stream error element: (condition, text, extra XML) -> bytes.
    error: Callable[[str, str, bytes], bytes]

    def header(self, attributes: Iterable[tuple[str, str | None]] = ()) -> bytes:
        """Our stream header; attributes whose value is None are left out."""
        attrs = "".join(f' {name}="{escape_attribute(value)}"'
                        for name, value in (*self.fixed, *attributes) if value is not None)
        return f"{self.declaration}<{self.root}{attrs}>".encode()

    @property
    def close(self) -> bytes:
        return f"</{self.root}>".encode()


@implementer(IHandshakeListener)
class XMLStreamProtocol(Protocol):
    """One XML stream over one connection: events in, header, errors and timers out.

    Subclasses set `format`, give the header attributes in `header_attributes()` and decide
    in the event methods. An exception from an event method ends the stream: a `StreamError`
    with its condition, anything else (a bug) with ``internal-server-error``.
    """

    format: StreamFormat
    #: Bytes parsed in one reactor turn. libxml2 needs about half a microsecond a byte for
    #: the densest markup (``<a/>`` repeated), so a slice costs two milliseconds at most.
    feed_slice = 4096

    def __init__(self, parser: StreamParser, clock: IReactorTime, *,
                 stall_timeout: float | None = None, negotiation_timeout: float | None = None,
                 idle_timeout: float | None = None, direct_tls: bool = False) -> None:
        self.parser = parser
        self.clock = clock
        self.stall_timeout = stall_timeout
        self.negotiation_timeout = negotiation_timeout
        self.idle_timeout = idle_timeout
        #: Our header was written on the current stream.
        self.header_sent = False
        #: The peer's header of the current stream arrived (what it said went to
        #: `stream_opened`; keeping it would cost every idle stream its attribute dicts).
        self.header_received = False
        #: The stream is over: nothing more is read or written.
        self.closed = False
        #: A TLS handshake is under way (direct TLS from the start, or after STARTTLS).
        self.tls_pending = direct_tls
        self.last_received = clock.seconds()
        #: Parsed events not handled yet; None while there are none (an empty deque is
        #: 600 bytes, on every idle stream).
        self._events: deque[Any] | None = None
        self._held = False
        #: Received bytes not parsed yet (beyond this turn's `feed_slice`).
        self._unparsed = b""
        self._next_slice: IDelayedCall | None = None
        self._reading_paused = False  # by us, while `_unparsed` waits
        self._stall: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None

    # -- what the subclass decides -----------------------------------------------------------

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        """The attributes of our header after the fixed ones (from, id, xml:lang...)."""
        return ()

    def stream_opened(self, header: StreamOpened) -> None:
        """The peer's header arrived (`header_received` is set)."""

    def element_received(self, element: etree._Element) -> None:
        """A whole top-level element arrived."""

    def header_in_stream(self, header: HeaderInStream) -> None:
        """A new stream header began inside the stream; by default it is an ordinary child
        (handled by `element_received` should it ever complete)."""

    def stream_closed(self) -> None:
        """The peer closed its stream; by default we close ours."""
        self.close_stream()

    def malformed(self, error: XMLStreamError) -> None:
        """The parser refused the input."""
        self.send_stream_error(error.condition, error.text)

    def timed_out(self, why: str) -> None:
        """A timer fired: `why` is ``stall``, ``negotiation`` or ``idle``."""
        self.send_stream_error("connection-timeout", TIMEOUT_TEXTS[why])

    def tls_established(self) -> None:
        """The TLS handshake completed; the peer's new stream follows."""

    def stream_ended(self) -> None:
        """Called once when the stream is over, whatever ended it."""

    # -- connection lifetime -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._arm_stall()  # the header is due like any other element
        if self.negotiation_timeout is not None:
            self._deadline = self.clock.callLater(self.negotiation_timeout,
                                                  self._fire, "negotiation")
        self._restart_idle()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._end()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()

    def handshakeCompleted(self) -> None:
        self.tls_pending = False
        if not self.closed:
            self.tls_established()

    def negotiated(self) -> None:
        """Negotiation is over: the deadline no longer applies."""
        _cancel(self._deadline)
        self._deadline = None

    # -- bytes in ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_received = self.clock.seconds()
        self._restart_idle()
        if self.tls_pending:
            self.send_stream_error("policy-violation", "data in the clear after <starttls/>")
            return
        if self._unparsed:  # a TLS layer may deliver more after we paused: it waits its turn
            self._unparsed += data
            return
        self._unparsed = data
        self._parse_slice()

    def _parse_slice(self) -> None:
        """Parse one `feed_slice` of what was received; leave the rest for the next turn."""
        self._next_slice = None
        if self.closed or self._held:
            return  # `release` goes on where a held stream stopped
        if not self._unparsed:  # a stream restart voided what waited
            self._schedule_slice()
            return
        data = self._unparsed[:self.feed_slice]
        self._unparsed = self._unparsed[self.feed_slice:]
        try:
            events = self.parser.feed(data)
        except XMLStreamError as error:
            self._unparsed = b""
            self.malformed(error)
            return
        if data.strip(b" \t\r\n"):
            if self.parser.idle:
                _cancel(self._stall)
            else:
                self._arm_stall()
        if events:
            if self._events is None:
                self._events = deque(events)
            else:
                self._events.extend(events)
        self._pump()
        self._schedule_slice()

    def _schedule_slice(self) -> None:
        """Pause reading while bytes wait, and parse the next slice in the next turn."""
        if self.closed or self._held:
            return
        if not self._unparsed:
            if self._next_slice is None and self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()
            return
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        if self._next_slice is None:
            self._next_slice = self.clock.callLater(0, self._parse_slice)

    def release_parser(self) -> bool:
        """Give back the parser's memory on a stream gone quiet (see `StreamParser.release`);
        False when something waits to be parsed or handled, so it must stay."""
        if self.closed:
            return True
        if self._events or self._unparsed or self._held:
            return False
        return self.parser.release()

    def hold(self) -> None:
        """Keep further events queued until `release` (an asynchronous step is running)."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._pump()
        if self._next_slice is None:
            self._parse_slice()  # what arrived while held

    @property
    def quiet(self) -> bool:
        """Nothing received waits to be parsed or handled, and bytes may come (a subclass may
        then take a whole message from `dataReceived` itself: `took_whole`)."""
        return not (self.closed or self.tls_pending or self._held or self._unparsed
                    or self._events)

    def took_whole(self, event: Any) -> None:
        """A subclass's `dataReceived` found its bytes, arriving while `quiet` and the parser
        `idle`, to be one whole message (`event`): the reception is noted (idle time, no
        stall due) and the event handled, as `_parse_slice` and `_pump` would."""
        self.last_received = self.clock.seconds()
        self._restart_idle()
        _cancel(self._stall)
        self._handle_event(event)

    def _pump(self) -> None:
        while self._events and not self._held and not self.closed:
            event = self._events.popleft()
            if not self._events:
                self._events = None
            self._handle_event(event)

    def _handle_event(self, event: Any) -> None:
        try:
            if isinstance(event, StreamOpened):
                self.header_received = True
                self.stream_opened(event)
            elif isinstance(event, HeaderInStream):
                self.header_in_stream(event)
            elif isinstance(event, StreamClosed):
                self.stream_closed()
            else:
                self.element_received(event)
        except StreamError as error:
            self.send_stream_error(error.condition, error.text, error.extra)
        except Exception:
            log.failure("{peer}: internal error", peer=self.transport.getPeer())
            self.send_stream_error("internal-server-error")

    # -- bytes out ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def send_header(self) -> None:
        self.send(self.format.header(self.header_attributes()))
        self.header_sent = True

    def send_stream_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        """End the stream with an error: header first if none was sent, the error, the close."""
        if self.closed:
            return
        if self.tls_pending:  # no stream to put an error on until TLS is up
            log.info("{peer}: {condition} during the TLS handshake ({text})",
                     peer=self.transport.getPeer(), condition=condition, text=text)
            self.abort_connection()
            return
        log.info("{peer}: stream error {condition} ({text})", peer=self.transport.getPeer(),
                 condition=condition, text=text)
        head = b"" if self.header_sent else self.format.header(self.header_attributes())
        self.header_sent = True
        self.transport.write(head + self.format.error(condition, text, extra) + self.format.close)
        self.hang_up()

    def close_stream(self) -> None:
        """Close our stream politely (after the peer closed its own, or when we are done)."""
        if self.closed:
            return
        self.transport.write(self.format.close)
        self.hang_up()

    def hang_up(self) -> None:
        """The stream is over: read nothing more, close once what was written is sent."""
        self._end()
        self.close_connection()

    def close_connection(self) -> None:
        """Close once what was written is sent; abort if the peer does not let that happen."""
        self.transport.loseConnection()
        if self._abort is None:
            self._abort = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def abort_connection(self) -> None:
        """Cut the connection at once, saying nothing."""
        self._end()
        self.transport.abortConnection()

    # -- STARTTLS and stream restarts ----------------------------------------------------------

    def start_tls(self, context: Any, answer: bytes = b"") -> bool:
        """Write `answer` (``<proceed/>``), then start TLS unless the peer sent more in the
        clear; False when it did (the stream then ended with ``policy-violation``)."""
        self.send(answer)
        if self._events or self._unparsed or not self.parser.idle:
            self.send_stream_error("policy-violation", "data in the clear after <starttls/>")
            return False
        self.restart_stream()
        self.tls_pending = True
        self.transport.startTLS(context)
        self._arm_stall()  # the handshake and the new header are due in time
        return True

    def restart_stream(self) -> None:
        """A new stream starts (after STARTTLS or SASL success); queued events are void."""
        self.parser.reset()
        self._events = None
        self._unparsed = b""
        self.header_sent = False
        self.header_received = False

    # -- timers ----------------------------------------------------------------------------------

    def _arm_stall(self) -> None:
        if self.stall_timeout is not None and (self._stall is None or not self._stall.active()):
            self._stall = self.clock.callLater(self.stall_timeout, self._fire, "stall")

    def _restart_idle(self) -> None:
        """Received bytes restart the idle time (`last_received`). The timer is not moved
        on every read (a busy stream reads thousands of times a second): armed once, it is
        put off by what is left of the time when it comes due early."""
        if self.idle_timeout is None:
            return
        if self._idle is None or not self._idle.active():
            self._idle = self.clock.callLater(self.idle_timeout, self._idle_due)

    def _idle_due(self) -> None:
        assert self.idle_timeout is not None
        left = self.last_received + self.idle_timeout - self.clock.seconds()
        if left > 0:
            self._idle = self.clock.callLater(left, self._idle_due)
        else:
            self._fire("idle")

    def _fire(self, why: str) -> None:
        if not self.closed:
            self.timed_out(why)

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._events = None
        self._unparsed = b""
        for timer in (self._stall, self._deadline, self._idle, self._next_slice):
            _cancel(timer)
        if self._reading_paused:  # a TLS close needs the peer's close_notify read
            self._reading_paused = False
            self.transport.resumeProducing()
        self.stream_ended()


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()
