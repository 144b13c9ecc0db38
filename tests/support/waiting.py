"""Waiting in tests without fixed sleeps: until a condition holds, or an attempt succeeds.

Both return the seconds they waited, so a test can also say how long something took.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet import reactor, task

T = TypeVar("T")


async def pause(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def wait_for(condition: Callable[[], object], timeout: float = 10.0,
                   interval: float = 0.01, what: str = "condition") -> float:
    """Wait until `condition()` is true; the seconds it took. AssertionError after `timeout`."""
    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        if waited > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        await pause(interval)
    return time.monotonic() - started


async def retry(attempt: Callable[[], Awaitable[T]], timeout: float = 10.0,
                interval: float = 0.05,
                errors: tuple[type[BaseException], ...] = (Exception,)) -> tuple[T, float]:
    """Run `attempt` until it returns instead of raising one of `errors`: (result, seconds).

    After `timeout` the last error is raised again.
    """
    started = time.monotonic()
    while True:
        try:
            return await attempt(), time.monotonic() - started
        except errors:
            if time.monotonic() - started > timeout:
                raise
        await pause(interval)
