"""`IPeerDirectory` over the IRP registry (``sixnet.irp.client``).

One authenticated connection, made when first needed and made again when it drops (with
backoff), because watches live only as long as their connection: after a reconnect every
person still watched is watched again and their current record is passed on, so a move
that happened while the connection was down is not missed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
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
        self.store = store
        self.identity = identity
        self.server_name = server_name
        self.device = device
        self.reactor = reactor
        self.timeout = timeout
        self.retry_max = retry_max
        self._client: IRPClient | None = None
        self._waiting: list[defer.Deferred[IRPClient]] | None = None
        self._watchers: dict[str, list[Watcher]] = {}
        self._reconnect: IDelayedCall | None = None
        self._backoff = 1.0
        self._closed = False

    # -- the connection ------------------------------------------------------------------------

    def client(self) -> defer.Deferred[IRPClient]:
        """The live connection, connecting (once, for every caller waiting) if needed."""
        if self._closed:
            return defer.fail(IRPConnectionError("the directory is closed"))
        if self._client is not None:
            return defer.succeed(self._client)
        waiter: defer.Deferred[IRPClient] = defer.Deferred()
        if self._waiting is None:
            self._waiting = [waiter]
            defer.Deferred.fromCoroutine(self._connect())
        else:
            self._waiting.append(waiter)
        return waiter

    async def _connect(self) -> None:
        try:
            client = await connect(self.host, self.port, self.store, identity=self.identity,
                                   server_name=self.server_name, reactor=self.reactor,
                                   timeout=self.timeout)
        except Exception as e:
            waiters, self._waiting = self._waiting or [], None
            for waiter in waiters:
                waiter.errback(e)
            self._schedule_reconnect()
            return
        waiters, self._waiting = self._waiting or [], None
        if self._closed:
            client.close()
            for waiter in waiters:
                waiter.errback(IRPConnectionError("the directory is closed"))
            return
        self._client = client
        self._backoff = 1.0
        client.lost.addCallback(self._lost, client)
        log.info("connected to the IRP registry {host}:{port} as {user}", host=self.host,
                 port=self.port, user=client.user)
        for user in list(self._watchers):
            self._start_watch(client, user)
        for waiter in waiters:
            waiter.callback(client)

    def _lost(self, error: IRPConnectionError, client: IRPClient) -> None:
        if self._client is client:
            self._client = None
            if not self._closed:
                log.warn("lost the IRP registry: {error}", error=error)
                self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        """Only watches need a standing connection; requests connect on demand."""
        if self._closed or not self._watchers:
            return
        if self._reconnect is not None and self._reconnect.active():
            return
        delay, self._backoff = self._backoff, min(self._backoff * 2, self.retry_max)
        self._reconnect = self.reactor.callLater(delay, self._reconnect_now)

    def _reconnect_now(self) -> None:
        self._reconnect = None
        self.client().addErrback(lambda f: log.info("IRP reconnect failed: {error}",
                                                    error=f.getErrorMessage()))

    @classmethod
    def from_config(cls, config: Any, identity: NodeIdentity,
                    store: CertificateStore) -> IRPDirectory:
        chat = config.chat
        server = PeerAddress.parse(chat.irp_server)
        return cls(server.host, server.port, store, identity,
                   server_name=chat.irp_server_name or server.host, device=chat.device,
                   timeout=chat.connect_timeout)

    def close(self) -> None:
        self._closed = True
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None

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

    def watch(self, user_id: str, watcher: Watcher) -> Callable[[], None]:
        watchers = self._watchers.setdefault(user_id, [])
        watchers.append(watcher)
        if len(watchers) == 1:
            d = self.client()
            d.addCallback(self._start_watch, user_id)
            d.addErrback(lambda f: log.info("cannot watch {user} yet: {error}", user=user_id,
                                            error=f.getErrorMessage()))

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
