"""Watches: who gets a person's record whenever it changes, and the one expiry timer.

A watcher gets the person's `Answer` (its canonical ``<person>`` payload, `person_payload`,
and its version) when the record changes
in this process or (on PostgreSQL) any other, and when one of its addresses or certificates
expires. One timer serves the whole process: it is armed for the earliest next expiry among
watched persons and re-armed as their records change; nothing is polled per person.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from sixnet.irp.engine.answers import NEVER, Answer, AnswerCache

log = Logger(namespace="sixnet.irp")

#: Gets the `Answer` of a changed record.
Watcher = Callable[[Answer], object]


class Watches:
    """The watchers of each person, and when each watched record next expires."""

    def __init__(self, answers: AnswerCache, now_ms: Callable[[], int], reactor: Any) -> None:
        self.answers = answers
        self.now_ms = now_ms
        self.reactor = reactor
        self._watchers: dict[str, list[Watcher]] = {}
        #: The next expiry of each watched person's record (ms), a heap of the same (with
        #: outdated entries skipped when they come up) and the one timer for its head.
        self._expiry_at: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []
        self._timer: Any = None

    def __len__(self) -> int:
        """Watchers in all (a person watched on two connections counts twice)."""
        return sum(len(w) for w in self._watchers.values())

    def add(self, person: str, watcher: Watcher) -> None:
        self._watchers.setdefault(person, []).append(watcher)

    def remove(self, person: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(person, [])
        if watcher in watchers:
            watchers.remove(watcher)
        if not watchers:
            self._watchers.pop(person, None)
            self._expiry_at.pop(person, None)

    def changed(self, person: str | None) -> None:
        """The record of `person` (None: of anyone) changed: tell its watchers."""
        for watched in [person] if person is not None else list(self._watchers):
            if watched in self._watchers:
                self._notify_later(watched, "notifying watchers of {person}")

    def expire_at(self, person: str, at: int) -> None:
        """Notify the watchers of `person` at `at` (ms), when their record next changes by
        itself (an address or a certificate expires)."""
        if at >= NEVER:
            self._expiry_at.pop(person, None)
            return
        if self._expiry_at.get(person) == at:
            return
        self._expiry_at[person] = at
        heapq.heappush(self._expiries, (at, person))
        if len(self._expiries) > 2 * len(self._expiry_at) + 64:  # outdated entries
            self._expiries = [(t, p) for p, t in self._expiry_at.items()]
            heapq.heapify(self._expiries)
        self._arm()

    def expire(self) -> None:
        """The timer: notify the watchers of every record whose expiry has come."""
        now = self.now_ms()
        while self._expiries and self._expiries[0][0] <= now:
            at, person = heapq.heappop(self._expiries)
            if self._expiry_at.get(person) != at:
                continue  # outdated: the record changed since, or nobody watches it
            del self._expiry_at[person]
            if person in self._watchers:
                self._notify_later(person, "notifying watchers of {person} after an expiry")
        self._arm()

    def stop(self) -> None:
        """Cancel the expiry timer (the service is stopping)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _arm(self) -> None:
        if not self._expiries:
            return
        delay = max(0.0, (self._expiries[0][0] - self.now_ms()) / 1000) + 0.001
        timer = self._timer
        if timer is not None and timer.active():
            if timer.getTime() <= self.reactor.seconds() + delay:
                return
            timer.cancel()
        self._timer = self.reactor.callLater(delay, self.expire)

    def _notify_later(self, person: str, failing: str) -> None:
        d = defer.Deferred.fromCoroutine(self._notify(person))
        d.addErrback(lambda f: log.failure(failing, f, person=person))

    async def _notify(self, person: str) -> None:
        answer = await self.answers.answer(person)
        if person in self._watchers:
            self.expire_at(person, answer.changes_at)
        for watcher in list(self._watchers.get(person, ())):
            watcher(answer)
