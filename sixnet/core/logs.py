"""Log observers: human-readable text by default, JSON lines on request.

A JSON line has ``time`` (RFC 3339, UTC), ``level``, ``namespace``, ``message`` (the event
formatted for people), every other plain-valued field of the event under its own name, and
``traceback`` when the event carries a failure. It is written for scripts and log shippers.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
)

from sixnet.core.timefmt import rfc3339

LOG_FORMATS = ("text", "json")
_PLAIN = (str, int, float, bool, type(None))


def event_as_json(event: dict[str, Any]) -> str:
    record: dict[str, Any] = {
        "time": rfc3339(event.get("log_time", 0)),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for name, value in event.items():
        if name.startswith("log_") or name in record or name == "format":
            continue
        if isinstance(value, _PLAIN):
            record[name] = value
        elif isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value):
            record[name] = list(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(out: IO[str] | None = None) -> ILogObserver:
    """One JSON object a line on `out` (standard output by default); twistd's ``--logger``."""
    return FileLogObserver(out or sys.stdout, event_as_json)
