"""The grid's metrics: counters the streams and SASL increment, gauges read when scraped.

`GridCounters` takes every series from the registry once, when the service is built, so the
hot path (a stanza received, a login) is one attribute increment; `GridService` registers
the gauges over its live objects (`register_gauges`). Label values come from closed sets
(mechanisms we offer, the three stanza kinds), never from what a client sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sixnet.core.metrics import CounterSeries, Registry
from sixnet.grid.xmpp import NS_CLIENT

if TYPE_CHECKING:
    from sixnet.grid.service import GridService

log = Logger(namespace="sixnet.grid")

#: Mechanism label values; anything else a client asks for is counted as "other".
MECHANISMS = ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1",
              "EXTERNAL", "PLAIN", "other")
STANZA_KINDS = ("message", "presence", "iq")
#: Seconds a count of stored offline messages is reused before the table is counted again.
OFFLINE_REFRESH = 30.0


class GridCounters:
    """The series the grid's streams and SASL increment."""

    def __init__(self, registry: Registry) -> None:
        logins = registry.counter(
            "sixnet_grid_logins_total", "SASL logins, by mechanism and outcome.",
            ("mechanism", "outcome"))
        self.login_success = {m: logins.labels(mechanism=m, outcome="success")
                              for m in MECHANISMS}
        self.login_failure = {m: logins.labels(mechanism=m, outcome="failure")
                              for m in MECHANISMS}
        self.lockouts = registry.counter(
            "sixnet_grid_lockouts_total",
            "Password accounts locked for a source network after repeated failures.").labels()
        received = registry.counter(
            "sixnet_grid_stanzas_received_total",
            "Stanzas received from client sessions, by kind.", ("kind",))
        #: By element tag, as the stream has it (one dictionary lookup per stanza).
        self.received: dict[str, CounterSeries] = {
            f"{{{NS_CLIENT}}}{kind}": received.labels(kind=kind) for kind in STANZA_KINDS}
        self.rate_limited = registry.counter(
            "sixnet_grid_stanza_rate_limited_total",
            "Streams closed for sending more stanzas than stanzas_per_second allows.").labels()

    def login(self, mechanism: str | None, ok: bool) -> None:
        series = self.login_success if ok else self.login_failure
        series.get(mechanism or "other", series["other"]).inc()


class CachedCount:
    """Numbers read by a query at most every `interval` seconds, in the background: a
    scrape never waits for the database, and never makes a query of its own."""

    def __init__(self, query: Callable[[], defer.Deferred[tuple[int, ...]]],
                 clock: IReactorTime, interval: float, size: int) -> None:
        self.query = query
        self.clock = clock
        self.interval = interval
        self.values: tuple[int, ...] = (0,) * size
        self._read_at: float | None = None
        self._reading = False

    def refresh(self) -> None:
        if self._reading:
            return
        self._reading = True
        self._read_at = self.clock.seconds()
        d = self.query()
        d.addCallback(self._got)
        d.addErrback(lambda f: log.failure("counting offline messages", f))
        d.addBoth(self._done)

    def _got(self, values: tuple[int, ...]) -> None:
        self.values = values

    def _done(self, _: object) -> None:
        self._reading = False

    def get(self, index: int) -> float:
        if self._read_at is None or self.clock.seconds() - self._read_at >= self.interval:
            self.refresh()
        return self.values[index]


def register_gauges(service: GridService) -> CachedCount:
    """The gauges and read counters over the service's live objects; returns the cached
    offline count (the service refreshes it once its database is ready)."""
    registry = service.metrics
    server, router = service.server, service.router
    delivery = service.broker.delivery
    rate_limits = service.broker.engine.rate_limits

    def sessions() -> dict[tuple[str, ...], float]:
        counts = {("connected",): 0.0, ("detached",): 0.0}
        for s in router.all_sessions():
            counts[("connected",) if s.connection is not None else ("detached",)] += 1
        return counts

    def unacked() -> float:
        return sum(len(s.sm.unacked) for s in router.all_sessions() if s.sm is not None)

    offline = CachedCount(service.offline.totals, service.clock, OFFLINE_REFRESH, 2)
    gauges: list[tuple[str, str, Any]] = [
        ("sixnet_grid_connections", "Client connections (TCP), negotiating or bound.",
         lambda: len(server.connections)),
        ("sixnet_grid_fanout_queue", "Notifications waiting to be fanned out to subscribers.",
         lambda: delivery.queued),
        ("sixnet_grid_offline_writes_pending",
         "Messages for offline accounts being written to offline storage.",
         lambda: router.pending),
        ("sixnet_grid_unacked_stanzas",
         "Stanzas sent to stream-management sessions and not yet acknowledged.", unacked),
        ("sixnet_grid_send_backlog_bytes",
         "Bytes written to streams whose client stopped reading (closed beyond 8 MiB).",
         lambda: sum(s.backlog for s in server.connections)),
        ("sixnet_grid_offline_messages", "Messages in offline storage (counted every "
         f"{OFFLINE_REFRESH:g} s at most).", lambda: offline.get(0)),
        ("sixnet_grid_offline_accounts", "Accounts with messages in offline storage.",
         lambda: offline.get(1)),
        ("sixnet_grid_revoked_platforms", "Platforms revoked by sixnet grid revoke.",
         lambda: len(service.revocations.revoked)),
    ]
    registry.gauge("sixnet_grid_sessions", "Bound client sessions: connected, or detached "
                   "and waiting to be resumed (XEP-0198).", ("state",), read=sessions)
    for name, help_text, read in gauges:
        registry.gauge(name, help_text, read=read)
    registry.counter("sixnet_grid_notifications_sent_total",
                     "Pubsub notifications handed to the router, one per recipient.",
                     read=lambda: delivery.delivered)
    registry.counter("sixnet_grid_pubsub_rate_limited_total",
                     "Publishes and subscription requests refused by the broker's "
                     "per-platform rate limits.", ("operation",),
                     read=lambda: {(k,): v for k, v in rate_limits.refusals.items()})
    host = service.host_router
    if host is not None:  # component mode: the link to the host server
        registry.gauge("sixnet_grid_component_connected",
                       "1 while the host server has accepted the broker's component stream.",
                       read=lambda: 1.0 if host.stream is not None else 0.0)
        registry.gauge("sixnet_grid_component_backlog",
                       "Stanzas waiting for the component connection to come back.",
                       read=lambda: len(host.backlog))
        registry.gauge("sixnet_grid_component_platforms_online",
                       "Platform resources the host's presence says are online.",
                       read=lambda: sum(len(j) for j in host.presence.values()))
        registry.counter("sixnet_grid_component_dropped_total",
                         "Stanzas dropped because the backlog was full while the host "
                         "was away.", read=lambda: host.dropped)
    return offline
