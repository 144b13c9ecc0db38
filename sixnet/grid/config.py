"""The ``[grid]`` section."""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.settings import ServiceConfig, endpoints_check, setting


@dataclass(frozen=True)
class GridConfig(ServiceConfig):
    """``[grid]``: the XMPP-Grid controller and broker."""

    domain: str = setting("localhost")
    listen: list[str] = setting(["tcp6:5222:interface=\\:\\:"], check=endpoints_check,
                            doc="client streams with STARTTLS")
    listen_tls: list[str] = setting(["tcp6:5223:interface=\\:\\:"], check=endpoints_check,
                                doc="direct TLS client streams (XEP-0368)")
    broker: BrokerConfig = setting(BrokerConfig(), doc="the [grid.broker] table")
