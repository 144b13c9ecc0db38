"""The registry's side of an IRP connection: framing, STARTTLS, limits and timeouts.

`IRPServerProtocol` builds on the shared XML stream (`sixnet.core.stream.protocol`), which
turns bytes into events, writes stream errors, keeps the STARTTLS restart rule and runs the
stall and idle timers. Here is the negotiation, an Automat machine whose table is at the
bottom of the class; what a request does is decided by the `Registry`
(`sixnet.irp.engine`)::

    CLEAR --header--> OFFERED --<starttls/>--> HANDSHAKE --TLS done, client checked-->
    AUTHENTICATED --header--> OPEN --</irp> or error--> CLOSED

Anything out of place gets a ``<stream-error>`` and the connection is closed; a bad request
inside an open stream only gets an ``<error>`` for that request.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from automat import MethodicalMachine
from lxml import etree
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from sixnet.core.stream.limits import AddressLimiter
from sixnet.core.stream.parser import Event, StreamOpened, StreamParser, XMLStreamError
from sixnet.core.stream.protocol import StreamError, XMLStreamProtocol
from sixnet.core.timefmt import rfc3339
from sixnet.irp.engine.access import ANONYMOUS, Caller
from sixnet.irp.engine.answers import Answer
from sixnet.irp.engine.registry import Registry
from sixnet.irp.storage import StoredRecord
from sixnet.irp.wire import (
    NS,
    RECORDS_VERSION,
    ROOT,
    STREAM,
    VERSION,
    IRPError,
    Limits,
    LookupRequest,
    RecordStatement,
    Request,
    ResponseSigner,
    RevokeRequest,
    Statement,
    UnwatchRequest,
    WatchRequest,
    answer_subject,
    element,
    error_element,
    parse_request,
    parse_user,
    q,
    request_id,
    serialize,
    signed_data,
    signed_record,
    version_of,
)
from sixnet.pki.store import VerificationError
from sixnet.pki.tls import ServerTLS, peer_chain

log = Logger(namespace="sixnet.irp")

CLEAR, OFFERED, HANDSHAKE, AUTHENTICATED, OPEN, CLOSED = (
    "clear", "offered", "handshake", "authenticated", "open", "closed")
#: Watches one connection may hold.
MAX_WATCHES = 256
MAX_DEPTH = 8


@dataclass(frozen=True)
class TextBetweenMessages:
    """An event: non-whitespace text arrived between messages (``bad-format``)."""

    text: bytes


@dataclass(frozen=True, slots=True)
class PlainLookup:
    """An event: a lookup in its plain form (`PLAIN_LOOKUP`), taken without libxml2."""

    id: str
    user: str


#: A lookup as clients write it: ``<lookup id="..." user="..."/>``, with or without IRP's
#: namespace declared again (``xmlns="urn:sixnet:irp:1"`` first, as `serialize` writes it),
#: the id as `request_id` takes it, the user id printable ASCII that needs no escaping (no
#: space, ``"&'<>``). Such bytes are one whole, well-formed element, so between messages of
#: a stream whose default namespace is IRP's they say exactly what libxml2 makes of them.
PLAIN_LOOKUP = re.compile(
    rb'<lookup(?: xmlns="' + re.escape(NS.encode()) +
    rb'")? id="([A-Za-z0-9._:-]{1,64})" user="([!#-%(-;=?-~]{1,256})"/>')


class MessageGapParser(StreamParser):
    """The stream parser, reporting text between messages when it arrives.

    libxml2 holds character data back until the next ``<``, so ``<lookup .../>hello`` would
    only be refused when another message began, or time out. Each feed is parsed up to its
    last ``>`` first; if that leaves the parser between messages (`idle`, which a ``>``
    inside a half-sent attribute value cannot fake) and the rest is text with no markup,
    the events end with `TextBetweenMessages` and nothing more is parsed. It is an event,
    not an error, so what came before it is handled first (after ``<starttls/>`` it is
    data in the clear: ``policy-violation``).

    With `plain_lookups`, a feed that is just one lookup in its plain form, arriving
    between messages, becomes a `PlainLookup` without libxml2: most feeds of a busy
    registry are such lookups, and parsing is most of their cost.
    """

    def plain_lookup(self, data: bytes) -> PlainLookup | None:
        """`data` as a `PlainLookup` if plain lookups are on, the stream is between messages
        and `data` is exactly one; None otherwise."""
        if self.plain_lookups and self.idle and self.gap is None and \
                len(data) <= self.max_element_bytes:
            plain = PLAIN_LOOKUP.fullmatch(data)
            if plain is not None:
                return PlainLookup(plain[1].decode(), plain[2].decode())
        return None

    def feed(self, data: bytes) -> list[Event | TextBetweenMessages | PlainLookup]:
        lookup = self.plain_lookup(data)
        if lookup is not None:  # the common request, at a fraction of the cost
            return [lookup]
        cut = data.rfind(b">") + 1
        rest = data[cut:]
        if self.gap is not None or b"<" in rest or not rest.strip(b" \t\r\n"):
            return [] if self.gap is not None else list(super().feed(data))
        events: list[Event | TextBetweenMessages] = list(super().feed(data[:cut])) if cut else []
        if not self.idle:
            return events + list(super().feed(rest))
        self.gap = TextBetweenMessages(rest)
        return [*events, self.gap]

    def reset(self) -> None:
        super().reset()
        self.gap: TextBetweenMessages | None = None
        #: Set while the stream is open and its default namespace is IRP's (a new stream
        #: is a new question): plain lookups are then taken as `PlainLookup` events.
        self.plain_lookups = False


class SignedRecords:
    """Each person's record signed once (1.2's ``<record>``) and kept with its signature
    until the record changes (another version or payload) or its window ends.

    The window is ``[irp] answer_validity`` from the signing, and never past the record's
    first expiry (an address or a certificate in it), so a kept statement never vouches for
    what has expired. A statement is signed again once less than a tenth of its window is
    left, so an answer leaves with time to be used. What is signed goes to `keep` (the
    database, for the other workers and restarts); a statement read from there comes in
    the `Answer` and is used as it is.
    """

    def __init__(self, signer: ResponseSigner, hostname: str, validity: int,
                 clock: Any, size: int,
                 keep: Callable[[Answer, StoredRecord], object] | None = None) -> None:
        self.signer = signer
        self.hostname = hostname
        self.validity_ms = validity * 1000
        self.clock = clock
        self.size = max(size, 1)
        self.keep = keep
        self.signatures = 0
        #: person -> (version, payload, re-sign from (ms), signed bytes)
        self._kept: dict[str, tuple[int, bytes, int, bytes]] = {}

    def statement(self, answer: Answer) -> bytes:
        """The signed ``<record>`` and ``<signature>`` of `answer`'s record."""
        now = int(self.clock() * 1000)
        kept = self._kept.get(answer.person)
        if kept is not None and now < kept[2] and kept[0] == answer.version and \
                (kept[1] is answer.payload or kept[1] == answer.payload):
            return kept[3]
        if answer.statement is not None and now < answer.resign_at:
            self._remember(answer, answer.resign_at, answer.statement)
            return answer.statement
        not_after = min(now + self.validity_ms, answer.changes_at)
        at = datetime.datetime.fromtimestamp(now / 1000, datetime.UTC)
        until = datetime.datetime.fromtimestamp(not_after / 1000, datetime.UTC)
        record = signed_record(RecordStatement(answer.person, answer.version, self.hostname,
                                               rfc3339(at), rfc3339(until)), answer.payload)
        signed = record + self.signer.signature(record)
        self.signatures += 1
        resign_at = not_after - (not_after - now) // 10
        self._remember(answer, resign_at, signed)
        if self.keep is not None and answer.exists:
            self.keep(answer, StoredRecord(signed, answer.changes_at, resign_at))
        return signed

    def _remember(self, answer: Answer, resign_at: int, signed: bytes) -> None:
        self._kept.pop(answer.person, None)
        if len(self._kept) >= self.size:
            self._kept.pop(next(iter(self._kept)))
        self._kept[answer.person] = (answer.version, answer.payload, resign_at, signed)


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
        self.per_address = AddressLimiter(self.config.max_connections_per_address)
        self.records = SignedRecords(signer, hostname, self.config.answer_validity,
                                     lambda: registry.clock(), self.config.answer_cache,
                                     registry.keep_record)
        self.protocols: set[IRPServerProtocol] = set()
        #: Told the number of `protocols` whenever it changes (a worker's accept shares).
        self.on_count: Callable[[int], object] | None = None
        registry.revocation_listeners.append(self._revoked)

    def counted(self) -> None:
        if self.on_count is not None:
            self.on_count(len(self.protocols))

    def _revoked(self, person: str | None) -> None:
        for protocol in list(self.protocols):
            if protocol.caller.identity is not None and \
                    (person is None or protocol.caller.identity == person):
                protocol.check_revocation()

    def buildProtocol(self, addr: Any) -> Protocol:
        host = getattr(addr, "host", str(addr))
        return IRPServerProtocol(self, host, admitted=self.per_address.acquire(host))


class IRPServerProtocol(XMLStreamProtocol):
    """One client connection to the registry."""

    format = STREAM
    parser: MessageGapParser
    _machine = MethodicalMachine()

    def __init__(self, factory: IRPServerFactory, peer: str, admitted: bool = True) -> None:
        config = factory.config
        super().__init__(MessageGapParser(max_element_bytes=config.max_message_bytes,
                                          max_depth=MAX_DEPTH), factory.reactor,
                         stall_timeout=config.stall_timeout, idle_timeout=config.idle_timeout)
        self.factory = factory
        self.peer = peer
        #: Within the per-address limit (a refused connection only hears why).
        self.admitted = admitted
        self.config = config
        self.registry = factory.registry
        self.caller = Caller(peer)
        self.refusal: VerificationError | None = None
        #: The ids of the requests being answered (an id is unique among them).
        self.in_flight: set[str] = set()
        self.watches: dict[str, tuple[str, Any]] = {}
        #: Persons whose watch request is being answered.
        self.watching: set[str] = set()
        #: The client speaks 1.2: lookups and watches get the person's signed record.
        self.records = False
        #: The stream header declared IRP's namespace the default (plain lookups mean it).
        self._irp_default = False
        #: The machine is in `open_stream`, whose element inputs only loop to `_dispatch`:
        #: `element_received` then calls it directly, without Automat's cost per call (a
        #: fifth of a lookup's CPU). Set on entering it; cleared by the only inputs that
        #: leave it (a header, the end).
        self._serving = False

    @property
    def state(self) -> str:
        return self._current_state()

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        return (("from", self.factory.hostname),)

    # -- connection lifetime ----------------------------------------------------------------

    def connectionMade(self) -> None:
        if not self.admitted:
            self.registry.audit.record("connect", outcome="refused", actor=ANONYMOUS,
                                       peer=self.peer,
                                       detail="too many connections from this address")
            self.send_stream_error("resource-constraint",
                                   "too many connections from your address")
            return
        self.factory.protocols.add(self)
        self.factory.counted()
        super().connectionMade()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        if not self.admitted:
            return
        self.factory.protocols.discard(self)
        self.factory.counted()
        self.factory.per_address.release(self.peer)
        for user, (_, watcher) in self.watches.items():
            self.registry.unwatch(user, watcher)
        self.watches.clear()

    def stream_ended(self) -> None:
        self._serving = self.parser.plain_lookups = False
        self.end()

    def timed_out(self, why: str) -> None:
        text = ("no data for too long" if why == "idle"
                else "a message (or the TLS handshake) was not completed in time")
        self.registry.audit.record("timeout", outcome="refused", actor=self.caller.actor,
                                   peer=self.peer, detail=text)
        self.send_stream_error("connection-timeout", text)

    def malformed(self, error: XMLStreamError) -> None:
        self.registry.audit.record("stream", outcome="refused", actor=self.caller.actor,
                                   peer=self.peer, condition=error.condition,
                                   detail=error.text[:200])
        super().malformed(error)

    def fail(self, condition: str, text: str) -> None:
        """A stream error: say why, close the stream and the connection."""
        self.send_stream_error(condition, text)

    def dataReceived(self, data: bytes) -> None:
        # A plain lookup arriving while nothing else waits goes straight to its request,
        # without the parse-and-queue turn (a busy registry's most common read).
        if self.quiet:
            lookup = self.parser.plain_lookup(data)
            if lookup is not None:
                self.took_whole(lookup)
                return
        super().dataReceived(data)

    # -- events, checked before they reach the machine ---------------------------------------

    def stream_opened(self, header: StreamOpened) -> None:
        if header.tag != ROOT:
            raise StreamError("invalid-namespace",
                              f"the stream root must be <irp xmlns='{ROOT[1:-4]}'>")
        version = header.attrib.get("version", "")
        if version.split(".")[0] != VERSION.split(".")[0]:
            raise StreamError("unsupported-version", f"this registry speaks IRP {VERSION}")
        self.records = version_of(version) >= RECORDS_VERSION
        self._serving = False
        self._irp_default = header.nsmap.get(None) == NS
        self.got_header()

    def element_received(self, node: etree._Element | TextBetweenMessages) -> None:
        if isinstance(node, TextBetweenMessages):
            raise StreamError("bad-format", "text between messages")
        if self._serving:  # open_stream.upon(got_element or got_starttls) -> _dispatch
            if isinstance(node, PlainLookup):
                self._plain_lookup(node)
            else:
                self._request(node)
        elif node.tag == q("starttls"):
            self.got_starttls(node)
        else:
            self.got_element(node)

    def stream_closed(self) -> None:
        self.close_stream()

    # -- TLS --------------------------------------------------------------------------------

    def tls_established(self) -> None:
        self.tls_up()

    def _authenticated(self, caller: Caller | None) -> None:
        if caller is not None:
            self.caller = caller
        self.caller_judged()

    def _refused(self, failure: Failure) -> None:
        failure.trap(VerificationError)
        self.refusal = failure.value
        self.caller_judged()

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
            self._malformed_request(rid, error)
            return
        self._handle(request)

    def _plain_lookup(self, lookup: PlainLookup) -> None:
        """What `_request` does with the element a `PlainLookup` stands for."""
        try:
            request = LookupRequest(lookup.id, parse_user(lookup.user))
        except IRPError as error:
            self._malformed_request(lookup.id, error)
            return
        self._handle(request)

    def _malformed_request(self, rid: str | None, error: IRPError) -> None:
        if error.condition in ("policy-violation", "feature-not-implemented"):
            self.registry.audit.record("request", outcome="refused", actor=self.caller.actor,
                                       peer=self.peer, condition=error.condition,
                                       detail=error.text)
        self.send(serialize(error_element(rid, error)))

    def _handle(self, request: Request) -> None:
        """A well-formed request: admitted, then answered at once or run."""
        refused = self._admission(request)
        if refused is not None:
            # A repeated id is no valid id: the error has none, so the request in flight
            # under that id still gets the one answer that carries it.
            duplicate = request.id in self.in_flight
            self.send(serialize(error_element(None if duplicate else request.id, refused)))
            return
        if isinstance(request, LookupRequest):
            kept = self.registry.kept_lookup(self.caller, request)
            if kept is not None:
                self.send(self._signed(f'<result xmlns="{NS}" id="{request.id}">',
                                       b"</result>", request, self.caller, kept))
                return
        self.in_flight.add(request.id)
        if isinstance(request, WatchRequest):
            self.watching.add(request.user)
        d = defer.Deferred.fromCoroutine(self._run(request))
        d.addErrback(self._internal_failure, request)

    def _admission(self, request: Request) -> IRPError | None:
        """Why a well-formed request is refused before it runs (docs/irp.rst, "Requests,
        results, errors" and "watch"), or None."""
        if request.id in self.in_flight:
            return IRPError("bad-request", f"request {request.id} is still in flight; "
                                           "ids must be unique among requests in flight")
        if len(self.in_flight) >= self.config.max_requests_in_flight:
            return IRPError("resource-constraint",
                            "too many requests in flight on this connection")
        if isinstance(request, WatchRequest):
            if request.user in self.watches or request.user in self.watching:
                return IRPError("conflict", f"{request.user} is watched already on this "
                                            "connection; unwatch first")
            if len(self.watches) + len(self.watching) >= MAX_WATCHES:
                return IRPError("policy-violation",
                                f"at most {MAX_WATCHES} watches per connection")
        return None

    async def _run(self, request: Request) -> None:
        caller = self.caller
        try:
            payload = await self.registry.handle(caller, request)
        except IRPError as error:
            self._done(request)
            self.send(serialize(error_element(request.id, error)))
            return
        self._done(request)
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
                               request, caller, payload))

    def _signed(self, head: str, tail: bytes, request: Request, caller: Caller,
                payload: bytes | Answer) -> bytes:
        """A result or notification: the canonical ``<data>`` around `payload` (canonical
        bytes, possibly the registry's kept answer), signed now as the statement that
        answers this request of this caller, valid for ``answer_validity`` seconds; or, for
        a 1.2 client's lookup or watch, the person's record as signed once (`SignedRecords`),
        the request bound by the TLS channel and the unsigned id."""
        if isinstance(payload, Answer):
            if self.records:
                return head.encode() + self.factory.records.statement(payload) + tail
            payload = payload.payload
        now = datetime.datetime.fromtimestamp(self.registry.clock(), datetime.UTC)
        statement = Statement(
            op=request.op, request=request.id, registry=self.factory.hostname,
            time=rfc3339(now),
            not_after=rfc3339(now + datetime.timedelta(seconds=self.config.answer_validity)),
            requester=caller.identity,
            subject=answer_subject(request.op, getattr(request, "user", None),
                                   caller.identity),
            serial=getattr(request, "serial", None))
        data = signed_data(statement, payload)
        return head.encode() + data + self.factory.signer.signature(data) + tail

    def _done(self, request: Request) -> None:
        """`request` is answered (its id may be used again)."""
        self.in_flight.discard(request.id)
        if isinstance(request, WatchRequest):
            self.watching.discard(request.user)

    def _start_watch(self, request: WatchRequest) -> None:
        user = request.user

        def changed(answer: Answer) -> None:
            if self.state == OPEN:
                self.send(self._signed(f'<notify xmlns="{NS}" request="{request.id}">',
                                       b"</notify>", request, self.caller, answer))

        self.watches[user] = (request.id, changed)
        self.registry.watch(user, changed)

    def _stop_watch(self, user: str) -> None:
        entry = self.watches.pop(user, None)
        if entry is not None:
            self.registry.unwatch(user, entry[1])

    def _internal_failure(self, failure: Failure, request: Request | None) -> None:
        log.failure("IRP request failed", failure)
        if request is not None:
            self._done(request)
            self.send(serialize(error_element(request.id, IRPError(
                "internal-server-error", "the registry failed; nothing was changed"))))
        else:
            self.fail("internal-server-error", "the registry failed")

    # -- the machine: states -------------------------------------------------------------------

    @_machine.state(initial=True, serialized=CLEAR)
    def wait_header(self) -> None:
        "Connected in the clear; the stream header is due."

    @_machine.state(serialized=OFFERED)
    def wait_starttls(self) -> None:
        "STARTTLS offered; nothing else is accepted in the clear."

    @_machine.state(serialized=HANDSHAKE)
    def tls_handshake(self) -> None:
        "<proceed/> sent: the TLS handshake, then the client's certificate is judged."

    @_machine.state(serialized=AUTHENTICATED)
    def wait_tls_header(self) -> None:
        "TLS is up and the caller known; the new stream header is due."

    @_machine.state(serialized=OPEN)
    def open_stream(self) -> None:
        "The session is announced; requests are answered."

    @_machine.state(serialized=CLOSED)
    def ended(self) -> None:
        "The stream is over."

    @_machine.serializer()
    def _current_state(self, state: str) -> str:
        return state

    # -- inputs ------------------------------------------------------------------------------

    @_machine.input()
    def got_header(self) -> None:
        "A valid stream header (checked by stream_opened)."

    @_machine.input()
    def got_starttls(self, node: etree._Element) -> None:
        "<starttls/>."

    @_machine.input()
    def got_element(self, node: etree._Element) -> None:
        "Any other top-level element."

    @_machine.input()
    def tls_up(self) -> None:
        "The TLS handshake completed."

    @_machine.input()
    def caller_judged(self) -> None:
        "The client's certificate (if any) was accepted or refused."

    @_machine.input()
    def end(self) -> None:
        "The stream is over (error, close, lost connection)."

    # -- outputs -----------------------------------------------------------------------------

    @_machine.output()
    def _offer_starttls(self) -> None:
        self.send_header()
        self.send(serialize(element("features", children=[
            element("starttls", {"required": "true"})])))

    @_machine.output()
    def _proceed(self, node: etree._Element) -> None:
        self.start_tls(self.factory.tls, serialize(element("proceed")))

    @_machine.output()
    def _judge_certificate(self) -> None:
        self.hold()  # the client's next stream waits until we know who it is
        chain = peer_chain(self.transport.getHandle())
        if not chain:
            self._authenticated(None)
            return
        d = defer.Deferred.fromCoroutine(self.registry.authenticate(chain, self.peer))
        d.addCallbacks(self._authenticated, self._refused)
        d.addErrback(self._internal_failure, None)

    @_machine.output()
    def _release(self) -> None:
        self.release()

    @_machine.output()
    def _open_session(self) -> None:
        self._serving = True
        self.parser.plain_lookups = self._irp_default
        self.send_header()
        self.send(serialize(self._session_element()))

    @_machine.output()
    def _dispatch(self, node: etree._Element) -> None:
        self._request(node)

    @_machine.output()
    def _header_first(self, node: etree._Element) -> None:
        raise StreamError("not-well-formed", "a message before the stream header")

    @_machine.output()
    def _starttls_first(self, node: etree._Element) -> None:
        self.registry.audit.record("stream", outcome="refused", actor=ANONYMOUS,
                                   peer=self.peer, detail="request before STARTTLS")
        raise StreamError("policy-violation", "send <starttls/> first: IRP runs only over TLS")

    @_machine.output()
    def _unexpected_header(self) -> None:
        raise StreamError("not-well-formed", "an unexpected stream header")

    # -- transitions ---------------------------------------------------------------------------

    wait_header.upon(got_header, enter=wait_starttls, outputs=[_offer_starttls])
    wait_starttls.upon(got_starttls, enter=tls_handshake, outputs=[_proceed])
    wait_starttls.upon(got_element, enter=ended, outputs=[_starttls_first])
    tls_handshake.upon(tls_up, enter=tls_handshake, outputs=[_judge_certificate])
    tls_handshake.upon(caller_judged, enter=wait_tls_header, outputs=[_release])
    wait_tls_header.upon(got_header, enter=open_stream, outputs=[_open_session])
    open_stream.upon(got_element, enter=open_stream, outputs=[_dispatch])
    open_stream.upon(got_starttls, enter=open_stream, outputs=[_dispatch])  # not an operation
    for _state in (wait_header, wait_tls_header):
        _state.upon(got_starttls, enter=ended, outputs=[_header_first])
        _state.upon(got_element, enter=ended, outputs=[_header_first])
    for _state in (wait_starttls, open_stream):
        _state.upon(got_header, enter=ended, outputs=[_unexpected_header])
    for _state in (wait_header, wait_starttls, tls_handshake, wait_tls_header, open_stream):
        _state.upon(end, enter=ended, outputs=[])
    #: Once over, whatever still arrives (a certificate judged late) is ignored.
    for _input in (got_header, got_starttls, got_element, tls_up, caller_judged, end):
        ended.upon(_input, enter=ended, outputs=[])
    del _state, _input
