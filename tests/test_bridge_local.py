"""The bridge's local target: incidents reach a platform subscribed over a real TLS socket
from the broker in the same process, published by the bridge's own platform JID (roles and
audit apply to it as to any publisher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import reactor
from twisted.trial import unittest

from sixnet.app.config import load_config
from sixnet.bridge.service import BridgeService, make_service
from sixnet.core.events import EventBus, SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator
from sixnet.core.metrics import Registry
from sixnet.grid.client import Notification, PubSubClient, connect
from tests.grid_harness import ports, start_grid, write_config

from .support.configs import toml_text
from .support.waiting import pause, wait_for

X = f"{{{IODEF_NS}}}"
TOPIC = "sixnet-security"


def bridge_config(tmp: Path, pki: Any, bridge: dict[str, Any],
                  roles: dict[str, Any] | None = None, **grid: Any) -> Any:
    """The grid harness's configuration with a [bridge] section (and broker roles) added."""
    config = write_config(tmp, pki, **grid)
    extra = {"bridge": bridge}
    if roles:
        extra["grid"] = {"broker": {"roles": roles}}
    config.path.write_text(config.path.read_text() + toml_text(extra))
    return load_config(config.path)


def iodef(notification: Notification) -> etree._Element:
    assert notification.payload is not None
    return notification.payload


def summary(notification: Notification) -> tuple[str, int, str | None]:
    doc = iodef(notification)
    kind = doc.findtext(f"{X}Incident/{X}AdditionalData[@name='sixnet-event']")
    count = int(doc.findtext(f"{X}Incident/{X}Assessment/{X}Counter"))
    source = doc.findtext(f".//{X}System[@category='source']/{X}Node/{X}Address")
    return kind, count, source


class LocalTargetTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _start(self, bridge: dict[str, Any] | None = None,
                     roles: dict[str, Any] | None = None) -> None:
        settings = {"enabled": True, "window": 0.3, **(bridge or {})}
        self.config = bridge_config(self.tmp, self.pki, settings, roles,
                                    broker={"admins": ["siem@localhost"]})
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        await self.grid.accounts.add("siem", "siem secret")
        self.bus = EventBus()
        self.metrics = Registry()
        self.bridge: BridgeService = make_service(  # type: ignore[assignment]
            self.config, self.grid.store, events=self.bus, metrics=self.metrics,
            grid=self.grid)
        self.bridge.startService()
        self.addCleanup(self.bridge.stopService)
        await self.bridge.ready

    async def _subscriber(self, topic: str = TOPIC) -> list[Notification]:
        """The SIEM: a platform over TLS, subscribed once the bridge made the topic."""
        session = await connect(reactor, "127.0.0.1", ports(self.grid)[0], "siem@localhost",
                                password="siem secret", store=self.grid.tls.store,
                                presence=True)
        self.addCleanup(session.close)
        got: list[Notification] = []
        session.add_message_handler(lambda m: got.extend(Notification.parse(m)))
        client = PubSubClient(session, "broker.localhost")
        await wait_for(lambda: topic in self.grid.broker.engine.nodes, what="topic created")
        await client.subscribe(topic)
        return got

    def emit(self, kind: str, count: int = 1, **fields: Any) -> None:
        for _ in range(count):
            self.bus.emit(SecurityEvent(kind, **fields))

    async def test_a_burst_of_wrong_passwords_is_one_incident_with_its_count(self) -> None:
        await self._start()
        got = await self._subscriber()
        self.emit("irp.login-failed", 7, subject="alice@example.test",
                  source="::ffff:192.0.2.7", detail="wrong password for alice@example.test")
        await wait_for(lambda: got, what="the incident")
        (notification,) = got
        assert notification.node == TOPIC
        assert summary(notification) == ("irp.login-failed", 7, "192.0.2.7")
        assert IODEFValidator().problem(iodef(notification)) is None
        await wait_for(lambda: self.bridge.queue.depth == 0, what="the queue emptied")
        metrics = self.metrics.render().decode()
        assert 'sixnet_bridge_events_total{kind="irp.login-failed"} 7' in metrics
        assert 'sixnet_bridge_incidents_published_total{kind="irp.login-failed"} 1' in metrics
        assert "sixnet_bridge_queued 0" in metrics

    async def test_the_bridge_publishes_as_a_platform_the_broker_audits(self) -> None:
        await self._start()
        got = await self._subscriber()
        self.emit("chat.mitm", subject="bob@example.test", source="2001:db8::5",
                  detail="certificate differs from the directory's")
        await wait_for(lambda: got, what="the incident")
        assert summary(got[0]) == ("chat.mitm", 1, "2001:db8::5")
        assert got[0].sender == "broker.localhost"
        audit = (self.config.sixnet.state_dir / "grid-broker-audit.jsonl").read_text()
        records = [json.loads(line) for line in audit.splitlines()]
        actors = {(r["event"], r.get("actor")) for r in records if "actor" in r}
        assert actors == {("create", "sixnet-bridge@localhost"),
                          ("publish", "sixnet-bridge@localhost")}, records

    async def test_per_service_topics(self) -> None:
        await self._start({"topics": {"grid": "grid-events"}})
        grid_events = await self._subscriber("grid-events")
        self.emit("grid.rate-limited", subject="sensor@localhost", source="127.0.0.1")
        await wait_for(lambda: grid_events, what="the grid incident")
        assert grid_events[0].node == "grid-events"

    async def test_a_platform_not_allowed_to_publish_keeps_its_incidents_queued(self) -> None:
        await self._start(roles={"readers": {"platforms": ["sixnet-bridge@localhost"],
                                             "operations": ["subscribe"]}})
        self.emit("chat.mitm", subject="bob@example.test")
        await wait_for(lambda: self.bridge.queue.depth == 1, what="queued")
        head = await self.bridge.queue.head()
        assert head is not None and head.kind == "chat.mitm"
        await pause(0.5)  # the broker said forbidden; the bridge waits and tries again
        assert self.bridge.queue.depth == 1
        assert list(self.bridge.published.samples()) == []
