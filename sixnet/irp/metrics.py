"""The registry's metrics: counters the engine increments, gauges read when scraped.

Every series is taken once when the service is built (operations are the closed set of
`sixnet.irp.wire.OPERATIONS`), so counting a request is one attribute increment.
"""

from __future__ import annotations

from collections.abc import Callable

from sixnet.core.metrics import CounterSeries, Registry
from sixnet.irp.wire import OPERATIONS


class IRPCounters:
    """The series the registry engine increments."""

    def __init__(self, registry: Registry) -> None:
        requests = registry.counter(
            "sixnet_irp_requests_total",
            "Requests answered, by operation and outcome (ok, or error: any IRP error).",
            ("operation", "outcome"))
        self.ok = {op: requests.labels(operation=op, outcome="ok") for op in OPERATIONS}
        self.error = {op: requests.labels(operation=op, outcome="error") for op in OPERATIONS}
        failures = registry.counter(
            "sixnet_irp_auth_failures_total",
            "Refused credentials: client certificates (TLS) and passwords or enrollment "
            "codes.", ("method",))
        self.certificate_refused: CounterSeries = failures.labels(method="certificate")
        self.password_refused: CounterSeries = failures.labels(method="password")
        self.lockouts = registry.counter(
            "sixnet_irp_lockouts_total",
            "User ids locked for a source network after repeated wrong passwords.").labels()


def register_gauges(registry: Registry, connections: Callable[[], int],
                    watches: Callable[[], int]) -> None:
    registry.gauge("sixnet_irp_connections", "Client connections.", read=connections)
    registry.gauge("sixnet_irp_watches", "Active watches (one per person watched on a "
                   "connection).", read=watches)
