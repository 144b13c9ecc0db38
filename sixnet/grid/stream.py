"""Client-to-server streams (RFC 6120): the grid's negotiation on the shared XML stream.

`ClientStream` builds on `sixnet.core.stream.protocol.XMLStreamProtocol`, which frames bytes
into events, writes stream errors, runs the STARTTLS restart rule and the timers. What this
module adds is the negotiation: an Automat machine (the table is at the bottom of
`ClientStream`) whose inputs are the stream's events, classified by `_input_name` before they
reach it. Any input a state does not accept gets that state's stream error. Policy lives
elsewhere: SASL in `sixnet.grid.sasl`, routing and sessions in `sixnet.grid.router`.

States (each stream restart has its own header state)::

    HEADER --header--> STARTTLS --starttls--> TLS_HANDSHAKE --handshake--> TLS_HEADER
    HEADER --handshake (direct TLS)--> TLS_HEADER
    TLS_HEADER --header--> AUTH --auth/response...success--> AUTHENTICATED_HEADER
    AUTHENTICATED_HEADER --header--> BIND --bind iq / resume--> SESSION
    SESSION: stanzas, <r/>, <a/>, <enable/>, legacy session iq; any end -> CLOSED
"""

from __future__ import annotations

import base64
import enum
import secrets
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from automat import MethodicalMachine
from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.metrics import Registry
from sixnet.core.stream.limits import AddressLimiter, TokenBucket
from sixnet.core.stream.parser import (
    HeaderInStream,
    StreamOpened,
    StreamParser,
    XMLStreamError,
)
from sixnet.core.stream.protocol import StreamError, XMLStreamProtocol, escape_text
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.grid.metrics import GridCounters
from sixnet.grid.router import Router, Session
from sixnet.grid.sasl import (
    MAX_FAILURES_PER_STREAM,
    Challenge,
    SaslExchange,
    SaslPolicy,
    Success,
    TLSFacts,
    decode_payload,
)
from sixnet.grid.scram import SaslFailure, server_end_point
from sixnet.grid.xmpp import (
    NS_BIND,
    NS_CLIENT,
    NS_LIMITS,
    NS_PING,
    NS_SASL,
    NS_SASL_CB,
    NS_SESSION,
    NS_SM,
    NS_STANZAS,
    NS_STREAMS,
    NS_TLS,
    STANZA_TAGS,
    STREAM,
    XML_LANG,
    StanzaError,
    error_reply,
    result_reply,
    serialize,
)
from sixnet.pki.store import NodeIdentity
from sixnet.pki.tls import ServerTLS, peer_chain, release_bio_buffers

log = Logger(namespace="sixnet.grid")

#: How long after sending a stanza the server asks a stream-management client for an ack.
ACK_REQUEST_DELAY = 0.25
#: Ask at once when this many stanzas are unacknowledged.
ACK_REQUEST_BATCH = 32
#: Bytes written to a client whose connection stopped draining (its transport paused us)
#: before the stream is closed: a peer that does not read must not fill the server's memory.
SLOW_CONSUMER_BYTES = 8 * 1024 * 1024


#: Stream errors that answer input breaking the protocol (RFC 6120 4.9.3), reported as
#: ``grid.hostile-input``; what the parser refuses is reported by `ClientStream.malformed`.
#: Limits, revocations, timeouts, conflicts and shutdowns are not among them.
HOSTILE_INPUT = frozenset({"bad-format", "bad-namespace-prefix", "invalid-from",
                           "invalid-namespace", "invalid-xml", "not-well-formed",
                           "restricted-xml", "unsupported-stanza-type"})


class State(enum.Enum):
    """The machine's states, as `ClientStream.state` reports them."""

    HEADER = "waiting for a stream header"
    STARTTLS = "waiting for STARTTLS"
    TLS_HANDSHAKE = "TLS handshake"
    TLS_HEADER = "waiting for the stream header inside TLS"
    AUTH = "SASL"
    AUTHENTICATED_HEADER = "waiting for the stream header after SASL"
    BIND = "waiting for resource binding"
    SESSION = "session"
    CLOSED = "closed"


@dataclass(frozen=True)
class Limits:
    """Per-stream and per-server limits (the [grid] settings)."""

    max_stanza_bytes: int = 262144
    max_depth: int = 32
    stanzas_per_second: float = 500.0
    stanza_burst: int = 2000
    max_connections_per_address: int = 1000
    max_unauthenticated_per_address: int = 20
    max_sessions: int = 20000
    negotiation_timeout: float = 30.0
    unauthenticated_timeout: float = 10.0
    idle_timeout: float = 300.0
    resume_timeout: float = 300.0


class C2SServer:
    """What every client stream shares: domain, TLS, SASL policy, router, limits, counters."""

    def __init__(self, domain: str, identity: NodeIdentity, tls: ServerTLS, sasl: SaslPolicy,
                 router: Router, limits: Limits, clock: IReactorTime,
                 counters: GridCounters | None = None, *,
                 events: IEventSink | None = None) -> None:
        self.domain = domain
        self.events = events if events is not None else EventBus()
        self.identity = identity
        #: RFC 5929's tls-server-end-point: the same for every stream (our certificate).
        self.end_point_binding = server_end_point(identity.certificate)
        self.tls = tls
        self.sasl = sasl
        self.router = router
        self.limits = limits
        self.clock = clock
        self.connections: set[ClientStream] = set()
        #: Authenticated connections per address, and those not yet past SASL: a separate,
        #: smaller allowance with a shorter deadline, so idle strangers cannot use up the
        #: slots of the platforms behind the same address.
        self.per_address = AddressLimiter(limits.max_connections_per_address)
        self.unauthenticated = AddressLimiter(limits.max_unauthenticated_per_address)
        self.stopping = False
        self.counters = counters if counters is not None else GridCounters(Registry())
        #: Streams that received or were sent data since the last `release_parsers`, and
        #: those that had at the one before: a stream in the second and not the first has
        #: been quiet for a whole interval. Sent too: a stream that only takes fan-out would
        #: otherwise keep TLS memory BIOs at the size of the largest burst written to it.
        self.fed: set[ClientStream] = set()
        self.recently_fed: set[ClientStream] = set()

    def release_parsers(self) -> None:
        """Free the parser state and the TLS memory BIOs of the streams that received and
        were sent nothing since the last call (one shared sweep, not a timer per stream; it
        visits only streams that had traffic)."""
        fed, self.fed = self.fed, set()
        for stream in self.recently_fed - fed:
            if not stream.release_parser():
                fed.add(stream)  # mid-stanza: try again next time
        self.recently_fed = fed

    def check_idle(self) -> None:
        """Ping sessions that have been silent for `idle_timeout`; close those that stay
        silent as long again (a dead peer on a half-open TCP connection says nothing)."""
        now = self.clock.seconds()
        for stream in list(self.connections):
            stream.check_idle(now, self.limits.idle_timeout)


class ClientStreamFactory(Factory):
    noisy = False

    def __init__(self, server: C2SServer, direct_tls: bool) -> None:
        self.server = server
        self.direct_tls = direct_tls

    def buildProtocol(self, addr: Any) -> ClientStream:
        return ClientStream(self.server, self.direct_tls)


def _input_name(element: etree._Element) -> str:
    """Classify a top-level element as an input of the state machine."""
    tag = element.tag
    if tag in STANZA_TAGS:
        if tag == f"{{{NS_CLIENT}}}iq" and element.get("type") == "set" and len(element) == 1:
            child = element[0].tag
            if child == f"{{{NS_BIND}}}bind":
                return "bind"
            if child == f"{{{NS_SESSION}}}session":
                return "session"
        return "stanza"
    qname = etree.QName(element)
    if qname.namespace == NS_TLS and qname.localname == "starttls":
        return "starttls"
    if qname.namespace == NS_SASL and qname.localname in ("auth", "response", "abort"):
        return qname.localname
    if qname.namespace == NS_SM and qname.localname in ("enable", "resume", "r", "a"):
        return f"sm-{qname.localname}"
    return "unknown"


#: Input name (from `_input_name`) -> the machine input it is given to.
ELEMENT_INPUTS = {
    "starttls": "got_starttls", "auth": "got_auth", "response": "got_response",
    "abort": "got_abort", "bind": "got_bind", "session": "got_session_iq",
    "stanza": "got_stanza", "sm-enable": "got_enable", "sm-resume": "got_resume",
    "sm-r": "got_r", "sm-a": "got_a", "unknown": "got_unknown",
}


@implementer(IPushProducer)
class ClientStream(XMLStreamProtocol):
    """One client connection (the `Connection` a router session writes to)."""

    format = STREAM
    _machine = MethodicalMachine()
    # Slots for this class's own attributes: with the base protocol's and Twisted's, one
    # instance dict would hold 43 keys, past CPython's 30 for a dict sharing its keys with
    # the class's other instances, and so be a whole dict of its own (1.6 KB a stream).
    # What stays in the dict (XMLStreamProtocol's, Twisted's, Automat's state) is shared.
    __slots__ = ("server", "direct_tls", "tls", "jid", "certificate_chain", "session", "sasl",
                 "lang", "client_lang", "address", "clean_close", "_slot",
                 "_login_deadline", "_ack_timer", "_refusal", "_unsent", "_registered",
                 "_pinged", "_stanzas", "_lost")

    def __init__(self, server: C2SServer, direct_tls: bool) -> None:
        super().__init__(StreamParser(max_element_bytes=server.limits.max_stanza_bytes,
                                      max_depth=server.limits.max_depth),
                         server.clock, negotiation_timeout=server.limits.negotiation_timeout,
                         direct_tls=direct_tls)
        self.server = server
        self.direct_tls = direct_tls
        self.tls: TLSFacts | None = None
        self.jid: Any = None  # the authenticated bare JID
        self.certificate_chain: tuple[Any, ...] = ()  # when authenticated by EXTERNAL
        self.session: Session | None = None
        self.sasl: SaslExchange | None = None
        self.lang = "en"
        self.client_lang: str | None = None
        self.address = "?"
        self.clean_close = False
        self._slot: AddressLimiter | None = None  # the per-address limit it is counted in
        self._login_deadline: IDelayedCall | None = None
        self._ack_timer: IDelayedCall | None = None
        self._refusal: tuple[str, str] | None = None
        #: Bytes written since the transport said its buffer is full (None: it is not).
        self._unsent: int | None = None
        self._registered = False  # as the transport's producer
        self._pinged = False  # since the last data received
        #: Made on the first stanza, dropped by the quiet-stream sweep once full again.
        self._stanzas: TokenBucket | None = None
        self._lost: defer.Deferred[None] | None = None

    @property
    def lost(self) -> defer.Deferred[None]:
        """Fires when the connection is gone (the service waits for it when stopping); made
        when first asked for, as an idle stream need not hold one."""
        if self._lost is None:
            self._lost = defer.Deferred()
        return self._lost

    @property
    def state(self) -> State:
        return self._current_state()

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        # A new id for every header (RFC 6120 4.7.3), made here: nothing needs it later, so
        # an idle stream does not keep one.
        return (("from", self.server.domain), ("id", secrets.token_urlsafe(12)),
                ("version", "1.0"), ("xml:lang", self.lang))

    # -- connection lifetime -----------------------------------------------------------------

    def connectionMade(self) -> None:
        server = self.server
        self.address = getattr(self.transport.getPeer(), "host", "?")
        server.connections.add(self)
        # Stanzas are small and a publish fans out to many streams at once: no Nagle delay
        # (p99 at 10 subscribers fell from 35 ms to 2 ms). In-memory test transports have none.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        super().connectionMade()
        if server.stopping:
            self._refuse("system-shutdown", "the server is stopping")
        elif len(server.connections) > server.limits.max_sessions:
            log.warn("connection from {address} refused: {limit} connections in total",
                     address=self.address, limit=server.limits.max_sessions)
            self._refuse("resource-constraint", "too many connections")
        elif not server.unauthenticated.acquire(self.address):
            log.warn("connection from {address} refused: {limit} from one address are not "
                     "authenticated yet", address=self.address, limit=server.unauthenticated.limit)
            self._limited("max_unauthenticated_per_address", server.unauthenticated.limit)
            self._refuse("policy-violation", "too many unauthenticated connections from your "
                                             "address")
        else:
            self._slot = server.unauthenticated
            self._login_deadline = server.clock.callLater(
                server.limits.unauthenticated_timeout, self._login_overdue)

    def _login_overdue(self) -> None:
        self._login_deadline = None
        if not self.closed:
            log.info("{address}: not authenticated after {seconds}s; closing",
                     address=self.address, seconds=self.server.limits.unauthenticated_timeout)
            self.send_stream_error("connection-timeout", "authentication took too long")

    def _authenticated(self) -> None:
        """Move from the unauthenticated allowance to the authenticated one (before SASL
        success is sent, so a refusal is a plain stream error)."""
        server = self.server
        if not server.per_address.acquire(self.address):
            log.warn("{address}: login refused: {limit} authenticated connections from one "
                     "address", address=self.address, limit=server.per_address.limit)
            self._limited("max_connections_per_address", server.per_address.limit)
            raise StreamError("policy-violation", "too many connections from your address")
        if self._slot is not None:
            self._slot.release(self.address)
        self._slot = server.per_address
        if self._login_deadline is not None and self._login_deadline.active():
            self._login_deadline.cancel()
        self._login_deadline = None

    def _refuse(self, condition: str, text: str) -> None:
        """Refuse a new connection with a stream error (after the handshake on direct TLS)."""
        if self.tls_pending:
            self._refusal = (condition, text)
        else:
            self.send_stream_error(condition, text)

    def connectionLost(self, reason: Failure | None = None) -> None:
        server = self.server
        server.connections.discard(self)
        server.fed.discard(self)
        server.recently_fed.discard(self)
        if self._slot is not None:
            self._slot.release(self.address)
            self._slot = None
        super().connectionLost(reason)
        session, self.session = self.session, None
        if session is not None and session.connection is self:
            server.router.connection_lost(session, clean=self.clean_close)
        if self._lost is None:
            self._lost = defer.succeed(None)
        else:
            self._lost.callback(None)

    def stream_ended(self) -> None:
        for timer in (self._ack_timer, self._login_deadline):
            if timer is not None and timer.active():
                timer.cancel()
        self._ack_timer = self._login_deadline = None
        self.end()

    def close_connection(self) -> None:
        if self._registered:  # a transport with a producer would wait for it to go away
            self._registered = False
            self.transport.unregisterProducer()
        super().close_connection()

    def timed_out(self, why: str) -> None:
        log.info("{address}: no session after {seconds}s ({state}); closing",
                 address=self.address, seconds=self.negotiation_timeout,
                 state=self.state.value)
        super().timed_out(why)

    def tls_established(self) -> None:
        conn = self.transport.getHandle()
        version = conn.get_protocol_version_name()
        bindings = {"tls-server-end-point": self.server.end_point_binding}
        if version == "TLSv1.3":
            bindings["tls-exporter"] = conn.export_keying_material(
                b"EXPORTER-Channel-Binding", 32, b"")
        self.tls = TLSFacts(version, bindings, peer_chain(conn))
        self.transport.registerProducer(self, True)
        self._registered = True
        if self._refusal is not None:
            self.send_stream_error(*self._refusal)
            return
        self.tls_up()

    def release_parser(self) -> bool:
        """Also give the TLS layer's memory BIOs back (`release_bio_buffers`): a quiet
        stream keeps them at the size of the handshake's flight otherwise; and the stanza
        rate bucket once it is full (a new one is the same)."""
        released = super().release_parser()
        if released and not self.closed and not self.tls_pending:
            release_bio_buffers(self.transport.getHandle())
            if self._stanzas is not None and self._stanzas.full(self.server.clock.seconds()):
                self._stanzas = None
        return released

    # -- output (Connection) -----------------------------------------------------------------

    def send_stanza(self, data: bytes) -> None:
        if self.closed:
            return
        if self._unsent is not None:
            self._unsent += len(data)
            if self._unsent > SLOW_CONSUMER_BYTES:
                log.warn("{jid}: the client reads nothing; {bytes} bytes wait to be sent",
                         jid=self.jid, bytes=self._unsent)
                self.abort_connection()  # unacked stanzas stay with the session
                return
        self.transport.write(data)
        self.server.fed.add(self)
        session = self.session
        if session is not None and session.sm is not None and self._ack_timer is None:
            delay = 0 if len(session.sm.unacked) >= ACK_REQUEST_BATCH else ACK_REQUEST_DELAY
            self._ack_timer = self.server.clock.callLater(delay, self._request_ack)

    @property
    def backlog(self) -> int:
        """Bytes written since the client stopped reading (0 while it reads)."""
        return self._unsent or 0

    def _request_ack(self) -> None:
        self._ack_timer = None
        if self.state is State.SESSION:
            self.send(f"<r xmlns='{NS_SM}'/>".encode())

    # -- security events (only built when something was detected) ----------------------------

    def _event(self, kind: str, detail: str, facts: dict[str, str]) -> None:
        self.server.events.emit(SecurityEvent(
            kind, subject=str(self.jid) if self.jid is not None else None,
            source=self.address, detail=detail, facts=facts, time=self.server.clock.seconds()))

    def _limited(self, limit: str, value: float, **facts: str) -> None:
        self._event("grid.rate-limited", f"{limit} ({value:g}) exceeded; stream closed",
                    {"limit": limit, "value": f"{value:g}", **facts})

    def _hostile(self, condition: str, text: str) -> None:
        self._event("grid.hostile-input", f"stream closed: {condition}: {text[:160]}",
                    {"condition": condition})

    def malformed(self, error: XMLStreamError) -> None:
        """The parser refused the input (malformed XML, DTD or entities, too big, too deep)."""
        self._hostile(error.condition, error.text)
        super().send_stream_error(error.condition, error.text)

    def send_stream_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        if condition in HOSTILE_INPUT and not self.closed:
            self._hostile(condition, text)
        super().send_stream_error(condition, text, extra)

    def close_with_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        """The router's name for ending the stream with a stream error."""
        self.send_stream_error(condition, text, extra)

    def drop(self) -> None:
        """The session moved to another stream (resumed there): close without ending it."""
        self.session = None
        self.abort_connection()

    def check_idle(self, now: float, timeout: float) -> None:
        if self.state is not State.SESSION or self.session is None:
            return  # the negotiation timeout covers streams without a session
        silent = now - self.last_received
        if silent >= 2 * timeout:
            log.info("{jid}: silent for {seconds:.0f}s after a ping; closing",
                     jid=self.session.full, seconds=silent)
            self.send_stream_error("connection-timeout", "no answer to a ping")
        elif silent >= timeout and not self._pinged:
            self._pinged = True
            # Through the session, so stream management counts it like any other stanza.
            self.session.write(f"<iq type='get' id='idle-{secrets.token_hex(4)}' "
                               f"from='{self.server.domain}' "
                               f"to={quoteattr(self.session.full)}>"
                               f"<ping xmlns='{NS_PING}'/></iq>".encode())

    # -- IPushProducer: the transport tells us when the client stops draining ---------------

    def pauseProducing(self) -> None:
        if self._unsent is None:
            self._unsent = 0

    def resumeProducing(self) -> None:
        self._unsent = None

    def stopProducing(self) -> None:
        self._unsent = None

    # -- input: events, validated and classified before they reach the machine ---------------

    def dataReceived(self, data: bytes) -> None:
        self._pinged = False
        self.server.fed.add(self)
        super().dataReceived(data)

    def stream_opened(self, header: StreamOpened) -> None:
        lang = header.attrib.get(XML_LANG)
        if lang:
            self.client_lang = lang
            self.lang = lang if len(lang) <= 35 and lang.replace("-", "").isalnum() else "en"
        if header.tag != f"{{{NS_STREAMS}}}stream":
            raise StreamError("invalid-namespace", "the root must be <stream:stream>")
        if header.nsmap.get(None) != NS_CLIENT:
            raise StreamError("invalid-namespace", "the default namespace must be jabber:client")
        to = header.attrib.get("to")
        if to is not None:
            try:
                domain = parse_jid(to)
            except JIDError:
                raise StreamError("host-unknown", f"{to!r} is not a domain") from None
            if domain.local is not None or domain.resource is not None or \
                    domain.domain != self.server.domain:
                raise StreamError("host-unknown", f"this server is {self.server.domain}")
        version = header.attrib.get("version", "0.9")
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise StreamError("unsupported-version", "version must be 1.0") from None
        if major != 1:
            raise StreamError("unsupported-version", "version must be 1.0")
        self.got_header()

    def element_received(self, element: etree._Element) -> None:
        getattr(self, ELEMENT_INPUTS[_input_name(element)])(element)

    def header_in_stream(self, header: HeaderInStream) -> None:
        """`<stream:stream>` inside the stream: only the header states take one, and the
        stream's root has arrived, so this is never one of them (`_unexpected_header`)."""
        self.got_header()

    def stream_closed(self) -> None:
        """The client closed its stream: close ours (RFC 6120 4.4); the session ends."""
        self.clean_close = True
        self.close_stream()

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run an asynchronous step; later input waits until it has finished (and the socket
        is not read meanwhile, so what waits is at most one read's worth)."""
        self.hold()
        self.transport.pauseProducing()

        def done(result: object) -> None:
            if not self.closed:
                self.transport.resumeProducing()
            if isinstance(result, Failure):
                if result.check(StreamError):
                    e = result.value
                    self.send_stream_error(e.condition, e.text, e.extra)
                else:
                    log.failure("{address}: internal error", result, address=self.address)
                    self.send_stream_error("internal-server-error")
            self.release()

        defer.Deferred.fromCoroutine(coroutine).addBoth(done)

    # -- the machine: states -------------------------------------------------------------------

    @_machine.state(initial=True, serialized=State.HEADER)
    def wait_header(self) -> None:
        "Connected; the first stream header is due (or, on direct TLS, the handshake)."

    @_machine.state(serialized=State.STARTTLS)
    def wait_starttls(self) -> None:
        "Plain TCP: only <starttls/> is accepted."

    @_machine.state(serialized=State.TLS_HANDSHAKE)
    def tls_handshake(self) -> None:
        "<proceed/> sent; TLS is being negotiated."

    @_machine.state(serialized=State.TLS_HEADER)
    def wait_tls_header(self) -> None:
        "TLS is up; the client's new stream header is due."

    @_machine.state(serialized=State.AUTH)
    def authenticating(self) -> None:
        "SASL mechanisms offered; auth, response and abort are accepted."

    @_machine.state(serialized=State.AUTHENTICATED_HEADER)
    def wait_bound_header(self) -> None:
        "SASL succeeded; the client's new stream header is due."

    @_machine.state(serialized=State.BIND)
    def binding(self) -> None:
        "Authenticated: a resource must be bound (or a session resumed)."

    @_machine.state(serialized=State.SESSION)
    def in_session(self) -> None:
        "Bound: stanzas are routed."

    @_machine.state(serialized=State.CLOSED)
    def ended(self) -> None:
        "The stream is over."

    @_machine.serializer()
    def _current_state(self, state: State) -> State:
        return state

    # -- inputs ------------------------------------------------------------------------------

    @_machine.input()
    def got_header(self) -> None:
        "A valid stream header (checked by stream_opened)."

    @_machine.input()
    def got_starttls(self, element: etree._Element) -> None:
        "<starttls/>."

    @_machine.input()
    def got_auth(self, element: etree._Element) -> None:
        "SASL <auth/>."

    @_machine.input()
    def got_response(self, element: etree._Element) -> None:
        "SASL <response/>."

    @_machine.input()
    def got_abort(self, element: etree._Element) -> None:
        "SASL <abort/>."

    @_machine.input()
    def got_bind(self, element: etree._Element) -> None:
        "A resource binding iq."

    @_machine.input()
    def got_session_iq(self, element: etree._Element) -> None:
        "The legacy RFC 3921 session iq."

    @_machine.input()
    def got_stanza(self, element: etree._Element) -> None:
        "Any other message, presence or iq."

    @_machine.input()
    def got_enable(self, element: etree._Element) -> None:
        "XEP-0198 <enable/>."

    @_machine.input()
    def got_resume(self, element: etree._Element) -> None:
        "XEP-0198 <resume/>."

    @_machine.input()
    def got_r(self, element: etree._Element) -> None:
        "XEP-0198 ack request."

    @_machine.input()
    def got_a(self, element: etree._Element) -> None:
        "XEP-0198 ack."

    @_machine.input()
    def got_unknown(self, element: etree._Element) -> None:
        "A top-level element that is none of the above."

    @_machine.input()
    def tls_up(self) -> None:
        "The TLS handshake completed."

    @_machine.input()
    def sasl_succeeded(self) -> None:
        "SASL success was sent and the stream restarted."

    @_machine.input()
    def session_started(self) -> None:
        "A resource was bound or a session resumed on this stream."

    @_machine.input()
    def end(self) -> None:
        "The stream is over (error, close, lost connection)."

    # -- outputs: stream headers and features ----------------------------------------------------

    def _answer_header(self, features: str) -> None:
        self.send_header()
        self.send(f"<stream:features>{features}</stream:features>".encode())

    @_machine.output()
    def _offer_starttls(self) -> None:
        self._answer_header(f"<starttls xmlns='{NS_TLS}'><required/></starttls>")

    def _limits(self) -> str:
        return (f"<limits xmlns='{NS_LIMITS}'><max-bytes>"
                f"{self.server.limits.max_stanza_bytes}</max-bytes></limits>")

    @_machine.output()
    def _offer_sasl(self) -> None:
        assert self.tls is not None
        if self.sasl is None:
            self.sasl = SaslExchange(self.server.sasl, self.tls, self.address)
        mechanisms = "".join(f"<mechanism>{m}</mechanism>"
                             for m in self.server.sasl.mechanisms(self.tls))
        bindings = "".join(f"<channel-binding type='{t}'/>"
                           for t in sorted(self.tls.channel_bindings))
        self._answer_header(f"<mechanisms xmlns='{NS_SASL}'>{mechanisms}</mechanisms>"
                            f"<sasl-channel-binding xmlns='{NS_SASL_CB}'>{bindings}"
                            f"</sasl-channel-binding>{self._limits()}")

    @_machine.output()
    def _offer_bind(self) -> None:
        self._answer_header(f"<bind xmlns='{NS_BIND}'/>"
                            f"<session xmlns='{NS_SESSION}'><optional/></session>"
                            f"<sm xmlns='{NS_SM}'/>{self._limits()}")

    @_machine.output()
    def _unexpected_header(self) -> None:
        # RFC 6120 4.9.3.11: well-formed so far, but the streams schema (appendix A.1) has
        # no <stream> among the children of <stream>; a restart happens only after TLS and
        # SASL success, and then the server resets first.
        raise StreamError("invalid-xml", "a stream header inside the stream")

    # -- outputs: refusals (RFC 6120 5.3.1, 6.4, 7.1, 4.9.3.12) ---------------------------------

    @_machine.output()
    def _header_first(self, element: etree._Element) -> None:
        raise StreamError("not-authorized", f"{_input_name(element)} is not expected now")

    @_machine.output()
    def _starttls_first(self, element: etree._Element) -> None:
        raise StreamError("policy-violation", "STARTTLS is required first")

    @_machine.output()
    def _authenticate_first(self, element: etree._Element) -> None:
        raise StreamError("not-authorized", "authenticate first")

    @_machine.output()
    def _bind_first(self, element: etree._Element) -> None:
        raise StreamError("not-authorized", "bind a resource first")

    @_machine.output()
    def _not_a_stanza(self, element: etree._Element) -> None:
        name = _input_name(element)
        if name == "unknown":
            raise StreamError("unsupported-stanza-type", f"{element.tag} is not a stanza")
        raise StreamError("unsupported-stanza-type", f"{name} is not expected now")

    # -- outputs: STARTTLS -----------------------------------------------------------------------

    @_machine.output()
    def _proceed(self, element: etree._Element) -> None:
        self.start_tls(self.server.tls, f"<proceed xmlns='{NS_TLS}'/>".encode())

    @_machine.output()
    def _encryption_required(self, element: etree._Element) -> None:
        self.send(f"<failure xmlns='{NS_SASL}'><encryption-required/></failure>".encode())
        raise StreamError("policy-violation", "STARTTLS is required first")

    # -- SASL --------------------------------------------------------------------------------

    @_machine.output()
    def _on_auth(self, element: etree._Element) -> None:
        mechanism = element.get("mechanism", "")
        self._sasl_step(lambda payload: self._exchange().auth(mechanism, payload), element)

    @_machine.output()
    def _on_response(self, element: etree._Element) -> None:
        self._sasl_step(lambda payload: self._exchange().response(payload or b""), element)

    @_machine.output()
    def _on_abort(self, element: etree._Element) -> None:
        self._exchange().abort()
        self.send(f"<failure xmlns='{NS_SASL}'><aborted/></failure>".encode())

    def _exchange(self) -> SaslExchange:
        assert self.sasl is not None
        return self.sasl

    def _sasl_step(self, step: Callable[[bytes | None], Coroutine[Any, Any, Challenge | Success]],
                   element: etree._Element) -> None:
        async def run() -> None:
            try:
                payload = decode_payload(element.text)
                outcome = await step(payload)
            except SaslFailure as failure:
                text = (f"<text xml:lang='en'>{escape_text(failure.text)}</text>"
                        if failure.text else "")
                self.send(f"<failure xmlns='{NS_SASL}'><{failure.condition}/>{text}"
                            "</failure>".encode())
                if self._exchange().failures >= MAX_FAILURES_PER_STREAM:
                    raise StreamError("policy-violation",
                                      "too many failed authentications") from None
                return
            if isinstance(outcome, Challenge):
                data = base64.b64encode(outcome.data).decode() if outcome.data else ""
                self.send(f"<challenge xmlns='{NS_SASL}'>{data}</challenge>".encode())
                return
            self._authenticated()
            data = base64.b64encode(outcome.data).decode() if outcome.data else ""
            self.send(f"<success xmlns='{NS_SASL}'>{data}</success>".encode())
            self.jid = outcome.jid
            self.certificate_chain = outcome.certificate_chain
            self.sasl = None
            self.tls = None  # what SASL needed of TLS: an idle session need not keep it
            self.restart_stream()
            self.sasl_succeeded()

        self._run(run())

    # -- binding and stream management resumption ---------------------------------------------

    @_machine.output()
    def _on_bind(self, element: etree._Element) -> None:
        iq = element
        if not iq.get("id"):
            raise StreamError("invalid-xml", "iq without an id")
        resource_el = iq[0].find(f"{{{NS_BIND}}}resource")
        resource = (resource_el.text or "").strip() if resource_el is not None else ""
        if str(self.jid) in self.server.sasl.revoked:  # revoked since it authenticated
            self.send_stream_error("policy-violation", "this platform's access has been revoked")
            return
        try:
            session = self.server.router.bind(self, self.jid, resource or None)
        except StanzaError as e:
            self.send(serialize(error_reply(iq, e.condition, e.text)))
            return
        self._session_started(session)
        reply = result_reply(iq)
        reply.attrib.pop("from", None)
        bind = etree.SubElement(reply, f"{{{NS_BIND}}}bind", nsmap={None: NS_BIND})
        etree.SubElement(bind, f"{{{NS_BIND}}}jid").text = session.full
        self.send(serialize(reply))

    def _session_started(self, session: Session) -> None:
        self.session = session
        session.certificate_chain = self.certificate_chain
        self.session_started()

    @_machine.output()
    def _on_resume(self, element: etree._Element) -> None:
        previd = element.get("previd", "")
        try:
            handled = int(element.get("h", ""))
            session = self.server.router.resume(previd, handled, self, self.jid)
        except (ValueError, StanzaError, StreamError):
            self.send(f"<failed xmlns='{NS_SM}'><item-not-found xmlns='{NS_STANZAS}'/>"
                        "</failed>".encode())
            return
        assert session.sm is not None
        self._session_started(session)
        self.send(f"<resumed xmlns='{NS_SM}' previd={quoteattr(previd)} "
                    f"h='{session.sm.handled_in}'/>".encode())
        for data in list(session.sm.unacked):
            self.transport.write(data)
        if session.sm.unacked:
            self._request_ack()

    @_machine.output()
    def _sm_too_early(self, element: etree._Element) -> None:
        self._refuse_sm_request()

    def _refuse_sm_request(self) -> None:
        self.send(f"<failed xmlns='{NS_SM}'><unexpected-request xmlns='{NS_STANZAS}'/>"
                  "</failed>".encode())

    # -- the session --------------------------------------------------------------------------

    @_machine.output()
    def _on_enable(self, element: etree._Element) -> None:
        session = self.session
        assert session is not None
        if session.sm is not None:
            self._refuse_sm_request()
            return
        resume = element.get("resume") in ("true", "1")
        limit = self.server.limits.resume_timeout
        try:
            wanted = int(element.get("max", "0"))
        except ValueError:
            wanted = 0
        max_resume = int(min(wanted, limit) if wanted > 0 else limit)
        sm = self.server.router.enable_sm(session, resume, max_resume)
        extra = f" id='{sm.resume_id}' resume='true' max='{max_resume}'" if resume else ""
        self.send(f"<enabled xmlns='{NS_SM}'{extra}/>".encode())

    @_machine.output()
    def _on_ack_request(self, element: etree._Element) -> None:
        session = self.session
        if session is None or session.sm is None:
            raise StreamError("unsupported-stanza-type", "stream management is not enabled")
        self.send(f"<a xmlns='{NS_SM}' h='{session.sm.handled_in}'/>".encode())

    @_machine.output()
    def _on_ack(self, element: etree._Element) -> None:
        session = self.session
        if session is None or session.sm is None:
            raise StreamError("unsupported-stanza-type", "stream management is not enabled")
        try:
            h = int(element.get("h", ""))
        except ValueError:
            raise StreamError("invalid-xml", "<a/> needs a numeric h") from None
        session.sm.ack(h)

    @_machine.output()
    def _on_legacy_session(self, element: etree._Element) -> None:
        iq = element
        self._count_inbound()
        reply = result_reply(iq)
        reply.attrib.pop("from", None)
        self.send(serialize(reply))

    @_machine.output()
    def _on_bind_again(self, element: etree._Element) -> None:
        iq = element
        self._count_inbound()
        self.send(serialize(error_reply(iq, "not-allowed", "already bound")))

    def _count_inbound(self) -> None:
        session = self.session
        if session is not None and session.sm is not None:
            session.sm.received()

    @_machine.output()
    def _on_stanza(self, element: etree._Element) -> None:
        stanza = element
        session = self.session
        assert session is not None
        self._throttle()
        self._count_inbound()
        self.server.counters.received[stanza.tag].inc()
        claimed = stanza.get("from")
        if claimed is not None and claimed not in (session.full, session.bare):
            try:
                ok = parse_jid(claimed) in (session.jid, session.jid.bare)
            except JIDError:
                ok = False
            if not ok:
                raise StreamError("invalid-from", f"you are {session.full}")
        stanza.set("from", session.full)
        if self.client_lang and stanza.get(XML_LANG) is None:
            stanza.set(XML_LANG, self.client_lang)
        try:
            _check_stanza(stanza)
            self.server.router.from_client(session, stanza)
        except StanzaError as e:
            if stanza.get("type") in ("error", "result"):
                return  # never answer an error or a result with an error
            reply = error_reply(stanza, e.condition, e.text)
            reply.set("to", session.full)
            session.send(serialize(reply))

    def _throttle(self) -> None:
        """Token bucket: `stanza_burst` stanzas at once, `stanzas_per_second` sustained."""
        limits = self.server.limits
        now = self.server.clock.seconds()
        if self._stanzas is None:
            self._stanzas = TokenBucket(limits.stanzas_per_second, limits.stanza_burst, now)
        if not self._stanzas.take(now):
            self.server.counters.rate_limited.inc()
            log.warn("{jid}: more than {rate} stanzas per second; closing", jid=self.jid,
                     rate=limits.stanzas_per_second)
            self._limited("stanzas_per_second", limits.stanzas_per_second,
                          burst=f"{limits.stanza_burst:g}")
            raise StreamError("policy-violation",
                              f"more than {limits.stanzas_per_second:g} stanzas per second")



    @_machine.output()
    def _negotiated(self) -> None:
        self.negotiated()

    # -- transitions ---------------------------------------------------------------------------

    _header_states = (wait_header, wait_tls_header, wait_bound_header)
    _element_inputs = (got_starttls, got_auth, got_response, got_abort, got_bind,
                       got_session_iq, got_stanza, got_enable, got_resume, got_r, got_a,
                       got_unknown)

    wait_header.upon(got_header, enter=wait_starttls, outputs=[_offer_starttls])
    wait_header.upon(tls_up, enter=wait_tls_header, outputs=[])  # direct TLS
    wait_tls_header.upon(got_header, enter=authenticating, outputs=[_offer_sasl])
    wait_bound_header.upon(got_header, enter=binding, outputs=[_offer_bind])
    for _state in _header_states:
        for _input in _element_inputs:
            _state.upon(_input, enter=ended, outputs=[_header_first])

    wait_starttls.upon(got_starttls, enter=tls_handshake, outputs=[_proceed])
    wait_starttls.upon(got_auth, enter=ended, outputs=[_encryption_required])
    tls_handshake.upon(tls_up, enter=wait_tls_header, outputs=[])

    authenticating.upon(got_auth, enter=authenticating, outputs=[_on_auth])
    authenticating.upon(got_response, enter=authenticating, outputs=[_on_response])
    authenticating.upon(got_abort, enter=authenticating, outputs=[_on_abort])
    authenticating.upon(sasl_succeeded, enter=wait_bound_header, outputs=[])

    binding.upon(got_bind, enter=binding, outputs=[_on_bind])
    binding.upon(got_resume, enter=binding, outputs=[_on_resume])
    binding.upon(got_enable, enter=binding, outputs=[_sm_too_early])
    binding.upon(session_started, enter=in_session, outputs=[_negotiated])

    in_session.upon(got_stanza, enter=in_session, outputs=[_on_stanza])
    in_session.upon(got_bind, enter=in_session, outputs=[_on_bind_again])
    in_session.upon(got_session_iq, enter=in_session, outputs=[_on_legacy_session])
    in_session.upon(got_enable, enter=in_session, outputs=[_on_enable])
    in_session.upon(got_r, enter=in_session, outputs=[_on_ack_request])
    in_session.upon(got_a, enter=in_session, outputs=[_on_ack])
    in_session.upon(got_resume, enter=in_session, outputs=[_sm_too_early])

    #: Whatever else a state is given ends the stream with that state's error.
    for _state, _accepted, _refusal in (
            (wait_starttls, (got_starttls, got_auth), _starttls_first),
            (authenticating, (got_auth, got_response, got_abort), _authenticate_first),
            (binding, (got_bind, got_resume, got_enable), _bind_first),
            (in_session, (got_stanza, got_bind, got_session_iq, got_enable, got_r, got_a,
                          got_resume), _not_a_stanza)):
        for _input in _element_inputs:
            if _input not in _accepted:
                _state.upon(_input, enter=ended, outputs=[_refusal])
    for _state in (wait_starttls, tls_handshake, authenticating, binding, in_session):
        _state.upon(got_header, enter=ended, outputs=[_unexpected_header])
    for _state in (*_header_states, wait_starttls, tls_handshake, authenticating, binding,
                   in_session):
        _state.upon(end, enter=ended, outputs=[])
    #: Once over, whatever still arrives (an asynchronous step finishing late) is ignored.
    for _input in (*_element_inputs, got_header, tls_up, sasl_succeeded, session_started, end):
        ended.upon(_input, enter=ended, outputs=[])
    del _state, _input, _accepted, _refusal, _header_states, _element_inputs


def _check_stanza(stanza: etree._Element) -> None:
    """RFC 6120 8.1-8.2: the attributes every stanza kind requires."""
    kind = etree.QName(stanza).localname
    stanza_type = stanza.get("type")
    if kind == "iq":
        if not stanza.get("id"):
            raise StanzaError("bad-request", "an iq needs an id")
        if stanza_type in ("get", "set"):
            if len(stanza) != 1:
                raise StanzaError("bad-request", "an iq get/set has exactly one child")
        elif stanza_type not in ("result", "error"):
            raise StanzaError("bad-request", "iq type must be get, set, result or error")
    elif kind == "message":
        if stanza_type not in (None, "normal", "chat", "headline", "groupchat", "error"):
            raise StanzaError("bad-request", f"unknown message type {stanza_type!r}")
    elif stanza_type not in (None, "unavailable", "subscribe", "subscribed", "unsubscribe",
                             "unsubscribed", "probe", "error"):
        raise StanzaError("bad-request", f"unknown presence type {stanza_type!r}")
