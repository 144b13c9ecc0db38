"""The grid in this process with the bridge publishing to it (the local target), and a SIEM
platform subscribed to the bridge's topic over a real TLS connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lxml import etree
from twisted.internet import reactor

from sixnet.app.config import load_config
from sixnet.bridge.service import BridgeService, make_service
from sixnet.core.events import EventBus
from sixnet.core.iodef import IODEF_NS
from sixnet.core.metrics import Registry
from sixnet.grid.client import Notification, PubSubClient, connect
from tests.grid_harness import ports, start_grid, write_config

from .configs import toml_text
from .waiting import wait_for

X = f"{{{IODEF_NS}}}"
TOPIC = "sixnet-security"


class BridgedGrid:
    """A test case's grid (`grid`), bridge (`bridge`, on `bus`) and its `metrics`."""

    def __init__(self, test: Any, pki: Any, directory: Path) -> None:
        self.test = test
        self.pki = pki
        self.directory = directory
        self.bus = EventBus()
        self.metrics = Registry()

    async def start(self, bridge: dict[str, Any] | None = None,
                    tables: dict[str, Any] | None = None, **broker: Any) -> BridgedGrid:
        """Grid with ``siem@localhost`` a broker admin, `broker` keys and `tables` of
        ``[grid.broker]`` (roles, rate_limits); the bridge with `bridge` settings."""
        self.directory.mkdir(parents=True, exist_ok=True)
        config = write_config(self.directory, self.pki,
                              broker={"admins": ["siem@localhost"], **broker})
        extra: dict[str, Any] = {"bridge": {"enabled": True, "window": 0.3, **(bridge or {})}}
        if tables:
            extra["grid"] = {"broker": tables}
        config.path.write_text(config.path.read_text() + toml_text(extra))
        self.config = load_config(config.path)
        self.grid = await start_grid(self.config)
        self.test.addCleanup(self.grid.stopService)
        await self.grid.accounts.add("siem", "siem secret")
        self.bridge: BridgeService = make_service(  # type: ignore[assignment]
            self.config, self.grid.store, events=self.bus, metrics=self.metrics,
            grid=self.grid)
        self.bridge.startService()
        self.test.addCleanup(self.bridge.stopService)
        await self.bridge.ready
        return self

    async def subscriber(self, topic: str = TOPIC) -> list[Notification]:
        """The SIEM, subscribed once the bridge has made the topic; what it receives."""
        session = await connect(reactor, "127.0.0.1", ports(self.grid)[0], "siem@localhost",
                                password="siem secret", store=self.grid.tls.store,
                                presence=True)
        self.test.addCleanup(session.close)
        got: list[Notification] = []
        session.add_message_handler(lambda m: got.extend(Notification.parse(m)))
        await wait_for(lambda: topic in self.grid.broker.engine.nodes, what="topic created")
        await PubSubClient(session, self.grid.pubsub_service).subscribe(topic)
        return got


def summary(notification: Notification) -> tuple[str | None, int, str | None, str | None]:
    """(event kind, count, source address, person or platform) of an IODEF notification."""
    doc = notification.payload
    assert doc is not None
    kind = doc.findtext(f"{X}Incident/{X}AdditionalData[@name='sixnet-event']")
    count = int(doc.findtext(f"{X}Incident/{X}Assessment/{X}Counter") or 0)
    source = doc.findtext(f".//{X}System[@category='source']/{X}Node/{X}Address")
    subject = doc.findtext(f"{X}Incident/{X}Contact[@role='user']/{X}ContactName")
    return kind, count, source, subject


def text_of(notification: Notification) -> str:
    assert notification.payload is not None
    return etree.tostring(notification.payload).decode()
