"""Repeats of one event become one incident per window, with a count.

Events are grouped by (kind, source, subject): a burst of wrong passwords for one user id from
one address is one incident, not fifty. A group opens at its first event and closes `window`
seconds later, when its incident (count, first and last time) is handed on; a later event of
the same group opens a new group. A responder wants the count more than the first attempt,
so most kinds are reported at the end of their window. Kinds in `immediate` (an attack on a
conversation under way) are reported at once with a count of one, and the repeats that follow
within the window as a second incident at its end; the counts of a group's incidents always
add up to the events seen.

Pure logic: the clock is injected (`IReactorTime`), nothing here does I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from sixnet.core.events import SecurityEvent

#: Groups open at once; beyond it the oldest is closed early (a flood of distinct sources
#: must not grow memory without bound).
MAX_OPEN_GROUPS = 10000

GroupKey = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class Incident:
    """What the bridge reports: one or more events of one group."""

    kind: str
    source: str | None
    subject: str | None
    detail: str
    count: int
    first: float  # POSIX seconds of the first and last event counted
    last: float
    facts: Mapping[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def service(self) -> str:
        return self.kind.split(".", 1)[0]


class _Group:
    def __init__(self, event: SecurityEvent, timer: IDelayedCall) -> None:
        self.first = event
        self.count = 0
        self.start = event.time
        self.last = event.time
        self.timer = timer

    def add(self, event: SecurityEvent) -> None:
        if self.count == 0:
            self.start = event.time
        self.count += 1
        self.last = event.time


class Aggregator:
    """Receives events (`receive`, an `EventBus` subscriber) and hands on incidents."""

    def __init__(self, window: float, immediate: Collection[str],
                 report: Callable[[Incident], None], clock: IReactorTime,
                 max_groups: int = MAX_OPEN_GROUPS) -> None:
        self.window = window
        self.immediate = frozenset(immediate)
        self.report = report
        self.clock = clock
        self.max_groups = max_groups
        self._groups: dict[GroupKey, _Group] = {}

    def receive(self, event: SecurityEvent) -> None:
        key = (event.kind, event.source, event.subject)
        group = self._groups.get(key)
        if group is not None:
            group.add(event)
            return
        if len(self._groups) >= self.max_groups:
            self._close(next(iter(self._groups)))
        group = _Group(event, self.clock.callLater(self.window, self._close, key))
        self._groups[key] = group
        if event.kind in self.immediate:
            self.report(self._incident(event, 1, event.time, event.time))
        else:
            group.add(event)

    def _close(self, key: GroupKey) -> None:
        group = self._groups.pop(key)
        if group.timer.active():
            group.timer.cancel()
        if group.count:
            self.report(self._incident(group.first, group.count, group.start, group.last))

    def flush(self) -> None:
        """Report every open group now (the bridge is stopping)."""
        for key in list(self._groups):
            self._close(key)

    @property
    def open_groups(self) -> int:
        return len(self._groups)

    @staticmethod
    def _incident(event: SecurityEvent, count: int, first: float, last: float) -> Incident:
        return Incident(kind=event.kind, source=event.source, subject=event.subject,
                        detail=event.detail, count=count, first=first, last=last,
                        facts=dict(event.facts))
