"""One SixChat connection's life, as an explicit state machine (Automat), without a reactor.

The protocol hands it whole handshake elements and, after the XML phase, record bytes; it
answers through a `SessionTransport` (bytes out, hang up) and tells its `SessionOwner` (the
agent) when the session is established, when an application element arrives and when the
session ends. Diagram (docs/chat.rst, "State machine")::

    start --dial--> wait_hello --responder_hello--> wait_verify
    start --initiator_hello--> wait_verify
    wait_verify --certificate_verify--> wait_finished --finished--> established
    established --close--> closing --peer_close--> closed
    established --peer_close--> closed
    any live state --refuse(alert) / peer_alert--> failed
    any live state --connection_lost--> closed

Outputs that check the peer raise `Alert`; `handle` turns that (and any input the current
state does not accept) into ``refuse``, so one state has one set of allowed inputs.

How a failure is reported depends on what this side has sent: before its own ``</sixchat>``
an XML ``<alert/>``, after it an alert record (docs/chat.rst, "Reporting a failure"). The
responder ends its XML stream with its ``finished``, so its failures while it waits for the
initiator's proof are records under its first application keys, which the initiator already
holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol

from automat import MethodicalMachine, NoTransition
from lxml import etree
from twisted.logger import Logger

from sixnet.chat import handshake as hs
from sixnet.chat import messages as m
from sixnet.chat.alerts import Alert, certificate_alert
from sixnet.chat.keyschedule import KeySchedule, finished_mac
from sixnet.chat.records import ALERT, APPLICATION, KEY_UPDATE, RecordLayer
from sixnet.core.stream.parser import StreamClosed, StreamOpened, StreamParser, XMLStreamError
from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id, user_ids_in
from sixnet.pki.store import (
    CertificateStore,
    NodeIdentity,
    VerificationError,
    VerifiedPeer,
    certificate_facts,
)

log = Logger(namespace="sixnet.chat")

APP_HEADER = f'<session xmlns="{m.NS}">'.encode()
APP_ROOT = f"{{{m.NS}}}session"


class SessionTransport(Protocol):
    """Where a session's bytes go: the connection."""

    def write(self, data: bytes) -> None: ...

    def lose_connection(self) -> None: ...


class SessionOwner(Protocol):
    """Who is told about a session's life: the agent."""

    def session_established(self, session: Session) -> None: ...

    def stanza_received(self, session: Session, element: etree._Element) -> None: ...

    def session_ended(self, session: Session, reason: str) -> None: ...


def own_user_id(identity: NodeIdentity) -> str:
    names = user_ids_in(identity.certificate)
    if len(names) != 1:
        raise ValueError(f"identity {identity.name!r} must name exactly one person")
    return next(iter(names))


class Session:
    """A connection to one peer: handshake, then records, then a clean or failed end."""

    _machine = MethodicalMachine()

    def __init__(self, identity: NodeIdentity, store: CertificateStore,
                 transport: SessionTransport, owner: SessionOwner, *,
                 policy: hs.HandshakePolicy | None = None, max_message_bytes: int = 65536,
                 key_update_bytes: int = 1 << 30, me: str | None = None,
                 clock: Callable[[], float] | None = None,
                 admit: Callable[[VerifiedPeer], None] | None = None) -> None:
        self.identity = identity
        self.store = store
        self.transport = transport
        self.owner = owner
        self.policy = policy or hs.DEFAULT_POLICY
        self.me = me or own_user_id(identity)
        self.max_message_bytes = max_message_bytes
        self.key_update_bytes = key_update_bytes
        self.role = "responder"
        self.wanted: str | None = None
        self.peer: VerifiedPeer | None = None
        self.method: str | None = None
        self.cipher: str | None = None
        self.records: RecordLayer | None = None
        #: The agent's check of a verified peer (policy, revocations it heard of): raises
        #: `Alert` to refuse the handshake.
        self.admit = admit
        #: The alert that ended the session, if one did (from either side's check).
        self.end_alert: Alert | None = None
        #: The records this side seals once its XML stream has ended (set before `records`
        #: on the responder, which ends its stream first).
        self._sealer: RecordLayer | None = None
        self.end_reason: str | None = None
        self.created = (clock or time.time)()  # when the connection began (epoch seconds)
        self._transcript = hs.Transcript()
        self._share: hs.X25519Share | None = None
        self._schedule: KeySchedule | None = None
        self._peer_hs: bytes = b""
        self._own_hs: bytes = b""
        self._header_sent = False
        self._app_header_sent = False
        self._app_parser = StreamParser(max_element_bytes=max_message_bytes + 1024, max_depth=4)
        self._app_opened = False
        self._offered: tuple[str, ...] = ()
        self._closing = False

    @property
    def peer_id(self) -> str | None:
        return self.peer.identity if self.peer else None

    @property
    def initiator_id(self) -> str:
        assert self.peer is not None
        return self.me if self.role == "initiator" else self.peer.identity

    def __repr__(self) -> str:
        return f"<Session {self.role} {self.me} <-> {self.peer_id or self.wanted or '?'}>"

    # -- entry points (the protocol calls these) -------------------------------------------

    def handle(self, inp: Callable[..., object], *args: object) -> None:
        """Run one input; a failed check or an input not allowed now ends the session."""
        try:
            inp(*args)
        except Alert as alert:
            self._refuse_quietly(alert)
        except NoTransition as e:
            self._refuse_quietly(Alert("unexpected-message", str(e)))
        except Exception:  # a bug or a library surprise ends this session, not the agent
            log.failure("{session}: internal error", session=self)
            self._refuse_quietly(Alert("internal-error"))

    def _refuse_quietly(self, alert: Alert) -> None:
        try:
            self.refuse(alert)
        except NoTransition:
            pass  # already over

    def element_received(self, element: etree._Element) -> None:
        """A whole handshake element from the peer's XML stream."""
        try:
            message = m.parse(element)
        except Alert as alert:
            self._refuse_quietly(alert)
            return
        if isinstance(message, m.InitiatorHello):
            self.handle(self.initiator_hello, message, element)
        elif isinstance(message, m.ResponderHello):
            self.handle(self.responder_hello, message, element)
        elif isinstance(message, m.CertificateVerify):
            self.handle(self.certificate_verify, message, element)
        elif isinstance(message, m.Finished):
            self.handle(self.finished, message, element)
        else:
            self.handle(self.peer_alert, message.reason)

    def stream_ended(self) -> None:
        """The peer's ``</sixchat>``: it must come right after its ``finished``."""
        if self.records is None:
            self._refuse_quietly(Alert("unexpected-message", "XML stream ended early"))

    def records_received(self, data: bytes) -> None:
        """Bytes of the record phase."""
        if self.records is None or self.end_reason is not None:
            self._refuse_quietly(Alert("unexpected-message", "record after the session ended"))
            return
        records, alert = self.records.feed(data)
        application: list[bytes] = []
        for record_type, plaintext in records:
            if record_type == APPLICATION:
                if self._closing:
                    self._refuse_quietly(Alert("unexpected-message",
                                               "application record after close-notify"))
                    return
                application.append(plaintext)
                continue
            if application:
                self._application(b"".join(application))
                application = []
            if self.end_reason is not None:
                return
            if record_type == KEY_UPDATE:
                if plaintext == b"\x01":
                    self.handle(self.key_update_requested)
            else:
                reason = plaintext.decode("utf-8", "replace")
                if reason == "close-notify":
                    self.handle(self.peer_close)
                else:
                    self.handle(self.peer_alert, reason[:40])
        if application and self.end_reason is None:
            self._application(b"".join(application))
        if alert is not None and self.end_reason is None:
            self._refuse_quietly(alert)

    def _application(self, plaintext: bytes) -> None:
        """Application bytes (all the records of one read at once: one parser pass)."""
        try:
            events = self._app_parser.feed(plaintext)
        except XMLStreamError as e:
            self._refuse_quietly(Alert("decode-error", f"application stream: {e}"))
            return
        for event in events:
            if isinstance(event, StreamOpened):
                if event.tag != APP_ROOT:
                    self._refuse_quietly(Alert("decode-error", "bad application stream root"))
                    return
                self._app_opened = True
            elif isinstance(event, StreamClosed) or not self._app_opened:
                self._refuse_quietly(Alert("decode-error", "application stream closed"))
                return
            else:
                try:
                    self.owner.stanza_received(self, event)
                except Exception:
                    log.failure("{session}: the agent failed on a stanza", session=self)
                    self._refuse_quietly(Alert("internal-error"))
                if self.end_reason is not None:
                    return

    def send_stanza(self, data: bytes) -> bool:
        """Send one serialized application element; False unless established and open."""
        records = self.records
        if records is None or self.end_reason is not None or self._closing:
            return False
        # Exactly the established state; the hot path skips the machine's dispatch cost.
        if not self._app_header_sent:
            self._app_header_sent = True
            data = APP_HEADER + data
        write = self.transport.write
        for record in records.seal_application(data):
            write(record)
        if records.needs_key_update:
            write(records.seal_key_update(False))
        return True

    # -- the machine -----------------------------------------------------------------------

    @_machine.state(initial=True)
    def start(self) -> None:
        "Nothing sent or received yet."

    @_machine.state()
    def wait_hello(self) -> None:
        "The initiator sent its hello."

    @_machine.state()
    def wait_verify(self) -> None:
        "Hellos exchanged; the peer's certificate-verify is next."

    @_machine.state()
    def wait_finished(self) -> None:
        "The peer proved its key; its Finished is next."

    @_machine.state()
    def established(self) -> None:
        "Application records flow both ways."

    @_machine.state()
    def closing(self) -> None:
        "We sent close-notify and wait for the peer's."

    @_machine.state()
    def closed(self) -> None:
        "Ended cleanly or the connection went away."

    @_machine.state()
    def failed(self) -> None:
        "Ended by an alert."

    @_machine.input()
    def dial(self, to: str) -> None:
        "Start as initiator, wanting `to`."

    @_machine.input()
    def initiator_hello(self, message: m.InitiatorHello, element: etree._Element) -> None:
        "The initiator's hello arrived."

    @_machine.input()
    def responder_hello(self, message: m.ResponderHello, element: etree._Element) -> None:
        "The responder's hello arrived."

    @_machine.input()
    def certificate_verify(self, message: m.CertificateVerify,
                           element: etree._Element) -> None:
        "The peer's signature over the transcript arrived."

    @_machine.input()
    def finished(self, message: m.Finished, element: etree._Element) -> None:
        "The peer's Finished arrived."

    @_machine.input()
    def key_update_requested(self) -> None:
        "The peer updated its keys and asks us to update ours."

    @_machine.input()
    def close(self) -> None:
        "Close cleanly (close-notify)."

    @_machine.input()
    def peer_close(self) -> None:
        "The peer's close-notify arrived."

    @_machine.input()
    def refuse(self, alert: Alert) -> None:
        "End the session with an alert."

    @_machine.input()
    def peer_alert(self, reason: str) -> None:
        "The peer ended the session with an alert."

    @_machine.input()
    def connection_lost(self) -> None:
        "The connection is gone."

    # -- outputs: handshake ------------------------------------------------------------------

    def _write_xml(self, elements: list[etree._Element], *, end: bool = False) -> None:
        parts = [] if self._header_sent else [m.STREAM_HEADER]
        self._header_sent = True
        parts += [etree.tostring(e) for e in elements]
        if end:
            parts.append(m.STREAM_END)
        self.transport.write(b"".join(parts))

    @_machine.output()
    def _send_initiator_hello(self, to: str) -> None:
        self.role = "initiator"
        self.wanted = normalize_user_id(to)
        offers = []
        for method in self.policy.key_agreements:
            if method == "x25519":
                self._share = hs.X25519Share()
                offers.append(m.Offer(method, self._share.public))
            elif hs.can_receive_key_transport(self.identity.certificate):
                offers.append(m.Offer(method, None))
        self._offered = tuple(o.method for o in offers)
        hello = m.build(m.InitiatorHello(self.wanted, os.urandom(m.RANDOM_LEN), tuple(offers),
                                         self.policy.ciphers, tuple(self.identity.chain)))
        self._transcript.add(hello)
        self._write_xml([hello])

    def _verify_peer(self, chain: tuple, expected: str | None) -> VerifiedPeer:
        try:
            peer = self.store.verify(list(chain), "client", expected)
        except VerificationError as e:
            raise certificate_alert(e, chain, expected) from None
        if self.admit is not None:
            self.admit(peer)
        return peer

    @_machine.output()
    def _answer_hello(self, message: m.InitiatorHello, element: etree._Element) -> None:
        self._transcript.add(element)
        try:
            wanted = normalize_user_id(message.to)
        except IdentitySyntaxError:
            wanted = None
        if wanted != self.me:
            # No event: a caller with an address that is no longer that person's says so.
            raise Alert("unknown-identity", f"the caller wants {message.to[:80]!r}")
        self.peer = self._verify_peer(message.chain, None)
        offered = {o.method: o for o in message.offers}
        self.method = self.policy.choose(tuple(offered), self.policy.key_agreements,
                                         "key agreement")
        self.cipher = self.policy.choose(message.ciphers, self.policy.ciphers, "cipher")
        share = encrypted = None
        if self.method == "x25519":
            own = hs.X25519Share()
            peer_share = offered["x25519"].share
            assert peer_share is not None
            secret, share = own.shared_secret(peer_share), own.public
        else:
            secret, encrypted = hs.transport_secret(self.peer.certificate)
        hello = m.build(m.ResponderHello(self.peer.identity, os.urandom(m.RANDOM_LEN),
                                         self.method, share, encrypted, self.cipher,
                                         tuple(self.identity.chain)))
        self._transcript.add(hello)
        self._schedule = KeySchedule(secret)
        self._peer_hs, self._own_hs = self._schedule.handshake_traffic(
            self._transcript.digest())
        algorithm, signature = hs.sign(self.identity.key, "responder", self._transcript.digest())
        verify = m.build(m.CertificateVerify(algorithm, signature))
        self._transcript.add(verify)
        done = m.build(m.Finished(finished_mac(self._own_hs, self._transcript.digest())))
        self._transcript.add(done)
        receive, send = self._schedule.application_traffic(self._transcript.digest())
        self._sealer = RecordLayer(self.cipher, send, receive,
                                   key_update_bytes=self.key_update_bytes)
        self._write_xml([hello, verify, done], end=True)

    @_machine.output()
    def _accept_hello(self, message: m.ResponderHello, element: etree._Element) -> None:
        self._transcript.add(element)
        if message.method not in self._offered or message.cipher not in self.policy.ciphers:
            raise Alert("handshake-failure", "the responder chose what was not offered",
                        event="chat.downgrade",
                        facts={"check": "choice", "chosen-method": message.method[:40],
                               "chosen-cipher": message.cipher[:40]})
        self.peer = self._verify_peer(message.chain, self.wanted)
        if message.to != self.me:
            # It verified another initiator's certificate: a relay swapped ours for its own.
            raise Alert("handshake-failure", "the responder names another initiator",
                        event="chat.mitm", facts={"check": "hello-to",
                                                  **certificate_facts(self.peer.certificate)})
        self.method, self.cipher = message.method, message.cipher
        if message.method == "x25519":
            assert self._share is not None and message.share is not None
            secret = self._share.shared_secret(message.share)
        else:
            assert message.encrypted_secret is not None
            secret = hs.receive_transported_secret(self.identity.key, message.encrypted_secret)
        self._share = None
        self._schedule = KeySchedule(secret)
        self._own_hs, self._peer_hs = self._schedule.handshake_traffic(
            self._transcript.digest())

    @_machine.output()
    def _check_peer_verify(self, message: m.CertificateVerify,
                           element: etree._Element) -> None:
        assert self.peer is not None
        peer_role = "initiator" if self.role == "responder" else "responder"
        hs.verify_signature(self.peer.certificate, peer_role, self._transcript.digest(),
                            message.algorithm, message.signature)
        self._transcript.add(element)

    @_machine.output()
    def _check_peer_finished(self, message: m.Finished, element: etree._Element) -> None:
        peer_role = "initiator" if self.role == "responder" else "responder"
        hs.check_finished(self._peer_hs, self._transcript.digest(), message.mac, peer_role)
        self._transcript.add(element)

    @_machine.output()
    def _complete(self) -> None:
        """Install the record layer; the initiator first sends its own proof."""
        assert self._schedule is not None
        if self.role == "initiator":
            initiator, responder = self._schedule.application_traffic(
                self._transcript.digest())
            algorithm, signature = hs.sign(self.identity.key, "initiator",
                                           self._transcript.digest())
            verify = m.build(m.CertificateVerify(algorithm, signature))
            self._transcript.add(verify)
            done = m.build(m.Finished(finished_mac(self._own_hs, self._transcript.digest())))
            self._write_xml([verify, done], end=True)
            assert self.cipher is not None
            self._sealer = RecordLayer(self.cipher, initiator, responder,
                                       key_update_bytes=self.key_update_bytes)
        self.records = self._sealer
        self._schedule = None
        self._own_hs = self._peer_hs = b""
        self.owner.session_established(self)

    # -- outputs: records --------------------------------------------------------------------

    @_machine.output()
    def _answer_key_update(self) -> None:
        assert self.records is not None
        self.transport.write(self.records.seal_key_update(False))

    def request_key_update(self) -> None:
        """Update our sending keys and ask the peer to update its own."""
        if self.records is not None and self.end_reason is None:
            self.transport.write(self.records.seal_key_update(True))

    def _write_alert(self, condition: str) -> None:
        """An alert record once this side's XML stream has ended, else an XML ``<alert/>``."""
        if self._sealer is not None:
            self.transport.write(self._sealer.seal(ALERT, condition.encode()))
        else:
            self._write_xml([m.build(m.AlertMessage(condition))], end=True)

    @_machine.output()
    def _send_close_notify(self) -> None:
        self._closing = True
        self._write_alert("close-notify")

    @_machine.output()
    def _send_alert(self, alert: Alert) -> None:
        log.info("{session}: ending with alert {reason}: {detail}", session=self,
                 reason=alert.condition, detail=alert.text)
        self._write_alert(alert.condition)

    @_machine.output()
    def _hang_up(self) -> None:
        self.transport.lose_connection()

    @_machine.output()
    def _report_alert(self, alert: Alert) -> None:
        if self.end_reason is None:
            self.end_alert = alert
        self._report(alert.condition)

    @_machine.output()
    def _report_peer_alert(self, reason: str) -> None:
        log.info("{session}: the peer sent alert {reason}", session=self, reason=reason)
        self._report(f"peer:{reason}")

    @_machine.output()
    def _report_closed(self) -> None:
        self._report("close-notify")

    @_machine.output()
    def _report_lost(self) -> None:
        self._report("connection-lost")

    def _report(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
            self.owner.session_ended(self, reason)

    # -- transitions ---------------------------------------------------------------------------

    start.upon(dial, enter=wait_hello, outputs=[_send_initiator_hello])
    start.upon(initiator_hello, enter=wait_verify, outputs=[_answer_hello])
    wait_hello.upon(responder_hello, enter=wait_verify, outputs=[_accept_hello])
    wait_verify.upon(certificate_verify, enter=wait_finished, outputs=[_check_peer_verify])
    wait_finished.upon(finished, enter=established, outputs=[_check_peer_finished, _complete])
    established.upon(key_update_requested, enter=established, outputs=[_answer_key_update])
    established.upon(close, enter=closing, outputs=[_send_close_notify])
    established.upon(peer_close, enter=closed,
                     outputs=[_send_close_notify, _hang_up, _report_closed])
    closing.upon(peer_close, enter=closed, outputs=[_hang_up, _report_closed])
    closing.upon(key_update_requested, enter=closing, outputs=[])
    for _state in (start, wait_hello, wait_verify, wait_finished):
        _state.upon(close, enter=closed, outputs=[_send_close_notify, _hang_up, _report_closed])
    for _state in (start, wait_hello, wait_verify, wait_finished, established, closing):
        _state.upon(refuse, enter=failed, outputs=[_send_alert, _hang_up, _report_alert])
        _state.upon(peer_alert, enter=failed, outputs=[_hang_up, _report_peer_alert])
        _state.upon(connection_lost, enter=closed, outputs=[_report_lost])
    for _state in (closed, failed):
        _state.upon(connection_lost, enter=_state, outputs=[])
        _state.upon(close, enter=_state, outputs=[])
    del _state
