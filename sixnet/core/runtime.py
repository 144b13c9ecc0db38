"""Running a service in the process: listening on endpoints, reporting that it cannot run.

A service that cannot run calls `report_failure`; what happens to the process then (stop every
service, exit status 1) is the composition root's policy, not the service's.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

log = Logger(namespace="sixnet")


def report_failure(service: IService, message: str) -> None:
    """`service` cannot run: log why, and hand the verdict to the nearest ancestor that has
    a ``service_failed`` policy (the composition root's root service).

    Without such an ancestor (a test, an embedding program) the critical log line is all.
    """
    log.critical("{message}", message=message)
    node: Any = service.parent
    while node is not None:
        handler = getattr(node, "service_failed", None)
        if handler is not None:
            handler(service, message)
            return
        node = getattr(node, "parent", None)


def settle_heap() -> None:
    """Keep what start-up made out of the cyclic collector's full collections (a server
    process's modules, classes and configuration live as long as it does, and each full
    collection would walk them all again). For the processes twistd and the IRP workers
    run, once the reactor is running; not for a program that embeds the services."""
    gc.collect()
    gc.freeze()


class ListeningService(Service):
    """Listens with one protocol factory on every endpoint string of a service's section.

    Stopping closes every port before the service reports it has stopped.
    """

    def __init__(self, name: str, endpoint_strings: Iterable[str],
                 factory: IProtocolFactory, owner: IService | None = None) -> None:
        self.setName(name)
        self.owner = owner  # the service that starts it, when it is not a child of one
        self.endpoint_strings = list(endpoint_strings)
        self.factory = factory
        self.ports: list[IListeningPort] = []
        self._listened = False

    def privilegedStartService(self) -> None:
        """Bind every port before twistd daemonizes or sheds privileges.

        A port that cannot be had (in use, no permission) then stops the process with one
        line on standard error and exit status 1, instead of a daemon that runs without
        listening. A service that starts listening later (after opening its database) gets
        a critical log line, and the process stops with exit status 1.
        """
        from twisted.internet import reactor

        super().privilegedStartService()
        self._listen(fatal=not reactor.running)

    def startService(self) -> None:
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
        message = f"{self.name}: cannot listen on {description}: {failure.getErrorMessage()}"
        if refused is not None:
            refused.append(message)  # raised by _listen once every endpoint was tried
            return
        report_failure(self.owner or self, message)

    def stopService(self) -> defer.Deferred[object]:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
