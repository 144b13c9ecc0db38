"""Group commit: the one batcher every store uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from sixnet.core.storage.database import Cursor, Database


class GroupCommit:
    """Runs the items submitted while the previous batch was busy in one named transaction.

    Under load, many writes share one commit (group commit: one fsync, one thread hop) and
    many reads share one read transaction (and its queries); an idle service runs each at
    once, so batching adds no latency. `body(cursor, items)` returns one result per item; expected
    outcomes are reported in a result; a body that raises rolls back the whole batch, and
    every caller in it gets that error (nothing was changed).
    """

    MAX = 64

    def __init__(self, db: Database, name: str,
                 body: Callable[[Cursor, list[tuple[Any, ...]]], list[Any]]) -> None:
        self.db = db
        self.name = name
        self.body = body
        self.queue: list[tuple[tuple[Any, ...], defer.Deferred[Any]]] = []
        self.busy = False

    def submit(self, *item: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.queue.append((item, d))
        if not self.busy:
            self._next()
        return d

    def _next(self) -> None:
        batch, self.queue = self.queue[:self.MAX], self.queue[self.MAX:]
        if not batch:
            self.busy = False
            return
        self.busy = True

        def done(results: list[Any]) -> None:
            for (_, d), result in zip(batch, results, strict=True):
                d.callback(result)

        def failed(failure: Any) -> None:
            for _, d in batch:
                d.errback(failure)

        run = self.db.run(self.name, self.body, [item for item, _ in batch])
        run.addCallbacks(done, failed)
        run.addBoth(lambda _: self._next())
