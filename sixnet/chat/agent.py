"""The user agent's engine: sessions by person, the outbox, receipts, retries.

It owns no port: the service gives it a listening factory and the reactor to dial with. It
keeps at most one session per person (docs/chat.rst, "Simultaneous dial"), sends every
queued message on each new session until the peer's receipt arrives, and retries people
with queued messages when the directory says they moved, or with exponential backoff.

It decides who gets through a handshake (`admit`: the allow/deny policy and the
certificates the registry said were revoked), and asks the directory about each new
session's certificate before using the session; it watches every person it has a session
with, so a revocation the registry announces ends the session (docs/chat.rst, "Revocation").
"""

from __future__ import annotations

import datetime
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from lxml import etree
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from sixnet.chat.alerts import Alert
from sixnet.chat.directory import IPeerDirectory, PeerAddress, PeerRecord
from sixnet.chat.handshake import DEFAULT_POLICY, HandshakePolicy
from sixnet.chat.messages import NS
from sixnet.chat.metrics import ChatCounters, handshake_outcome
from sixnet.chat.policy import OPEN_POLICY, PeerPolicy
from sixnet.chat.protocol import SessionFactory, SessionProtocol
from sixnet.chat.session import Session, SessionTransport, own_user_id
from sixnet.chat.store import MessageStore, StoredMessage
from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.metrics import Registry
from sixnet.core.timefmt import parse_rfc3339
from sixnet.pki.identity import normalize_user_id
from sixnet.pki.store import CertificateStore, NodeIdentity, VerifiedPeer, certificate_facts

log = Logger(namespace="sixnet.chat")

_MESSAGE = f"{{{NS}}}message"
_RECEIPT = f"{{{NS}}}receipt"
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: How far ahead of this agent's clock a message's ``sent`` may be (clock skew, not more).
MAX_SENT_AHEAD = datetime.timedelta(hours=1)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class MessageRefused(ValueError):
    """A message the person asked to send cannot be sent (too long, bad characters...)."""


@dataclass(frozen=True)
class AgentSettings:
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    close_timeout: float = 5.0
    retry_initial: float = 5.0
    retry_max: float = 300.0
    max_message_bytes: int = 65536
    key_update_bytes: int = 1 << 30
    max_handshakes_per_address: int = 8
    max_handshakes: int = 64
    policy: HandshakePolicy = DEFAULT_POLICY
    peers: PeerPolicy = OPEN_POLICY


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\r", "&#13;"))


def encode_message(message: StoredMessage) -> bytes:
    return (f'<message id="{message.id}" sent="{message.sent}">{_escape(message.body)}'
            "</message>").encode()


def encode_receipt(message_id: str) -> bytes:
    return f'<receipt id="{message_id}"/>'.encode()


def sent_problem(sent: str, now: float) -> str | None:
    """Why a message's ``sent`` is refused: not RFC 3339 UTC, or too far in the future."""
    try:
        when = parse_rfc3339(sent)
    except ValueError as e:
        return str(e)
    if not sent.endswith("Z"):
        return f"{sent[:40]!r} is not UTC (Z)"
    ahead = when - datetime.datetime.fromtimestamp(now, datetime.UTC)
    if ahead > MAX_SENT_AHEAD:
        return f"{sent!r} is {ahead} ahead of this agent's clock"
    return None


def fingerprint(peer: VerifiedPeer) -> bytes:
    return peer.certificate.fingerprint(hashes.SHA256())


class Agent:
    """One person's agent: implements `SessionOwner` for every session it runs."""

    def __init__(self, identity: NodeIdentity, store: CertificateStore,
                 messages: MessageStore, directory: IPeerDirectory, reactor: Any,
                 settings: AgentSettings | None = None,
                 counters: ChatCounters | None = None, *,
                 events: IEventSink | None = None) -> None:
        self.identity = identity
        self.counters = counters if counters is not None else ChatCounters(Registry())
        #: Where the security events of this agent's sessions go (`_detected`).
        self.events = events if events is not None else EventBus()
        self.store = store
        self.messages = messages
        self.directory = IPeerDirectory(directory)
        self.reactor = reactor  # IReactorTime and IReactorTCP
        self.settings = settings or AgentSettings()
        self.me = own_user_id(identity)
        #: The one live session per person (established, not yet ended).
        self.sessions: dict[str, Session] = {}
        self._protocols: dict[Session, SessionProtocol] = {}
        self._sent: dict[Session, set[str]] = {}
        self._dialing: dict[str, defer.Deferred[bool]] = {}
        self._waiters: dict[Session, defer.Deferred[bool]] = {}
        self._retry_calls: dict[str, IDelayedCall] = {}
        #: Retries of each person since their last session or move (`_schedule_retry`).
        self._retries: dict[str, int] = {}
        initial = self.settings.retry_initial
        self._retry_delay = backoffPolicy(initialDelay=initial, maxDelay=self.settings.retry_max,
                                          factor=2.0, jitter=lambda: random.random() * initial / 8)
        self._watches: dict[str, Callable[[], None]] = {}
        self._listeners: list[Callable[[str, StoredMessage], None]] = []
        #: Sessions established but not yet confirmed by the directory (`_confirm`), with the
        #: elements that arrived meanwhile.
        self._unconfirmed: dict[Session, list[etree._Element]] = {}
        #: SHA-256 fingerprints of peer certificates the directory said are revoked.
        self.revoked: set[bytes] = set()
        self._stopping = False

    # -- wiring ------------------------------------------------------------------------------

    def factory(self) -> SessionFactory:
        return SessionFactory(self.make_protocol, self.settings.max_handshakes_per_address,
                              self.settings.max_handshakes)

    def make_protocol(self, dial_to: str | None) -> SessionProtocol:
        s = self.settings
        proto = SessionProtocol(self._new_session, self.reactor, dial_to=dial_to,
                                handshake_timeout=s.handshake_timeout,
                                close_timeout=s.close_timeout)
        return proto

    def _new_session(self, transport: SessionTransport) -> Session:
        s = self.settings
        session = Session(self.identity, self.store, transport, self, policy=s.policy,
                          max_message_bytes=s.max_message_bytes,
                          key_update_bytes=s.key_update_bytes, me=self.me,
                          clock=self.reactor.seconds, admit=self.admit)
        assert isinstance(transport, SessionProtocol)
        self._protocols[session] = transport
        return session

    def listen(self, listener: Callable[[str, StoredMessage], None]) -> Callable[[], None]:
        """Be told of ("received", message) and ("delivered", message); returns a cancel."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, event: str, message: StoredMessage) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, message)
            except Exception:
                log.failure("a message listener failed")

    async def start(self) -> None:
        """Resume delivery of everything still queued (after a restart)."""
        counts = await self.messages.queued_counts()
        for peer in counts:
            self.deliver(peer)

    async def stop(self) -> None:
        """Close every session cleanly and stop retrying."""
        self._stopping = True
        for call in self._retry_calls.values():
            if call.active():
                call.cancel()
        self._retry_calls.clear()
        for cancel in self._watches.values():
            cancel()
        self._watches.clear()
        waits = []
        for proto in list(self._protocols.values()):
            waits.append(proto.lost)
            proto.close()
        if waits:
            timeout = self.settings.close_timeout + 1
            done = defer.DeferredList(waits, consumeErrors=True)
            done.addTimeout(timeout, self.reactor)
            try:
                await done
            except defer.TimeoutError:
                for proto in list(self._protocols.values()):
                    if proto.transport is not None:
                        proto.transport.abortConnection()

    # -- the person's requests ---------------------------------------------------------------

    def check_text(self, text: str) -> None:
        if not text:
            raise MessageRefused("the message is empty")
        if _NOT_XML.search(text):
            raise MessageRefused("the message contains a control character that cannot be sent")
        size = len(text.encode("utf-8"))
        if size > self.settings.max_message_bytes:
            raise MessageRefused(f"the message is {size} bytes; the limit is "
                                 f"{self.settings.max_message_bytes}")

    def admit(self, peer: VerifiedPeer) -> None:
        """The handshake's check of a verified peer, both roles: policy, then revocations."""
        if not self.settings.peers.permits(peer.identity):
            raise Alert("access-denied", f"{peer.identity} is not allowed by [chat] allow/deny")
        if fingerprint(peer) in self.revoked:
            raise Alert("certificate-revoked",
                        f"the registry said this certificate of {peer.identity} is revoked",
                        event="chat.certificate-revoked",
                        facts={"check": "registry", **certificate_facts(peer.certificate)})

    async def send(self, to: str, text: str) -> StoredMessage:
        """Queue a message (committed to disk when this returns) and try to deliver it."""
        peer = normalize_user_id(to)
        self.check_text(text)
        if not self.settings.peers.permits(peer):
            raise MessageRefused(f"{peer} is not allowed by [chat] allow/deny")
        message = await self.messages.queue(peer, text)
        session = self._usable(peer)
        if session is not None:
            self._transmit(session, [message])
        else:
            self.deliver(peer)
        self._watch(peer)
        return message

    def peers(self) -> list[dict[str, Any]]:
        out = []
        for peer, session in sorted(self.sessions.items()):
            out.append({"peer": peer, "role": session.role, "method": session.method,
                        "cipher": session.cipher, "initiator": session.initiator_id,
                        "since": session.created})
        return out

    # -- delivery ----------------------------------------------------------------------------

    def _usable(self, peer: str) -> Session | None:
        """The live session with `peer`, once the directory has confirmed its certificate."""
        session = self.sessions.get(peer)
        if session is None or session.end_reason is not None or session in self._unconfirmed:
            return None
        return session

    def deliver(self, peer: str) -> defer.Deferred[bool]:
        """Make sure queued messages for `peer` go out: on the live session, or dial."""
        if self._stopping:
            return defer.succeed(False)
        session = self.sessions.get(peer)
        if session is not None and session.end_reason is None:
            if session in self._unconfirmed:  # `_confirm` delivers when it is done
                return defer.succeed(True)
            return defer.Deferred.fromCoroutine(self._flush(peer, session))
        if peer in self._dialing:
            return self._dialing[peer]
        d = defer.Deferred.fromCoroutine(self._dial(peer))
        self._dialing[peer] = d

        def done(result: bool) -> bool:
            self._dialing.pop(peer, None)
            return result

        return d.addBoth(done)

    async def _dial(self, peer: str) -> bool:
        pending = await self.messages.outbox(peer)
        if not pending:
            self._unwatch(peer)
            return True
        self._watch(peer)
        try:
            lookup = self.directory.lookup(peer)
            lookup.addTimeout(self.settings.connect_timeout, self.reactor)
            record = await lookup
        except Exception as e:
            log.warn("lookup of {peer} failed: {error}", peer=peer, error=e)
            record = None
        if record is not None:
            for address in record.addresses:
                if self._stopping:
                    return False
                if await self._try(peer, address):
                    return True
                if self.sessions.get(peer) is not None:  # the peer called us meanwhile
                    return True
        if self.sessions.get(peer) is None:
            self._schedule_retry(peer)
        return False

    async def _try(self, peer: str, address: PeerAddress) -> bool:
        proto = self.make_protocol(peer)
        endpoint = endpoints.HostnameEndpoint(self.reactor, address.host.encode("idna")
                                              if not address.host.isascii() else address.host,
                                              address.port,
                                              timeout=self.settings.connect_timeout)
        try:
            await endpoints.connectProtocol(endpoint, proto)
        except Exception as e:
            log.info("cannot reach {peer} at {address}: {error}", peer=peer,
                     address=str(address), error=e)
            return False
        session = proto.session
        assert session is not None
        if session.records is not None:
            return True
        if session.end_reason is not None:
            return False
        waiter: defer.Deferred[bool] = defer.Deferred()
        self._waiters[session] = waiter
        return await waiter

    def _schedule_retry(self, peer: str) -> None:
        if self._stopping:
            return
        call = self._retry_calls.get(peer)
        if call is not None and call.active():
            return
        retries = self._retries.get(peer, 0)
        delay, self._retries[peer] = self._retry_delay(retries), retries + 1
        log.info("retrying {peer} in {delay:.0f}s", peer=peer, delay=delay)
        self._retry_calls[peer] = self.reactor.callLater(delay, self.deliver, peer)

    def _watch(self, peer: str) -> None:
        if peer not in self._watches and not self._stopping:
            self._watches[peer] = self.directory.watch(peer, self._record_changed)

    def _unwatch(self, peer: str) -> None:
        if peer in self.sessions:  # a live session stays watched, for revocations
            return
        cancel = self._watches.pop(peer, None)
        if cancel is not None:
            cancel()

    def _record_changed(self, record: PeerRecord) -> None:
        """The person's record changed: try now if they moved, check a live session's
        certificate (a revocation is a change of the record)."""
        peer = record.user_id
        session = self.sessions.get(peer)
        if session is not None:
            if session not in self._unconfirmed:
                defer.Deferred.fromCoroutine(self._confirm(session))
            return
        call = self._retry_calls.pop(peer, None)
        if call is not None and call.active():
            call.cancel()
        self._retries.pop(peer, None)
        self.deliver(peer)

    async def _confirm(self, session: Session) -> bool:
        """Ask the directory whether the session's certificate is revoked, or not the one
        it publishes for that person (a man in the middle); end it if so.

        When the directory cannot say (unreachable, slow, the person unknown to it), the
        session goes on: the CRLs the handshake checked still apply.
        """
        peer = session.peer
        assert peer is not None
        try:
            query = self.directory.certificate_status(peer.identity, peer.certificate)
            query.addTimeout(self.settings.connect_timeout, self.reactor)
            status = await query
        except Exception as e:
            log.warn("cannot ask the directory about {peer}'s certificate: {error}",
                     peer=peer.identity, error=e)
            status = None
        if status == "unknown":
            log.warn("the directory does not publish this certificate of {peer}: ending the "
                     "session", peer=peer.identity)
            session.handle(session.refuse, Alert(
                "bad-certificate", f"the registry publishes other certificates for "
                f"{peer.identity}", event="chat.mitm",
                facts={"check": "directory", **certificate_facts(peer.certificate)}))
            return False
        if status != "revoked":
            return True
        self.revoked.add(fingerprint(peer))
        log.warn("the directory says {peer}'s certificate is revoked: ending the session",
                 peer=peer.identity)
        session.handle(session.refuse, Alert(
            "certificate-revoked", "revoked in the registry", event="chat.certificate-revoked",
            facts={"check": "registry", **certificate_facts(peer.certificate)}))
        return False

    async def _first_confirm(self, session: Session) -> None:
        """A new session, not read from meanwhile: once confirmed, it gets what arrived
        with the handshake, and the outbox."""
        transport = getattr(self._protocols.get(session), "transport", None)
        if transport is not None:
            transport.pauseProducing()
        confirmed = await self._confirm(session)
        held = self._unconfirmed.pop(session, [])
        if not confirmed or session.end_reason is not None:
            return
        for element in held:
            if session.end_reason is not None:
                return
            self.stanza_received(session, element)
        if transport is not None:
            transport.resumeProducing()
        if self.sessions.get(session.peer_id or "") is session:
            self.deliver(session.peer_id or "")

    async def _flush(self, peer: str, session: Session) -> bool:
        queued = await self.messages.outbox(peer)
        if session.end_reason is not None or self.sessions.get(peer) is not session:
            return False
        self._transmit(session, queued)
        if not queued:
            self._unwatch(peer)
        return True

    def _transmit(self, session: Session, queued: list[StoredMessage]) -> None:
        sent = self._sent.setdefault(session, set())
        for message in queued:
            if message.id in sent:
                continue
            if not session.send_stanza(encode_message(message)):
                return
            self.counters.sent.inc()
            sent.add(message.id)

    # -- SessionOwner ------------------------------------------------------------------------

    @staticmethod
    def keeps(existing: Session, new: Session) -> Session:
        """The simultaneous-dial rule: which of two sessions with one person survives."""
        if existing.initiator_id != new.initiator_id:
            return min((existing, new), key=lambda s: s.initiator_id.encode("utf-8"))
        return new

    def session_established(self, session: Session) -> None:
        peer = session.peer_id
        assert peer is not None
        self.counters.handshakes["established"].inc()
        log.info("session with {peer} ({role}, {method}, {cipher})", peer=peer,
                 role=session.role, method=session.method, cipher=session.cipher)
        waiter = self._waiters.pop(session, None)
        existing = self.sessions.get(peer)
        winner = session
        if existing is not None and existing is not session and existing.end_reason is None:
            winner = self.keeps(existing, session)
            loser = session if winner is existing else existing
            self.sessions[peer] = winner
            loser.handle(loser.refuse, Alert("duplicate-session", "simultaneous dial"))
        else:
            self.sessions[peer] = session
        call = self._retry_calls.pop(peer, None)
        if call is not None and call.active():
            call.cancel()
        self._retries.pop(peer, None)
        if waiter is not None:
            waiter.callback(True)
        if winner is session:
            self._watch(peer)
            self._unconfirmed[session] = []
            defer.Deferred.fromCoroutine(self._first_confirm(session))

    def session_ended(self, session: Session, reason: str) -> None:
        proto = self._protocols.pop(session, None)
        alert = session.end_alert
        if alert is not None and alert.event is not None:
            self._detected(session, alert, proto)
        self._sent.pop(session, None)
        self._unconfirmed.pop(session, None)
        waiter = self._waiters.pop(session, None)
        if waiter is not None:
            waiter.callback(False)
        if session.records is None:  # ended in the handshake
            self.counters.handshakes[handshake_outcome(reason)].inc()
        peer = session.peer_id
        if peer is None:
            return
        if self.sessions.get(peer) is session:
            del self.sessions[peer]
            log.info("session with {peer} ended: {reason}", peer=peer, reason=reason)
            if not self._stopping and peer in self._watches:
                defer.Deferred.fromCoroutine(self._after_session(peer))

    def _detected(self, session: Session, alert: Alert, proto: SessionProtocol | None) -> None:
        """A session ended on a detection: one security event, with the peer's address and
        the person (the one verified, else the one dialled)."""
        assert alert.event is not None
        address = getattr(proto.transport, "getPeer", lambda: None)() if proto else None
        facts = {"alert": alert.condition, "role": session.role, **alert.facts}
        if session.method is not None:
            facts.setdefault("method", session.method)
        if session.cipher is not None:
            facts.setdefault("cipher", session.cipher)
        self.events.emit(SecurityEvent(
            alert.event, subject=session.peer_id or session.wanted,
            source=getattr(address, "host", None),
            detail=f"session {session.role} {self.me}: {alert.text[:200]}", facts=facts))

    async def _after_session(self, peer: str) -> None:
        """Retry a person who still has queued messages; stop watching one who has none."""
        queued = await self.messages.outbox(peer)
        if peer in self.sessions or self._stopping:
            return
        if queued:
            self._schedule_retry(peer)
        else:
            self._unwatch(peer)

    def stanza_received(self, session: Session, element: etree._Element) -> None:
        held = self._unconfirmed.get(session)
        if held is not None:
            held.append(element)
            return
        peer = session.peer_id
        assert peer is not None
        if element.tag == _MESSAGE:
            self._message_received(session, peer, element)
        elif element.tag == _RECEIPT:
            message_id = element.get("id", "")
            if not _ID.fullmatch(message_id) or len(element):
                session.handle(session.refuse, Alert("decode-error", "bad receipt"))
                return
            d = self.messages.mark_delivered(peer, message_id)
            d.addCallback(self._delivered)
            d.addErrback(lambda f: log.failure("cannot record a receipt", f))
        else:
            session.handle(session.refuse, Alert("decode-error",
                                                 f"unknown element {str(element.tag)[:80]}"))

    def _delivered(self, message: StoredMessage | None) -> None:
        if message is not None:
            self._notify("delivered", message)

    def _message_received(self, session: Session, peer: str, element: etree._Element) -> None:
        message_id, sent = element.get("id", ""), element.get("sent", "")
        text = element.text or ""
        if (not _ID.fullmatch(message_id) or len(element)
                or len(text.encode("utf-8")) > self.settings.max_message_bytes):
            session.handle(session.refuse, Alert("decode-error", "bad message"))
            return
        problem = sent_problem(sent, self.reactor.seconds())
        if problem is not None:
            session.handle(session.refuse, Alert("decode-error", f"bad message: {problem}"))
            return

        def stored(result: tuple[StoredMessage, bool]) -> None:
            message, new = result
            if new:
                self.counters.received.inc()
                self._notify("received", message)
            session.send_stanza(encode_receipt(message_id))

        d = self.messages.receive(peer, message_id, sent, text)
        d.addCallback(stored)
        d.addErrback(lambda f: log.failure("cannot store a message from {peer}", f, peer=peer))
