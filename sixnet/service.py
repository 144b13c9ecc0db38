"""The process: one reactor, one certificate store, one child service per enabled section."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Iterable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from sixnet import __version__
from sixnet.config import SERVICES, Config
from sixnet.errors import ConfigError
from sixnet.pki.keys import KeyFileError
from sixnet.pki.store import CertificateStore, NodeIdentity

log = Logger(namespace="sixnet")

#: Where each service's builder lives: ``make_service(config, store) -> IService``.
#: A service whose module is absent is not built yet.
BUILDERS = {name: f"sixnet.{name}.service" for name in SERVICES}


class NotBuilt(Exception):
    """The service's own issue has not landed yet."""


def stop_failed(reactor: Any, message: str) -> None:
    """A service cannot run: log why, stop every service, and leave with exit status 1."""
    log.critical("{message}", message=message)
    if getattr(reactor, "running", False):
        reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        reactor.stop()


class ListeningService(Service):
    """Listens with one protocol factory on every endpoint string of a service's section.

    Stopping closes every port before the service reports it has stopped.
    """

    def __init__(self, name: str, endpoint_strings: Iterable[str],
                 factory: IProtocolFactory) -> None:
        self.setName(name)
        self.endpoint_strings = list(endpoint_strings)
        self.factory = factory
        self.ports: list[IListeningPort] = []
        self._listened = False

    def privilegedStartService(self) -> None:  # noqa: N802 - Twisted's name
        """Bind every port before twistd daemonizes or sheds privileges.

        A port that cannot be had (in use, no permission) then stops the process with one
        line on standard error and exit status 1, instead of a daemon that runs without
        listening. A service that starts listening later (after opening its database) gets
        a critical log line, and the process stops with exit status 1.
        """
        from twisted.internet import reactor

        super().privilegedStartService()
        self._listen(fatal=not reactor.running)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        if not self._listened:  # started directly (tests, an embedding program)
            self._listen(fatal=False)

    def _listen(self, *, fatal: bool) -> None:
        from twisted.internet import reactor

        self._listened = True
        refused: list[str] = []
        for description in self.endpoint_strings:
            endpoint = endpoints.serverFromString(reactor, description)
            d = endpoint.listen(self.factory)
            d.addCallback(self._listening, description)
            d.addErrback(self._failed, description, refused if fatal else None)
        if refused:
            raise SystemExit(f"sixnet: {refused[0]}")

    def _listening(self, port: IListeningPort, description: str) -> None:
        self.ports.append(port)
        log.info("{service} listening on {endpoint}", service=self.name, endpoint=description)

    def _failed(self, failure: Any, description: str, refused: list[str] | None) -> None:
        from twisted.internet import reactor

        message = f"{self.name}: cannot listen on {description}: {failure.getErrorMessage()}"
        if refused is not None:
            refused.append(message)  # raised by _listen once every endpoint was tried
            return
        stop_failed(reactor, message)

    def stopService(self) -> defer.Deferred[object]:  # noqa: N802
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SixnetService(MultiService):
    """The root service: holds the shared certificate store; children are the services.

    SIGTERM and SIGINT stop the reactor the ordinary way, so every child's stopService runs
    (ports closed, storage flushed) and twistd exits with status 0.
    """

    def __init__(self, config: Config, store: CertificateStore) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self._previous_handlers: dict[int, Any] = {}
        # CRLs change under a running process (sixnet pki revoke, a CA's cron job): look.
        TimerService(config.pki.crl_refresh, self.refresh_crls).setServiceParent(self)

    def refresh_crls(self) -> None:
        try:
            if self.store.refresh_crls():
                log.info("CRLs reloaded: {count} issuer(s)", count=len(self.store.crls()))
        except (OSError, ValueError) as e:
            log.error("CRLs not reloaded, keeping the previous ones: {error}", error=e)

    def startService(self) -> None:  # noqa: N802
        from twisted.internet import reactor

        # twistd starts services before the reactor runs and installs its own handlers, which
        # would make the process exit "killed by SIGTERM": ours go in now (for a signal that
        # arrives during start-up) and again once the reactor has installed its own.
        self._handle_stop_signals()
        reactor.callWhenRunning(self._running)
        super().startService()

    def _running(self) -> None:
        if not self.running:  # stopped before the reactor got going
            return
        self._handle_stop_signals()
        log.info("sixnet {version} started: {services}", version=__version__,
                 services=", ".join(s.name for s in self
                                    if not isinstance(s, TimerService)) or "no services")

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        # Give the signals back (the process may go on: tests, an embedding program).
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        return super().stopService()

    def _handle_stop_signals(self) -> None:
        from twisted.internet import reactor

        if not self._previous_handlers:
            self._previous_handlers = {s: signal.getsignal(s) for s in _HANDLED_SIGNALS}

        def stop(signum: int, frame: object) -> None:
            log.info("signal {signal}: stopping", signal=signal.Signals(signum).name)
            reactor.callFromThread(reactor.stop)

        def reload(signum: int, frame: object) -> None:
            reactor.callFromThread(self.refresh_crls)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)


def build_store(config: Config) -> CertificateStore:
    """The certificate store described by the ``[pki]`` section."""
    identities = []
    for name, ident in config.pki.identities.items():
        try:
            identities.append(NodeIdentity.load(name, ident.certificate, ident.key))
        except KeyFileError as e:
            raise ConfigError(str(config.path), f"pki.identities.{name}", str(e)) from None
    try:
        return CertificateStore.from_files(config.pki.trust_anchors, config.pki.crls,
                                           identities)
    except (KeyFileError, ValueError) as e:
        raise ConfigError(str(config.path), "pki", str(e)) from None


def make_root(config: Config, only: str | None = None) -> tuple[SixnetService, list[str]]:
    """Build the root service with the enabled services (or just `only`).

    Returns the root and one line for each enabled service that is not built yet.
    """
    store = build_store(config)
    root = SixnetService(config, store)
    notes = []
    names = [only] if only else [n for n in SERVICES if config.service(n).enabled]
    for name in names:
        try:
            child = build_service(name, config, store)
        except NotBuilt:
            notes.append(f"{name}: the {name} service is not built yet; it does not listen")
            continue
        child = IService(child)
        if child.name is None:
            child.setName(name)
        child.setServiceParent(root)
    return root, notes


def build_service(name: str, config: Config, store: CertificateStore) -> IService:
    try:
        module = importlib.import_module(BUILDERS[name])
    except ModuleNotFoundError as e:
        if e.name != BUILDERS[name]:
            raise
        raise NotBuilt(name) from None
    return module.make_service(config, store)
