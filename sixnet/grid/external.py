"""The broker as an XEP-0114 external component of another XMPP server (component mode).

In component mode the grid does not serve clients itself: platforms log in to an existing
server (Prosody, ejabberd, MongooseIM) and the broker attaches to it as the component
``component_name`` over the Jabber Component Protocol. `HostRouter` is the `IRouter` the
broker is attached to instead of the built-in `sixnet.grid.router.Router`, so the broker is
unchanged: what it routes is written to the host, what the host sends it reaches
`IComponent.receive`, and presence the host delivers drives `session_available` and
`session_unavailable`.

`ComponentStream` is one connection, on the shared XML stream base, negotiated by an
Automat machine (the table is at the bottom of the class)::

    HEADER --host header (stream id)--> HANDSHAKE --<handshake/>--> READY
    any state --stream error, unexpected element, connection lost--> CLOSED

Our header is sent on connect; the handshake is the hex SHA-1 of the host's stream id and
the shared secret (XEP-0114 section 3). `ComponentService` keeps the connection up with
Twisted's `ClientService` and its exponential backoff.

Presence: components have no roster of their own at the host, so the broker learns who is
online from what the host delivers to it (XEP-0114 routes presence like any stanza):

* directed presence a platform sends to the broker (as to a MUC room), which the host
  follows with unavailable presence when that session ends (RFC 6121 4.6);
* presence subscriptions: a platform that adds the broker to its roster gets ``subscribed``
  (and a subscription request back, so both sides see each other, as gateways do,
  XEP-0100); the host then sends the broker that platform's presence at every login and
  logout, and answers the broker's probes.

After a reconnect the broker probes every platform it had seen, so subscribed owners are
known again without waiting for their next login.

Several instances attached for one name share a `PresenceBoard` (the broker database): the
host gives each presence stanza to one of them (or copies it), so each available full JID is
*held* by the one instance whose claim came first, and only that instance counts it as
online (`is_available`, `session_available`). Whoever hears it leave releases the claim, and
the holder lets go when it hears the release. An approval request is therefore sent by one
instance, once.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Sequence
from copy import deepcopy
from typing import Any

from automat import MethodicalMachine
from lxml import etree
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.stream.parser import StreamOpened, StreamParser
from sixnet.core.stream.protocol import StreamFormat, XMLStreamProtocol, child_error
from sixnet.grid.component import IComponent, IRouter
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.grid.storage.presence import PresenceBoard
from sixnet.grid.xmpp import NS_CLIENT, NS_STREAM_ERRORS, NS_STREAMS, splice_to

log = Logger(namespace="sixnet.grid.external")

NS_COMPONENT = "jabber:component:accept"
_ACCEPT = f"{{{NS_COMPONENT}}}"
_CLIENT = f"{{{NS_CLIENT}}}"
_DEFAULT_CLIENT = f' xmlns="{NS_CLIENT}"'.encode()
_DEFAULT_ACCEPT = f' xmlns="{NS_COMPONENT}"'.encode()

#: How a component stream is written (XEP-0114 section 3: no version, no features).
COMPONENT_STREAM = StreamFormat("<?xml version='1.0'?>", "stream:stream",
                                (("xmlns", NS_COMPONENT), ("xmlns:stream", NS_STREAMS)),
                                child_error("stream:error", NS_STREAM_ERRORS))
#: Largest element accepted from the host: it has checked its clients' stanzas already.
MAX_ELEMENT_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64
#: Stanzas held while the connection is down, sent in order once it is back; beyond this
#: the oldest are dropped (a host that is away for long loses them, and says nothing).
MAX_BACKLOG = 10000
#: Seconds between whitespace keepalives on an idle connection.
KEEPALIVE = 60.0


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 section 3: hex SHA-1 of the stream id followed by the secret."""
    # SHA-1 is what the protocol defines; the secret never crosses the wire.
    return hashlib.sha1((stream_id + secret).encode("utf-8")).hexdigest()  # noqa: S324


def to_host(stanza: etree._Element) -> bytes:
    """A stanza of the broker's (jabber:client) as written on the component stream."""
    data = etree.tostring(stanza)
    end = data.find(b">")
    head = data[:end]
    if _DEFAULT_CLIENT in head:
        return head.replace(_DEFAULT_CLIENT, _DEFAULT_ACCEPT, 1) + data[end:]
    copy = deepcopy(stanza)  # built without a default namespace: rename instead
    for node in copy.iter():
        if isinstance(node.tag, str) and node.tag.startswith(_CLIENT):
            node.tag = _ACCEPT + node.tag[len(_CLIENT):]
    return etree.tostring(copy)


def from_host(stanza: etree._Element) -> etree._Element:
    """A stanza from the host, in the jabber:client namespace the broker speaks."""
    for node in stanza.iter():
        if isinstance(node.tag, str) and node.tag.startswith(_ACCEPT):
            node.tag = _CLIENT + node.tag[len(_ACCEPT):]
    etree.cleanup_namespaces(stanza)
    return stanza


class HandshakeRefused(Exception):
    """The host ended the stream: a wrong secret, a name it does not know, a conflict."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(f"{condition}{': ' + text if text else ''}")
        self.condition = condition
        self.text = text


def _condition(node: etree._Element) -> tuple[str, str]:
    condition, text = "undefined-condition", ""
    for child in node:
        if not isinstance(child.tag, str):
            continue
        name = etree.QName(child).localname
        if name == "text":
            text = (child.text or "").strip()
        elif condition == "undefined-condition":
            condition = name
    return condition, text


def _input_name(node: etree._Element) -> str:
    qname = etree.QName(node)
    if qname.namespace == NS_COMPONENT:
        if qname.localname in ("iq", "message", "presence"):
            return "stanza"
        if qname.localname == "handshake":
            return "handshake"
    if qname.namespace == NS_STREAMS and qname.localname == "error":
        return "error"
    return "other"


ELEMENT_INPUTS = {"stanza": "got_stanza", "handshake": "got_handshake",
                  "error": "got_stream_error", "other": "got_other"}


class ComponentStream(XMLStreamProtocol):
    """One connection to the host's component port, from our header to READY and after."""

    format = COMPONENT_STREAM
    _machine = MethodicalMachine()

    def __init__(self, router: HostRouter, secret: str, clock: IReactorTime, *,
                 timeout: float = 30.0, keepalive: float = KEEPALIVE) -> None:
        super().__init__(StreamParser(max_element_bytes=MAX_ELEMENT_BYTES,
                                      max_depth=MAX_DEPTH),
                         clock, stall_timeout=timeout, negotiation_timeout=timeout)
        self.router = router
        self.secret = secret
        self.failure: HandshakeRefused | None = None
        self._keepalive = task.LoopingCall(self.send, b" ")
        self._keepalive.clock = clock
        self._keepalive_interval = keepalive

    @property
    def state(self) -> str:
        return self._current_state()

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        return (("to", self.router.name),)

    # -- connection lifetime ---------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_header()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.router.disconnected(self)

    def stream_ended(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()
        self.end()

    def close(self) -> None:
        """End our stream politely (the service is stopping)."""
        self.close_stream()

    # -- events, checked before they reach the machine -------------------------------------

    def stream_opened(self, header: StreamOpened) -> None:
        if header.tag != f"{{{NS_STREAMS}}}stream" or header.nsmap.get(None) != NS_COMPONENT:
            self.send_stream_error("invalid-namespace", "not a jabber:component:accept stream")
            return
        stream_id = header.attrib.get("id")
        if not stream_id:
            self.send_stream_error("bad-format", "the stream header has no id")
            return
        self.got_header(stream_id)

    def element_received(self, element: etree._Element) -> None:
        getattr(self, ELEMENT_INPUTS[_input_name(element)])(element)

    # -- the machine: states ---------------------------------------------------------------

    @_machine.state(initial=True, serialized="header")
    def header(self) -> None:
        "Our header is sent; the host's, with the stream id, is due."

    @_machine.state(serialized="handshake")
    def handshake(self) -> None:
        "<handshake/> with the digest is sent; the empty <handshake/> is due."

    @_machine.state(serialized="ready")
    def ready(self) -> None:
        "Accepted: stanzas flow both ways."

    @_machine.state(serialized="closed")
    def ended(self) -> None:
        "The stream is over."

    @_machine.serializer()
    def _current_state(self, state: str) -> str:
        return state

    # -- inputs ----------------------------------------------------------------------------

    @_machine.input()
    def got_header(self, stream_id: str) -> None:
        "The host's stream header, with its id."

    @_machine.input()
    def got_handshake(self, node: etree._Element) -> None:
        "<handshake/>."

    @_machine.input()
    def got_stanza(self, node: etree._Element) -> None:
        "An iq, message or presence in jabber:component:accept."

    @_machine.input()
    def got_stream_error(self, node: etree._Element) -> None:
        "<stream:error/>: the host ends the stream."

    @_machine.input()
    def got_other(self, node: etree._Element) -> None:
        "Any other element."

    @_machine.input()
    def end(self) -> None:
        "The stream is over."

    # -- outputs ---------------------------------------------------------------------------

    @_machine.output()
    def _send_handshake(self, stream_id: str) -> None:
        digest = handshake_digest(stream_id, self.secret)
        self.send(f"<handshake>{digest}</handshake>".encode())

    @_machine.output()
    def _accepted(self, node: etree._Element) -> None:
        self.negotiated()
        self._keepalive.start(self._keepalive_interval, now=False)
        self.router.connected(self)

    @_machine.output()
    def _deliver(self, node: etree._Element) -> None:
        self.router.received(from_host(node))

    @_machine.output()
    def _host_error(self, node: etree._Element) -> None:
        condition, text = _condition(node)
        self.failure = HandshakeRefused(condition, text)
        log.error("the host {host} ended the component stream of {name}: {why}",
                  host=self.transport.getPeer(), name=self.router.name, why=self.failure)
        self.close_stream()

    @_machine.output()
    def _unexpected(self, node: etree._Element) -> None:
        self.send_stream_error("unsupported-stanza-type",
                               f"<{etree.QName(node).localname}/> in state {self.state}")

    @_machine.output()
    def _ignore(self, node: etree._Element) -> None:
        log.debug("ignored <{tag}/> from the host", tag=node.tag)

    # -- transitions -----------------------------------------------------------------------

    header.upon(got_header, enter=handshake, outputs=[_send_handshake])
    handshake.upon(got_handshake, enter=ready, outputs=[_accepted])
    ready.upon(got_stanza, enter=ready, outputs=[_deliver])
    ready.upon(got_other, enter=ready, outputs=[_ignore])
    ready.upon(got_handshake, enter=ready, outputs=[_ignore])

    _elements = (got_handshake, got_stanza, got_other)
    _accepted_by = {header: (), handshake: (got_handshake,),
                    ready: (got_stanza, got_other, got_handshake)}
    for _state, _inputs in _accepted_by.items():
        _state.upon(got_stream_error, enter=ended, outputs=[_host_error])
        _state.upon(end, enter=ended, outputs=[])
        for _input in _elements:
            if _input not in _inputs:
                _state.upon(_input, enter=ended, outputs=[_unexpected])
    for _input in (*_elements, got_header, got_stream_error, end):
        ended.upon(_input, enter=ended, outputs=[])
    del _state, _inputs, _input, _elements, _accepted_by


@implementer(IRouter)
class HostRouter:
    """The broker's `IRouter` in component mode: the host server is the rest of the world.

    `domain` is the host's XMPP domain, `name` the component's own domain (the broker's),
    `board` the presence claims shared with the other instances attached for `name`.
    Stanzas routed while no stream is ready wait in a bounded backlog.
    """

    def __init__(self, domain: str, name: str, board: PresenceBoard | None = None) -> None:
        self.domain = domain
        self.name = name
        #: Shared with the other instances attached for `name`; None: this one is alone.
        self.board = board
        self.component: IComponent | None = None
        self.stream: ComponentStream | None = None
        #: Available full JIDs by bare JID that this instance holds (all it was told of,
        #: without a board).
        self.presence: dict[str, set[str]] = {}
        #: The token of each held claim (`PresenceBoard`), by full JID.
        self.tokens: dict[str, str] = {}
        self._board_ops: set[defer.Deferred[Any]] = set()
        #: Bare JIDs seen available since we started: probed again after a reconnect.
        self.seen: set[str] = set()
        self.backlog: deque[bytes] = deque()
        self.dropped = 0
        #: Fires (and is replaced) each time a stream is accepted by the host.
        self._waiting: list[defer.Deferred[None]] = []

    def attach(self, component: IComponent) -> None:
        self.component = component
        component.attach(self)

    async def open(self) -> None:
        """Hear the other instances' releases (before the link to the host starts)."""
        if self.board is not None:
            await self.board.open(self._released)

    def drain(self) -> defer.Deferred[Any]:
        """Fires once the board operations in flight are done."""
        return defer.DeferredList(list(self._board_ops))

    async def stop(self) -> None:
        """Give up this instance's claims (after the link is closed, before the database)."""
        await self.drain()
        if self.board is not None:
            await self.board.close()

    def when_connected(self) -> defer.Deferred[None]:
        """Fires once a stream is accepted (at once if one is)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.stream is not None:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    # -- IRouter ---------------------------------------------------------------------------

    def route(self, stanza: etree._Element) -> None:
        if not stanza.get("from"):
            stanza.set("from", self.name)
        self._write(to_host(stanza))

    def route_fanout(self, stanza: etree._Element, recipients: Sequence[str]) -> None:
        """One serialisation for the chunk; the host applies its own delivery rules (offline
        storage of normal messages to a bare JID included) to each copy."""
        template = deepcopy(stanza)
        template.attrib.pop("to", None)
        body = to_host(template)
        self._write(b"".join(splice_to(body, recipient) for recipient in recipients))

    def is_available(self, jid: str) -> bool:
        try:
            target = parse_jid(jid)
        except JIDError:
            return False
        online = self.presence.get(str(target.bare), set())
        return str(target) in online if target.resource is not None else bool(online)

    def origin_of(self, jid: str) -> tuple[str | None, str]:
        """The host server does not tell a component its clients' addresses."""
        return None, "platform of the host server (component mode)"

    # -- from the stream -------------------------------------------------------------------

    def connected(self, stream: ComponentStream) -> None:
        self.stream = stream
        log.info("component {name} accepted by the host", name=self.name)
        backlog, self.backlog = self.backlog, deque()
        if backlog:
            stream.send(b"".join(backlog))
        for bare in sorted(self.seen):  # who is online now: the host answers subscribers
            self._probe(bare)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def disconnected(self, stream: ComponentStream) -> None:
        """The stream ended: what the host told us about presence is no longer known."""
        if self.stream is not stream:
            return
        self.stream = None
        log.warn("component {name}: connection to the host lost", name=self.name)
        for full in sorted(j for jids in self.presence.values() for j in jids):
            self._went_unavailable(full)
        if self.board is not None:  # another instance's link may hear of them meanwhile
            self._on_board(self.board.release_mine())

    def received(self, stanza: etree._Element) -> None:
        if stanza.tag == _CLIENT + "presence":
            self._presence(stanza)
        elif self.component is not None:
            self.component.receive(stanza)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()

    # -- presence --------------------------------------------------------------------------

    def _presence(self, stanza: etree._Element) -> None:
        try:
            sender = parse_jid(stanza.get("from", ""))
        except JIDError:
            return
        if sender.local is None:
            return  # servers and components: not platforms
        kind = stanza.get("type")
        full, bare = str(sender), str(sender.bare)
        if kind is None and sender.resource is not None:
            self.seen.add(bare)
            if self.board is None:
                if full not in self.presence.get(bare, ()):
                    self._hold(full, "")
                return
            # Claimed at every available presence: a claim released meanwhile by the
            # instance that heard the logout makes this one a new login, held here.
            self._on_board(self.board.claim(full)).addCallback(
                lambda token: self._hold(full, token) if token is not None else None)
        elif kind == "unavailable":
            if sender.resource is not None:
                self._went_unavailable(full)
            else:
                for jid in sorted(self.presence.get(bare, ())):
                    self._went_unavailable(jid)
            if self.board is not None:
                self._on_board(self.board.release(full))
        elif kind == "subscribe":
            # Accept, ask back, and say we are here: the host then keeps us told.
            self._send_presence(bare, "subscribed")
            self._send_presence(bare, "subscribe")
            self._send_presence(bare, None)
        elif kind == "probe":
            self._send_presence(bare, None)

    def _hold(self, full: str, token: str) -> None:
        """`full` has come online, and this instance is the one to act on it."""
        self.presence.setdefault(full.split("/", 1)[0], set()).add(full)
        self.tokens[full] = token
        if self.component is not None:
            self.component.session_available(full)

    def _released(self, token: str, full: str) -> None:
        """An instance heard `full` leave (or lost its link): if it was our claim, let go."""
        if self.tokens.get(full) == token:
            self._went_unavailable(full)

    def _on_board(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._board_ops.add(d)

        def done(result: Any) -> Any:
            self._board_ops.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.failure("component {name}: the presence board failed", f,
                                           name=self.name))
        return d

    def _went_unavailable(self, full: str) -> None:
        bare = full.split("/", 1)[0]
        online = self.presence.get(bare)
        if online is None or full not in online:
            return
        online.discard(full)
        self.tokens.pop(full, None)
        if not online:
            del self.presence[bare]
        if self.component is not None:
            self.component.session_unavailable(full)

    def _probe(self, bare: str) -> None:
        self._send_presence(bare, "probe")

    def _send_presence(self, to: str, kind: str | None) -> None:
        presence = etree.Element(_CLIENT + "presence", {"from": self.name, "to": to},
                                 nsmap={None: NS_CLIENT})
        if kind is not None:
            presence.set("type", kind)
        self._write(to_host(presence))

    def _write(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.send(data)
            return
        if len(self.backlog) >= MAX_BACKLOG:
            self.backlog.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warn("component {name}: host away, {count} stanzas dropped so far",
                         name=self.name, count=self.dropped)
        self.backlog.append(data)


class ComponentFactory(Factory):
    """Builds one `ComponentStream` per connection attempt."""

    def __init__(self, router: HostRouter, secret: str, clock: IReactorTime) -> None:
        self.router = router
        self.secret = secret
        self.clock = clock

    def buildProtocol(self, addr: Any) -> ComponentStream:
        return ComponentStream(self.router, self.secret, self.clock)


def component_service(router: HostRouter, endpoint: IStreamClientEndpoint, secret: str,
                      clock: IReactorTime, *, max_delay: float = 60.0) -> ClientService:
    """Keeps one component connection up: reconnects after 1 s, then backs off to
    `max_delay` (Twisted's `backoffPolicy`, with jitter), for as long as it runs."""
    return ClientService(endpoint, ComponentFactory(router, secret, clock),
                         retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=max_delay),
                         clock=clock)
