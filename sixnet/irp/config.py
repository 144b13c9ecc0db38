"""The ``[irp]`` section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sixnet.core.config import Settings
from sixnet.core.settings import (
    ServiceConfig,
    database_url,
    endpoints_check,
    one_of,
    positive,
    setting,
)

#: Who may look up or watch a person (docs/irp.rst, "Access policy").
ACCESS_POLICIES = ("enrolled", "same-domain", "operators")


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else f"{value} must be at least 1"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else f"{value} must not be negative"


@dataclass(frozen=True)
class IRPConfig(ServiceConfig):
    """``[irp]``: the Identity Registration Protocol registry (TCP 4604)."""

    listen: list[str] = setting(["tcp6:4604:interface=\\:\\:"], check=endpoints_check)
    database: str = setting("sqlite:irp.sqlite3", check=database_url,
                            doc="sqlite:PATH (relative to state_dir) or a postgresql:// URL")
    audit_log: str = setting("irp-audit.jsonl", doc="JSON lines file, relative to state_dir")
    operators: list[str] = setting([], doc="user ids with the operator role")
    lookup_access: str = setting("enrolled", check=one_of(*ACCESS_POLICIES))
    watch_access: str = setting("enrolled", check=one_of(*ACCESS_POLICIES))
    max_message_bytes: int = setting(65536, check=_at_least_one)
    max_addresses: int = setting(8, check=_at_least_one)
    max_devices: int = setting(8, check=_at_least_one)
    default_lifetime: int = setting(3600, check=_at_least_one)
    max_lifetime: int = setting(86400, check=_at_least_one)
    max_backup_bytes: int = setting(32768, check=_at_least_one)
    idle_timeout: float = setting(300.0, check=positive)
    stall_timeout: float = setting(10.0, check=positive)
    max_connections_per_address: int = setting(16, check=_at_least_one)
    max_requests_in_flight: int = setting(32, check=_at_least_one)
    failure_delay: float = setting(1.0, check=positive)
    lockout_after: int = setting(5, check=_at_least_one)
    lockout_seconds: int = setting(900, check=_at_least_one)
    invite_days: int = setting(7, check=_at_least_one)
    certificate_days: int = setting(365, check=_at_least_one)
    answer_validity: int = setting(300, check=_at_least_one,
                                   doc="seconds a signed answer is valid (its not-after)")
    answer_cache: int = setting(100_000, check=_not_negative,
                                doc="persons whose lookup answer is kept in memory (0: none)")
    workers: int = setting(1, check=_at_least_one,
                           doc="processes serving the registry on this host, sharing its ports "
                               "and database (1: this process alone)")
    answer_cache_shared: bool = setting(
        False, doc="keep answers also on a shared (PostgreSQL) database: faster lookups, but "
                   "a change made through another registry shows after its notification")


class IRPSettings(Settings, Protocol):
    """What the IRP registry reads of the whole file (the composition root's aggregate has it)."""

    @property
    def irp(self) -> IRPConfig: ...
