"""Loopback ports for servers run as processes: pick a free one, wait until one listens."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 60.0, running: Callable[[], bool] = lambda: True,
                  interval: float = 0.1) -> float:
    """Block until a TCP connection to 127.0.0.1:`port` succeeds; the seconds that took.

    RuntimeError after `timeout` seconds, or as soon as `running()` says the server ended.
    """
    started = time.monotonic()
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return time.monotonic() - started
        except OSError:
            if not running():
                raise RuntimeError(f"the server for port {port} ended before it listened") from None
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"nothing listens on port {port} after {timeout} s") from None
        time.sleep(interval)
