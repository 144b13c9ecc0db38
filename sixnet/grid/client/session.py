"""An XMPP client session: what a lab script or the bridge talks to a grid controller through.

::

    from sixnet.grid.client import connect

    session = await connect(reactor, "grid.example.org", 5222, "sensor7@example.org",
                            identity=store.identity("sensor7"), store=store)  # EXTERNAL
    # or password="..." (SCRAM-SHA-256-PLUS, -SHA-1-PLUS, -SHA-256, -SHA-1: the strongest
    # the server offers; mechanisms=[...] restricts), direct_tls=True for XEP-0368 (5223)
    session.jid                       # the full JID the server bound
    result = await session.iq(iq)     # an <iq type='get|set'> element; the id is filled in
    session.add_message_handler(fn)   # fn(message_element) for each <message/>
    session.send(stanza)
    await session.close()             # session.closed fires however the session ends

`IXMPPSession` is the shape both this client and the grid's in-process session
(`sixnet.grid.local`) have, so code on top (`PubSubClient`) does not care which it has.
A request answered with an error errbacks with `IQError`; one not answered within
`iq_timeout` with `IQTimeout`; requests pending when the session ends with `ClientError`.
The server's pings are answered; ours (every `keepalive` seconds) find a dead connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from typing import Any

from lxml import etree
from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from sixnet.grid.client.errors import AuthenticationError, ClientError, IQError, IQTimeout
from sixnet.grid.client.stream import ClientStream, Login
from sixnet.grid.jid import JIDError, parse_jid
from sixnet.grid.xmpp import NS_CLIENT, NS_PING, error_reply, result_reply, serialize
from sixnet.pki.store import CertificateStore, NodeIdentity

__all__ = ["AuthenticationError", "ClientError", "IQError", "IQTimeout", "IXMPPSession",
           "XMPPClientSession", "connect"]

log = Logger(namespace="sixnet.grid.client")

_IQ = f"{{{NS_CLIENT}}}iq"
_MESSAGE = f"{{{NS_CLIENT}}}message"


class IXMPPSession(Interface):
    """A bound XMPP session (RFC 6120), over a socket or inside the grid process."""

    jid = Attribute("The full JID the session is bound to (str).")
    closed = Attribute("A Deferred that fires when the session ends, for whatever reason.")

    def iq(element: etree._Element) -> defer.Deferred[etree._Element]:
        """Send an ``<iq/>`` (jabber:client) with a fresh id; fires with the result iq,
        errbacks with `IQError` (the error iq) or `IQTimeout`."""

    def send(element: etree._Element) -> None:
        """Send a stanza as it is."""

    def add_message_handler(handler: Callable[[etree._Element], object]) -> Callable[[], None]:
        """Call `handler(message)` for each ``<message/>`` received; returns the remover."""

    def close() -> defer.Deferred[None]:
        """End the session; fires when it has ended."""


class MessageHandlers:
    """The ``add_message_handler`` registry an `IXMPPSession` keeps: each handler gets every
    message, in the order added; one that raises is logged and the others still run."""

    def __init__(self) -> None:
        self._handlers: list[Callable[[etree._Element], object]] = []

    def add(self, handler: Callable[[etree._Element], object]) -> Callable[[], None]:
        self._handlers.append(handler)

        def remove() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return remove

    def deliver(self, message: etree._Element, jid: str) -> None:
        for handler in list(self._handlers):
            try:
                handler(message)
            except Exception:
                log.failure("{jid}: a message handler failed", jid=jid)


def _same_jid(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return parse_jid(a) == parse_jid(b)
    except JIDError:
        return a == b


@implementer(IXMPPSession)
class XMPPClientSession:
    """One client session to an XMPP server. Make it with `connect`."""

    def __init__(self, clock: Any, iq_timeout: float) -> None:
        self.clock = clock
        self.iq_timeout = iq_timeout
        self.jid = ""
        self.protocol: ClientStream | None = None
        #: Fires with the session once bound; errbacks with why it could not be set up.
        self.ready: defer.Deferred[XMPPClientSession] = defer.Deferred()
        #: Fires when the session has ended: with None after `close`, else the ClientError.
        self.closed: defer.Deferred[ClientError | None] = defer.Deferred()
        self.error: ClientError | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str | None, defer.Deferred[etree._Element],
                                       IDelayedCall]] = {}
        self._handlers = MessageHandlers()
        self._keepalive: task.LoopingCall | None = None

    # -- IXMPPSession ----------------------------------------------------------------------

    def iq(self, element: etree._Element) -> defer.Deferred[etree._Element]:
        if element.tag != _IQ or element.get("type") not in ("get", "set"):
            raise ValueError("iq() takes an <iq type='get|set'/> in jabber:client")
        if self.error is not None or self.closed.called:
            return defer.fail(self.error or ClientError("the session is closed", "closed"))
        iq_id = f"c{next(self._ids)}"
        element.set("id", iq_id)
        d: defer.Deferred[etree._Element] = defer.Deferred()
        timer = self.clock.callLater(self.iq_timeout, self._timed_out, iq_id)
        self._pending[iq_id] = (element.get("to"), d, timer)
        self._write(serialize(element))
        return d

    def send(self, element: etree._Element) -> None:
        if self.error is not None or self.closed.called:
            raise self.error or ClientError("the session is closed", "closed")
        self._write(serialize(element))

    def add_message_handler(self, handler: Callable[[etree._Element], object]
                            ) -> Callable[[], None]:
        return self._handlers.add(handler)

    def close(self) -> defer.Deferred[None]:
        if self.protocol is not None and not self.closed.called:
            self.protocol.close()
        d: defer.Deferred[None] = defer.Deferred()
        self.closed.addBoth(lambda result: (d.callback(None), result)[1])
        return d

    # -- from the stream -------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.send(data)

    def _ready(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)

    def _failed(self, error: ClientError) -> None:
        if self.error is None:
            self.error = error
        if not self.ready.called:
            self.ready.errback(error)

    def _lost(self, error: ClientError | None) -> None:
        if self.closed.called:
            return
        if error is not None:
            self._failed(error)
        elif not self.ready.called:
            self.ready.errback(ClientError("the session was closed", "closed"))
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        pending, self._pending = self._pending, {}
        ended = error or ClientError("the session was closed", "closed")
        for _, d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(ended)
        self.closed.callback(error)

    def _timed_out(self, iq_id: str) -> None:
        entry = self._pending.pop(iq_id, None)
        if entry is not None:
            entry[1].errback(IQTimeout(f"no answer from {entry[0] or 'the server'} within "
                                       f"{self.iq_timeout:g}s", "timeout"))

    def _stanza(self, stanza: etree._Element) -> None:
        if stanza.tag == _IQ:
            self._iq(stanza)
        elif stanza.tag == _MESSAGE:
            self._handlers.deliver(stanza, self.jid)

    def _iq(self, iq: etree._Element) -> None:
        kind = iq.get("type")
        if kind in ("get", "set"):
            ping = len(iq) == 1 and iq[0].tag == f"{{{NS_PING}}}ping"
            reply = result_reply(iq) if ping and kind == "get" else \
                error_reply(iq, "service-unavailable")
            reply.attrib.pop("from", None)
            self._write(serialize(reply))
            return
        entry = self._pending.get(iq.get("id", ""))
        if entry is None:
            return
        to, d, timer = entry
        sender = iq.get("from")
        # RFC 6120 10.1: an answer comes from whom we asked; without a 'to' the server
        # answered for our account (no 'from', our bare or full JID, or the domain).
        if to is None:
            bare = self.jid.split("/")[0]
            allowed = sender is None or any(_same_jid(sender, j) for j in (
                bare, self.jid, bare.split("@")[-1]))
        else:
            allowed = _same_jid(sender, to)
        if not allowed:
            log.warn("an answer to {id} came from {sender}, not {to}: ignored",
                     id=iq.get("id"), sender=sender, to=to)
            return
        del self._pending[iq.get("id", "")]
        if timer.active():
            timer.cancel()
        if kind == "result":
            d.callback(iq)
        else:
            d.errback(IQError(iq))

    def _start_keepalive(self, interval: float) -> None:
        domain = self.jid.split("@")[-1].split("/")[0]

        def ping() -> None:
            iq = etree.Element(_IQ, type="get", to=domain, nsmap={None: NS_CLIENT})
            etree.SubElement(iq, f"{{{NS_PING}}}ping", nsmap={None: NS_PING})
            self.iq(iq).addErrback(dead)

        def dead(failure: Any) -> None:
            if failure.check(IQTimeout) and self.protocol is not None:
                self.protocol._fail(ClientError("the server did not answer a ping within "
                                                f"{self.iq_timeout:g}s", "connection-timeout"))

        self._keepalive = task.LoopingCall(ping)
        self._keepalive.clock = self.clock
        self._keepalive.start(interval, now=False)


async def _connect(reactor: Any, host: str, port: int, jid: str, password: str | None,
                   identity: NodeIdentity | None, store: CertificateStore, direct_tls: bool,
                   mechanisms: Collection[str] | None, server_name: str | None,
                   presence: bool, timeout: float, iq_timeout: float,
                   keepalive: float) -> XMPPClientSession:
    try:
        parsed = parse_jid(jid)
    except JIDError as e:
        raise ClientError(f"{jid!r} is not a JID: {e}", "jid-malformed") from None
    if parsed.local is None:
        raise ClientError(f"{jid!r} has no local part (user@domain)", "jid-malformed")
    if password is None and identity is None:
        raise ValueError("connect() needs a password or an identity")
    login = Login(parsed.bare, store, password, identity, mechanisms, server_name)
    session = XMPPClientSession(reactor, iq_timeout)
    protocol = ClientStream(login, session, reactor, direct_tls=direct_tls, timeout=timeout,
                            resource=parsed.resource)
    session.protocol = protocol
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    try:
        await endpoints.connectProtocol(endpoint, protocol)
    except (error.ConnectError, error.DNSLookupError, OSError) as e:
        raise ClientError(f"cannot connect to {host}:{port} ({e})", "connection-failed") \
            from None
    await session.ready
    if presence:
        session.send(etree.Element(f"{{{NS_CLIENT}}}presence", nsmap={None: NS_CLIENT}))
    if keepalive > 0:
        session._start_keepalive(keepalive)
    return session


def connect(reactor: Any, host: str, port: int, jid: str, *, password: str | None = None,
            identity: NodeIdentity | None = None, store: CertificateStore,
            direct_tls: bool = False, mechanisms: Collection[str] | None = None,
            server_name: str | None = None, presence: bool = False, timeout: float = 30.0,
            iq_timeout: float = 30.0, keepalive: float = 60.0
            ) -> defer.Deferred[XMPPClientSession]:
    """Connect to `host`:`port` as `jid` (a resource in it is asked for when binding).

    STARTTLS (or `direct_tls`), the server's certificate checked by `store` for the JID's
    domain (or `server_name`), SASL EXTERNAL with `identity` or SCRAM with `password`,
    then bind. With `presence`, an initial presence is sent: the server then delivers
    messages kept while we were offline (with their XEP-0203 delay stamps). Fires with the
    session; errbacks with `ClientError` / `AuthenticationError`, within `timeout` seconds.
    """
    return defer.Deferred.fromCoroutine(_connect(
        reactor, host, port, jid, password, identity, store, direct_tls, mechanisms,
        server_name, presence, timeout, iq_timeout, keepalive))
