"""The bridge's local target: incidents reach a platform subscribed over a real TLS socket
from the broker in the same process, published by the bridge's own platform JID (roles and
audit apply to it as to any publisher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import backoffPolicy
from twisted.trial import unittest

from sixnet.core.events import SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator

from .support.bridge import TOPIC, BridgedGrid, summary
from .support.waiting import pause, wait_for


class LocalTargetTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.lab = BridgedGrid(self, pki, tmp_path)

    def emit(self, kind: str, count: int = 1, **fields: Any) -> None:
        for _ in range(count):
            self.lab.bus.emit(SecurityEvent(kind, **fields))

    async def test_a_burst_is_one_incident_with_its_count(self) -> None:
        lab = await self.lab.start()
        got = await lab.subscriber()
        self.emit("irp.login-failed", 7, subject="alice@example.test",
                  source="::ffff:192.0.2.7", detail="wrong password for alice@example.test")
        await wait_for(lambda: got, what="the incident")
        (notification,) = got
        assert notification.node == TOPIC
        assert summary(notification) == ("irp.login-failed", 7, "192.0.2.7",
                                          "alice@example.test")
        assert IODEFValidator().problem(notification.payload) is None
        await wait_for(lambda: lab.bridge.queue.depth == 0, what="the queue emptied")
        metrics = lab.metrics.render().decode()
        assert 'sixnet_bridge_events_total{kind="irp.login-failed"} 7' in metrics
        assert 'sixnet_bridge_incidents_published_total{kind="irp.login-failed"} 1' in metrics
        assert "sixnet_bridge_queued 0" in metrics

    async def test_the_bridge_publishes_as_a_platform_the_broker_audits(self) -> None:
        lab = await self.lab.start()
        got = await lab.subscriber()
        self.emit("chat.mitm", subject="bob@example.test", source="2001:db8::5",
                  detail="certificate differs from the directory's")
        await wait_for(lambda: got, what="the incident")
        assert summary(got[0]) == ("chat.mitm", 1, "2001:db8::5", "bob@example.test")
        assert got[0].sender == "broker.localhost"
        config = lab.grid.broker.engine.nodes[TOPIC].config  # typed by payload (RFC 8600 7.1)
        assert (config.type, config.title) == (IODEF_NS, "sixnet security incidents")
        audit = lab.config.sixnet.state_dir / "grid-broker-audit.jsonl"
        await wait_for(lambda: '"publish"' in audit.read_text(), what="publish audited")
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        actors = {(r["event"], r.get("actor")) for r in records if "actor" in r}
        assert actors == {("create", "sixnet-bridge@localhost"),
                          ("publish", "sixnet-bridge@localhost")}, records

    async def test_per_service_topics(self) -> None:
        lab = await self.lab.start({"topics": {"grid": "grid-events"}})
        grid_events = await lab.subscriber("grid-events")
        self.emit("grid.rate-limited", subject="sensor@localhost", source="127.0.0.1")
        await wait_for(lambda: grid_events, what="the grid incident")
        assert grid_events[0].node == "grid-events"

    async def test_a_platform_not_allowed_to_publish_keeps_its_incidents_queued(self) -> None:
        lab = await self.lab.start(tables={"roles": {"readers": {
            "platforms": ["sixnet-bridge@localhost"], "operations": ["subscribe"]}}})
        self.emit("chat.mitm", subject="bob@example.test")
        await wait_for(lambda: lab.bridge.queue.depth == 1, what="queued")
        await pause(0.5)  # the broker said forbidden; the bridge waits and tries again
        assert lab.bridge.queue.depth == 1
        assert list(lab.bridge.published.samples()) == []

    async def test_in_order_and_once_each_under_the_brokers_rate_limit(self) -> None:
        lab = await self.lab.start({"window": 0.05}, tables={"rate_limits": {
            "publishes_per_second": 10.0, "publish_burst": 3}})
        lab.bridge.backoff = backoffPolicy(initialDelay=0.1, maxDelay=0.3)
        got = await lab.subscriber()
        for n in range(8):
            self.emit("grid.hostile-input", source=f"192.0.2.{n}")
        await wait_for(lambda: len(got) >= 8 and lab.bridge.queue.depth == 0, what="all")
        await pause(0.2)
        assert [summary(g)[2] for g in got] == [f"192.0.2.{n}" for n in range(8)]

    async def test_a_document_refused_for_good_is_dropped_and_the_rest_go_on(self) -> None:
        lab = await self.lab.start(max_item_bytes=1000)  # every incident is bigger
        for n in range(3):
            self.emit("chat.mitm", subject="bob@example.test", source=f"192.0.2.{n}")
        await wait_for(lambda: ("refused",) in dict(lab.bridge.dropped.samples()) and
                       dict(lab.bridge.dropped.samples())[("refused",)] == 3, what="dropped")
        await wait_for(lambda: lab.bridge.queue.depth == 0, what="the queue emptied")

    async def test_a_session_ended_by_the_server_is_made_again(self) -> None:
        lab = await self.lab.start()
        await lab.subscriber()  # the bridge made its topic and waits for incidents
        session = lab.bridge._session
        assert session is not None
        lab.grid.router.revoke_session(lab.grid.router.sessions_of(
            "sixnet-bridge@localhost")[0], "replaced", "conflict")  # while idle
        await wait_for(lambda: lab.bridge._session not in (None, session), what="again")
        assert [s.full for s in lab.grid.router.sessions_of("sixnet-bridge@localhost")] == [
            lab.bridge._session.jid]

    async def test_a_revoked_bridge_platform_stops_publishing(self) -> None:
        lab = await self.lab.start()
        await lab.subscriber()
        session = lab.bridge._session
        assert session is not None
        # what the revocation watch does when `sixnet grid revoke` wrote the table
        lab.grid.revocations.revoked.add("sixnet-bridge@localhost")
        lab.grid.platform_revoked("sixnet-bridge@localhost")
        await wait_for(lambda: session.closed.called, what="the session ended")
        await pause(0.3)  # the bridge tried again, and was refused
        assert not lab.grid.router.sessions_of("sixnet-bridge@localhost")
        self.emit("chat.mitm", subject="bob@example.test")
        await wait_for(lambda: lab.bridge.queue.depth == 1, what="queued, not published")
