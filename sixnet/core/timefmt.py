"""RFC 3339 timestamps in UTC: the one way sixnet writes them (protocols, logs, databases)."""

from __future__ import annotations

import datetime
import time
from typing import Literal

Precision = Literal["seconds", "milliseconds"]


def rfc3339(when: datetime.datetime | float | None = None, *,
            precision: Precision = "milliseconds") -> str:
    """``2026-12-02T12:00:00.000Z``: `when` (an aware datetime or POSIX seconds; now if None)."""
    if when is None:
        when = time.time()
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromtimestamp(when, datetime.UTC)
    elif when.tzinfo is None:
        raise ValueError("a naive datetime has no time zone")
    text = when.astimezone(datetime.UTC).isoformat(timespec=precision)
    return text.removesuffix("+00:00") + "Z"


def parse_rfc3339(text: str) -> datetime.datetime:
    """An aware datetime from an RFC 3339 timestamp with ``Z`` or a numeric offset.

    Raises ValueError for anything else (a date alone, no offset, a lower-case ``t``).
    """
    if len(text) < 20 or text[10] != "T" or not (text.endswith("Z") or text[-6] in "+-"):
        raise ValueError(f"{text[:40]!r} is not an RFC 3339 timestamp")
    when = datetime.datetime.fromisoformat(text.removesuffix("Z") + ("+00:00" if
                                           text.endswith("Z") else ""))
    if when.tzinfo is None:
        raise ValueError(f"{text[:40]!r} has no time zone")
    return when
