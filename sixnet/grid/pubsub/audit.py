"""The audit log (RFC 8600 section 8.3): JSON lines, opened for appending only.

One record a line: administrative actions, subscription decisions, publishes (metadata: node,
publisher, item id, namespace, size, fan-out; never the payload), revocations, refusals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stamp(seconds: float) -> str:
    millis = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class AuditLog:
    """Appends records; each line is written and flushed before `record` returns."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._clock = clock
        self._file = path.open("a", encoding="utf-8")

    def record(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": _stamp(self._clock()), **entry}, sort_keys=True,
                          separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
