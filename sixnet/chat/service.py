"""The user agent as a twistd service: ports, the control socket, IRP registration, storage.

`make_service(config, store)` builds it; `ChatService` owns the lifetime: on start it
migrates the database, listens on ``[chat] listen``, opens the control socket, resumes
delivery of queued messages and registers this agent's addresses; on stop it closes every
session cleanly, unregisters nothing (the registration simply expires) and closes storage.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger

from sixnet.chat.agent import Agent, AgentSettings
from sixnet.chat.config import ChatConfig, ChatSettings
from sixnet.chat.control import ControlFactory
from sixnet.chat.directory import IPeerDirectory, PeerAddress
from sixnet.chat.handshake import HandshakePolicy
from sixnet.chat.metrics import ChatCounters
from sixnet.chat.policy import PeerPolicy
from sixnet.chat.session import own_user_id
from sixnet.chat.store import MessageStore
from sixnet.core.errors import ConfigError
from sixnet.core.events import IEventSink
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.core.runtime import report_failure
from sixnet.core.storage.database import Database, DatabaseURLError
from sixnet.pki.store import CertificateStore, NodeIdentity

log = Logger(namespace="sixnet.chat")

_WILDCARDS = ("", "::", "0.0.0.0", "::ffff:0.0.0.0")  # noqa: S104 - recognised, not bound


def route_source(family: int, towards: str) -> str | None:
    """The local address the kernel would use to reach `towards` (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(towards, 9, family, socket.SOCK_DGRAM)
    except OSError:
        return None
    for *_, target in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(target)
            except OSError:
                continue
            host = probe.getsockname()[0]
            if host not in _WILDCARDS:
                return str(host)
    return None


def local_addresses(ports: Sequence[IListeningPort], towards: str) -> list[PeerAddress]:
    """Where this agent can be reached: each port's address, wildcards resolved by routing."""
    found: list[PeerAddress] = []
    for port in ports:
        host = port.getHost()
        addr = getattr(host, "host", None)
        if addr is None:
            continue
        if addr in _WILDCARDS:
            families = [socket.AF_INET6, socket.AF_INET] if ":" in addr else [socket.AF_INET]
            candidates = [route_source(f, towards) for f in families]
        else:
            candidates = [addr.removeprefix("::ffff:")]
        for candidate in candidates:
            if candidate:
                address = PeerAddress(candidate, host.port)
                if address not in found:
                    found.append(address)
    return found


class Registration:
    """Keeps this agent registered: at start, before the lifetime ends, when addresses change."""

    def __init__(self, directory: IPeerDirectory, addresses: Any, lifetime: float,
                 check_interval: float, clock: Any) -> None:
        self.directory = directory
        self.addresses = addresses  # () -> list[PeerAddress]
        self.lifetime = lifetime
        self.check_interval = min(check_interval, lifetime * 2 / 3)
        self.clock = clock
        self.registered: list[PeerAddress] = []
        self.registered_at = 0.0
        self._call: IDelayedCall | None = None
        self._running = False
        self._retry_delay = backoffPolicy(initialDelay=2.0, maxDelay=self.check_interval,
                                          factor=2.0)
        self._failures = 0

    def start(self) -> None:
        self._running = True
        self._tick()

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _tick(self) -> None:
        self._call = None
        current = self.addresses()
        due = self.clock.seconds() >= self.registered_at + self.lifetime * 2 / 3
        d: defer.Deferred[Any] = defer.succeed(self.check_interval)
        if current and (current != self.registered or due):
            d = defer.maybeDeferred(self.directory.announce, current, self.lifetime)
            d.addCallbacks(self._registered, self._failed, callbackArgs=(current,))
        d.addCallback(self._schedule)

    def _registered(self, _: object, addresses: list[PeerAddress]) -> float:
        log.info("registered at {addresses}", addresses=", ".join(map(str, addresses)))
        self.registered = list(addresses)
        self.registered_at = self.clock.seconds()
        self._failures = 0
        return self.check_interval

    def _failed(self, failure: Any) -> float:
        """Try again soon (the registry may be starting too), backing off to the interval."""
        delay = self._retry_delay(self._failures)
        self._failures += 1
        log.warn("IRP registration failed ({error}); again in {delay:.0f}s",
                 error=failure.getErrorMessage(), delay=delay)
        return delay

    def _schedule(self, delay: float) -> None:
        if self._running:
            self._call = self.clock.callLater(delay, self._tick)


class ChatService(MultiService):
    def __init__(self, chat: ChatConfig, identity: NodeIdentity, store: CertificateStore,
                 db: Database, directory: IPeerDirectory, control_path: Path,
                 reactor: Any = None, counters: ChatCounters | None = None, *,
                 events: IEventSink | None = None) -> None:
        super().__init__()
        self.setName("chat")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.chat = chat
        self.db = db
        self.directory = directory
        self.control_path = control_path
        settings = AgentSettings(
            handshake_timeout=chat.handshake_timeout, connect_timeout=chat.connect_timeout,
            retry_initial=chat.retry_initial, retry_max=chat.retry_max,
            max_message_bytes=chat.max_message_bytes, key_update_bytes=chat.key_update_bytes,
            max_handshakes_per_address=chat.max_handshakes_per_address,
            max_handshakes=chat.max_handshakes,
            policy=HandshakePolicy(tuple(chat.key_agreement), tuple(chat.ciphers)),
            peers=PeerPolicy.from_lists(chat.allow, chat.deny))
        self.agent = Agent(identity, store, MessageStore(db), directory, reactor, settings,
                           counters, events=events)
        self.ports: list[IListeningPort] = []
        self.control_port: IListeningPort | None = None
        self.registration = Registration(
            directory, self.advertised, chat.registration_lifetime,
            chat.address_check_interval, reactor)
        self.ready: defer.Deferred[None] = defer.Deferred()

    def advertised(self) -> list[PeerAddress]:
        if self.chat.advertise:
            return [PeerAddress.parse(a) for a in self.chat.advertise]
        return local_addresses(self.ports, PeerAddress.parse(self.chat.irp_server).host)

    def startService(self) -> None:
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> None:
        await self.agent.messages.migrate()
        for description in self.chat.listen:
            endpoint = endpoints.serverFromString(self.reactor, description)
            self.ports.append(await endpoint.listen(self.agent.factory()))
            log.info("chat listening on {endpoint}", endpoint=description)
        self.control_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        control = endpoints.UNIXServerEndpoint(self.reactor, str(self.control_path),
                                               mode=0o600, wantPID=True)
        self.control_port = await control.listen(ControlFactory(self.agent))
        os.chmod(self.control_path, 0o600)
        await self.agent.start()
        self.registration.start()

    def _failed(self, failure: Any) -> None:
        self.ready.errback(failure)
        report_failure(self, f"chat: cannot start: {failure.getErrorMessage()}")

    async def _stop(self) -> None:
        self.registration.stop()
        await self.agent.stop()
        ports, self.ports = self.ports, []
        if self.control_port is not None:
            ports.append(self.control_port)
            self.control_port = None
        for port in ports:
            await port.stopListening()
        await self.directory.close()
        self.db.close()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


def control_socket_path(config: ChatSettings) -> Path:
    path = Path(config.chat.control_socket)
    return path if path.is_absolute() else config.sixnet.state_dir / path


def make_directory(config: ChatSettings, identity: NodeIdentity,
                   store: CertificateStore) -> IPeerDirectory:
    """The IRP registry named by ``[chat] irp_server``."""
    try:
        from sixnet.chat.irp import IRPDirectory
    except ModuleNotFoundError as e:
        if e.name not in ("sixnet.chat.irp", "sixnet.irp.client"):
            raise
        raise ConfigError(str(config.path), "chat.irp_server",
                          "this build has no IRP client (sixnet.irp.client), so the agent "
                          "cannot find or announce anyone") from None
    host = PeerAddress.parse(config.chat.irp_server).host
    if not config.chat.irp_server_name and _is_ip(host):
        raise ConfigError(str(config.path), "chat.irp_server_name",
                          "must be set when irp_server is an IP address: it is the host name "
                          "the registry's certificate is checked for")
    return IRPDirectory.from_config(config, identity, store)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def make_service(config: ChatSettings, store: CertificateStore, *,
                 directory: IPeerDirectory | None = None, reactor: Any = None,
                 events: IEventSink | None = None,
                 metrics: MetricsRegistry | None = None) -> ChatService:
    chat = config.chat
    try:
        identity = store.identity(chat.identity)
    except KeyError as e:
        raise ConfigError(str(config.path), "chat.identity", str(e.args[0])) from None
    try:
        own_user_id(identity)
    except ValueError as e:  # the identity names no person, or several
        raise ConfigError(str(config.path), "chat.identity", str(e)) from None
    if directory is None:
        directory = make_directory(config, identity, store)
    try:
        db = Database(chat.database, base=config.sixnet.state_dir)
    except DatabaseURLError as e:
        raise ConfigError(str(config.path), "chat.database", str(e)) from None
    counters = ChatCounters(metrics if metrics is not None else MetricsRegistry())
    service = ChatService(chat, identity, store, db, directory, control_socket_path(config),
                          reactor, counters, events=events)
    counters.register_gauges(lambda: len(service.agent.sessions))
    return service
