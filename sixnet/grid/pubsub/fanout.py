"""Delivering notifications: in order, in chunks that never hold the reactor for long.

A publish makes one `Notification`: its event element is built once, with the payload parsed
from the publisher's stanza, and handed to `IRouter.route_fanout` as one message template for
each chunk of `CHUNK` recipients; the router serialises the template once per chunk and
splices each recipient's address into the bytes (so 1,000 subscribers cost 16
serialisations, not 1,000). Every notification goes through one FIFO queue drained by one
cooperative task (a `twisted.internet.task.Cooperator`), so a 100,000-subscriber fan-out is
interleaved with other work and two publishes reach every subscriber in publish order.
Notifications of one topic queued behind each other are delivered as a batch, recipient by
recipient, so a subscriber's stream sends the batch as one write instead of one per item:
under load the cost per copy falls as the queue grows, instead of the queue growing.
`written` fires once a notification's last chunk has been handed to the router: the broker
sends a publish's result only then, so on the link to the host the result follows the
notifications, and a publish the result prompts, through any instance, is delivered after
them.

Notifications are ``type="normal"`` messages: the core stores them for an offline subscriber
and delivers them at its next login with a delay stamp (RFC 8600 section 6, XEP-0160). A topic
configured never to cache (``pubsub#notification_type = headline``) sends headlines, which
the core does not store (RFC 8600 section 5).
"""

from __future__ import annotations

import heapq
import os
import time
from collections import deque
from collections.abc import Callable, Iterator

from lxml import etree
from twisted.internet import defer, task
from twisted.logger import Logger

from sixnet.grid.component import IRouter
from sixnet.grid.pubsub.engine import Notification

log = Logger(namespace="sixnet.grid.pubsub")
_MESSAGE = "{jabber:client}message"
#: Messages handed to the router in one step of the delivery task.
CHUNK = 64
#: Most notifications delivered together to the same recipients: about 48 KB of 1 KB items
#: per recipient, under the 64 KB Twisted's TLS transport writes out at once.
BATCH = 32
#: Fewest recipients per step of a batch: each call to the router serialises its template.
MIN_STEP = 8
#: How long delivery keeps the reactor before letting it run (which is when the TLS layer
#: flushes what was written). With nothing queued behind the notification being sent, short
#: slices get the first subscribers of a large fan-out their copy sooner; with a backlog,
#: long slices (Twisted's default) give the most notifications per second.
SLICE_IDLE = 0.002
SLICE_BUSY = 0.010


class Delivery:
    """The broker's outgoing message queue."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.router: IRouter | None = None
        self.sent = 0
        #: Copies handed to the router, one per recipient (the metrics read it).
        self.delivered = 0
        self._queue: deque[Notification] = deque()
        self._task: task.CooperativeTask | None = None
        self._idle: list[defer.Deferred[None]] = []
        #: Notifications enqueued, and how many of them were handed to the router in full
        #: (the queue is FIFO, so the first `_handed` tickets are done).
        self._tickets = 0
        self._handed = 0
        #: (ticket, a tie-breaker, Deferred) of each `written` waiting, smallest ticket first.
        self._written: list[tuple[int, int, defer.Deferred[None]]] = []
        self._prefix = os.urandom(4).hex() + "-"
        self._cooperator = task.Cooperator(terminationPredicateFactory=self._time_slice)

    def _time_slice(self) -> Callable[[], bool]:
        deadline = time.monotonic() + (SLICE_BUSY if self._queue else SLICE_IDLE)
        return lambda: time.monotonic() >= deadline

    def enqueue(self, notification: Notification) -> int:
        """Queue `notification`; returns its ticket for `written` (0: nothing to send)."""
        if not notification.recipients:
            return 0
        self._queue.append(notification)
        self._tickets += 1
        if self._task is None:
            self._task = self._cooperator.cooperate(self._drain())
            self._task.whenDone().addBoth(self._finished)
        return self._tickets

    def written(self, ticket: int) -> defer.Deferred[None]:
        """Fires once the notification of `ticket` (and all before it) is handed to the
        router: written to the subscribers' streams or to the host link."""
        d: defer.Deferred[None] = defer.Deferred()
        if ticket <= self._handed:
            d.callback(None)
        else:
            heapq.heappush(self._written, (ticket, id(d), d))
        return d

    @property
    def queued(self) -> int:
        """Notifications waiting behind the one being delivered."""
        return len(self._queue)

    def idle(self) -> defer.Deferred[None]:
        """Fires once every queued notification has been handed to the router."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._task is None:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def _finished(self, result: object) -> None:
        self._task = None
        if self._queue:  # enqueued after the iterator ended but before whenDone fired
            self._task = self._cooperator.cooperate(self._drain())
            self._task.whenDone().addBoth(self._finished)
            return
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    def _drain(self) -> Iterator[None]:
        router = self.router
        assert router is not None  # attach() comes before any stanza
        while self._queue:
            batch = self._batch()
            templates = [self._template(n) for n in batch]
            recipients, only_available = batch[0].recipients, batch[0].only_available
            # Each recipient gets every notification of the batch in one step, so its stream
            # writes them out together (one TLS record, one send) at the next reactor turn.
            step = max(MIN_STEP, CHUNK // len(templates))
            for start in range(0, len(recipients), step):
                chunk = recipients[start:start + step]
                if only_available:
                    chunk = [r for r in chunk if router.is_available(r)]
                for template in templates:
                    self.delivered += len(chunk)
                    try:
                        router.route_fanout(template, chunk)
                    except Exception:
                        log.failure("routing a notification to {count} recipients failed",
                                    count=len(chunk))
                if start + step >= len(recipients):  # the last chunk: the batch is out
                    self._handed += len(batch)
                    self._release()
                yield None

    def _release(self) -> None:
        """Fire `written` for every ticket handed over (in this step, before the reactor
        flushes: what a callback writes follows the notifications)."""
        while self._written and self._written[0][0] <= self._handed:
            heapq.heappop(self._written)[2].callback(None)

    def _batch(self) -> list[Notification]:
        """The next notification and those queued right behind it for the same recipients
        (the same topic with no subscription change between: the engine's cached tuple)."""
        first = self._queue.popleft()
        batch = [first]
        while self._queue and len(batch) < BATCH:
            following = self._queue[0]
            if following.recipients is not first.recipients or \
                    following.only_available != first.only_available:
                break
            batch.append(self._queue.popleft())
        return batch

    def _template(self, notification: Notification) -> etree._Element:
        """The message every recipient gets, without its 'to'."""
        self.sent += 1
        message = etree.Element(_MESSAGE, {"from": self.service, "type": notification.type,
                                           "id": f"{self._prefix}{self.sent}"},
                                nsmap={None: "jabber:client"})
        message.append(notification.payload)
        return message
