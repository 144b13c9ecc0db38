"""The IRP client library: what a user agent uses to publish and find addresses.

Every method returns a Deferred (``await`` it from an ``async def``). The API::

    from sixnet.irp.client import connect, find_registry

    host, port = (await find_registry("example.test"))[0]  # DNS SRV _irp._tcp, else :4604
    client = await connect(host, port, store, identity=me, server_name="irp.example.test")
    client.user                  # who the registry says we are ("alice@example.test"), or None
    await client.register([("2001:db8::7", 4605)], device="laptop", lifetime=3600)
    record = await client.lookup("bob@example.test")
    record.addresses             # [(ip, port, device), ...], most recently registered first
    record.certificate.chain     # bob's certificate chain, leaf first
    record.certificate.status    # "valid", "revoked" or "expired"
    await client.watch("bob@example.test", on_change)   # on_change(PersonRecord); returns now
    await client.unwatch("bob@example.test")
    await client.unregister(device="laptop")
    client.close()               # client.lost fires when the connection has ended

Every result is signed by the registry; the signature is checked against the registry's
certificate from the TLS handshake (itself verified for `server_name` by the store) before
a method returns, and so is the signed statement: that it answers this request (operation,
id, person, serial) of this requester and is still valid (docs/irp.rst, "Signed data"): a
returned record did come from the registry, for this question, recently (a client's clock
is `IRPClient.clock`). Failures raise `IRPError` (its ``condition`` is the protocol's
error), `IRPConnectionError` when the connection or the TLS setup fails or the registry
ends the stream.

Enrollment (no certificate yet) uses a connection without `identity`::

    key = generate_key()
    client = await connect(host, port, store, server_name=...)
    chain = await client.enroll("alice@example.test", key, password="...")  # or code="..."

Then `renew`, `revoke`, `ca_certificates`, `certificates`, `put_backup`/`get_backup`
(PKCS#12 blobs, opaque to the registry), and for operators `list_users` and `remove`.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from automat import MethodicalMachine
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from lxml import etree
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from sixnet.core.stream.parser import StreamOpened, StreamParser
from sixnet.core.stream.protocol import XMLStreamProtocol
from sixnet.irp.wire import (
    CONDITIONS,
    NS,
    RECORD_OPERATIONS,
    RECORDS_VERSION,
    ROOT,
    STREAM,
    VERSION,
    CertificateInfo,
    IRPError,
    PersonRecord,
    answer_subject,
    b64,
    b64decode,
    check_record,
    check_statement,
    element,
    parse_serial,
    parse_user,
    q,
    read_certificate,
    read_chain,
    read_person,
    serialize,
    signed_parts,
    verify_signature,
    version_of,
)
from sixnet.pki.keys import PrivateKey
from sixnet.pki.store import CertificateStore, NodeIdentity, VerificationError
from sixnet.pki.tls import ClientTLS, peer_chain

__all__ = ["IRPClient", "IRPConnectionError", "IRPError", "PersonRecord", "connect",
           "find_registry", "make_csr"]

log = Logger(namespace="sixnet.irp")

DEFAULT_PORT = 4604
MAX_MESSAGE_BYTES = 1 << 20
#: The versions a client may ask for: 1.1 (per-request statements only) and 1.2.
CLIENT_VERSIONS = ("1.1", VERSION)


class IRPConnectionError(Exception):
    """The connection failed, TLS or the registry's certificate was refused, or it closed."""

    def __init__(self, text: str, condition: str | None = None) -> None:
        super().__init__(f"{condition}: {text}" if condition else text)
        self.condition = condition
        self.text = text


def make_csr(key: PrivateKey, user: str) -> x509.CertificateSigningRequest:
    """A CSR for `key` (the registry takes the person from the credentials, not from here)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
    digest = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, digest)  # type: ignore[arg-type]


class _ClientProtocol(XMLStreamProtocol):
    """The client side of the stream: header, STARTTLS, stream restart, then requests by id.

    The negotiation is an Automat machine (its table is at the bottom of the class); what
    the registry answers is handed to the `IRPClient`.
    """

    format = STREAM
    _machine = MethodicalMachine()

    def __init__(self, client: IRPClient, reactor: Any) -> None:
        super().__init__(StreamParser(max_element_bytes=MAX_MESSAGE_BYTES, max_depth=16),
                         reactor)
        self.client = client
        if client.version != VERSION:
            self.format = dataclasses.replace(STREAM, fixed=(("xmlns", NS),
                                                             ("version", client.version)))

    @property
    def state(self) -> str:
        return self._current_state()

    def header_attributes(self) -> Iterable[tuple[str, str | None]]:
        return (("to", self.client.server_name),)

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_header()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self.client._broken(IRPConnectionError(f"connection lost: {reason.getErrorMessage()}"))

    def stream_ended(self) -> None:
        self.end()

    def send_stream_error(self, condition: str, text: str = "", extra: bytes = b"") -> None:
        """A client does not answer the registry with stream errors: it reports why and
        closes (a stream the registry broke, data in the clear, a refused certificate)."""
        self._fail(text, condition)

    def _fail(self, text: str, condition: str | None = None) -> None:
        if self.closed:
            return
        self.client._broken(IRPConnectionError(text, condition))
        self.hang_up()

    # -- events, classified before they reach the machine --------------------------------------

    def stream_opened(self, header: StreamOpened) -> None:
        if header.tag != ROOT:
            self._fail("the server does not speak IRP")
        self.client.registry_version = version_of(header.attrib.get("version"))

    def stream_closed(self) -> None:
        self._fail("the registry closed the stream")

    def element_received(self, node: etree._Element) -> None:
        tag = node.tag
        if tag == q("stream-error"):
            self.got_stream_error(node)
        elif tag == q("features"):
            self.got_features(node)
        elif tag == q("proceed"):
            self.got_proceed(node)
        elif tag == q("session"):
            self.got_session(node)
        elif tag in (q("result"), q("error")):
            self.got_response(node)
        elif tag == q("notify"):
            self.got_notify(node)
        else:
            self.got_other(node)

    def tls_established(self) -> None:
        chain = peer_chain(self.transport.getHandle())
        try:
            verified = self.client.store.verify(chain, "server", self.client.server_name)
        except VerificationError as e:
            self._fail(f"the registry's certificate is refused: {e}")
            return
        self.client.server_certificate = verified.certificate
        self.server_verified()

    # -- the machine: states -------------------------------------------------------------------

    @_machine.state(initial=True, serialized="clear")
    def wait_features(self) -> None:
        "Our header is sent; the registry's features are due."

    @_machine.state(serialized="starttls")
    def wait_proceed(self) -> None:
        "<starttls/> sent."

    @_machine.state(serialized="handshake")
    def tls_handshake(self) -> None:
        "TLS is being negotiated; the registry's certificate is checked when it is done."

    @_machine.state(serialized="open")
    def open_stream(self) -> None:
        "The registry is verified: the session, results and notifications arrive."

    @_machine.state(serialized="closed")
    def ended(self) -> None:
        "The connection is over."

    @_machine.serializer()
    def _current_state(self, state: str) -> str:
        return state

    # -- inputs ------------------------------------------------------------------------------

    @_machine.input()
    def got_features(self, node: etree._Element) -> None:
        "<features/>."

    @_machine.input()
    def got_proceed(self, node: etree._Element) -> None:
        "<proceed/>."

    @_machine.input()
    def got_session(self, node: etree._Element) -> None:
        "<session/>: who the registry says we are."

    @_machine.input()
    def got_response(self, node: etree._Element) -> None:
        "<result/> or <error/> for a request."

    @_machine.input()
    def got_notify(self, node: etree._Element) -> None:
        "<notify/> for a watch."

    @_machine.input()
    def got_stream_error(self, node: etree._Element) -> None:
        "<stream-error/>: the registry ends the stream."

    @_machine.input()
    def got_other(self, node: etree._Element) -> None:
        "Any other element."

    @_machine.input()
    def server_verified(self) -> None:
        "The TLS handshake completed and the registry's certificate is good."

    @_machine.input()
    def end(self) -> None:
        "The connection is over."

    # -- outputs -----------------------------------------------------------------------------

    @_machine.output()
    def _ask_starttls(self, node: etree._Element) -> None:
        self.send(serialize(element("starttls")))

    @_machine.output()
    def _start_tls(self, node: etree._Element) -> None:
        if self.start_tls(self.client.tls):
            self.send_header()

    @_machine.output()
    def _deliver_session(self, node: etree._Element) -> None:
        self.client._session(node)

    @_machine.output()
    def _deliver_response(self, node: etree._Element) -> None:
        self.client._response(node)

    @_machine.output()
    def _deliver_notification(self, node: etree._Element) -> None:
        self.client._notification(node)

    @_machine.output()
    def _registry_refused(self, node: etree._Element) -> None:
        self._fail(node.text or "", node.get("condition", "undefined-condition"))

    @_machine.output()
    def _unexpected(self, node: etree._Element) -> None:
        self._fail(f"unexpected <{etree.QName(node.tag).localname}>")

    # -- transitions ---------------------------------------------------------------------------

    wait_features.upon(got_features, enter=wait_proceed, outputs=[_ask_starttls])
    wait_proceed.upon(got_proceed, enter=tls_handshake, outputs=[_start_tls])
    tls_handshake.upon(server_verified, enter=open_stream, outputs=[])
    open_stream.upon(got_session, enter=open_stream, outputs=[_deliver_session])
    open_stream.upon(got_response, enter=open_stream, outputs=[_deliver_response])
    open_stream.upon(got_notify, enter=open_stream, outputs=[_deliver_notification])
    _elements = (got_features, got_proceed, got_session, got_response, got_notify, got_other)
    for _state, _accepted in ((wait_features, got_features), (wait_proceed, got_proceed),
                              (tls_handshake, None), (open_stream, None)):
        _state.upon(got_stream_error, enter=ended, outputs=[_registry_refused])
        _state.upon(end, enter=ended, outputs=[])
        for _input in _elements:
            if _input is not _accepted and not (
                    _state is open_stream and _input in (got_session, got_response,
                                                         got_notify)):
                _state.upon(_input, enter=ended, outputs=[_unexpected])
    for _input in (*_elements, got_stream_error, server_verified, end):
        ended.upon(_input, enter=ended, outputs=[])
    del _state, _accepted, _input, _elements


class IRPClient:
    """One connection to a registry. Make it with `connect`."""

    def __init__(self, store: CertificateStore, identity: NodeIdentity | None,
                 server_name: str, version: str = VERSION) -> None:
        self.store = store
        #: The protocol version this client asks for in its stream header.
        self.version = version
        self.identity = identity
        self.server_name = server_name
        self.tls = ClientTLS(store, identity)
        self.server_certificate: x509.Certificate | None = None
        #: The person the registry authenticated us as (None: anonymous).
        self.user: str | None = None
        self.role: str = "anonymous"
        #: Why the registry refused our certificate, if it did ("revoked", "expired", ...).
        self.refused: str | None = None
        self.protocol: _ClientProtocol | None = None
        self.ready: defer.Deferred[IRPClient] = defer.Deferred()
        #: The clock a signed answer's freshness is judged by (seconds since the epoch).
        self.clock: Callable[[], float] = time.time
        self._ids = itertools.count(1)
        #: Per request id: the operation, and the Deferred for its verified ``<data>``.
        self._pending: dict[str, tuple[str, defer.Deferred[etree._Element]]] = {}
        #: Per request id: the person and serial the request named (normalized).
        self._asked: dict[str, tuple[str | None, str | None]] = {}
        self._watches: dict[str, tuple[str, Callable[[PersonRecord], object]]] = {}
        #: The version of the registry's stream (1.2 and later: lookups and watches are
        #: answered with signed records).
        self.registry_version: tuple[int, int] = (0, 0)
        #: Per person, the highest record version accepted (a later one must not be older).
        self.versions: dict[str, int] = {}
        self._closed: IRPConnectionError | None = None
        self._keepalive: task.LoopingCall | None = None
        #: Fires (with the IRPConnectionError saying why) when the connection has ended.
        self.lost: defer.Deferred[IRPConnectionError] = defer.Deferred()

    # -- plumbing -----------------------------------------------------------------------------

    def _session(self, node: etree._Element) -> None:
        self.user = node.get("user")
        self.role = node.get("role", "anonymous")
        self.refused = node.get("refused")
        if not self.ready.called:
            self.ready.callback(self)

    def _start_keepalive(self, reactor: Any, interval: float) -> None:
        def ping() -> None:
            if self._closed is None and self.protocol is not None:
                self.protocol.send(b" ")

        self._keepalive = task.LoopingCall(ping)
        self._keepalive.clock = reactor
        self._keepalive.start(interval, now=False)

    def _broken(self, error: IRPConnectionError) -> None:
        if self._closed is not None:
            return
        self._closed = error
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        if not self.ready.called:
            self.ready.errback(error)
        pending, self._pending = self._pending, {}
        self._asked.clear()
        for _, d in pending.values():
            d.errback(error)
        self.lost.callback(error)

    @property
    def agreed_version(self) -> tuple[int, int]:
        """The version both speak (the lower of the two headers')."""
        return min(self.registry_version, version_of(self.version))

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

    def _verified(self, node: etree._Element, op: str, request: str, subject: str | None,
                  serial: str | None) -> etree._Element:
        """The ``<data>`` of a result or notification, once its signature verifies and it
        is the statement answering this request of ours, still valid; for a lookup or a
        watch of a 1.2 registry, the ``<record>`` of the person asked, checked as such."""
        data, signature = signed_parts(node)
        assert self.server_certificate is not None
        if self.agreed_version >= RECORDS_VERSION and op in RECORD_OPERATIONS:
            if data.tag != q("record"):
                raise IRPError("bad-request", f"the answer to {op} is not a signed record")
            assert subject is not None
            verify_signature(data, signature, self.server_certificate)
            version = check_record(data, subject=subject, now=self._now(),
                                   seen=self.versions.get(subject))
            self.versions[subject] = version
            return data
        if data.tag != q("data"):
            raise IRPError("bad-request", f"the answer to {op} is not a signed <data>")
        verify_signature(data, signature, self.server_certificate)
        check_statement(data, op=op, request=request, requester=self.user, subject=subject,
                        serial=serial, now=datetime.datetime.fromtimestamp(self.clock(),
                                                                           datetime.UTC))
        return data

    def _response(self, node: etree._Element) -> None:
        rid = node.get("id", "")
        entry = self._pending.pop(rid, None)
        asked = self._asked.pop(rid, (None, None))
        if entry is None:
            log.warn("IRP response to no request: {id}", id=node.get("id"))
            return
        op, d = entry
        if node.tag == q("error"):
            d.errback(IRPError(_condition(node.get("condition")), node.text or ""))
            return
        try:
            data = self._verified(node, op, rid, *asked)
        except IRPError as e:
            d.errback(e)
            return
        d.callback(data)

    def _notification(self, node: etree._Element) -> None:
        try:
            data = signed_parts(node)[0]
            subject = data.get("subject", "")
            entry = self._watches.get(subject)
            if entry is None:
                raise IRPError("bad-request", f"a notification for {subject!r}, not watched")
            if data.tag == q("record") and node.get("request") != entry[0]:
                raise IRPError("bad-request", "a notification for another watch request")
            self._verified(node, "watch", entry[0], subject, None)
            person = data.find(q("person"))
            if person is None:
                raise IRPError("bad-request", "a notification without <person>")
            record = read_person(person)
            if record.person != subject:
                raise IRPError("bad-request", "a notification whose record is not its subject's")
        except IRPError as e:
            log.warn("IRP notification refused: {error}", error=e)
            return
        entry[1](record)

    def request(self, op: str, attrib: dict[str, str] | None = None,
                children: Sequence[etree._Element] = (), text: str | None = None
                ) -> defer.Deferred[etree._Element]:
        """Send one request; the Deferred fires with the verified ``<data>`` element (or,
        for a 1.2 lookup or watch, the verified ``<record>``)."""
        return self._request(op, attrib, children, text)[1]

    def _request(self, op: str, attrib: dict[str, str] | None = None,
                 children: Sequence[etree._Element] = (), text: str | None = None
                 ) -> tuple[str, defer.Deferred[etree._Element]]:
        """`request`, and the id it was sent with."""
        rid = str(next(self._ids))
        if self._closed is not None:
            return rid, defer.fail(self._closed)
        assert self.protocol is not None
        d: defer.Deferred[etree._Element] = defer.Deferred()
        self._pending[rid] = (op, d)
        self._asked[rid] = _asked(op, attrib or {}, self.user)
        self.protocol.send(serialize(element(op, {"id": rid, **(attrib or {})}, text,
                                             children)))
        return rid, d

    def close(self) -> None:
        """End the stream politely and close the connection."""
        if self.protocol is not None and self._closed is None:
            self.protocol.close_stream()

    # -- operations ---------------------------------------------------------------------------

    def register(self, addresses: Sequence[tuple[str, int]], device: str = "default",
                 lifetime: int = 3600) -> defer.Deferred[PersonRecord]:
        """Publish this device's addresses (replacing its earlier ones); returns our record."""
        children = [element("address", {"ip": ip, "port": str(port)}) for ip, port in addresses]
        d = self.request("register", {"device": device, "lifetime": str(lifetime)}, children)
        return d.addCallback(_person)

    def unregister(self, device: str | None = None) -> defer.Deferred[PersonRecord]:
        """Withdraw one device's addresses (all devices when None)."""
        return self.request("unregister", {"device": device} if device else {}).addCallback(
            _person)

    def lookup(self, user: str) -> defer.Deferred[PersonRecord]:
        return self.request("lookup", {"user": user}).addCallback(_person)

    def watch(self, user: str, callback: Callable[[PersonRecord], object]
              ) -> defer.Deferred[PersonRecord]:
        """Call `callback` with the new record whenever `user`'s record changes.

        Fires with the current record; notifications arrive until `unwatch` or close.
        """
        rid, d = self._request("watch", {"user": user})

        def started(data: etree._Element) -> PersonRecord:
            record = _person(data)
            self._watches[record.person] = (rid, callback)
            return record

        return d.addCallback(started)

    def unwatch(self, user: str) -> defer.Deferred[None]:
        d = self.request("unwatch", {"user": user})

        def stopped(data: etree._Element) -> None:
            node = data.find(q("unwatched"))
            self._watches.pop(node.get("user", "") if node is not None else user, None)

        return d.addCallback(stopped)

    def certificates(self, user: str | None = None,
                     serial: str | None = None) -> defer.Deferred[list[CertificateInfo]]:
        """Certificates (with status) of a person, newest first, or the one with `serial`."""
        attrib = {"user": user} if user is not None else {"serial": serial or ""}
        return self.request("certificates", attrib).addCallback(
            lambda data: [read_chain(c) for c in data.iter(q("chain"))])

    def ca_certificates(self) -> defer.Deferred[list[x509.Certificate]]:
        return self.request("ca-certificates").addCallback(_certificates)

    def enroll(self, user: str, key: PrivateKey, *, password: str | None = None,
               code: str | None = None) -> defer.Deferred[list[x509.Certificate]]:
        """Get a certificate for `key` as `user`, by password or one-time code; the chain."""
        children = [element("csr", text=b64(make_csr(key, user).public_bytes(
            serialization.Encoding.DER)))]
        if password is not None:
            children.append(element("password", text=password))
        if code is not None:
            children.append(element("code", text=code))
        return self.request("enroll", {"user": user}, children).addCallback(_certificates)

    def renew(self, key: PrivateKey) -> defer.Deferred[list[x509.Certificate]]:
        """A new certificate for `key`, authenticated by the current one."""
        user = self.user or "renew@localhost"
        csr = element("csr", text=b64(make_csr(key, user).public_bytes(
            serialization.Encoding.DER)))
        return self.request("renew", children=[csr]).addCallback(_certificates)

    def revoke(self, serial: str | None = None) -> defer.Deferred[str]:
        """Revoke our certificate (this connection's, unless `serial`); returns the serial."""
        d = self.request("revoke", {"serial": serial} if serial else {})
        return d.addCallback(lambda data: data.find(q("revoked")).get("serial"))

    def put_backup(self, blob: bytes) -> defer.Deferred[None]:
        """Store our PKCS#12 (passphrase-protected by the caller; opaque to the registry)."""
        return self.request("backup-put", text=b64(blob)).addCallback(lambda _: None)

    def get_backup(self, user: str | None = None,
                   password: str | None = None) -> defer.Deferred[bytes]:
        """Fetch our PKCS#12: with our certificate, or as `user` with the password."""
        attrib = {"user": user} if user else {}
        children = [element("password", text=password)] if password is not None else []
        d = self.request("backup-get", attrib, children)
        return d.addCallback(lambda data: b64decode(data.find(q("backup")).text, "backup"))

    def list_users(self, after: str | None = None, limit: int = 100
                   ) -> defer.Deferred[tuple[list[dict[str, str]], str | None]]:
        """Operators: one page of persons and the cursor for the next (None at the end)."""
        attrib = {"limit": str(limit), **({"after": after} if after else {})}

        def page(data: etree._Element) -> tuple[list[dict[str, str]], str | None]:
            more = data.find(q("more"))
            return ([dict(u.attrib) for u in data.iter(q("user"))],
                    more.get("after") if more is not None else None)

        return self.request("list-users", attrib).addCallback(page)

    def remove(self, user: str) -> defer.Deferred[None]:
        """Operators: remove a person, their records and backup; revoke their certificates."""
        return self.request("remove", {"user": user}).addCallback(lambda _: None)


def _asked(op: str, attrib: dict[str, str], requester: str | None
           ) -> tuple[str | None, str | None]:
    """The subject and serial a signed answer to this request must name, as the registry
    writes them (normalized); an argument that does not parse is the registry's to refuse."""
    try:
        user = parse_user(attrib["user"]) if "user" in attrib else None
        serial = parse_serial(attrib["serial"]) if "serial" in attrib else None
    except IRPError:
        return None, None
    return answer_subject(op, user, requester), serial


def _condition(value: str | None) -> str:
    return value if value in CONDITIONS else "internal-server-error"


def _person(data: etree._Element) -> PersonRecord:
    node = data.find(q("person"))
    if node is None:
        raise IRPError("bad-request", "the result has no <person>")
    return read_person(node)


def _certificates(data: etree._Element) -> list[x509.Certificate]:
    return [read_certificate(c) for c in data.iter(q("certificate"))]


async def _connect(host: str, port: int, store: CertificateStore,
                   identity: NodeIdentity | None, server_name: str | None,
                   reactor: Any, timeout: float, keepalive: float,
                   source: str | None, version: str) -> IRPClient:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    client = IRPClient(store, identity, server_name or host, version)
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout,
                                          bindAddress=(source, 0) if source else None)
    client.protocol = _ClientProtocol(client, reactor)
    await endpoints.connectProtocol(endpoint, client.protocol)
    timer = reactor.callLater(timeout, lambda: client._broken(IRPConnectionError(
        f"no IRP session with {host}:{port} within {timeout:g}s")))
    try:
        await client.ready
    except IRPConnectionError:
        if client.protocol.transport is not None:
            client.protocol.transport.abortConnection()
        raise
    finally:
        if timer.active():
            timer.cancel()
    if keepalive > 0:
        client._start_keepalive(reactor, keepalive)
    return client


def connect(host: str, port: int, store: CertificateStore, *,
            identity: NodeIdentity | None = None, server_name: str | None = None,
            reactor: Any = None, timeout: float = 10.0, keepalive: float = 60.0,
            source: str | None = None, version: str = VERSION) -> defer.Deferred[IRPClient]:
    """Connect, upgrade to TLS, check the registry is `server_name`; fires when ready.

    `version` is the protocol version asked for (one of `CLIENT_VERSIONS`): ``1.1`` gets
    lookups and watches as per-request statements, as from a 1.1 registry.

    A space is sent every `keepalive` seconds (0: never) so that a connection that only
    waits for watch notifications is not closed by the registry's idle timeout. With
    `source`, the connection comes from that local address.
    """
    if version not in CLIENT_VERSIONS:
        raise ValueError(f"IRP version {version!r} is not one of {', '.join(CLIENT_VERSIONS)}")
    return defer.Deferred.fromCoroutine(
        _connect(host, port, store, identity, server_name, reactor, timeout, keepalive,
                 source, version))


async def _find(domain: str, resolver: Any) -> list[tuple[str, int]]:
    from twisted.names import client as dns_client
    from twisted.names import dns, error

    resolver = resolver or dns_client
    try:
        answers, _, _ = await resolver.lookupService(f"_irp._tcp.{domain}")
    except (error.DomainError, error.DNSNameError, error.DNSServerError,
            error.DNSQueryTimeoutError, defer.TimeoutError):
        return [(domain, DEFAULT_PORT)]
    records = sorted((a.payload for a in answers if a.type == dns.SRV),
                     key=lambda r: (r.priority, -r.weight))
    if len(records) == 1 and str(records[0].target) in ("", "."):
        return []  # RFC 2782: the service is decidedly not available
    return [(str(r.target), r.port) for r in records] or [(domain, DEFAULT_PORT)]


def find_registry(domain: str, resolver: Any = None) -> defer.Deferred[list[tuple[str, int]]]:
    """Where `domain`'s registry is: DNS SRV ``_irp._tcp.<domain>`` in priority order, or
    ``(domain, 4604)`` when there is no SRV record."""
    return defer.Deferred.fromCoroutine(_find(domain, resolver))

