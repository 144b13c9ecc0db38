"""The ``[chat]`` section."""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.settings import ServiceConfig, endpoints_check, setting


@dataclass(frozen=True)
class ChatConfig(ServiceConfig):
    """``[chat]``: the SixChat End2End Direct user agent (TCP 4605)."""

    listen: list[str] = setting(["tcp6:4605:interface=\\:\\:"], check=endpoints_check)
    identity: str = setting("user")
