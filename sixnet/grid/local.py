"""A client session inside the grid process: a platform bound on the router like any c2s
session, without a socket.

`GridService.local_session(localpart)` makes one for ``localpart@<domain>``. Its stanzas enter
the router as a stream's would (``from`` stamped with its full JID), so the broker applies its
roles, rate limits and audit to it as to any other publisher, `sixnet grid revoke` ends it, and
stanzas to it come back through the router. It implements the client library's
`IXMPPSession`, so the same `PubSubClient` code runs on it and on a real connection.

What the router writes to the session is handed on one stanza per reactor turn, in order, so
an answer never runs inside the call that sent its request.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sixnet.grid.client.errors import ClientError, IQError, IQTimeout
from sixnet.grid.client.session import IXMPPSession, MessageHandlers
from sixnet.grid.jid import JID
from sixnet.grid.router import Router
from sixnet.grid.xmpp import NS_CLIENT, StanzaError, error_reply

log = Logger(namespace="sixnet.grid.local")

_IQ = f"{{{NS_CLIENT}}}iq"
_MESSAGE = f"{{{NS_CLIENT}}}message"
#: What the router writes is its own serialisation: no DTD, no entities, no network.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          huge_tree=False)


@implementer(IXMPPSession)
class LocalSession:
    """One bound resource of ``bare`` on `router`; also the router's `Connection` for it."""

    def __init__(self, router: Router, bare: JID, clock: IReactorTime,
                 iq_timeout: float = 30.0) -> None:
        self.router = router
        self.clock = clock
        self.iq_timeout = iq_timeout
        self.closed: defer.Deferred[ClientError | None] = defer.Deferred()
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[defer.Deferred[etree._Element], IDelayedCall]] = {}
        self._handlers = MessageHandlers()
        self._inbox: deque[bytes] = deque()
        self._flush: IDelayedCall | None = None
        self.session = router.bind(self, bare, None)
        self.jid = self.session.full

    # -- IXMPPSession ------------------------------------------------------------------------

    def iq(self, element: etree._Element) -> defer.Deferred[etree._Element]:
        if element.tag != _IQ or element.get("type") not in ("get", "set"):
            raise ValueError("iq() takes an <iq type='get|set'/> in jabber:client")
        if self.closed.called:
            return defer.fail(ClientError("the session is closed", "closed"))
        iq_id = f"l{next(self._ids)}"
        element.set("id", iq_id)
        d: defer.Deferred[etree._Element] = defer.Deferred()
        self._pending[iq_id] = (d, self.clock.callLater(self.iq_timeout, self._timed_out,
                                                        iq_id))
        self._route(element)
        return d

    def send(self, element: etree._Element) -> None:
        if self.closed.called:
            raise ClientError("the session is closed", "closed")
        self._route(element)

    def add_message_handler(self, handler: Callable[[etree._Element], object]
                            ) -> Callable[[], None]:
        return self._handlers.add(handler)

    def close(self) -> defer.Deferred[None]:
        if not self.closed.called:
            self.router.end_session(self.session)
            self._end(None)
        return defer.succeed(None)

    # -- Connection: what the router does to the session -------------------------------------

    def send_stanza(self, data: bytes) -> None:
        self._inbox.append(data)
        if self._flush is None:
            self._flush = self.clock.callLater(0, self._deliver)

    def close_with_error(self, condition: str, text: str = "") -> None:
        """The server ended the session (the platform revoked, replaced by a new login)."""
        log.info("{jid}: local session ended: {condition} {text}", jid=self.jid,
                 condition=condition, text=text)
        self._end(ClientError(text or condition, condition))

    def drop(self) -> None:
        self._end(ClientError("the session was taken over", "connection-lost"))

    # -- inside ------------------------------------------------------------------------------

    def _route(self, stanza: etree._Element) -> None:
        stanza.set("from", self.jid)
        try:
            self.router.from_client(self.session, stanza)
        except StanzaError as e:
            if stanza.get("type") in ("error", "result"):
                return
            reply = error_reply(stanza, e.condition, e.text)
            reply.set("to", self.jid)
            self.send_stanza(etree.tostring(reply))

    def _deliver(self) -> None:
        self._flush = None
        if not self._inbox:
            return
        data = self._inbox.popleft()
        if self._inbox:
            self._flush = self.clock.callLater(0, self._deliver)
        if self.closed.called:
            return
        try:
            stanza = etree.fromstring(data, _PARSER)
        except etree.XMLSyntaxError:
            log.warn("{jid}: unreadable stanza from the router dropped", jid=self.jid)
            return
        if stanza.tag == _IQ:
            self._iq(stanza)
        elif stanza.tag == _MESSAGE:
            self._handlers.deliver(stanza, self.jid)

    def _iq(self, iq: etree._Element) -> None:
        kind = iq.get("type")
        if kind in ("result", "error"):
            pending = self._pending.pop(iq.get("id", ""), None)
            if pending is None:
                return
            d, timer = pending
            timer.cancel()
            if kind == "result":
                d.callback(iq)
            else:
                d.errback(IQError(iq))
        elif kind in ("get", "set"):  # nothing is served here
            reply = error_reply(iq, "service-unavailable")
            self._route(reply)

    def _timed_out(self, iq_id: str) -> None:
        pending = self._pending.pop(iq_id, None)
        if pending is not None:
            pending[0].errback(IQTimeout(f"no answer within {self.iq_timeout:g}s", "timeout"))

    def _end(self, error: ClientError | None) -> None:
        if self.closed.called:
            return
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._inbox.clear()
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            timer.cancel()
            d.errback(error or ClientError("the session is closed", "closed"))
        self.closed.callback(error)
