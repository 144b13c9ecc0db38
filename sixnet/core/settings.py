"""Declaring configuration sections: typed keys with defaults, checks and documentation.

A section is a frozen dataclass whose fields are made with `setting`; `sixnet.app.config` reads
the TOML file into them and reports every problem as one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def endpoint_check(value: str) -> str | None:
    """Check a twistd server endpoint string, as `serverFromString` would read it."""
    from twisted.internet import endpoints

    class _NoReactor:
        """Endpoints only keep a reactor reference until they listen."""

    try:
        endpoint = endpoints.serverFromString(_NoReactor(), value)
    except (ValueError, TypeError, KeyError) as e:
        return f"{value!r} is not a server endpoint string ({e or 'bad syntax'})"
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"{value!r}: port {port} is out of range 0-65535"
    return None


def endpoints_check(values: list[str]) -> str | None:
    for value in values:
        problem = endpoint_check(value)
        if problem:
            return problem
    return None


def database_url(value: str) -> str | None:
    """A database setting: ``sqlite:PATH`` or a ``postgresql://`` URL (see `parse_url`)."""
    from sixnet.core.storage.database import DatabaseURLError, parse_url

    try:
        parse_url(value, Path("."))
    except DatabaseURLError as e:
        return str(e)
    return None


def in_range(low: int, high: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        if not low <= value <= high:
            return f"{value} is out of range {low}-{high}"
        return None

    return check


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value not in choices:
            return f"{value!r} is not one of {', '.join(choices)}"
        return None

    return check


def positive(value: float) -> str | None:
    return None if value > 0 else f"{value} must be greater than 0"


def setting(default: Any = dataclasses.MISSING, *, check: Callable[[Any], str | None] | None = None,
        must_exist: bool = False, doc: str = "") -> Any:
    """Declare a configuration setting (a dataclass field with validation metadata)."""
    meta = {"check": check, "must_exist": must_exist, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServiceConfig:
    """Keys every service section has."""

    enabled: bool = setting(False)
    listen: list[str] = setting([], check=endpoints_check)
    identity: str = setting("host", doc="name of a [pki.identities.NAME] table")
