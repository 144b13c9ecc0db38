"""The process: one reactor, one certificate store, one child service per enabled section.

This is the composition root: the static table of service builders, and the exit policy for
a child that cannot run (every service stops, exit status 1).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.internet import defer
from twisted.logger import Logger

from sixnet import __version__
from sixnet.app.config import SERVICES, Config
from sixnet.bridge.service import make_service as make_bridge
from sixnet.chat.service import make_service as make_chat
from sixnet.core.events import EventBus
from sixnet.core.metrics import Registry, register_process_metrics
from sixnet.core.metrics_http import metrics_service
from sixnet.grid.service import make_service as make_grid
from sixnet.irp.service import make_service as make_irp
from sixnet.pki.store import CertificateStore, store_from_config

log = Logger(namespace="sixnet")

#: Each service's builder: ``make_service(config, store, events=, metrics=) -> IService``.
BUILDERS: dict[str, Callable[..., IService]] = {
    "irp": make_irp,
    "chat": make_chat,
    "grid": make_grid,
    "bridge": make_bridge,
}
assert tuple(BUILDERS) == SERVICES
#: The services a builder is also handed, by name, when they run in this process: the
#: bridge's local target is the grid broker here.
NEEDS: dict[str, tuple[str, ...]] = {"bridge": ("grid",)}

_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SixnetService(MultiService):
    """The root service: holds what the services share (the certificate store, the security
    event bus, the metrics registry); children are the services.

    SIGTERM and SIGINT stop the reactor the ordinary way, so every child's stopService runs
    (ports closed, storage flushed) and twistd exits with status 0.
    """

    def __init__(self, config: Config, store: CertificateStore) -> None:
        super().__init__()
        self.config = config
        self.store = store
        self.events = EventBus()
        self.metrics = Registry()
        register_process_metrics(self.metrics)
        self._previous_handlers: dict[int, Any] = {}
        # CRLs change under a running process (sixnet pki revoke, a CA's cron job): look.
        TimerService(config.pki.crl_refresh, self.refresh_crls).setServiceParent(self)

    def refresh_crls(self) -> None:
        try:
            if self.store.refresh_crls():
                log.info("CRLs reloaded: {count} issuer(s)", count=len(self.store.crls()))
        except (OSError, ValueError) as e:
            log.error("CRLs not reloaded, keeping the previous ones: {error}", error=e)

    def startService(self) -> None:
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

    def service_failed(self, service: IService, message: str) -> None:
        """The exit policy: a child that cannot run stops the process with status 1."""
        from twisted.internet import reactor

        if reactor.running:
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
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


def make_root(config: Config, only: str | None = None) -> SixnetService:
    """Build the root service with the enabled services (or just `only`), and the metrics
    endpoint when ``[metrics]`` enables it."""
    store = store_from_config(config)
    root = SixnetService(config, store)
    names = [only] if only else [n for n in SERVICES if config.service(n).enabled]
    built: dict[str, IService] = {}
    for name in names:
        peers = {peer: built[peer] for peer in NEEDS.get(name, ()) if peer in built}
        child = IService(BUILDERS[name](config, store, events=root.events,
                                        metrics=root.metrics, **peers))
        if child.name is None:
            child.setName(name)
        child.setServiceParent(root)
        built[name] = child
    if config.metrics.enabled:
        metrics_service(config.metrics.listen, root.metrics).setServiceParent(root)
    return root
