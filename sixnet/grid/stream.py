"""Client-to-server streams (RFC 6120): framing, TLS, and the negotiation state machine.

`ClientStream` is the Twisted protocol: it turns bytes into stream events with the shared
hardened parser, writes what the negotiation decides, runs the timers and counts the limits.
Negotiation is an explicit state table (`TRANSITIONS`): each state names the inputs it
accepts and the handler for each; any other input gets the state's stream error. Policy lives
elsewhere: SASL in `sixnet.grid.sasl`, routing and sessions in `sixnet.grid.router`.

States (a stream restart returns to ``HEADER``)::

    HEADER --header--> STARTTLS  (plain TCP)  --starttls--> TLS_HANDSHAKE --handshake--> HEADER
    HEADER --header--> AUTH  (TLS, not authenticated)  --auth/response...success--> HEADER
    HEADER --header--> BIND      (authenticated)  --bind iq / resume--> SESSION
    SESSION: stanzas, <r/>, <a/>, <enable/>, legacy session iq; </stream:stream> -> CLOSED
"""

from __future__ import annotations

import base64
import enum
import secrets
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.grid.router import Router, Session
from sixnet.grid.sasl import (
    MAX_FAILURES_PER_STREAM,
    Challenge,
    SaslExchange,
    SaslPolicy,
    Success,
    TLSFacts,
    decode_payload,
    server_end_point,
)
from sixnet.grid.scram import SaslFailure
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
    XML_LANG,
    StanzaError,
    StreamError,
    error_reply,
    result_reply,
    serialize,
    stream_error,
    stream_header,
)
from sixnet.pki.store import NodeIdentity
from sixnet.pki.tls import ServerTLS, peer_chain

log = Logger(namespace="sixnet.grid")

#: How long after sending a stanza the server asks a stream-management client for an ack.
ACK_REQUEST_DELAY = 0.25
#: Ask at once when this many stanzas are unacknowledged.
ACK_REQUEST_BATCH = 32
#: Seconds a closing connection gets to flush (e.g. a TLS peer that never finishes the
#: handshake) before it is aborted.
CLOSE_GRACE = 10.0
#: Bytes written to a client whose connection stopped draining (its transport paused us)
#: before the stream is closed: a peer that does not read must not fill the server's memory.
SLOW_CONSUMER_BYTES = 8 * 1024 * 1024


class State(enum.Enum):
    HEADER = "waiting for a stream header"
    STARTTLS = "waiting for STARTTLS"
    TLS_HANDSHAKE = "TLS handshake"
    AUTH = "SASL"
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
    max_connections_per_address: int = 100
    max_sessions: int = 20000
    negotiation_timeout: float = 30.0
    idle_timeout: float = 300.0
    resume_timeout: float = 300.0


class C2SServer:
    """What every client stream shares: domain, TLS, SASL policy, router, limits, counters."""

    def __init__(self, domain: str, identity: NodeIdentity, tls: ServerTLS, sasl: SaslPolicy,
                 router: Router, limits: Limits, clock: IReactorTime) -> None:
        self.domain = domain
        self.identity = identity
        self.tls = tls
        self.sasl = sasl
        self.router = router
        self.limits = limits
        self.clock = clock
        self.connections: set[ClientStream] = set()
        self.per_address: Counter[str] = Counter()
        self.stopping = False

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

    def buildProtocol(self, addr: Any) -> ClientStream:  # noqa: N802 - Twisted's name
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


@implementer(IHandshakeListener, IPushProducer)
class ClientStream(Protocol):
    """One client connection (the `Connection` a router session writes to)."""

    def __init__(self, server: C2SServer, direct_tls: bool) -> None:
        self.server = server
        self.direct_tls = direct_tls
        self.parser = StreamParser(max_element_bytes=server.limits.max_stanza_bytes,
                                   max_depth=server.limits.max_depth)
        self.state = State.HEADER
        self.tls: TLSFacts | None = None
        self.jid: Any = None  # the authenticated bare JID
        self.certificate_chain: tuple[Any, ...] = ()  # when authenticated by EXTERNAL
        self.session: Session | None = None
        self.sasl: SaslExchange | None = None
        self.lang = "en"
        self.client_lang: str | None = None
        self.header_sent = False
        self.address = "?"
        self.clean_close = False
        self._dropped = False
        self._events: deque[Any] = deque()
        self._busy = False
        self._negotiation_timer: IDelayedCall | None = None
        self._ack_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None
        self._refusal: tuple[str, str] | None = None
        #: Bytes written since the transport said its buffer is full (None: it is not).
        self._unsent: int | None = None
        self._registered = False  # as the transport's producer
        self.last_received = server.clock.seconds()
        self._pinged = False  # since the last data received
        self._tokens = float(server.limits.stanza_burst)
        self._refilled = server.clock.seconds()
        #: Fires when the connection is gone (the service waits for it when stopping).
        self.lost: defer.Deferred[None] = defer.Deferred()

    # -- connection lifetime -----------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        server = self.server
        self.address = getattr(self.transport.getPeer(), "host", "?")
        server.connections.add(self)
        server.per_address[self.address] += 1
        # Stanzas are small and a publish fans out to many streams at once: no Nagle delay
        # (p99 at 10 subscribers fell from 35 ms to 2 ms). In-memory test transports have none.
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            no_delay(True)
        self._negotiation_timer = server.clock.callLater(
            server.limits.negotiation_timeout, self._negotiation_timed_out)
        if server.stopping:
            self._refuse("system-shutdown", "the server is stopping")
        elif len(server.connections) > server.limits.max_sessions:
            log.warn("connection from {address} refused: {limit} connections in total",
                     address=self.address, limit=server.limits.max_sessions)
            self._refuse("resource-constraint", "too many connections")
        elif server.per_address[self.address] > server.limits.max_connections_per_address:
            log.warn("connection from {address} refused: more than {limit} from one address",
                     address=self.address, limit=server.limits.max_connections_per_address)
            self._refuse("policy-violation", "too many connections from your address")

    def _refuse(self, condition: str, text: str) -> None:
        """Refuse a new connection with a stream error (after the handshake on direct TLS)."""
        if self.direct_tls and self.tls is None:
            self._refusal = (condition, text)
        else:
            self.close_with_error(condition, text)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        server = self.server
        server.connections.discard(self)
        server.per_address[self.address] -= 1
        if server.per_address[self.address] <= 0:
            del server.per_address[self.address]
        self._cancel_timers()
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self.state = State.CLOSED
        session, self.session = self.session, None
        if session is not None and session.connection is self:
            server.router.connection_lost(session, clean=self.clean_close)
        self.lost.callback(None)

    def _cancel_timers(self) -> None:
        for timer in (self._negotiation_timer, self._ack_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._negotiation_timer = self._ack_timer = None

    def _close(self) -> None:
        """Close after what was written is sent; abort if the peer does not let that happen."""
        if self._registered:  # a transport with a producer would wait for it to go away
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.server.clock.callLater(CLOSE_GRACE,
                                                            self.transport.abortConnection)

    def _negotiation_timed_out(self) -> None:
        if self.state not in (State.SESSION, State.CLOSED):
            log.info("{address}: no session after {seconds}s ({state}); closing",
                     address=self.address, seconds=self.server.limits.negotiation_timeout,
                     state=self.state.value)
            self.close_with_error("connection-timeout", "stream negotiation took too long")

    def handshakeCompleted(self) -> None:  # noqa: N802 - IHandshakeListener
        conn = self.transport.getHandle()
        version = conn.get_protocol_version_name()
        bindings = {"tls-server-end-point": server_end_point(self.server.identity.certificate)}
        if version == "TLSv1.3":
            bindings["tls-exporter"] = conn.export_keying_material(
                b"EXPORTER-Channel-Binding", 32, b"")
        self.tls = TLSFacts(version, bindings, peer_chain(conn))
        self.transport.registerProducer(self, True)
        self._registered = True
        if self._refusal is not None:
            self.close_with_error(*self._refusal)
            return
        if self.state is State.TLS_HANDSHAKE:
            self.state = State.HEADER
            self._pump()

    # -- output (Connection) -----------------------------------------------------------------

    def send_stanza(self, data: bytes) -> None:
        if self.state is State.CLOSED or self._dropped:
            return
        if self._unsent is not None:
            self._unsent += len(data)
            if self._unsent > SLOW_CONSUMER_BYTES:
                log.warn("{jid}: the client reads nothing; {bytes} bytes wait to be sent",
                         jid=self.jid, bytes=self._unsent)
                self.state = State.CLOSED
                self._cancel_timers()
                self.transport.abortConnection()  # unacked stanzas stay with the session
                return
        self.transport.write(data)
        session = self.session
        if session is not None and session.sm is not None and self._ack_timer is None:
            delay = 0 if len(session.sm.unacked) >= ACK_REQUEST_BATCH else ACK_REQUEST_DELAY
            self._ack_timer = self.server.clock.callLater(delay, self._request_ack)

    def _request_ack(self) -> None:
        self._ack_timer = None
        if self.state is State.SESSION and not self._dropped:
            self.transport.write(f"<r xmlns='{NS_SM}'/>".encode())

    def close_with_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        """Send a stream error (with our header if not yet sent) and close the connection."""
        if self.state is State.CLOSED or self._dropped:
            return
        if self.state is State.TLS_HANDSHAKE or (self.direct_tls and self.tls is None):
            # No TLS yet, so no stream to put an error on: just cut the connection.
            log.info("{address}: {condition} during the TLS handshake ({text})",
                     address=self.address, condition=condition, text=text)
            self.state = State.CLOSED
            self._cancel_timers()
            self.transport.abortConnection()
            return
        head = b"" if self.header_sent else stream_header(self.server.domain, None, self.lang)
        self.header_sent = True
        self.transport.write(head + stream_error(condition, text, extra))
        log.info("{address}: stream error {condition} ({text})", address=self.address,
                 condition=condition, text=text)
        self.state = State.CLOSED
        self._events.clear()
        self._cancel_timers()
        self._close()

    def drop(self) -> None:
        """The session moved to another stream (resumed there): close without ending it."""
        self._dropped = True
        self.session = None
        self.state = State.CLOSED
        self.transport.abortConnection()

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def check_idle(self, now: float, timeout: float) -> None:
        if self.state is not State.SESSION or self.session is None:
            return  # the negotiation timeout covers streams without a session
        silent = now - self.last_received
        if silent >= 2 * timeout:
            log.info("{jid}: silent for {seconds:.0f}s after a ping; closing",
                     jid=self.session.full, seconds=silent)
            self.close_with_error("connection-timeout", "no answer to a ping")
        elif silent >= timeout and not self._pinged:
            self._pinged = True
            # Through the session, so stream management counts it like any other stanza.
            self.session.write(f"<iq type='get' id='idle-{secrets.token_hex(4)}' "
                               f"from='{self.server.domain}' "
                               f"to={quoteattr(self.session.full)}>"
                               f"<ping xmlns='{NS_PING}'/></iq>".encode())

    # -- IPushProducer: the transport tells us when the client stops draining ---------------

    def pauseProducing(self) -> None:  # noqa: N802
        if self._unsent is None:
            self._unsent = 0

    def resumeProducing(self) -> None:  # noqa: N802
        self._unsent = None

    def stopProducing(self) -> None:  # noqa: N802
        self._unsent = None

    # -- input -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.state is State.CLOSED:
            return
        self.last_received = self.server.clock.seconds()
        self._pinged = False
        try:
            self._events.extend(self.parser.feed(data))
        except XMLStreamError as e:
            self.close_with_error(e.condition, e.text)
            return
        self._pump()

    def _pump(self) -> None:
        """Handle queued events in order; an asynchronous step holds the rest back."""
        while self._events and not self._busy and \
                self.state not in (State.CLOSED, State.TLS_HANDSHAKE):
            event = self._events.popleft()
            try:
                self._handle(event)
            except StreamError as e:
                self.close_with_error(e.condition, e.text, e.extra)
            except Exception:  # noqa: BLE001 - one bad stream must not hurt the others
                log.failure("{address}: internal error", address=self.address)
                self.close_with_error("internal-server-error")

    def _handle(self, event: Any) -> None:
        if isinstance(event, StreamOpened):
            if self.state is not State.HEADER:
                raise StreamError("not-well-formed", "unexpected stream header")
            self._on_header(event)
        elif isinstance(event, StreamClosed):
            self._on_close()
        else:
            name = _input_name(event)
            handler = TRANSITIONS.get(self.state, {}).get(name)
            if handler is None:
                condition, text = REFUSALS.get(self.state, ("not-authorized", ""))
                if name == "unknown" and self.state is State.SESSION:
                    condition, text = "unsupported-stanza-type", f"{event.tag} is not a stanza"
                raise StreamError(condition, text or f"{name} is not expected now")
            handler(self, event)

    def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run an asynchronous step; later input waits until it has finished (and the socket
        is not read meanwhile, so what waits is at most one read's worth)."""
        self._busy = True
        self.transport.pauseProducing()

        def done(result: object) -> None:
            self._busy = False
            if self.state is not State.CLOSED:
                self.transport.resumeProducing()
            if isinstance(result, Failure):
                if result.check(StreamError):
                    e = result.value
                    self.close_with_error(e.condition, e.text, e.extra)
                else:
                    log.failure("{address}: internal error", result, address=self.address)
                    self.close_with_error("internal-server-error")
            self._pump()

        defer.Deferred.fromCoroutine(coroutine).addBoth(done)

    # -- stream header and features ----------------------------------------------------------

    def _on_header(self, header: StreamOpened) -> None:
        lang = header.attrib.get(XML_LANG)
        if lang:
            self.client_lang = lang
            self.lang = lang if len(lang) <= 35 and lang.replace("-", "").isalnum() else "en"
        self._write(stream_header(self.server.domain, secrets.token_urlsafe(12), self.lang))
        self.header_sent = True
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
        self._write(self._features())

    def _features(self) -> bytes:
        if self.tls is None:
            self.state = State.STARTTLS
            return (f"<stream:features><starttls xmlns='{NS_TLS}'><required/></starttls>"
                    "</stream:features>").encode()
        limits = (f"<limits xmlns='{NS_LIMITS}'><max-bytes>"
                  f"{self.server.limits.max_stanza_bytes}</max-bytes></limits>")
        if self.jid is None:
            self.state = State.AUTH
            if self.sasl is None:
                self.sasl = SaslExchange(self.server.sasl, self.tls, self.address)
            mechanisms = "".join(f"<mechanism>{m}</mechanism>"
                                 for m in self.server.sasl.mechanisms(self.tls))
            bindings = "".join(f"<channel-binding type='{t}'/>"
                               for t in sorted(self.tls.channel_bindings))
            return (f"<stream:features><mechanisms xmlns='{NS_SASL}'>{mechanisms}</mechanisms>"
                    f"<sasl-channel-binding xmlns='{NS_SASL_CB}'>{bindings}"
                    f"</sasl-channel-binding>{limits}</stream:features>").encode()
        self.state = State.BIND
        return (f"<stream:features><bind xmlns='{NS_BIND}'/>"
                f"<session xmlns='{NS_SESSION}'><optional/></session>"
                f"<sm xmlns='{NS_SM}'/>{limits}</stream:features>").encode()

    def _on_close(self) -> None:
        """The client closed its stream: close ours (RFC 6120 4.4); the session ends."""
        self.clean_close = True
        if self.state is not State.CLOSED:
            self._write(b"</stream:stream>")
            self.state = State.CLOSED
            self._close()

    # -- STARTTLS ----------------------------------------------------------------------------

    def _on_starttls(self, element: etree._Element) -> None:
        self._write(f"<proceed xmlns='{NS_TLS}'/>".encode())
        self.state = State.TLS_HANDSHAKE
        self._events.clear()  # nothing the client sent before the handshake counts
        self.parser.reset()
        self.header_sent = False
        self.transport.startTLS(self.server.tls)

    # -- SASL --------------------------------------------------------------------------------

    def _on_auth(self, element: etree._Element) -> None:
        mechanism = element.get("mechanism", "")
        self._sasl_step(lambda payload: self._exchange().auth(mechanism, payload), element)

    def _on_response(self, element: etree._Element) -> None:
        self._sasl_step(lambda payload: self._exchange().response(payload or b""), element)

    def _on_abort(self, element: etree._Element) -> None:
        self._exchange().abort()
        self._write(f"<failure xmlns='{NS_SASL}'><aborted/></failure>".encode())

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
                text = (f"<text xml:lang='en'>{_escape(failure.text)}</text>"
                        if failure.text else "")
                self._write(f"<failure xmlns='{NS_SASL}'><{failure.condition}/>{text}"
                            "</failure>".encode())
                if self._exchange().failures >= MAX_FAILURES_PER_STREAM:
                    raise StreamError("policy-violation",
                                      "too many failed authentications") from None
                return
            if isinstance(outcome, Challenge):
                data = base64.b64encode(outcome.data).decode() if outcome.data else ""
                self._write(f"<challenge xmlns='{NS_SASL}'>{data}</challenge>".encode())
                return
            data = base64.b64encode(outcome.data).decode() if outcome.data else ""
            self._write(f"<success xmlns='{NS_SASL}'>{data}</success>".encode())
            self.jid = outcome.jid
            self.certificate_chain = outcome.certificate_chain
            self.sasl = None
            self.parser.reset()
            self._events.clear()
            self.header_sent = False
            self.state = State.HEADER

        self._run(run())

    # -- binding and stream management resumption ---------------------------------------------

    def _on_bind(self, iq: etree._Element) -> None:
        if not iq.get("id"):
            raise StreamError("invalid-xml", "iq without an id")
        resource_el = iq[0].find(f"{{{NS_BIND}}}resource")
        resource = (resource_el.text or "").strip() if resource_el is not None else ""
        if str(self.jid) in self.server.sasl.revoked:  # revoked since it authenticated
            self.close_with_error("policy-violation", "this platform's access has been revoked")
            return
        try:
            session = self.server.router.bind(self, self.jid, resource or None)
        except StanzaError as e:
            self._write(serialize(error_reply(iq, e.condition, e.text)))
            return
        self._session_started(session)
        reply = result_reply(iq)
        reply.attrib.pop("from", None)
        bind = etree.SubElement(reply, f"{{{NS_BIND}}}bind", nsmap={None: NS_BIND})
        etree.SubElement(bind, f"{{{NS_BIND}}}jid").text = session.full
        self._write(serialize(reply))

    def _session_started(self, session: Session) -> None:
        self.session = session
        session.certificate_chain = self.certificate_chain
        self.state = State.SESSION
        if self._negotiation_timer is not None and self._negotiation_timer.active():
            self._negotiation_timer.cancel()
        self._negotiation_timer = None

    def _on_resume(self, element: etree._Element) -> None:
        previd = element.get("previd", "")
        try:
            handled = int(element.get("h", ""))
            session = self.server.router.resume(previd, handled, self, self.jid)
        except (ValueError, StanzaError, StreamError):
            self._write(f"<failed xmlns='{NS_SM}'><item-not-found xmlns='{NS_STANZAS}'/>"
                        "</failed>".encode())
            return
        assert session.sm is not None
        self._session_started(session)
        self._write(f"<resumed xmlns='{NS_SM}' previd={quoteattr(previd)} "
                    f"h='{session.sm.handled_in}'/>".encode())
        for data in list(session.sm.unacked):
            self.transport.write(data)
        if session.sm.unacked:
            self._request_ack()

    def _auth_before_tls(self, element: etree._Element) -> None:
        self._write(f"<failure xmlns='{NS_SASL}'><encryption-required/></failure>".encode())
        raise StreamError("policy-violation", "STARTTLS is required first")

    def _sm_too_early(self, element: etree._Element) -> None:
        self._write(f"<failed xmlns='{NS_SM}'><unexpected-request xmlns='{NS_STANZAS}'/>"
                    "</failed>".encode())

    # -- the session --------------------------------------------------------------------------

    def _on_enable(self, element: etree._Element) -> None:
        session = self.session
        assert session is not None
        if session.sm is not None:
            self._sm_too_early(element)
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
        self._write(f"<enabled xmlns='{NS_SM}'{extra}/>".encode())

    def _on_ack_request(self, element: etree._Element) -> None:
        session = self.session
        if session is None or session.sm is None:
            raise StreamError("unsupported-stanza-type", "stream management is not enabled")
        self._write(f"<a xmlns='{NS_SM}' h='{session.sm.handled_in}'/>".encode())

    def _on_ack(self, element: etree._Element) -> None:
        session = self.session
        if session is None or session.sm is None:
            raise StreamError("unsupported-stanza-type", "stream management is not enabled")
        try:
            h = int(element.get("h", ""))
        except ValueError:
            raise StreamError("invalid-xml", "<a/> needs a numeric h") from None
        session.sm.ack(h)

    def _on_legacy_session(self, iq: etree._Element) -> None:
        self._count_inbound()
        reply = result_reply(iq)
        reply.attrib.pop("from", None)
        self._write(serialize(reply))

    def _on_bind_again(self, iq: etree._Element) -> None:
        self._count_inbound()
        self._write(serialize(error_reply(iq, "not-allowed", "already bound")))

    def _count_inbound(self) -> None:
        session = self.session
        if session is not None and session.sm is not None:
            session.sm.received()

    def _on_stanza(self, stanza: etree._Element) -> None:
        session = self.session
        assert session is not None
        self._throttle()
        self._count_inbound()
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
        self._tokens = min(float(limits.stanza_burst),
                           self._tokens + (now - self._refilled) * limits.stanzas_per_second)
        self._refilled = now
        if self._tokens < 1:
            log.warn("{jid}: more than {rate} stanzas per second; closing", jid=self.jid,
                     rate=limits.stanzas_per_second)
            raise StreamError("policy-violation",
                              f"more than {limits.stanzas_per_second:g} stanzas per second")
        self._tokens -= 1


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


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


Handler = Callable[[ClientStream, etree._Element], None]

#: The state table: for each state, the inputs it accepts and what handles them.
TRANSITIONS: dict[State, dict[str, Handler]] = {
    State.STARTTLS: {"starttls": ClientStream._on_starttls,
                     "auth": ClientStream._auth_before_tls},
    State.AUTH: {"auth": ClientStream._on_auth, "response": ClientStream._on_response,
                 "abort": ClientStream._on_abort},
    State.BIND: {"bind": ClientStream._on_bind, "sm-resume": ClientStream._on_resume,
                 "sm-enable": ClientStream._sm_too_early},
    State.SESSION: {"stanza": ClientStream._on_stanza, "bind": ClientStream._on_bind_again,
                    "session": ClientStream._on_legacy_session,
                    "sm-enable": ClientStream._on_enable, "sm-r": ClientStream._on_ack_request,
                    "sm-a": ClientStream._on_ack, "sm-resume": ClientStream._sm_too_early},
}

#: The stream error for any other input, per state (RFC 6120 5.3.1, 6.4, 7.1, 4.9.3.12).
REFUSALS: dict[State, tuple[str, str]] = {
    State.STARTTLS: ("policy-violation", "STARTTLS is required first"),
    State.AUTH: ("not-authorized", "authenticate first"),
    State.BIND: ("not-authorized", "bind a resource first"),
    State.SESSION: ("unsupported-stanza-type", ""),
}
