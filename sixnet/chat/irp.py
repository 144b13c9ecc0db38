"""`IPeerDirectory` over the IRP registry (``sixnet.irp.client``).

One authenticated connection, made when first needed and kept from then on by Twisted's
`ClientService`, which makes it again with `backoffPolicy` when it drops or cannot be made.
Watches live only as long as their connection: on every new connection each person still
watched is watched again and their current record is passed on, so a move that happened
while the connection was down is not missed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.chat.directory import IPeerDirectory, PeerAddress, PeerRecord, Watcher
from sixnet.irp.client import IRPClient, IRPConnectionError, IRPError, PersonRecord, connect
from sixnet.pki.store import CertificateStore, NodeIdentity

log = Logger(namespace="sixnet.chat")


def peer_record(record: PersonRecord) -> PeerRecord:
    """The registry's answer as the agent needs it: addresses most recent first, the chain."""
    chain = record.certificate.chain if record.certificate is not None else ()
    return PeerRecord(record.person, tuple(PeerAddress(ip, port)
                                           for ip, port, _ in record.addresses), chain)


class _SessionTransport:
    """The registry connection's transport as `ClientService` uses it: to close it."""

    def __init__(self, client: IRPClient) -> None:
        self.client = client

    def loseConnection(self) -> None:
        self.client.close()


class RegistrySession(Protocol):
    """One connection to the registry, as `ClientService` holds it; `client` speaks IRP."""

    transport: _SessionTransport

    @property
    def client(self) -> IRPClient:
        return self.transport.client


def _ended(error: IRPConnectionError, protocol: Protocol) -> IRPConnectionError:
    protocol.connectionLost(Failure(error))
    return error


@implementer(IStreamClientEndpoint)
class RegistryEndpoint:
    """Connecting is `sixnet.irp.client.connect` (TCP, STARTTLS, the session): the connection
    counts as made when the registry has said who we are, and as lost when the session ends."""

    def __init__(self, host: str, port: int, store: CertificateStore, identity: NodeIdentity,
                 server_name: str, reactor: Any, timeout: float) -> None:
        self.host, self.port = host, port
        self.store = store
        self.identity = identity
        self.server_name = server_name
        self.reactor = reactor
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<IRP registry {self.host}:{self.port}>"

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Protocol]:
        cancelled = False

        def cancel(_: defer.Deferred[Protocol]) -> None:
            nonlocal cancelled  # connect() cannot stop halfway: close what it makes
            cancelled = True

        made: defer.Deferred[Protocol] = defer.Deferred(cancel)

        def connected(client: IRPClient) -> None:
            if cancelled:
                client.close()
                return
            protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
            assert protocol is not None
            protocol.makeConnection(_SessionTransport(client))  # type: ignore[arg-type]
            client.lost.addCallback(_ended, protocol)
            made.callback(protocol)  # type: ignore[arg-type]

        def failed(failure: Failure) -> None:
            if not cancelled:
                made.errback(failure)

        attempt = connect(self.host, self.port, self.store, identity=self.identity,
                          server_name=self.server_name, reactor=self.reactor,
                          timeout=self.timeout)
        attempt.addCallbacks(connected, failed)
        return made


@implementer(IPeerDirectory)
class IRPDirectory:
    """This agent's connection to its IRP registry."""

    def __init__(self, host: str, port: int, store: CertificateStore, identity: NodeIdentity,
                 *, server_name: str, device: str = "chat", reactor: Any = None,
                 timeout: float = 10.0, retry_max: float = 60.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.host, self.port = host, port
        self.server_name = server_name
        self.device = device
        self.connection = ClientService(
            RegistryEndpoint(host, port, store, identity, server_name, reactor, timeout),
            Factory.forProtocol(RegistrySession),
            retryPolicy=backoffPolicy(maxDelay=retry_max, factor=2.0), clock=reactor,
            prepareConnection=self._connected)
        self._client: IRPClient | None = None
        self._watchers: dict[str, list[Watcher]] = {}
        self._closed = False

    # -- the connection ------------------------------------------------------------------------

    def client(self) -> defer.Deferred[IRPClient]:
        """The live connection; else the next one, failing if that attempt fails."""
        if self._closed:
            return defer.fail(IRPConnectionError("the directory is closed"))
        if self._client is not None:
            return defer.succeed(self._client)
        if not self.connection.running:
            self.connection.startService()
        d = self.connection.whenConnected(failAfterFailures=1)
        d.addErrback(self._not_connected)
        return d.addCallback(lambda session: session.client)

    @staticmethod
    def _not_connected(failure: Failure) -> None:
        failure.trap(defer.CancelledError)
        raise IRPConnectionError("the directory is closed")

    def _connected(self, session: RegistrySession) -> None:
        """Each new connection: remember it, watch again everyone still watched."""
        client = self._client = session.client
        client.lost.addCallback(self._lost, client)
        log.info("connected to the IRP registry {host}:{port} as {user}", host=self.host,
                 port=self.port, user=client.user)
        for user in list(self._watchers):
            self._start_watch(client, user)

    def _lost(self, error: IRPConnectionError, client: IRPClient) -> IRPConnectionError:
        if self._client is client:
            self._client = None
            if not self._closed:
                log.warn("lost the IRP registry: {error}", error=error)
        return error

    @classmethod
    def from_config(cls, config: Any, identity: NodeIdentity,
                    store: CertificateStore) -> IRPDirectory:
        chat = config.chat
        server = PeerAddress.parse(chat.irp_server)
        return cls(server.host, server.port, store, identity,
                   server_name=chat.irp_server_name or server.host, device=chat.device,
                   timeout=chat.connect_timeout)

    def close(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the connection; fires when it is closed."""
        self._closed = True
        self._client = None
        if not self.connection.running:
            return defer.succeed(None)
        return self.connection.stopService()

    # -- IPeerDirectory -----------------------------------------------------------------------

    async def _announce(self, addresses: Sequence[PeerAddress], lifetime: float) -> None:
        client = await self.client()
        await client.register([(a.host, a.port) for a in addresses], device=self.device,
                              lifetime=max(1, int(lifetime)))

    def announce(self, addresses: Sequence[PeerAddress], lifetime: float) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._announce(addresses, lifetime))

    async def _lookup(self, user_id: str) -> PeerRecord | None:
        client = await self.client()
        try:
            record = await client.lookup(user_id)
        except IRPError as e:
            if e.condition == "item-not-found":
                return None
            raise
        return peer_record(record)

    def lookup(self, user_id: str) -> defer.Deferred[PeerRecord | None]:
        return defer.Deferred.fromCoroutine(self._lookup(user_id))

    async def _certificate_status(self, user_id: str,
                                  certificate: x509.Certificate) -> str | None:
        client = await self.client()
        try:
            known = await client.certificates(serial=format(certificate.serial_number, "X"))
        except IRPError as e:
            if e.condition != "item-not-found":
                raise
            known = []
        for info in known:  # the serial of the registry's CA: check it is this certificate
            if info.certificate == certificate:
                return info.status
        try:  # not this certificate: does the registry publish others for the person?
            published = await client.certificates(user=user_id)
        except IRPError as e:
            if e.condition == "item-not-found":
                return None
            raise
        return "unknown" if published else None

    def certificate_status(self, user_id: str,
                           certificate: x509.Certificate) -> defer.Deferred[str | None]:
        """The registry's ``certificates serial=...`` answer for this exact certificate; when
        it has none, ``unknown`` if the registry publishes other certificates for the person."""
        return defer.Deferred.fromCoroutine(self._certificate_status(user_id, certificate))

    def watch(self, user_id: str, watcher: Watcher) -> Callable[[], None]:
        watchers = self._watchers.setdefault(user_id, [])
        watchers.append(watcher)
        if len(watchers) == 1:
            if self._client is not None:
                self._start_watch(self._client, user_id)
            else:  # the next connection watches everyone (`_connected`)
                self.client().addErrback(lambda f: log.info(
                    "cannot watch {user} yet: {error}", user=user_id, error=f.getErrorMessage()))

        def cancel() -> None:
            if watcher in watchers:
                watchers.remove(watcher)
            if not watchers and self._watchers.get(user_id) is watchers:
                del self._watchers[user_id]
                if self._client is not None:
                    self._client.unwatch(user_id).addErrback(lambda f: None)

        return cancel

    def _start_watch(self, client: IRPClient, user_id: str) -> None:
        def changed(record: PersonRecord) -> None:
            for watcher in list(self._watchers.get(user_id, ())):
                watcher(peer_record(record))

        d = client.watch(user_id, changed)
        d.addCallback(changed)  # the record now: a move while we were not watching counts
        d.addErrback(lambda f: log.info("cannot watch {user}: {error}", user=user_id,
                                        error=f.getErrorMessage()))
