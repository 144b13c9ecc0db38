"""The ``[irp]`` section."""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.settings import ServiceConfig, endpoints_check, setting


@dataclass(frozen=True)
class IRPConfig(ServiceConfig):
    """``[irp]``: the Identity Registration Protocol registry (TCP 4604)."""

    listen: list[str] = setting(["tcp6:4604:interface=\\:\\:"], check=endpoints_check)
