"""The IRP registry service: storage, the registry engine and its listening ports, together.

`make_service` reads the ``[irp]`` section; the service opens (and migrates) the database
before it listens, purges expired registrations once a minute, and on stop closes its ports,
then the database and the audit log.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.application.service import MultiService
from twisted.internet import defer, stdio, task
from twisted.logger import Logger

from sixnet.core.audit import AuditLog
from sixnet.core.errors import ConfigError
from sixnet.core.events import EventBus, EventSpool, IEventSink
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.core.runtime import ListeningService, report_failure
from sixnet.core.storage.database import Database, DatabaseURLError, parse_url
from sixnet.irp.config import IRPConfig, IRPSettings
from sixnet.irp.engine.registry import Registry
from sixnet.irp.metrics import IRPCounters, register_gauges
from sixnet.irp.protocol import IRPServerFactory
from sixnet.irp.storage import SQLRegistryStore
from sixnet.irp.wire import ResponseSigner
from sixnet.irp.workers import (
    FEED_IN,
    FEED_OUT,
    FIRST_PORT,
    AcceptShares,
    AdoptedPorts,
    VersionBoard,
    WorkerFeed,
    WorkerSupervisor,
    shares_path,
)
from sixnet.pki.ca import CAError, LabCA
from sixnet.pki.keys import KeyFileError
from sixnet.pki.store import CertificateStore, NodeIdentity
from sixnet.pki.tls import ServerTLS

log = Logger(namespace="sixnet.irp")

PURGE_INTERVAL = 60.0
#: Where the registry's commands (``sixnet irp user remove``) leave their security events,
#: under the state directory, for the running registry to emit (`EventSpool`).
EVENT_SPOOL = "irp-events"
#: Seconds between looks at the spool.
SPOOL_INTERVAL = 1.0


def host_name(identity: NodeIdentity) -> str:
    """The registry's name: the first DNS name of its certificate, else its common name."""
    cert = identity.certificate
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return names[0]
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else identity.name


class IRPService(MultiService):
    """Owns the registry's database, audit log, purge timer and listening ports."""

    def __init__(self, registry: Registry, factory: IRPServerFactory,
                 listen: list[str] | AdoptedPorts, spool: EventSpool | None = None,
                 board: VersionBoard | None = None) -> None:
        super().__init__()
        self.setName("irp")
        self.registry = registry
        self.factory = factory
        #: Its own ports, or (a worker) the main process's, adopted.
        self.listening: ListeningService | AdoptedPorts = \
            listen if isinstance(listen, AdoptedPorts) else \
            ListeningService("irp", listen, factory, owner=self)
        self.board = board
        self._purge = task.LoopingCall(self._purge_expired)
        self.spool = spool
        self._spooled = task.LoopingCall(self._deliver_spooled)
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        d = self.registry.store.open()
        d.addCallback(self._opened)
        d.addErrback(self._failed)

    def _opened(self, _: object) -> None:
        if not self.running:
            return
        self.listening.setServiceParent(self)
        self._purge.start(PURGE_INTERVAL, now=False)
        if self.spool is not None:
            self._spooled.start(SPOOL_INTERVAL, now=True)
        self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        report_failure(self, f"irp: cannot open the database: {failure.getErrorMessage()}")

    def _purge_expired(self) -> defer.Deferred[int]:
        d = self.registry.store.purge_expired(self.registry.now_ms())
        d.addErrback(lambda f: log.failure("purging expired registrations", f))
        return d

    def _deliver_spooled(self) -> None:
        assert self.spool is not None
        self.spool.deliver(self.registry.events)

    async def _stop(self) -> None:
        if self._purge.running:
            self._purge.stop()
        if self._spooled.running:
            self._spooled.stop()
        await defer.maybeDeferred(super().stopService)
        for protocol in list(self.factory.protocols):
            protocol.transport.loseConnection()
        self.registry.stop()
        self.registry.store.close()
        self.registry.audit.close()
        if self.board is not None:
            self.board.close()

    def stopService(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())


#: What a worker runs (``python -m ...``): the composition root's entry for one worker.
WORKER_MODULE = "sixnet.app.worker"
#: The workers' shared change counters (`VersionBoard`), under the state directory.
BOARD_FILE = "irp-workers.board"


def make_service(config: IRPSettings, store: CertificateStore, *,
                 events: IEventSink | None = None,
                 metrics: MetricsRegistry | None = None,
                 worker: int | None = None) -> IRPService | WorkerSupervisor:
    """Build the registry from the configuration (errors are ConfigErrors naming the key).

    With ``[irp] workers`` above 1 this is the main process's `WorkerSupervisor`, which
    runs ``python -m sixnet.app.worker CONFIG INDEX`` for each worker; that command builds
    worker `worker`'s registry here, on the sockets the main process passed it.
    """
    section = config.irp
    try:
        identity = store.identity(section.identity)
    except KeyError as e:
        raise ConfigError(str(config.path), "irp.identity", str(e.args[0])) from None
    ca = None
    if config.pki.lab_ca is not None:
        try:
            ca = LabCA.open(config.pki.lab_ca)
        except (CAError, KeyFileError) as e:
            raise ConfigError(str(config.path), "pki.lab_ca", str(e)) from None
    try:
        if section.workers > 1 and worker is None:
            return supervisor(config, events, metrics)
        return build_service(section, store, identity, config.sixnet.state_dir, ca,
                             events=events, metrics=metrics, worker=worker)
    except DatabaseURLError as e:
        raise ConfigError(str(config.path), "irp.database", str(e)) from None
    except OSError as e:  # the state directory or the audit log cannot be written
        raise ConfigError(str(config.path), "sixnet.state_dir",
                          f"{e.filename}: {e.strerror}") from None


def supervisor(config: IRPSettings, events: IEventSink | None = None,
               metrics: MetricsRegistry | None = None) -> WorkerSupervisor:
    """The main process of a registry with workers, once what a worker would refuse at
    start-up (the database setting, the state directory) has been checked here."""
    state_dir = config.sixnet.state_dir
    parse_url(config.irp.database, state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    AuditLog(state_dir / config.irp.audit_log).close()
    path = str(Path(config.path).resolve())
    return WorkerSupervisor(
        lambda index: [sys.executable, "-m", WORKER_MODULE, path, str(index)],
        config.irp.listen, config.irp.workers, state_dir / BOARD_FILE, events=events,
        metrics=metrics)


def build_service(section: IRPConfig, store: CertificateStore, identity: NodeIdentity,
                  state_dir: Path, ca: LabCA | None, reactor: Any = None, *,
                  events: IEventSink | None = None,
                  metrics: MetricsRegistry | None = None,
                  worker: int | None = None) -> IRPService:
    """The registry from its parts (what `make_service` reads from the configuration).

    `worker` (0 to ``workers - 1``): the registry is that worker of the main process that
    spawned it (`sixnet.irp.workers`).
    """
    events = events if events is not None else EventBus()
    metrics = metrics if metrics is not None else MetricsRegistry()
    db = Database(section.database, base=state_dir)
    if db.engine.shared and not section.answer_cache_shared:
        # Another registry may change a record at any moment: read it, so a registration
        # acknowledged there is visible here at once.
        section = dataclasses.replace(section, answer_cache=0)
    audit = AuditLog(state_dir / section.audit_log)
    board = None
    if worker is not None:
        board = VersionBoard(state_dir / BOARD_FILE, section.workers, worker)
    registry = Registry(SQLRegistryStore(db), store, section, audit, ca, reactor=reactor,
                        counters=IRPCounters(metrics), events=events, board=board)
    signer = ResponseSigner(identity.key, identity.certificate)
    factory = IRPServerFactory(registry, ServerTLS(store, identity, "requested"), signer,
                               host_name(identity), reactor=reactor)
    register_gauges(metrics, lambda: len(factory.protocols), lambda: len(registry.watches))
    if worker is None:
        return IRPService(registry, factory, section.listen, EventSpool(state_dir / EVENT_SPOOL))
    shares = AcceptShares(shares_path(state_dir / BOARD_FILE), section.workers, worker)
    ports = AdoptedPorts([FIRST_PORT + i for i in range(len(section.listen))], factory, shares)
    factory.on_count = ports.connections_changed
    feed = WorkerFeed(db.hear, _orphaned)
    if not db.engine.shared:
        db.relay = feed.send
    stdio.StandardIO(feed, stdin=FEED_IN, stdout=FEED_OUT)
    # Worker 0 alone delivers the commands' spooled events (each once).
    return IRPService(registry, factory, ports,
                      EventSpool(state_dir / EVENT_SPOOL) if worker == 0 else None, board)


def _orphaned() -> None:
    """The main process is gone (its end of the feed closed): this worker stops."""
    from twisted.internet import reactor

    if reactor.running:
        reactor.stop()
