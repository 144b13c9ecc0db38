"""The client side of an XMPP client-to-server stream (RFC 6120), on the shared XML stream.

`ClientStream` builds on `sixnet.core.stream.protocol.XMLStreamProtocol` like the grid's
server stream and the IRP client; what it adds is the negotiation, an Automat machine (the
table is at the bottom of the class) whose inputs are the server's elements, classified by
`_input_name` first::

    CLEAR --features--> STARTTLS --proceed--> TLS_HANDSHAKE --verified--> TLS_FEATURES
    CLEAR --direct TLS (XEP-0368)--> TLS_HANDSHAKE
    TLS_FEATURES --features--> SASL --challenge...success--> BOUND_FEATURES
    BOUND_FEATURES --features--> BINDING --bind result--> [SESSION_IQ -->] READY

Every state ends on a stream error from the server and on anything it does not expect; the
failure reaches the `XMPPClientSession` as a `ClientError` (`AuthenticationError` for SASL).
The server's certificate is checked by the shared store for the JID's domain (RFC 7590).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from automat import MethodicalMachine
from lxml import etree
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sixnet.core.stream.parser import StreamOpened, StreamParser
from sixnet.core.stream.protocol import XMLStreamProtocol
from sixnet.grid.client.errors import AuthenticationError, ClientError
from sixnet.grid.client.sasl import Choice, ScramClient, ScramError, choose
from sixnet.grid.jid import JID
from sixnet.grid.scram import server_end_point
from sixnet.grid.xmpp import (
    NS_BIND,
    NS_CLIENT,
    NS_SASL,
    NS_SASL_CB,
    NS_SESSION,
    NS_STREAM_ERRORS,
    NS_STREAMS,
    NS_TLS,
    STANZA_TAGS,
    STREAM,
    element,
    serialize,
)
from sixnet.pki.store import CertificateStore, NodeIdentity, VerificationError
from sixnet.pki.tls import ClientTLS, peer_chain

if TYPE_CHECKING:
    from sixnet.grid.client.session import XMPPClientSession

log = Logger(namespace="sixnet.grid.client")

#: Largest element accepted from the server: a page of items can be big.
MAX_ELEMENT_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64


@dataclass(frozen=True)
class Login:
    """Who logs in, and how."""

    jid: JID
    store: CertificateStore
    password: str | None = None
    identity: NodeIdentity | None = None
    mechanisms: Collection[str] | None = None
    #: The name the server's certificate must carry (default: the JID's domain).
    server_name: str | None = None

    @property
    def domain(self) -> str:
        return self.jid.domain

    @property
    def expected_name(self) -> str:
        return self.server_name or self.jid.domain


def _input_name(node: etree._Element) -> str:
    tag = node.tag
    if tag in STANZA_TAGS:
        return "stanza"
    qname = etree.QName(node)
    if qname.namespace == NS_STREAMS and qname.localname in ("features", "error"):
        return qname.localname
    if qname.namespace == NS_TLS and qname.localname in ("proceed", "failure"):
        return "tls-" + qname.localname
    if qname.namespace == NS_SASL and qname.localname in ("challenge", "success", "failure"):
        return "sasl-" + qname.localname
    return "other"


ELEMENT_INPUTS = {
    "features": "got_features", "error": "got_stream_error", "tls-proceed": "got_proceed",
    "tls-failure": "got_tls_failure", "sasl-challenge": "got_challenge",
    "sasl-success": "got_success", "sasl-failure": "got_sasl_failure",
    "stanza": "got_stanza", "other": "got_other",
}


def _condition(node: etree._Element, namespace: str) -> tuple[str, str]:
    """The defined condition (first child in `namespace`, or any child) and the text."""
    condition, text = "undefined-condition", ""
    for child in node:
        if not isinstance(child.tag, str):
            continue
        qname = etree.QName(child)
        if qname.localname == "text":
            text = (child.text or "").strip()
        elif condition == "undefined-condition" and qname.namespace in (namespace, None,
                                                                         NS_SASL):
            condition = qname.localname
    return condition, text


class ClientStream(XMLStreamProtocol):
    """One connection to an XMPP server, from the first header to the bound session."""

    format = STREAM
    _machine = MethodicalMachine()

    def __init__(self, login: Login, session: XMPPClientSession, clock: IReactorTime, *,
                 direct_tls: bool, timeout: float, resource: str | None = None) -> None:
        super().__init__(StreamParser(max_element_bytes=MAX_ELEMENT_BYTES, max_depth=MAX_DEPTH),
                         clock, stall_timeout=timeout, negotiation_timeout=timeout,
                         direct_tls=direct_tls)
        self.login = login
        self.session = session
        self.direct_tls = direct_tls
        self.resource = resource
        self.tls = ClientTLS(login.store, login.identity, hostname=login.expected_name)
        self.tls_version: str | None = None
        self.channel_bindings: dict[str, bytes] = {}
        self.mechanism: str | None = None
        self.failure: ClientError | None = None
        self._scram: ScramClient | None = None
        self._session_required = False
        self._closing = False

    @property
    def state(self) -> str:
        return self._current_state()

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        return (("to", self.login.domain), ("version", "1.0"), ("xml:lang", "en"))

    # -- connection lifetime ---------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.direct_tls:
            self.go_direct()
        else:
            self.send_header()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        state = self.state
        super().connectionLost(reason)
        if self.failure is None and not self._closing:
            why = reason.getErrorMessage()
            if state == "tls-handshake":
                self.failure = ClientError(
                    f"the TLS handshake with the server failed ({why}); is its certificate "
                    f"issued by a trust anchor of the store, for {self.login.expected_name}?",
                    "tls-failed")
            else:
                self.failure = ClientError(f"the connection was lost ({why})",
                                           "connection-lost")
        self.session._lost(self.failure)

    def stream_ended(self) -> None:
        self.end()

    def send_stream_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        """Something in what the server sent, or a timer, ends the stream: say so to the
        server, and report it."""
        self._fail(ClientError(text or condition, condition), stream_error=(condition, text))

    def _fail(self, error: ClientError, stream_error: tuple[str, str] | None = None) -> None:
        if self.closed:
            return
        self.failure = error
        self.session._failed(error)
        if stream_error is not None:
            super().send_stream_error(*stream_error)
        elif self.tls_pending:
            self.abort_connection()
        else:
            self.close_stream()

    def close(self) -> None:
        """End the stream politely (the user is done)."""
        self._closing = True
        if not self.closed:
            self.close_stream()

    # -- events, classified before they reach the machine --------------------------------------

    def stream_opened(self, header: StreamOpened) -> None:
        if header.tag != f"{{{NS_STREAMS}}}stream" or header.nsmap.get(None) != NS_CLIENT:
            self._fail(ClientError("the server does not speak XMPP (not a jabber:client "
                                   "stream)", "invalid-namespace"))
            return
        version = header.attrib.get("version", "0.9")
        if version.split(".")[0] != "1":
            self._fail(ClientError(f"the server speaks XMPP version {version}, not 1.0",
                                   "unsupported-version"))

    def stream_closed(self) -> None:
        if not self._closing:
            self._fail(ClientError("the server closed the stream", "stream-closed"))
        else:
            self.close_stream()

    def element_received(self, node: etree._Element) -> None:
        getattr(self, ELEMENT_INPUTS[_input_name(node)])(node)

    def tls_established(self) -> None:
        conn = self.transport.getHandle()
        chain = peer_chain(conn)
        try:
            self.login.store.verify(chain, "server", self.login.expected_name)
        except VerificationError as e:
            self._fail(ClientError(f"the server's certificate is refused: {e}",
                                   "bad-certificate"))
            return
        self.tls_version = conn.get_protocol_version_name()
        self.channel_bindings = {"tls-server-end-point": server_end_point(chain[0])}
        if self.tls_version == "TLSv1.3":
            self.channel_bindings["tls-exporter"] = conn.export_keying_material(
                b"EXPORTER-Channel-Binding", 32, b"")
        self.tls_verified()

    # -- the machine: states -------------------------------------------------------------------

    @_machine.state(initial=True, serialized="clear")
    def clear(self) -> None:
        "Our first header is sent; the server's features are due (in the clear)."

    @_machine.state(serialized="starttls")
    def starttls(self) -> None:
        "<starttls/> sent; <proceed/> is due."

    @_machine.state(serialized="tls-handshake")
    def tls_handshake(self) -> None:
        "TLS is being negotiated; the certificate is checked when it is done."

    @_machine.state(serialized="tls-features")
    def tls_features(self) -> None:
        "TLS is up and our new header sent; the SASL features are due."

    @_machine.state(serialized="sasl")
    def sasl(self) -> None:
        "<auth/> sent; challenges, then success or failure."

    @_machine.state(serialized="bound-features")
    def bound_features(self) -> None:
        "Authenticated, new header sent; the bind feature is due."

    @_machine.state(serialized="binding")
    def binding(self) -> None:
        "The bind iq is sent."

    @_machine.state(serialized="session-iq")
    def session_iq(self) -> None:
        "The legacy session iq is sent (a server that requires it, RFC 3921)."

    @_machine.state(serialized="ready")
    def ready(self) -> None:
        "Bound: stanzas go to the session."

    @_machine.state(serialized="closed")
    def ended(self) -> None:
        "The stream is over."

    @_machine.serializer()
    def _current_state(self, state: str) -> str:
        return state

    # -- inputs ------------------------------------------------------------------------------

    @_machine.input()
    def go_direct(self) -> None:
        "Direct TLS: the handshake starts at once."

    @_machine.input()
    def got_features(self, node: etree._Element) -> None:
        "<stream:features/>."

    @_machine.input()
    def got_proceed(self, node: etree._Element) -> None:
        "<proceed/>."

    @_machine.input()
    def got_tls_failure(self, node: etree._Element) -> None:
        "STARTTLS <failure/>."

    @_machine.input()
    def got_challenge(self, node: etree._Element) -> None:
        "SASL <challenge/>."

    @_machine.input()
    def got_success(self, node: etree._Element) -> None:
        "SASL <success/>."

    @_machine.input()
    def got_sasl_failure(self, node: etree._Element) -> None:
        "SASL <failure/>."

    @_machine.input()
    def got_stanza(self, node: etree._Element) -> None:
        "An iq, message or presence."

    @_machine.input()
    def got_stream_error(self, node: etree._Element) -> None:
        "<stream:error/>: the server ends the stream."

    @_machine.input()
    def got_other(self, node: etree._Element) -> None:
        "Any other element."

    @_machine.input()
    def tls_verified(self) -> None:
        "The TLS handshake completed and the server's certificate is good."

    @_machine.input()
    def bound(self) -> None:
        "The resource is bound (and the session iq answered, if needed)."

    @_machine.input()
    def needs_session(self) -> None:
        "Bound, but the server requires the legacy session iq."

    @_machine.input()
    def end(self) -> None:
        "The connection is over."

    # -- outputs: TLS ------------------------------------------------------------------------

    @_machine.output()
    def _start_direct(self) -> None:
        self.transport.startTLS(self.tls)

    @_machine.output()
    def _ask_starttls(self, node: etree._Element) -> None:
        if node.find(f"{{{NS_TLS}}}starttls") is None:
            self._fail(ClientError("the server does not offer STARTTLS; this client never "
                                   "talks in the clear (try direct TLS)", "no-tls"))
            return
        self.send(f"<starttls xmlns='{NS_TLS}'/>".encode())

    @_machine.output()
    def _start_tls(self, node: etree._Element) -> None:
        self.start_tls(self.tls)

    @_machine.output()
    def _tls_refused(self, node: etree._Element) -> None:
        self._fail(ClientError("the server refused STARTTLS", "tls-failed"))

    @_machine.output()
    def _send_header(self) -> None:
        self.send_header()

    # -- outputs: SASL -----------------------------------------------------------------------

    @_machine.output()
    def _authenticate(self, node: etree._Element) -> None:
        mechanisms = node.find(f"{{{NS_SASL}}}mechanisms")
        offered = [(m.text or "").strip() for m in mechanisms.iterchildren(
            f"{{{NS_SASL}}}mechanism")] if mechanisms is not None else []
        cb = node.find(f"{{{NS_SASL_CB}}}sasl-channel-binding")
        advertised = None if cb is None else [
            c.get("type", "") for c in cb.iterchildren(f"{{{NS_SASL_CB}}}channel-binding")]
        login = self.login
        choice = choose(offered, tls_version=self.tls_version or "", advertised=advertised,
                        password=login.password is not None,
                        certificate=login.identity is not None, allowed=login.mechanisms)
        if choice is None:
            ours = "EXTERNAL (a certificate)" if login.identity is not None else \
                "SCRAM (a password)"
            self._fail(AuthenticationError(
                f"no SASL mechanism in common: the server offers "
                f"{', '.join(offered) or 'none'}; this login can use {ours}"
                + (f" restricted to {', '.join(login.mechanisms)}" if login.mechanisms
                   else ""), "invalid-mechanism"))
            return
        self.mechanism = choice.mechanism
        self.send(self._auth(choice))

    def _auth(self, choice: Choice) -> bytes:
        if choice.mechanism == "EXTERNAL":
            return f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>=</auth>".encode()
        assert self.login.password is not None
        self._scram = ScramClient(
            choice.mechanism, self.login.jid.local or "", self.login.password,
            binding=choice.binding, flag=choice.flag,
            binding_data=self.channel_bindings.get(choice.binding or "", b""))
        return (f"<auth xmlns='{NS_SASL}' mechanism='{choice.mechanism}'>"
                f"{_b64(self._scram.first())}</auth>").encode()

    @_machine.output()
    def _respond(self, node: etree._Element) -> None:
        scram = self._scram
        try:
            data = _unb64(node.text)
            if scram is None:
                raise ScramError("a challenge to EXTERNAL")
            if scram.final_sent:
                scram.verify(data)  # server-final in a challenge (RFC 6120 6.3.10)
                answer = b""
            else:
                answer = scram.final(data)
        except ScramError as e:
            self._abort_sasl(str(e))
            return
        self.send(f"<response xmlns='{NS_SASL}'>{_b64(answer) if answer else ''}"
                  "</response>".encode())

    def _abort_sasl(self, why: str) -> None:
        self.send(f"<abort xmlns='{NS_SASL}'/>".encode())
        self._fail(AuthenticationError(why, "server-not-trusted"))

    @_machine.output()
    def _authenticated(self, node: etree._Element) -> None:
        scram = self._scram
        if scram is not None:
            try:
                if node.text and node.text.strip() not in ("", "="):
                    scram.verify(_unb64(node.text))
                if not scram.verified:
                    raise ScramError("the server sent no signature (it has not proved it "
                                     "knows the password)")
            except ScramError as e:
                self._fail(AuthenticationError(str(e), "server-not-trusted"))
                return
        self._scram = None
        self.restart_stream()
        self.send_header()

    @_machine.output()
    def _sasl_refused(self, node: etree._Element) -> None:
        condition, text = _condition(node, NS_SASL)
        self._fail(AuthenticationError(text or _SASL_TEXTS.get(condition, condition),
                                       condition))

    # -- outputs: binding --------------------------------------------------------------------

    @_machine.output()
    def _bind(self, node: etree._Element) -> None:
        if node.find(f"{{{NS_BIND}}}bind") is None:
            self._fail(ClientError("the server offers no resource binding", "no-bind"))
            return
        session = node.find(f"{{{NS_SESSION}}}session")
        self._session_required = session is not None and \
            session.find(f"{{{NS_SESSION}}}optional") is None
        bind = element("bind", ns=NS_BIND)
        if self.resource:
            etree.SubElement(bind, f"{{{NS_BIND}}}resource").text = self.resource
        self.send(serialize(element("iq", {"type": "set", "id": "bind-1"}, children=[bind])))

    @_machine.output()
    def _bind_answer(self, node: etree._Element) -> None:
        if node.tag != f"{{{NS_CLIENT}}}iq" or node.get("id") != "bind-1":
            return  # nothing else is due yet; a server may send a ping
        if node.get("type") != "result":
            condition, text = _stanza_condition(node)
            self._fail(ClientError(f"binding a resource was refused: {condition}"
                                   + (f" ({text})" if text else ""), condition))
            return
        jid = node.findtext(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
        if not jid:
            self._fail(ClientError("the bind result has no JID", "bad-bind"))
            return
        self.session.jid = jid.strip()
        if self._session_required:
            self.send(serialize(element("iq", {"type": "set", "id": "session-1"},
                                        children=[element("session", ns=NS_SESSION)])))
            self.needs_session()
        else:
            self.bound()

    @_machine.output()
    def _session_answer(self, node: etree._Element) -> None:
        if node.tag != f"{{{NS_CLIENT}}}iq" or node.get("id") != "session-1":
            return
        if node.get("type") != "result":
            condition, text = _stanza_condition(node)
            self._fail(ClientError(f"session establishment was refused: {condition}",
                                   condition))
            return
        self.bound()

    @_machine.output()
    def _ready(self) -> None:
        self.negotiated()
        self.session._ready()

    @_machine.output()
    def _deliver(self, node: etree._Element) -> None:
        self.session._stanza(node)

    # -- outputs: ends -----------------------------------------------------------------------

    @_machine.output()
    def _server_error(self, node: etree._Element) -> None:
        condition, text = _condition(node, NS_STREAM_ERRORS)
        self._fail(ClientError(f"the server ended the stream: {condition}"
                               + (f" ({text})" if text else ""), condition))

    @_machine.output()
    def _unexpected(self, node: etree._Element) -> None:
        self._fail(ClientError(f"unexpected <{etree.QName(node).localname}/> from the server "
                               f"while in state {self.state}", "unexpected"))

    @_machine.output()
    def _ignore(self, node: etree._Element) -> None:
        log.debug("ignored <{tag}/> from the server", tag=node.tag)

    # -- transitions ---------------------------------------------------------------------------

    clear.upon(go_direct, enter=tls_handshake, outputs=[_start_direct])
    clear.upon(got_features, enter=starttls, outputs=[_ask_starttls])
    starttls.upon(got_proceed, enter=tls_handshake, outputs=[_start_tls])
    starttls.upon(got_tls_failure, enter=ended, outputs=[_tls_refused])
    tls_handshake.upon(tls_verified, enter=tls_features, outputs=[_send_header])
    tls_features.upon(got_features, enter=sasl, outputs=[_authenticate])
    sasl.upon(got_challenge, enter=sasl, outputs=[_respond])
    sasl.upon(got_success, enter=bound_features, outputs=[_authenticated])
    sasl.upon(got_sasl_failure, enter=ended, outputs=[_sasl_refused])
    bound_features.upon(got_features, enter=binding, outputs=[_bind])
    binding.upon(got_stanza, enter=binding, outputs=[_bind_answer])
    binding.upon(bound, enter=ready, outputs=[_ready])
    binding.upon(needs_session, enter=session_iq, outputs=[])
    session_iq.upon(got_stanza, enter=session_iq, outputs=[_session_answer])
    session_iq.upon(bound, enter=ready, outputs=[_ready])
    ready.upon(got_stanza, enter=ready, outputs=[_deliver])
    ready.upon(got_other, enter=ready, outputs=[_ignore])

    _elements = (got_features, got_proceed, got_tls_failure, got_challenge, got_success,
                 got_sasl_failure, got_stanza, got_other)
    _accepted = {clear: (got_features,), starttls: (got_proceed, got_tls_failure),
                 tls_handshake: (), tls_features: (got_features,),
                 sasl: (got_challenge, got_success, got_sasl_failure),
                 bound_features: (got_features,), binding: (got_stanza,),
                 session_iq: (got_stanza,), ready: (got_stanza, got_other)}
    for _state, _inputs in _accepted.items():
        _state.upon(got_stream_error, enter=ended, outputs=[_server_error])
        _state.upon(end, enter=ended, outputs=[])
        for _input in _elements:
            if _input not in _inputs:
                _state.upon(_input, enter=ended, outputs=[_unexpected])
    for _input in (*_elements, got_stream_error, go_direct, tls_verified, bound,
                   needs_session, end):
        ended.upon(_input, enter=ended, outputs=[])
    del _state, _inputs, _input, _elements, _accepted


#: What a SASL condition means for the person logging in, when the server says no more.
_SASL_TEXTS = {
    "not-authorized": "wrong user name or password, or the certificate was refused",
    "account-disabled": "the account is locked or disabled",
    "credentials-expired": "the credentials have expired",
    "encryption-required": "the mechanism needs encryption",
    "invalid-mechanism": "the server does not support that mechanism",
    "temporary-auth-failure": "the server cannot authenticate now; try again later",
}


def _stanza_condition(stanza: etree._Element) -> tuple[str, str]:
    error = stanza.find(f"{{{NS_CLIENT}}}error")
    if error is None:
        return "undefined-condition", ""
    return _condition(error, "urn:ietf:params:xml:ns:xmpp-stanzas")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else "="


def _unb64(text: str | None) -> bytes:
    text = (text or "").strip()
    if text in ("", "="):
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError("the server sent bad base64") from None

