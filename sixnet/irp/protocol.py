"""The registry's side of an IRP connection: framing, STARTTLS, limits and timeouts.

`IRPServerProtocol` only turns bytes into stream events and results back into bytes; what
a request does is decided by the `Registry` (`sixnet.irp.engine`). A connection moves
through these states (one method per event, the table is `_HANDLERS`)::

    CLEAR --header--> OFFERED --<starttls/>--> HANDSHAKE --TLS done, client checked-->
    AUTHENTICATED --header--> OPEN --</irp> or error--> CLOSED

Anything out of place gets a ``<stream-error>`` and the connection is closed; a bad request
inside an open stream only gets an ``<error>`` for that request.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lxml import etree
from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError
from sixnet.core.timefmt import rfc3339
from sixnet.irp.engine.access import ANONYMOUS, Caller
from sixnet.irp.engine.registry import Registry
from sixnet.irp.wire import (
    NS,
    ROOT,
    VERSION,
    IRPError,
    Limits,
    Request,
    ResponseSigner,
    RevokeRequest,
    UnwatchRequest,
    WatchRequest,
    element,
    error_element,
    parse_request,
    q,
    request_id,
    serialize,
    signed_data,
    stream_error,
    stream_header,
)
from sixnet.pki.store import VerificationError
from sixnet.pki.tls import ServerTLS, peer_chain

log = Logger(namespace="sixnet.irp")

CLEAR, OFFERED, HANDSHAKE, AUTHENTICATED, OPEN, CLOSED = (
    "clear", "offered", "handshake", "authenticated", "open", "closed")
#: Watches one connection may hold.
MAX_WATCHES = 256
MAX_DEPTH = 8


class IRPServerFactory(Factory):
    """Builds one protocol per connection and counts connections per peer address."""

    def __init__(self, registry: Registry, tls: ServerTLS, signer: ResponseSigner,
                 hostname: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.registry = registry
        self.config = registry.config
        self.tls = tls
        self.signer = signer
        self.hostname = hostname
        self.reactor = reactor
        self.limits = Limits(self.config.max_addresses, self.config.max_lifetime,
                             self.config.default_lifetime, self.config.max_backup_bytes)
        self.per_address: Counter[str] = Counter()
        self.protocols: set[IRPServerProtocol] = set()
        registry.revocation_listeners.append(self._revoked)

    def _revoked(self, person: str | None) -> None:
        for protocol in list(self.protocols):
            if protocol.caller.identity is not None and \
                    (person is None or protocol.caller.identity == person):
                protocol.check_revocation()

    def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 - Twisted's name
        host = getattr(addr, "host", str(addr))
        if self.per_address[host] >= self.config.max_connections_per_address:
            self.registry.audit.record("connect", outcome="refused", actor=ANONYMOUS,
                                       peer=host, detail="too many connections from this address")
            return _RefuseConnection()
        protocol = IRPServerProtocol(self, host)
        return protocol


class _RefuseConnection(Protocol):
    """Says why and hangs up: the address already has its share of connections."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(stream_header({}) + stream_error(
            "resource-constraint", "too many connections from your address"))
        self.transport.loseConnection()


@implementer(interfaces.IHandshakeListener)
class IRPServerProtocol(Protocol):
    """One client connection to the registry."""

    def __init__(self, factory: IRPServerFactory, peer: str) -> None:
        self.factory = factory
        self.peer = peer
        self.config = factory.config
        self.registry = factory.registry
        self.parser = StreamParser(max_element_bytes=self.config.max_message_bytes,
                                   max_depth=MAX_DEPTH)
        self.state = CLEAR
        self.caller = Caller(peer)
        self.refusal: VerificationError | None = None
        self.in_flight = 0
        self.watches: dict[str, tuple[str, Any]] = {}
        self._pending: list[Any] = []
        self._idle_timer: Any = None
        self._stall_timer: Any = None
        #: True until STARTTLS: events parsed from this feed came in the clear.
        self.transport_is_clear = True
        self._header_out = False

    # -- connection lifetime ----------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        self.factory.per_address[self.peer] += 1
        self.factory.protocols.add(self)
        self._reset_idle()
        self._start_stall_clock()  # the stream header is due like any other message

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: N802,B008
        self.state = CLOSED
        self.factory.protocols.discard(self)
        self.factory.per_address[self.peer] -= 1
        if self.factory.per_address[self.peer] <= 0:
            del self.factory.per_address[self.peer]
        for user, (_, watcher) in self.watches.items():
            self.registry.unwatch(user, watcher)
        self.watches.clear()
        for timer in (self._idle_timer, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()

    def _reset_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.config.idle_timeout)
        else:
            self._idle_timer = self.factory.reactor.callLater(
                self.config.idle_timeout, self._timed_out, "idle")

    def _timed_out(self, why: str) -> None:
        if self.state == CLOSED:
            return
        text = ("no data for too long" if why == "idle"
                else "a message (or the TLS handshake) was not completed in time")
        self.registry.audit.record("timeout", outcome="refused", actor=self.caller.actor,
                                   peer=self.peer, detail=text)
        self.fail("connection-timeout", text)

    # -- bytes in ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.state == CLOSED:
            return
        self.transport_is_clear = self.state in (CLEAR, OFFERED)
        self._reset_idle()
        try:
            events = self.parser.feed(data)
        except XMLStreamError as e:
            self.registry.audit.record("stream", outcome="refused", actor=self.caller.actor,
                                       peer=self.peer, condition=e.condition,
                                       detail=e.text[:200])
            self.fail(e.condition, e.text)
            return
        self._track_stall(data, events)
        for event in events:
            if self.state == CLOSED:
                return
            if self.state == HANDSHAKE and not self._pending and self.transport_is_clear:
                # Bytes sent in the clear after <starttls/> must not pass as protected ones.
                self.fail("policy-violation", "data after <starttls/> before the handshake")
                return
            if self.state == HANDSHAKE:  # held until the client's certificate is judged
                self._pending.append(event)
                continue
            self._event(event)

    def _track_stall(self, data: bytes, events: list[Any]) -> None:
        """Start the stall clock when a message begins; stop it when messages are complete.

        A feed counts as "complete" when it produced a message (or the header) and its last
        non-blank byte closes a tag; anything else with content means a message is open.
        """
        tail = data.rstrip(b" \t\r\n")
        if not tail:
            return
        if events and tail.endswith(b">") and not isinstance(events[-1], StreamClosed):
            if self._stall_timer is not None and self._stall_timer.active():
                self._stall_timer.cancel()
            return
        self._start_stall_clock()

    def _start_stall_clock(self) -> None:
        if self._stall_timer is None or not self._stall_timer.active():
            self._stall_timer = self.factory.reactor.callLater(
                self.config.stall_timeout, self._timed_out, "stall")

    def _event(self, event: Any) -> None:
        if isinstance(event, StreamOpened):
            self._stream_opened(event)
        elif isinstance(event, StreamClosed):
            self.send(b"</irp>")
            self.state = CLOSED
            self.transport.loseConnection()
        elif self.state == OFFERED:
            self._clear_element(event)
        elif self.state == OPEN:
            self._request(event)
        else:
            self.fail("not-well-formed", "a message before the stream header")

    def _stream_opened(self, event: StreamOpened) -> None:
        if event.tag != ROOT:
            self.fail("invalid-namespace", f"the stream root must be <irp xmlns='{ROOT[1:-4]}'>")
            return
        version = event.attrib.get("version", "")
        if version.split(".")[0] != VERSION.split(".")[0]:
            self.fail("unsupported-version", f"this registry speaks IRP {VERSION}")
            return
        if self.state == CLEAR:
            self._send_header()
            self.send(serialize(element("features", children=[
                element("starttls", {"required": "true"})])))
            self.state = OFFERED
        elif self.state == AUTHENTICATED:
            self._send_header()
            self.send(serialize(self._session_element()))
            self.state = OPEN
        else:
            self.fail("not-well-formed", "an unexpected stream header")

    def _clear_element(self, event: etree._Element) -> None:
        if event.tag != q("starttls"):
            self.registry.audit.record("stream", outcome="refused", actor=ANONYMOUS,
                                       peer=self.peer, detail="request before STARTTLS")
            self.fail("policy-violation", "send <starttls/> first: IRP runs only over TLS")
            return
        self.send(serialize(element("proceed")))
        self.state = HANDSHAKE
        self._header_out = False  # a new stream starts inside TLS
        self.parser.reset()
        self.transport.startTLS(self.factory.tls)
        self._start_stall_clock()  # the handshake and the new header are due in time

    # -- TLS --------------------------------------------------------------------------------

    def handshakeCompleted(self) -> None:  # noqa: N802 - IHandshakeListener
        chain = peer_chain(self.transport.getHandle())
        if not chain:
            self._authenticated(None)
            return
        d = defer.Deferred.fromCoroutine(self.registry.authenticate(chain, self.peer))
        d.addCallbacks(self._authenticated, self._refused)
        d.addErrback(self._internal_failure, None)

    def _authenticated(self, caller: Caller | None) -> None:
        if caller is not None:
            self.caller = caller
        self._ready()

    def _refused(self, failure: Failure) -> None:
        failure.trap(VerificationError)
        self.refusal = failure.value
        self._ready()

    def _ready(self) -> None:
        if self.state != HANDSHAKE:
            return
        self.state = AUTHENTICATED
        pending, self._pending = self._pending, []
        for event in pending:
            if self.state == CLOSED:
                return
            self._event(event)

    def check_revocation(self) -> None:
        """A certificate of this person was revoked (here or in another process): if it is
        the one this connection authenticated with, end the connection."""
        serial = self.caller.serial
        if serial is None:
            return

        def checked(row: Any) -> None:
            if row is not None and row.revoked is not None and self.caller.serial == serial:
                self.registry.audit.record("session", outcome="refused",
                                           actor=self.caller.actor, peer=self.peer,
                                           serial=serial,
                                          detail="certificate revoked during the session")
                self.fail("not-authorized", "the certificate of this connection was revoked")

        d = self.registry.store.certificate(serial)
        d.addCallback(checked)
        d.addErrback(lambda f: log.failure("checking a revoked certificate", f))

    def _session_element(self) -> etree._Element:
        if self.caller.identity is not None:
            return element("session", {"user": self.caller.identity,
                                       "role": self.caller.role})
        if self.refusal is not None:
            return element("session", {"role": "anonymous", "refused": self.refusal.check},
                           self.refusal.detail)
        return element("session", {"role": "anonymous"})

    # -- requests ------------------------------------------------------------------------------

    def _request(self, node: etree._Element) -> None:
        rid = request_id(node)
        try:
            request = parse_request(node, self.factory.limits)
        except IRPError as error:
            if error.condition in ("policy-violation", "feature-not-implemented"):
                self.registry.audit.record("request", outcome="refused",
                                           actor=self.caller.actor, peer=self.peer,
                                           condition=error.condition, detail=error.text)
            self.send(serialize(error_element(rid, error)))
            return
        if self.in_flight >= self.config.max_requests_in_flight:
            self.send(serialize(error_element(rid, IRPError(
                "resource-constraint", "too many requests in flight on this connection"))))
            return
        if isinstance(request, WatchRequest) and len(self.watches) >= MAX_WATCHES and \
                request.user not in self.watches:
            self.send(serialize(error_element(rid, IRPError(
                "policy-violation", f"at most {MAX_WATCHES} watches per connection"))))
            return
        self.in_flight += 1
        d = defer.Deferred.fromCoroutine(self._run(request))
        d.addErrback(self._internal_failure, request)

    async def _run(self, request: Request) -> None:
        caller = self.caller
        try:
            payload = await self.registry.handle(caller, request)
        except IRPError as error:
            self.in_flight -= 1
            self.send(serialize(error_element(request.id, error)))
            return
        self.in_flight -= 1
        if self.state == CLOSED:
            return
        if isinstance(request, WatchRequest):
            self._start_watch(request)
        elif isinstance(request, UnwatchRequest):
            self._stop_watch(request.user)
        elif isinstance(request, RevokeRequest) and \
                (request.serial or caller.serial) == caller.serial:
            self.caller = Caller(self.peer)  # this connection's certificate is no longer good
        self.send(self._signed(f'<result xmlns="{NS}" id="{request.id}">', b"</result>",
                               request, payload))

    def _signed(self, head: str, tail: bytes, request: Request, payload: bytes) -> bytes:
        """A result or notification: the canonical ``<data>`` around `payload` (canonical
        bytes, possibly the registry's cached answer), signed now for this request."""
        data = signed_data(request.op, request.id, self.factory.hostname, rfc3339(), payload)
        return head.encode() + data + self.factory.signer.signature(data) + tail

    def _start_watch(self, request: WatchRequest) -> None:
        user = request.user
        self._stop_watch(user)

        def changed(payload: bytes) -> None:
            if self.state == OPEN:
                self.send(self._signed(f'<notify xmlns="{NS}">', b"</notify>", request, payload))

        self.watches[user] = (request.id, changed)
        self.registry.watch(user, changed)

    def _stop_watch(self, user: str) -> None:
        entry = self.watches.pop(user, None)
        if entry is not None:
            self.registry.unwatch(user, entry[1])

    def _internal_failure(self, failure: Failure, request: Request | None) -> None:
        log.failure("IRP request failed", failure)
        if request is not None:
            self.in_flight -= 1
            self.send(serialize(error_element(request.id, IRPError(
                "internal-server-error", "the registry failed; nothing was changed"))))
        else:
            self.fail("internal-server-error", "the registry failed")

    # -- bytes out ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.state != CLOSED or data == b"</irp>":
            self.transport.write(data)

    def _send_header(self) -> None:
        self.send(stream_header({"from": self.factory.hostname}))
        self._header_out = True

    def fail(self, condition: str, text: str) -> None:
        """A stream error: say why, close the stream and the connection."""
        if self.state == CLOSED:
            return
        if not self._header_out:  # the error must be inside a stream the client can parse
            self._send_header()
        self.transport.write(stream_error(condition, text))
        self.state = CLOSED
        self.transport.loseConnection()
