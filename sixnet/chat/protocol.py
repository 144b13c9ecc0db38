"""Framing: the XML phase through the shared stream parser, then raw bytes to the records.

The protocol only frames: it hands whole handshake elements, the end of the peer's XML
stream and record-phase bytes to its `Session`, and owns the connection's timers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sixnet.chat.alerts import Alert
from sixnet.chat.messages import ROOT, STREAM_END, VERSION
from sixnet.chat.session import Session, SessionTransport
from sixnet.core.stream.limits import AddressLimiter
from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError

log = Logger(namespace="sixnet.chat")

#: Handshake elements (a hello with an 8-certificate chain is well under this).
MAX_HANDSHAKE_BYTES = 32768
#: The start of a stream whose root is exactly the unprefixed ``sixchat`` (the parser reports
#: names in Clark notation, which hide the prefix; a prefixed root would end in another end
#: tag than the ``</sixchat>`` the record phase is found by).
_UNPREFIXED_ROOT = re.compile(rb"(?:\xef\xbb\xbf)?\s*(?:<\?xml\s[^>]*\?>\s*)?<sixchat[\s/>]")


def _held_suffix(data: bytes) -> int:
    """Length of the longest proper prefix of ``</sixchat>`` that `data` ends with."""
    for size in range(min(len(STREAM_END) - 1, len(data)), 0, -1):
        if data.endswith(STREAM_END[:size]):
            return size
    return 0


class SessionProtocol(Protocol):
    """One SixChat connection, dialed (`dial_to` set) or accepted."""

    def __init__(self, make_session: Callable[[SessionTransport], Session], clock: IReactorTime,
                 *, dial_to: str | None = None, handshake_timeout: float = 10.0,
                 close_timeout: float = 5.0) -> None:
        self.make_session = make_session
        self.clock = clock
        self.dial_to = dial_to
        self.handshake_timeout = handshake_timeout
        self.close_timeout = close_timeout
        self.session: Session | None = None
        self._parser: StreamParser | None = StreamParser(max_element_bytes=MAX_HANDSHAKE_BYTES,
                                                         max_depth=4)
        self._held = b""
        self._head: bytes | None = b""  # what was fed until the root opened
        self._timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        #: Fires when the connection is gone.
        self.lost: Deferred[None] = Deferred()
        #: Fires once the handshake is over: records established, or the connection gone.
        self.handshake_over: Deferred[None] = Deferred()

    # -- SessionTransport --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def lose_connection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- Protocol ----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.session = session = self.make_session(self)
        self._timer = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)
        if self.dial_to is not None:
            session.handle(session.dial, self.dial_to)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        session = self.session
        if session is not None and session.records is None:
            session.handle(session.refuse, Alert("handshake-timeout"))

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None or session.end_reason is not None:
            return
        if self._parser is not None:
            rest = self._xml_received(session, data)
            if rest is None:
                return
            self._parser = None
            self._held = b""
            if self._timer is not None and session.records is not None:
                self._timer.cancel()
                self._timer = None
            if session.records is not None and not self.handshake_over.called:
                self.handshake_over.callback(None)
            data = rest
        if data:
            session.records_received(data)

    def _xml_received(self, session: Session, data: bytes) -> bytes | None:
        """Feed the XML phase; the bytes after ``</sixchat>`` once the stream ended, else None."""
        buf = self._held + data
        at = buf.find(STREAM_END)
        if at < 0:
            keep = _held_suffix(buf)
            chunk, self._held = (buf[:-keep], buf[-keep:]) if keep else (buf, b"")
            rest = None
        else:
            chunk, rest = buf[:at + len(STREAM_END)], buf[at + len(STREAM_END):]
            self._held = b""
        assert self._parser is not None
        if self._head is not None:
            self._head += chunk
        try:
            events = self._parser.feed(chunk)
        except XMLStreamError as e:
            session.handle(session.refuse, Alert("decode-error", f"handshake stream: {e}"))
            return None
        for event in events:
            if session.end_reason is not None:
                return None
            if isinstance(event, StreamOpened):
                head, self._head = self._head or b"", None
                if event.tag != ROOT or event.attrib.get("version") != VERSION or \
                        not _UNPREFIXED_ROOT.match(head):
                    session.handle(session.refuse, Alert(
                        "protocol-version", f"stream {event.tag[:80]} version "
                                            f"{event.attrib.get('version', '')[:10]!r}, "
                                            "root must be the unprefixed sixchat"))
                    return None
            elif isinstance(event, StreamClosed):
                session.stream_ended()
                return rest if session.end_reason is None else None
            else:
                session.element_received(event)
        if rest is not None and session.end_reason is None:
            session.handle(session.refuse, Alert("decode-error", "</sixchat> out of place"))
        return None

    def close(self) -> None:
        """Close cleanly: close-notify, then hang up if the peer does not answer in time."""
        session = self.session
        if session is None:
            return
        session.handle(session.close)
        if self.transport is not None and session.end_reason is None:
            self._close_timer = self.clock.callLater(self.close_timeout, self.lose_connection)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        for timer in (self._timer, self._close_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._close_timer = None
        session = self.session
        if session is not None:
            session.handle(session.connection_lost)
        if not self.handshake_over.called:
            self.handshake_over.callback(None)
        self.lost.callback(None)


class SessionFactory(Factory):
    """Accepted connections: a responder session each.

    A handshake costs the responder a chain verification, key agreement and a signature
    before the caller has proven its key, so one address may have at most
    `max_handshakes_per_address` of them under way and all addresses together at most
    `max_handshakes`; a connection beyond either is closed at once, before any byte is read
    (logged for the first of a burst and every thousandth).
    """

    noisy = False

    def __init__(self, make_protocol: Callable[[str | None], SessionProtocol],
                 max_handshakes_per_address: int = 8, max_handshakes: int = 64) -> None:
        self.make_protocol = make_protocol
        self.handshaking = AddressLimiter(max_handshakes_per_address)
        self.max_handshakes = max_handshakes
        #: Handshakes under way from all addresses.
        self.under_way = 0
        #: Connections refused since the last one admitted (`_refuse` logs a few of them).
        self.refused = 0

    def buildProtocol(self, addr: Any) -> SessionProtocol | None:
        host = str(getattr(addr, "host", ""))
        if self.under_way >= self.max_handshakes:
            self._refuse(host, f"{self.under_way} handshakes under way in all")
            return None
        if not self.handshaking.acquire(host):
            self._refuse(host, f"{self.handshaking.held(host)} handshakes under way from it")
            return None
        self.under_way += 1
        self.refused = 0
        proto = self.make_protocol(None)
        proto.handshake_over.addBoth(self._handshake_over, host)
        return proto

    def _refuse(self, host: str, why: str) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warn("refused a connection from {host}: {why} ({refused} refused since the "
                     "last admitted)", host=host, why=why, refused=self.refused)

    def _handshake_over(self, result: object, host: str) -> None:
        self.under_way -= 1
        self.handshaking.release(host)
