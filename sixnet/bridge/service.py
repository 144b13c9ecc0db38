"""The bridge service: security events in, IODEF incidents out to an XMPP-Grid topic.

Events from the process's `EventBus` are aggregated (`aggregate.py`), each incident becomes
an IODEF document (`iodef.py`) checked against the schema, and is written to the durable
queue (`queue.py`) before anything is sent. One delivery loop publishes the queue's head,
waits for the target's acknowledgement (the publish iq's result), removes it and goes on:
strictly in order, at most one incident in flight. The target is an `IXMPPSession` (the grid
broker in this process, or a remote controller, `targets.py`); while it cannot be reached the
loop waits with Twisted's backoff policy and incidents keep queueing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from lxml import etree
from twisted.application.internet import backoffPolicy
from twisted.application.service import IService, Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from sixnet.bridge.aggregate import Aggregator, Incident
from sixnet.bridge.config import EVENT_SERVICES, BridgeConfig, BridgeSettings
from sixnet.bridge.iodef import document
from sixnet.bridge.queue import IncidentQueue, Queued
from sixnet.bridge.targets import LocalGrid, Target, make_target
from sixnet.core.errors import ConfigError
from sixnet.core.events import EventBus, SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator
from sixnet.core.metrics import Registry
from sixnet.core.runtime import report_failure
from sixnet.core.storage.database import Database, DatabaseURLError
from sixnet.grid.client.pubsub import PubSubClient
from sixnet.grid.client.session import IQError, IXMPPSession
from sixnet.pki.store import CertificateStore

log = Logger(namespace="sixnet.bridge")

#: Conditions that refuse this one document for good: it is dropped (and counted), not
#: retried; anything else (forbidden, a rate limit, the service gone) is retried later.
REFUSED_FOR_GOOD = frozenset({"not-acceptable", "bad-request", "jid-malformed"})


class SessionEnded(Exception):
    """The target ended the session while the bridge had nothing to send."""


class BridgeService(Service):
    """Owns the aggregator, the queue and the delivery loop."""

    name = "bridge"

    def __init__(self, config: BridgeSettings, target: Target, *, events: EventBus,
                 metrics: Registry, clock: IReactorTime, name: str) -> None:
        bridge: BridgeConfig = config.bridge
        self.config = bridge
        self.target = target
        self.events = events
        self.clock = clock
        self.incident_name = name
        self.validator = IODEFValidator()
        try:
            self.db = Database(bridge.database, base=config.sixnet.state_dir)
        except DatabaseURLError as e:
            raise ConfigError(str(config.path), "bridge.database", str(e)) from None
        self.queue = IncidentQueue(self.db, bridge.max_queue)
        self.aggregator = Aggregator(bridge.window, bridge.immediate, self.incident, clock)
        self.backoff = backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        self.received = metrics.counter("sixnet_bridge_events_total",
                                        "security events the bridge received", ["kind"])
        self.published = metrics.counter("sixnet_bridge_incidents_published_total",
                                         "incidents the target acknowledged", ["kind"])
        self.dropped = metrics.counter("sixnet_bridge_incidents_dropped_total",
                                       "incidents dropped: queue full, refused for good, "
                                       "or not valid IODEF", ["reason"])
        metrics.gauge("sixnet_bridge_queued", "incidents waiting to be acknowledged",
                      read=lambda: self.queue.depth)
        self.ready: defer.Deferred[None] = defer.Deferred()
        self._unsubscribe: Callable[[], None] | None = None
        self._wake: defer.Deferred[None] | None = None
        self._loop: defer.Deferred[None] | None = None
        self._session: IXMPPSession | None = None
        self._writes: set[defer.Deferred[Any]] = set()

    # -- events to the queue -----------------------------------------------------------------

    def event(self, event: SecurityEvent) -> None:
        self.received.inc(kind=event.kind)
        self.aggregator.receive(event)

    def incident(self, incident: Incident) -> None:
        """An aggregated incident: as an IODEF document, to the end of the queue."""
        payload = document(incident, self.incident_name)
        problem = self.validator.problem(payload)
        if problem is not None:  # a mapping bug: the target would refuse it for ever
            log.error("{kind}: incident dropped, not valid IODEF: {problem}",
                      kind=incident.kind, problem=problem)
            self.dropped.inc(reason="invalid")
            return
        d = self.queue.put(self.config.topic_for(incident.service), incident.id,
                           incident.kind, etree.tostring(payload))
        self._writes.add(d)
        d.addCallback(self._queued)
        d.addErrback(lambda f: log.failure("{kind}: incident not queued", f,
                                           kind=incident.kind))
        d.addBoth(lambda _: self._writes.discard(d))

    def _queued(self, dropped: int) -> None:
        if dropped:
            log.warn("bridge queue full ({limit}): {count} oldest incident(s) dropped",
                     limit=self.config.max_queue, count=dropped)
            self.dropped.inc(dropped, reason="queue-full")
        self._wake_up()

    def _wake_up(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    # -- lifetime ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.events.subscribe(self.event)
        self._loop = defer.Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        if failure.check(defer.CancelledError):
            return
        if not self.ready.called:
            self.ready.errback(failure)
        report_failure(self, f"bridge: cannot run: {failure.getErrorMessage()}")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.aggregator.flush()  # open groups are queued, not lost
        if self._loop is not None:
            self._loop.cancel()
        await defer.DeferredList(list(self._writes))
        await self.queue.idle()
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.db.close()

    # -- delivery ------------------------------------------------------------------------------

    async def _run(self) -> None:
        waiting = await self.queue.open()
        log.info("bridge: {count} incident(s) waiting from before; target {target}",
                 count=waiting, target=self.target.description)
        self.ready.callback(None)
        failures = 0
        while self.running:
            try:
                session = self._session = await self.target.connect()
                session.closed.addBoth(self._session_ended)
                failures = 0
                await self._deliver(session, PubSubClient(session, self.target.service))
            except defer.CancelledError:
                raise
            except Exception as e:
                delay = self.backoff(failures)
                failures += 1
                log.warn("bridge: {target}: {error}; retrying in {delay:.1f}s",
                         target=self.target.description, error=_describe(e), delay=delay)
                await self._close_session()
                await task.deferLater(self.clock, delay)

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                await session.close()
            except Exception as e:
                log.debug("bridge: closing the session: {error}", error=e)

    def _session_ended(self, result: object) -> object:
        self._wake_up()  # an idle loop notices, and reconnects
        return result

    async def _deliver(self, session: IXMPPSession, client: PubSubClient) -> None:
        """Publish the queue's oldest incident, wait for the target's answer, remove it, and
        on, until the session fails (the caller then logs in again).

        Every configured topic is made sure of first, so a SIEM can subscribe before the
        first incident. One publish is in flight at a time: with several, a later incident
        could be accepted while an earlier one refused for a moment (a rate limit) waits to
        be sent again, and the order would be lost."""
        ready: set[str] = set()
        for topic in sorted({self.config.topic_for(s) for s in EVENT_SERVICES}):
            await self._ensure_topic(client, topic)
            ready.add(topic)
        while self.running:
            oldest = await self.queue.peek()
            if not oldest:
                self._wake = defer.Deferred()
                await self._wake
                if session.closed.called:
                    raise SessionEnded("the session ended")
                continue
            queued = oldest[0]
            if queued.topic not in ready:  # queued under an earlier configuration
                await self._ensure_topic(client, queued.topic)
                ready.add(queued.topic)
            await self._acknowledged(queued, client.publish(
                queued.topic, etree.fromstring(queued.payload), item_id=queued.item_id))
            await self.queue.remove(oldest)

    async def _acknowledged(self, queued: Queued, publishing: Awaitable[str]) -> None:
        """Wait for the target's answer to one publish; raise when it must be tried again."""
        try:
            await publishing
        except IQError as e:
            if e.condition not in REFUSED_FOR_GOOD:
                raise  # item-not-found too: the topic is made again after logging in again
            log.error("bridge: {topic}: incident {id} refused ({condition}: {text}); dropped",
                      topic=queued.topic, id=queued.item_id, condition=e.condition,
                      text=e.text)
            self.dropped.inc(reason="refused")
        else:
            self.published.inc(kind=queued.kind)

    async def _ensure_topic(self, client: PubSubClient, topic: str) -> None:
        """Discover the topic (disco#info); create it when it does not exist."""
        try:
            await client.info(topic)
            return
        except IQError as e:
            if e.condition != "item-not-found":
                raise
        # Typed by payload (RFC 8600 section 7.1), so a platform can find it by what it holds.
        await client.create(topic, access_model=self.config.access_model or None,
                            options={"pubsub#type": IODEF_NS,
                                     "pubsub#title": "sixnet security incidents"})
        log.info("bridge: created topic {topic} at {service}", topic=topic,
                 service=self.target.service)


def _describe(error: Exception) -> str:
    if isinstance(error, IQError):
        return f"{error.condition}{': ' + error.text if error.text else ''}"
    return str(error) or type(error).__name__


def make_service(config: BridgeSettings, store: CertificateStore, *,
                 events: EventBus | None = None, metrics: Registry | None = None,
                 grid: LocalGrid | None = None) -> IService:
    """Build the bridge; `grid` is the grid service of this process, for the local target."""
    from twisted.internet import reactor

    bridge = config.bridge
    problem = bridge.problem(config.pki.identities, grid is not None)
    if problem is not None:
        raise ConfigError(str(config.path), *problem)
    identity = config.pki.identities.get(bridge.identity)
    if identity is None:
        raise ConfigError(str(config.path), "bridge.identity",
                          f"no [pki.identities.{bridge.identity}] table defines it")
    target = make_target(config, store, grid, reactor)
    return BridgeService(config, target, events=events if events is not None else EventBus(),
                         metrics=metrics if metrics is not None else Registry(),
                         clock=reactor,  # type: ignore[arg-type]
                         name=identity.subject)
