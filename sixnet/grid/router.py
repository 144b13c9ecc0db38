"""Sessions and stanza routing: local delivery (RFC 6120 10, RFC 6121 8), presence without
rosters, the server's own iq services, offline storage, and in-process components.

The router never touches a socket: a session writes through the `Connection` it is attached
to (or, while a stream-management session waits to be resumed, only into its unacked queue).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from copy import deepcopy
from typing import Any, Protocol

from lxml import etree
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from sixnet.core.timefmt import rfc3339
from sixnet.grid.component import IComponent, IRouter
from sixnet.grid.jid import JID, JIDError, parse_jid
from sixnet.grid.sm import StreamManagement
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.xmpp import (
    NS_CLIENT,
    NS_DELAY,
    NS_DISCO_INFO,
    NS_DISCO_ITEMS,
    NS_PING,
    NS_SM,
    StanzaError,
    error_reply,
    result_reply,
    serialize,
    split_for_to,
    to_attribute,
)

log = Logger(namespace="sixnet.grid")

PRODUCT = "sixnet XMPP-Grid controller"
#: What disco#info on the server announces. No jabber:iq:roster: there are no rosters; presence
#: is directed or goes to the account's own resources (RFC 6121 without subscriptions).
SERVER_FEATURES = (NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, "msgoffline", NS_DELAY,
                   NS_SM, "urn:xmpp:sm:2")
ACCOUNT_FEATURES = (NS_DISCO_INFO, NS_PING, "msgoffline")
#: Stanzas a session cut from its connection may queue before it is ended (its messages
#: then go to offline storage, which has its own limit).
MAX_WAITING = 5000
_MESSAGE = f"{{{NS_CLIENT}}}message"
_PRESENCE = f"{{{NS_CLIENT}}}presence"


class Connection(Protocol):
    """What a session needs from the client stream it is attached to."""

    def send_stanza(self, data: bytes) -> None: ...

    def close_with_error(self, condition: str, text: str = "") -> None: ...

    def drop(self) -> None: ...


class Session:
    """A bound resource; outlives its TCP connection while stream management may resume it."""

    # One per platform online: slots instead of a dict of attributes per session.
    __slots__ = ("jid", "full", "bare", "connection", "available", "priority", "presence",
                 "directed", "sm", "held", "resume_timer", "ended", "certificate_chain",
                 "overflow")

    def __init__(self, jid: JID, connection: Connection | None) -> None:
        self.jid = jid
        self.full = str(jid)
        # Interned: one copy for all of an account's resources (and a faster routing key).
        self.bare = sys.intern(str(jid.bare))
        self.connection = connection
        self.available = False
        self.priority = 0
        self.presence: etree._Element | None = None
        #: Entities (not our own resources) that got directed available presence from us;
        #: None while there are none (most platforms never send any).
        self.directed: set[str] | None = None
        self.sm: StreamManagement | None = None
        #: Stanzas held back while stored offline messages are being delivered first.
        self.held: list[bytes] | None = None
        self.resume_timer: IDelayedCall | None = None
        self.ended = False
        #: The client certificate chain a SASL EXTERNAL session authenticated with.
        self.certificate_chain: tuple[Any, ...] = ()
        #: Called when a session waiting to be resumed has too many stanzas queued (set by
        #: `Router.enable_sm` for resumable sessions).
        self.overflow: Callable[[Session], None] | None = None

    def send(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        else:
            self.write(data)

    def write(self, data: bytes) -> None:
        if self.sm is not None:
            self.sm.sent(data)
            if self.connection is None and len(self.sm.unacked) > MAX_WAITING and \
                    self.overflow is not None:
                self.overflow(self)  # a cut session may not hoard memory: end it
                return
        if self.connection is not None:
            self.connection.send_stanza(data)


@implementer(IRouter)
class Router:
    """Every session of the server, and the components on its subdomains."""

    def __init__(self, domain: str, offline: OfflineStore, clock: IReactorTime) -> None:
        self.domain = domain
        self.offline = offline
        self.clock = clock
        self.sessions: dict[str, dict[str, Session]] = {}
        self.resumable: dict[str, Session] = {}
        self.components: dict[str, IComponent] = {}
        self._pending: set[defer.Deferred[Any]] = set()

    # -- components ------------------------------------------------------------------------

    def attach_component(self, component: IComponent) -> None:
        domain = str(parse_jid(component.domain))
        self.components[domain] = component
        component.attach(self)
        log.info("component {domain} attached", domain=domain)

    # -- sessions --------------------------------------------------------------------------

    def bind(self, connection: Connection, bare: JID, resource: str | None) -> Session:
        """Bind a resource (RFC 6120 7); a requested resource in use replaces the old session,
        which gets the conflict stream error (7.7.2.2, option 3)."""
        if resource is None:
            resource = secrets.token_urlsafe(9)
        try:
            jid = bare.with_resource(resource)
        except JIDError as e:
            raise StanzaError("bad-request", str(e)) from None
        resources = self.sessions.setdefault(str(bare), {})
        old = resources.get(jid.resource or "")
        if old is not None:
            log.info("{jid}: new session replaces the old one", jid=str(jid))
            old_connection = old.connection
            self.end_session(old, resumable=False)
            if old_connection is not None:
                old_connection.close_with_error("conflict", "replaced by a new session")
        session = Session(jid, connection)
        # Ending the old session may have dropped the account's (then empty) table.
        self.sessions.setdefault(str(bare), {})[jid.resource or ""] = session
        return session

    def enable_sm(self, session: Session, resume: bool, max_resume: int) -> StreamManagement:
        resume_id = secrets.token_urlsafe(18) if resume else None
        session.sm = StreamManagement(resume_id, max_resume)
        if resume_id is not None:
            self.resumable[resume_id] = session
            # Only a session that can wait to be resumed can overflow; a bound method made
            # here, not for every session at bind.
            session.overflow = self._overflowed
        return session.sm

    def connection_lost(self, session: Session, clean: bool) -> None:
        """The stream under a session ended; keep the session if it can be resumed."""
        session.connection = None
        sm = session.sm
        if not clean and sm is not None and sm.resume_id is not None and not session.ended:
            log.info("{jid}: connection lost; resumable for {seconds}s", jid=session.full,
                     seconds=sm.max_resume)
            session.resume_timer = self.clock.callLater(
                sm.max_resume, self.end_session, session, False)
            return
        self.end_session(session, resumable=False)

    def _overflowed(self, session: Session) -> None:
        log.warn("{jid}: {count} stanzas queued while waiting to be resumed; session ended",
                 jid=session.full, count=MAX_WAITING)
        self.end_session(session)

    def resume(self, resume_id: str, handled: int, connection: Connection,
               bare: JID) -> Session:
        """XEP-0198 resumption: move a session onto a new stream (StanzaError on failure)."""
        session = self.resumable.get(resume_id)
        if session is None or session.ended or session.bare != str(bare):
            raise StanzaError("item-not-found", "no such session to resume")
        assert session.sm is not None
        session.sm.ack(handled)  # first: a bad count leaves the session as it was
        if session.resume_timer is not None and session.resume_timer.active():
            session.resume_timer.cancel()
        session.resume_timer = None
        old = session.connection
        session.connection = None
        if old is not None:
            old.drop()
        session.connection = connection
        log.info("{jid}: session resumed", jid=session.full)
        return session

    def end_session(self, session: Session, resumable: bool = False) -> None:
        """A session is over: unavailable presence, components told, unacked stanzas rerouted."""
        if session.ended:
            return
        session.ended = True
        if session.resume_timer is not None and session.resume_timer.active():
            session.resume_timer.cancel()
        resources = self.sessions.get(session.bare, {})
        if resources.get(session.jid.resource or "") is session:
            del resources[session.jid.resource or ""]
            if not resources:
                self.sessions.pop(session.bare, None)
        if session.sm is not None and session.sm.resume_id is not None:
            self.resumable.pop(session.sm.resume_id, None)
        if session.available:
            self._went_unavailable(session, None)
        unacked = list(session.sm.unacked) if session.sm is not None else []
        held = session.held or []
        session.held = None
        for data in unacked + held:
            self._reroute_undelivered(session, data)

    def _reroute_undelivered(self, session: Session, data: bytes) -> None:
        """A stanza the client never acknowledged: messages go to the bare JID (another
        resource or offline storage); iq requests are answered with an error."""
        try:
            stanza = etree.fromstring(data)
        except etree.XMLSyntaxError:
            return
        kind = etree.QName(stanza).localname
        if kind == "message" and stanza.get("type", "normal") in ("normal", "chat"):
            stanza.set("to", session.bare)
            self._spawn(self._message_to_bare(stanza, session.jid.bare, exclude=session))
        elif kind == "iq" and stanza.get("type") in ("get", "set"):
            self._bounce(stanza, "service-unavailable")

    # -- availability (IRouter) ------------------------------------------------------------

    def is_available(self, jid: str) -> bool:
        try:
            target = parse_jid(jid)
        except JIDError:
            return False
        resources = self.sessions.get(str(target.bare), {})
        if target.resource is not None:
            s = resources.get(target.resource)
            return s is not None and s.available
        return any(s.available for s in resources.values())

    def origin_of(self, jid: str) -> tuple[str | None, str]:
        try:
            target = parse_jid(jid)
        except JIDError:
            return None, "no session"
        session = self.sessions.get(str(target.bare), {}).get(target.resource or "")
        if session is None or session.connection is None:
            return None, "no session"
        address = getattr(session.connection, "address", None)
        # A stream has the peer's address; a LocalSession (the bridge's) has none.
        return (address, "") if address else (None, "local session (in this process)")

    # -- stanzas from clients ----------------------------------------------------------------

    def from_client(self, session: Session, stanza: etree._Element) -> None:
        """Route a stanza a session sent; 'from' is already stamped by the stream."""
        to_attr = stanza.get("to")
        to = self._parse_to(to_attr) if to_attr else None
        if stanza.tag == _PRESENCE:
            if to is None:
                self._presence_broadcast(session, stanza)
            else:
                self._directed_presence(session, stanza, to)
            return
        if to is None or (to.local == session.jid.local and to.domain == self.domain
                          and to.resource is None and stanza.tag != _MESSAGE):
            # No 'to' (or the account's bare JID, for an iq): the server answers for the
            # account (RFC 6120 10.3.3); a message without 'to' is for the bare JID (10.3.1).
            if stanza.tag == _MESSAGE:
                self._deliver(stanza, session.jid.bare)
            else:
                self._iq_for_account(stanza, session.jid.bare)
            return
        self._deliver(stanza, to)

    @staticmethod
    def _parse_to(text: str) -> JID:
        try:
            return parse_jid(text)
        except JIDError as e:
            raise StanzaError("jid-malformed", str(e)) from None

    # -- stanzas from components (IRouter) ---------------------------------------------------

    def route(self, stanza: etree._Element) -> None:
        try:
            to = self._parse_to(stanza.get("to", ""))
            self._deliver(stanza, to)
        except StanzaError as e:
            self._bounce(stanza, e.condition, e.text)

    def route_fanout(self, stanza: etree._Element, recipients: Sequence[str]) -> None:
        """Send one stanza to many recipients, serialising it once (see IRouter).

        A recipient that is a key of `sessions` (a bare JID of ours in canonical form) with an
        available session gets its copy without parsing its JID: at 10,000 subscribers that
        lookup is most of what a copy costs here. Anyone else takes `_fanout_one`.
        """
        template = stanza
        if "to" in stanza.attrib:  # the broker's templates have none: no copy to make
            template = deepcopy(stanza)
            del template.attrib["to"]
        head, tail = split_for_to(serialize(template))
        sessions = self.sessions
        for recipient in recipients:
            data = head + to_attribute(recipient) + tail
            resources = sessions.get(recipient)
            if resources is not None:
                live = [s for s in resources.values() if s.available and s.priority >= 0]
                if live:
                    for s in live:
                        s.send(data)
                    continue
            self._fanout_one(recipient, data)

    def _fanout_one(self, recipient: str, data: bytes) -> None:
        """One copy of a fan-out by the general rules: a full JID, another domain, offline."""
        try:
            to = parse_jid(recipient)
        except JIDError:
            log.warn("fan-out to invalid JID {jid!r} dropped", jid=recipient)
            return
        if to.domain != self.domain or to.local is None:
            self.route(etree.fromstring(data))
            return
        resources = self.sessions.get(str(to.bare), {})
        if to.resource is not None:
            target = resources.get(to.resource)
            if target is not None:
                target.send(data)
                return
        live = [s for s in resources.values() if s.available and s.priority >= 0]
        if live:
            for s in live:
                s.send(data)
        else:
            self.route(etree.fromstring(data))

    # -- delivery ----------------------------------------------------------------------------

    def _deliver(self, stanza: etree._Element, to: JID) -> None:
        if to.domain == self.domain:
            if to.local is None:
                self._for_server(stanza, to)
            else:
                self._to_local(stanza, to)
            return
        component = self.components.get(to.domain)
        if component is not None:
            component.receive(stanza)
            return
        if stanza.tag == _PRESENCE:
            return
        raise StanzaError("remote-server-not-found",
                          f"{to.domain} is not served here (no server-to-server links)")

    def _to_local(self, stanza: etree._Element, to: JID) -> None:
        resources = self.sessions.get(str(to.bare), {})
        kind = etree.QName(stanza).localname
        stanza_type = stanza.get("type")
        if to.resource is not None:
            session = resources.get(to.resource)
            if session is not None:
                session.send(serialize(stanza))
                return
            if kind == "message" and stanza_type in (None, "normal", "chat", "headline"):
                self._spawn(self._message_to_bare(stanza, to.bare))
            elif kind == "message" and stanza_type == "groupchat":
                raise StanzaError("service-unavailable")
            elif kind == "iq" and stanza_type in ("get", "set"):
                raise StanzaError("service-unavailable", "no such resource")
            return
        if kind == "message":
            if stanza_type == "groupchat":
                raise StanzaError("service-unavailable", "no group chat here")
            if stanza_type == "error":
                return
            self._spawn(self._message_to_bare(stanza, to))
        elif kind == "presence":
            data = serialize(stanza)
            for s in resources.values():
                if s.available:
                    s.send(data)
        else:
            self._iq_for_account(stanza, to)

    async def _message_to_bare(self, stanza: etree._Element, bare: JID,
                               exclude: Session | None = None) -> None:
        """RFC 6121 8.5.2: every available resource with non-negative priority, or offline."""
        resources = self.sessions.get(str(bare), {})
        live = [s for s in resources.values()
                if s.available and s.priority >= 0 and s is not exclude]
        if live:
            data = serialize(stanza)
            for s in live:
                s.send(data)
            return
        if stanza.get("type", "normal") not in ("normal", "chat"):
            return  # headline and error messages are not stored
        assert bare.local is not None
        data = serialize(stanza)
        # The stamp is the XEP-0203 <delay/> it is delivered with (milliseconds, Z).
        outcome = await self.offline.store(bare.local, rfc3339(), data)
        if outcome == "stored":
            # An initial presence sent meanwhile reads offline storage after this write.
            return
        self._bounce(stanza, "service-unavailable",
                     "offline storage is full" if outcome == "full" else "no such account")

    def _bounce(self, stanza: etree._Element, condition: str, text: str = "") -> None:
        """Answer a stanza with an error, routed back to its sender; never for errors."""
        if stanza.get("type") in ("error", "result") or not stanza.get("from"):
            return
        if stanza.tag == _PRESENCE:
            return
        reply = error_reply(stanza, condition, text)
        try:
            self._deliver(reply, parse_jid(reply.get("to", "")))
        except (StanzaError, JIDError):
            return

    # -- the server and accounts as iq endpoints ---------------------------------------------

    def _for_server(self, stanza: etree._Element, to: JID) -> None:
        if etree.QName(stanza).localname != "iq":
            return  # messages and presence to the server itself are ignored
        if stanza.get("type") not in ("get", "set"):
            return
        if len(stanza) != 1:
            raise StanzaError("bad-request", "an iq get/set has exactly one child")
        payload = stanza[0]
        ns = etree.QName(payload).namespace
        reply = result_reply(stanza)
        if stanza.get("type") == "get" and ns == NS_PING:
            pass
        elif stanza.get("type") == "get" and ns == NS_DISCO_INFO and not payload.get("node"):
            query = etree.SubElement(reply, f"{{{NS_DISCO_INFO}}}query",
                                     nsmap={None: NS_DISCO_INFO})
            etree.SubElement(query, f"{{{NS_DISCO_INFO}}}identity", category="server",
                             type="im", name=f"{PRODUCT} (no rosters)")
            for feature in SERVER_FEATURES:
                etree.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", var=feature)
        elif stanza.get("type") == "get" and ns == NS_DISCO_ITEMS and not payload.get("node"):
            query = etree.SubElement(reply, f"{{{NS_DISCO_ITEMS}}}query",
                                     nsmap={None: NS_DISCO_ITEMS})
            for domain in sorted(self.components):
                etree.SubElement(query, f"{{{NS_DISCO_ITEMS}}}item", jid=domain)
        elif ns in (NS_DISCO_INFO, NS_DISCO_ITEMS):
            raise StanzaError("item-not-found", "no such node")
        else:
            raise StanzaError("service-unavailable")
        self._deliver(reply, parse_jid(reply.get("to", "")))

    def _iq_for_account(self, stanza: etree._Element, account: JID) -> None:
        """RFC 6121 8.5.1/8.5.2.1.3: the server answers an iq to a bare JID for the account."""
        if stanza.get("type") not in ("get", "set"):
            return
        if len(stanza) != 1:
            raise StanzaError("bad-request", "an iq get/set has exactly one child")
        payload = stanza[0]
        ns = etree.QName(payload).namespace
        reply = result_reply(stanza)
        reply.set("from", str(account))
        if stanza.get("type") == "get" and ns == NS_PING:
            pass
        elif stanza.get("type") == "get" and ns == NS_DISCO_INFO and not payload.get("node"):
            query = etree.SubElement(reply, f"{{{NS_DISCO_INFO}}}query",
                                     nsmap={None: NS_DISCO_INFO})
            etree.SubElement(query, f"{{{NS_DISCO_INFO}}}identity", category="account",
                             type="registered")
            for feature in ACCOUNT_FEATURES:
                etree.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", var=feature)
        elif ns == NS_DISCO_INFO:
            raise StanzaError("item-not-found", "no such node")
        else:
            raise StanzaError("service-unavailable")
        self._deliver(reply, parse_jid(reply.get("to", "")))

    # -- presence ----------------------------------------------------------------------------

    def _presence_broadcast(self, session: Session, stanza: etree._Element) -> None:
        """Presence without 'to' (RFC 6121 4.2, 4.4, 4.5): the account's own resources and
        whoever got directed presence; there is no roster to broadcast to."""
        presence_type = stanza.get("type")
        if presence_type is None:
            priority = stanza.find(f"{{{NS_CLIENT}}}priority")
            try:
                value = int(priority.text or "0") if priority is not None else 0
            except ValueError:
                raise StanzaError("bad-request", "priority must be an integer") from None
            if not -128 <= value <= 127:
                raise StanzaError("bad-request", "priority must be in -128..127")
            initial = not session.available
            session.available = True
            session.priority = value
            session.presence = stanza
            data = serialize(stanza)
            own = [s for s in self.sessions.get(session.bare, {}).values() if s.available]
            for s in own:
                s.send(data)
            for target in list(session.directed or ()):
                self._send_presence_to(target, stanza)
            if initial:
                for other in own:
                    if other is not session and other.presence is not None:
                        session.send(serialize(other.presence))
                for component in list(self.components.values()):
                    component.session_available(session.full)
                if value >= 0:
                    self._spawn(self._flush_offline(session))
        elif presence_type == "unavailable":
            if session.available:
                self._went_unavailable(session, stanza)
        # Subscription requests, probes and errors need a roster: ignored (RFC 6121 3.1.3).

    def _went_unavailable(self, session: Session, stanza: etree._Element | None) -> None:
        if stanza is None:
            stanza = etree.Element(_PRESENCE, type="unavailable", nsmap={None: NS_CLIENT})
            stanza.set("from", session.full)
        session.available = False
        session.presence = None
        data = serialize(stanza)
        for s in list(self.sessions.get(session.bare, {}).values()):
            if s.available or s is session:
                if not s.ended:
                    s.send(data)
        for target in list(session.directed or ()):
            self._send_presence_to(target, stanza)
        session.directed = None
        for component in list(self.components.values()):
            component.session_unavailable(session.full)

    def _send_presence_to(self, target: str, stanza: etree._Element) -> None:
        copy = etree.fromstring(serialize(stanza))
        copy.set("to", target)
        try:
            self._deliver(copy, parse_jid(target))
        except (StanzaError, JIDError):
            return

    def _directed_presence(self, session: Session, stanza: etree._Element, to: JID) -> None:
        presence_type = stanza.get("type")
        if presence_type not in (None, "unavailable"):
            return  # subscriptions and probes: no rosters here
        if str(to.bare) != session.bare:
            if presence_type is None:
                if session.directed is None:
                    session.directed = set()
                session.directed.add(str(to))
            elif session.directed is not None:
                session.directed.discard(str(to))
        self._deliver(stanza, to)

    # -- offline delivery --------------------------------------------------------------------

    async def _flush_offline(self, session: Session) -> None:
        """Hand stored messages to a newly available session, oldest first, before any
        message that arrives meanwhile (those are held)."""
        if session.held is not None or session.jid.local is None:
            return
        session.held = []
        try:
            stored = await self.offline.take(session.jid.local)
        except Exception:
            log.failure("{jid}: reading offline messages failed", jid=session.full)
            stored = []
        held, session.held = session.held or [], None
        if session.ended:
            for stamp, data in stored:
                await self.offline.store(session.jid.local, stamp, data)
            for data in held:
                self._reroute_undelivered(session, data)
            return
        for stamp, data in stored:
            session.write(self._with_delay(data, stamp))
        for data in held:
            session.write(data)

    def relay_offline(self, username: str) -> None:
        """A message for `username` was stored (here or by another grid process on this
        database): hand it to the account's available sessions here, if it has any."""
        if self._live(f"{username}@{self.domain}"):
            self._spawn(self._relay_offline(username))

    def _live(self, bare: str) -> list[Session]:
        return [s for s in self.sessions.get(bare, {}).values()
                if s.available and s.priority >= 0 and not s.ended]

    async def _relay_offline(self, username: str) -> None:
        stored = await self.offline.take(username)
        live = self._live(f"{username}@{self.domain}")
        for stamp, data in stored:
            if not live:  # gone meanwhile: kept for the next login
                await self.offline.store(username, stamp, data)
                continue
            delayed = self._with_delay(data, stamp)
            for session in live:
                session.send(delayed)

    def _with_delay(self, data: bytes, stamp: str) -> bytes:
        stanza = etree.fromstring(data)
        delay = etree.SubElement(stanza, f"{{{NS_DELAY}}}delay", nsmap={None: NS_DELAY})
        delay.set("from", self.domain)
        delay.set("stamp", stamp)
        delay.text = "Offline Storage"
        return serialize(stanza)

    # -- bookkeeping --------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        d = defer.Deferred.fromCoroutine(coroutine)
        self._pending.add(d)
        d.addErrback(lambda f: log.failure("routing failed", failure=f))
        d.addBoth(lambda _: self._pending.discard(d))

    @property
    def pending(self) -> int:
        """Offline writes (and reads) in flight."""
        return len(self._pending)

    def drain(self) -> defer.Deferred[Any]:
        """Wait for offline writes in flight (the service calls this before closing storage)."""
        return defer.DeferredList(list(self._pending))

    def revoke_session(self, session: Session, reason: str, condition: str = "reset") -> None:
        """End a session whose credentials are no longer valid; it cannot be resumed. The
        stream is closed with `condition`: <reset/> when its credentials changed (RFC 6120
        4.9.3.16), <policy-violation/> when the operator revoked the platform."""
        log.warn("{jid}: session ended: {reason}", jid=session.full, reason=reason)
        connection = session.connection
        self.end_session(session)
        if connection is not None:
            connection.close_with_error(condition, reason)

    def sessions_of(self, bare: str) -> list[Session]:
        """Every session of one bare JID (detached ones awaiting resumption too)."""
        return list(self.sessions.get(bare, {}).values())

    def all_sessions(self) -> Iterable[Session]:
        for resources in list(self.sessions.values()):
            yield from list(resources.values())
