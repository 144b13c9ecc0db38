"""The grid service: the XMPP server's ports, storage, router and components, and their lifetime.

Start: the database schema is brought up to date, components are attached, then the ports
listen (STARTTLS on ``[grid] listen``, direct TLS on ``[grid] listen_tls``). Stop: every stream
gets the system-shutdown stream error, sessions end (unacknowledged messages go to offline
storage), components finish their work, then storage closes.

In component mode (``[grid] mode = "component"``) nothing listens: the broker is attached to
a `sixnet.grid.external.HostRouter` and reaches its platforms through another XMPP server's
component port (XEP-0114), kept connected by a reconnecting client service.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from sixnet.core.audit import AuditLog
from sixnet.core.errors import ConfigError
from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.lockout import LockoutPolicy
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.core.runtime import ListeningService, report_failure
from sixnet.core.storage.database import Database
from sixnet.grid.client.errors import ClientError
from sixnet.grid.config import GridSettings
from sixnet.grid.external import HostRouter, component_service
from sixnet.grid.jid import parse_jid
from sixnet.grid.local import LocalSession
from sixnet.grid.metrics import GridCounters, register_gauges
from sixnet.grid.pubsub.component import PubSubBroker
from sixnet.grid.router import Router
from sixnet.grid.sasl import SaslPolicy
from sixnet.grid.storage.accounts import AccountStore, LockoutStore
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.storage.presence import PresenceBoard
from sixnet.grid.storage.revocations import RevocationStore, RevocationWatch
from sixnet.grid.storage.schema import prepare_broker, prepare_grid
from sixnet.grid.stream import C2SServer, ClientStreamFactory, Limits
from sixnet.pki.store import CertificateStore, VerificationError, certificate_facts
from sixnet.pki.tls import ServerTLS

log = Logger(namespace="sixnet.grid")

AUDIT_FILE = "grid-audit.jsonl"
FAKE_SALT_KEY_FILE = "grid-secret"
#: Seconds between checks whether the CRLs changed (the check itself is one comparison).
REVOCATION_CHECK_INTERVAL = 1.0
#: Seconds between sweeps that free the parsers of streams gone quiet: a stream silent for
#: one to two intervals gives its parser back (see `C2SServer.release_parsers`).
PARSER_RELEASE_INTERVAL = 2.0
#: Seconds streams get to flush their closing stream error when the service stops.
STOP_GRACE = 2.0


def load_secret(state_dir: Path) -> bytes:
    """A per-installation secret (fake SCRAM salts for unknown accounts stay stable)."""
    path = state_dir / FAKE_SALT_KEY_FILE
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    data = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data


class GridService(MultiService):
    """Owns the grid's listening ports, its database, its router and its components."""

    def __init__(self, config: GridSettings, store: CertificateStore,
                 clock: IReactorTime | None = None, *, events: IEventSink | None = None,
                 metrics: MetricsRegistry | None = None) -> None:
        super().__init__()
        self.events: IEventSink = events if events is not None else EventBus()
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        self.counters = GridCounters(self.metrics)
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        grid = config.grid
        state_dir = config.sixnet.state_dir
        self.setName("grid")
        self.config = config
        self.clock = clock
        identity = store.identity(grid.identity)
        self.tls = ServerTLS(store, identity, "requested")
        self.db = Database(grid.database, base=state_dir)
        self.accounts = AccountStore(self.db, grid.scram_iterations)
        self.offline = OfflineStore(self.db, grid.offline_max_messages)
        self.router = Router(grid.domain, self.offline, clock)
        self.audit = AuditLog(state_dir / AUDIT_FILE)
        self.lockout = LockoutStore(self.db, LockoutPolicy(grid.lockout_after,
                                                           grid.lockout_seconds),
                                    clock=clock.seconds)
        self.revocations = RevocationWatch(RevocationStore(self.db), clock,
                                           self.platform_revoked, self.platform_restored)
        sasl = SaslPolicy(grid.domain, self.accounts, store, self.lockout, self.audit, clock,
                          load_secret(state_dir), grid.scram_iterations,
                          grid.failure_delay, grid.allow_plain, self.revocations.revoked,
                          counters=self.counters, events=self.events)
        limits = Limits(
            max_stanza_bytes=grid.max_stanza_bytes,
            stanzas_per_second=grid.stanzas_per_second, stanza_burst=grid.stanza_burst,
            max_connections_per_address=grid.max_connections_per_address,
            max_unauthenticated_per_address=grid.max_unauthenticated_per_address,
            max_sessions=grid.max_sessions, negotiation_timeout=grid.negotiation_timeout,
            unauthenticated_timeout=grid.unauthenticated_timeout,
            idle_timeout=grid.idle_timeout, resume_timeout=grid.resume_timeout)
        self.server = C2SServer(grid.domain, identity, self.tls, sasl, self.router, limits,
                                clock, self.counters, events=self.events)
        self.starttls_port = ListeningService(
            "grid", grid.listen, ClientStreamFactory(self.server, direct_tls=False), owner=self)
        self.direct_tls_port = ListeningService(
            "grid-tls", grid.listen_tls,
            TLSMemoryBIOFactory(self.tls, False, ClientStreamFactory(self.server, True)),
            owner=self)
        self.broker = self._make_broker()
        self.host_router: HostRouter | None = None
        self.component_link: IService | None = None
        if grid.mode == "component":
            self.host_router = HostRouter(grid.domain, grid.service_name,
                                          PresenceBoard(self.broker_db, clock))
            self.component_link = self._make_link(self.host_router)
        self.offline_count = register_gauges(self)
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.store = store
        self._crl_generation = store.generation
        self._revocation_check = task.LoopingCall(self.check_revocations)
        self._revocation_check.clock = clock
        self._idle_check = task.LoopingCall(self.server.check_idle)
        self._idle_check.clock = clock
        self._parser_release = task.LoopingCall(self.server.release_parsers)
        self._parser_release.clock = clock

    def check_revocations(self) -> None:
        """When the CRLs changed, end the sessions whose client certificate is now refused
        (a platform revoked while connected must not keep its session)."""
        if self.store.generation == self._crl_generation:
            return
        self._crl_generation = self.store.generation
        for session in list(self.router.all_sessions()):
            if not session.certificate_chain:
                continue
            try:
                self.store.verify(list(session.certificate_chain), "client")
            except VerificationError as e:
                self.audit.record("session-revoked", user=session.full, reason=str(e))
                self.events.emit(SecurityEvent(
                    "grid.platform-revoked", subject=session.bare,
                    source=getattr(session.connection, "address", None),
                    detail=f"session {session.full} ended: client certificate refused ({e.check})",
                    facts={"check": e.check, **certificate_facts(session.certificate_chain[0])},
                    time=self.clock.seconds()))
                self.router.revoke_session(session, f"client certificate refused: {e}")

    @property
    def pubsub_service(self) -> str:
        """The broker's JID (``<subdomain>.<domain>``)."""
        return self.broker.domain

    def local_session(self, localpart: str) -> defer.Deferred[LocalSession]:
        """A platform session ``localpart@<domain>`` inside this process (the bridge's local
        target); refused while that platform is revoked, as its login would be."""

        async def bind() -> LocalSession:
            await self.ready
            if self.host_router is not None:
                raise ClientError("component mode: platforms are on the host server; use "
                                  "the bridge's remote target", "service-unavailable")
            jid = parse_jid(f"{localpart}@{self.config.grid.domain}")
            if str(jid) in self.revocations.revoked:
                raise ClientError(f"{jid} is revoked", "not-authorized")
            session = LocalSession(self.router, jid, self.clock)
            self.audit.record("local-session", user=session.jid)
            return session

        return defer.Deferred.fromCoroutine(bind())

    def platform_revoked(self, jid: str) -> None:
        """`sixnet grid revoke` (read from the database): end the platform's sessions, remove
        its subscriptions and affiliations; SASL refuses it from now on."""
        self.audit.record("platform-revoked", user=jid)
        sessions = self.router.sessions_of(jid)
        self.events.emit(SecurityEvent(
            "grid.platform-revoked", subject=jid, detail=f"{jid} revoked by the operator; "
            f"{len(sessions)} sessions ended", facts={"by": "operator",
                                                     "sessions": str(len(sessions))},
            time=self.clock.seconds()))
        for session in sessions:
            self.audit.record("session-revoked", user=session.full, reason="platform revoked")
            self.router.revoke_session(session, "this platform's access has been revoked",
                                       "policy-violation")
        self.broker.revoke(jid)

    def platform_restored(self, jid: str) -> None:
        """`sixnet grid revoke --undo`: the platform may log in again."""
        self.audit.record("platform-unrevoked", user=jid)
        self.broker.restore(jid)

    def _make_broker(self) -> PubSubBroker:
        grid = self.config.grid
        state_dir = self.config.sixnet.state_dir
        self.broker_db = Database(grid.broker.database, base=state_dir)
        broker = grid.broker
        if grid.mode == "component":  # the broker's JID is the component's name
            broker = dataclasses.replace(
                broker, subdomain=grid.service_name[:-len(grid.domain) - 1])
        try:
            return PubSubBroker(broker, grid.domain, self.broker_db,
                                state_dir / grid.broker.audit_log, self.revocations.store,
                                events=self.events)
        except ConfigError as e:
            # The broker checks keys together but knows only its section: name the file.
            self.broker_db.close()
            self.db.close()
            raise ConfigError(str(self.config.path), f"grid.broker.{e.key}", e.problem) from None

    def _make_link(self, router: HostRouter) -> IService:
        from twisted.internet import reactor
        from twisted.internet.endpoints import HostnameEndpoint

        grid = self.config.grid
        path = grid.component_secret_file
        assert path is not None  # GridConfig.problem() said so
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            self._close_storage()
            raise ConfigError(str(self.config.path), "grid.component_secret_file",
                              f"cannot read {path} ({getattr(e, 'strerror', None) or e})"
                              ) from None
        if not secret:
            self._close_storage()
            raise ConfigError(str(self.config.path), "grid.component_secret_file",
                              f"{path} is empty")
        host, _, port = grid.component_host.rpartition(":")
        endpoint = HostnameEndpoint(reactor, host.strip("[]"), int(port))
        return component_service(router, endpoint, secret, self.clock)

    def _close_storage(self) -> None:
        self.broker_db.close()
        self.db.close()

    def startService(self) -> None:
        # The ports listen only once the schema is ready, so no login meets a missing table.
        self.running = 1
        defer.Deferred.fromCoroutine(self._start()).addErrback(self._failed)

    async def _start(self) -> None:
        await prepare_grid(self.db)
        # Before the revoked set is read: an old broker database's revocations move in.
        await prepare_broker(self.broker_db, self.revocations.store)
        # Attaching reads the revoked platforms too.
        if self.host_router is not None:
            await self.host_router.open()
            self.host_router.attach(self.broker)
        else:
            self.router.attach_component(self.broker)
        await self.revocations.start()
        if self.host_router is None:  # messages other grid processes stored for our sessions
            await self.offline.watch(self.router.relay_offline)
        self.offline_count.refresh()
        for jid in self.revocations.revoked:  # revoked while the broker was reading
            self.broker.revoke(jid)
        if self.component_link is not None:
            self.component_link.setServiceParent(self)
        else:
            for port in (self.starttls_port, self.direct_tls_port):
                port.setServiceParent(self)
        self._revocation_check.start(REVOCATION_CHECK_INTERVAL, now=False)
        self._idle_check.start(self.config.grid.idle_timeout / 4, now=False)
        self._parser_release.start(PARSER_RELEASE_INTERVAL, now=False)
        self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        self.ready.errback(failure)
        report_failure(self, f"grid: cannot start: {failure.getErrorMessage()}")

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.server.stopping = True
        for check in (self._revocation_check, self._idle_check, self._parser_release):
            if check.running:
                check.stop()
        if self.host_router is not None:  # answers in flight reach the host first
            await self.broker.idle()
            self.host_router.close()
        await super().stopService()
        await self.revocations.stop()
        streams = list(self.server.connections)
        for stream in streams:
            stream.close_with_error("system-shutdown", "the server is stopping")
        closing = defer.DeferredList([s.lost for s in streams])
        closing.addTimeout(STOP_GRACE, self.clock)
        try:
            await closing
        except defer.TimeoutError:
            for stream in list(self.server.connections):
                stream.transport.abortConnection()
        for session in list(self.router.all_sessions()):
            self.router.end_session(session)
        for session in list(self.router.resumable.values()):
            self.router.end_session(session)
        await self.router.drain()
        await self.broker.stop()
        if self.host_router is not None:  # its claims released before the database closes
            await self.host_router.stop()
        self.broker_db.close()
        self.db.close()
        self.audit.close()


def make_service(config: GridSettings, store: CertificateStore, *,
                 events: IEventSink | None = None,
                 metrics: MetricsRegistry | None = None) -> IService:
    return GridService(config, store, events=events, metrics=metrics)
