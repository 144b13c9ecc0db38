"""The ``[grid.broker]`` table: the publish-subscribe service."""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.settings import setting


@dataclass(frozen=True)
class BrokerConfig:
    """``[grid.broker]``: the pubsub service at ``<subdomain>.<domain>``."""

    subdomain: str = setting("broker", doc="the service's JID is subdomain.domain")
