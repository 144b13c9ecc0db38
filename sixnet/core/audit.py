"""The audit log every service writes: JSON lines, append-only, one durability rule.

One record a line, ``{"time": RFC 3339, "event": ..., other fields}``; fields that are None are
left out. Each record is one ``write()`` on a descriptor opened with ``O_APPEND`` (mode 0600),
so lines from several processes sharing a file never interleave, and a record is in the
kernel's hands before `record` returns: it survives the process being killed, though not the
machine losing power before the kernel writes it out (docs/operator.rst, "Audit logs").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sixnet.core.timefmt import rfc3339


class AuditLog:
    """Appends audit records to one file."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": rfc3339(self.clock()), "event": event}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, sort_keys=True, separators=(",", ":"), default=str) + "\n"
        os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
