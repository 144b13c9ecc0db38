"""The metrics registry (names, labels, escaping, counters, gauges read when scraped), the
process metrics, the [metrics] section and the HTTP endpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.trial import unittest

from sixnet.app.config import load_config
from sixnet.app.root import make_root
from sixnet.chat.directory import PeerAddress
from sixnet.core.metrics import Registry, register_process_metrics
from sixnet.core.metrics_http import CONTENT_TYPE, is_loopback, metrics_service
from sixnet.core.runtime import ListeningService
from sixnet.irp.client import IRPError
from sixnet.irp.config import IRPConfig
from sixnet.irp.engine.credentials import hash_password
from sixnet.irp.service import build_service
from sixnet.pki.keys import generate_key
from tests.grid_harness import RawClient, ports, write_config
from tests.test_chat_agents import ALICE, BOB, CAROL, MALLORY, AgentHarness, until
from tests.test_irp import LabSetup, RegistryHarness, wait_for

from .support.configs import config_file, localhost_config, problem
from .support.prometheus import http_request, parse, value


def test_names_and_labels_are_checked() -> None:
    registry = Registry()
    for bad in ("1abc", "a-b", "a b", ""):
        with pytest.raises(ValueError, match="bad metric name"):
            registry.gauge(bad, "x")
    with pytest.raises(ValueError, match="must end in _total"):
        registry.counter("logins", "x")
    for label in ("__reserved", "a-b", "1a"):
        with pytest.raises(ValueError, match="bad label name"):
            registry.counter("x_total", "x", (label,))
    with pytest.raises(ValueError, match="named twice"):
        registry.counter("y_total", "x", ("a", "a"))
    registry.counter("z_total", "x", ("kind",))
    with pytest.raises(ValueError, match="registered twice"):
        registry.gauge("z_total", "x")
    counter = registry.counter("w_total", "x", ("kind", "outcome"))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(kind="message")
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels(kind="message", outcome="ok", extra="no")


def test_counters_count_and_cannot_go_down() -> None:
    registry = Registry()
    counter = registry.counter("sixnet_things_total", "Things.", ("kind",))
    series = counter.labels(kind="a")
    assert counter.labels(kind="a") is series  # taken once, incremented often
    series.inc()
    series.inc(2.5)
    counter.inc(kind="b")
    with pytest.raises(ValueError, match="cannot go down"):
        series.inc(-1)
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-0.5, kind="b")
    plain = registry.counter("sixnet_plain_total", "No labels.")
    families = parse(registry.render().decode())
    assert families["sixnet_things_total"].kind == "counter"
    assert value(families, "sixnet_things_total", kind="a") == 3.5
    assert value(families, "sixnet_things_total", kind="b") == 1
    # A counter without labels is there from the start, at 0.
    assert families["sixnet_plain_total"].samples == {frozenset(): 0.0}
    plain.inc()
    assert value(parse(registry.render().decode()), "sixnet_plain_total") == 1


def test_escaping_of_label_values_and_help() -> None:
    registry = Registry()
    counter = registry.counter("sixnet_escaped_total", 'Help with a \\ and a\nnewline "q".',
                               ("value",))
    tricky = 'back\\slash "quoted"\nnext line'
    counter.inc(value=tricky)
    text = registry.render().decode()
    assert '# HELP sixnet_escaped_total Help with a \\\\ and a\\nnewline "q".' in text
    assert 'sixnet_escaped_total{value="back\\\\slash \\"quoted\\"\\nnext line"} 1' in text
    families = parse(text)
    assert value(families, "sixnet_escaped_total", value=tricky) == 1
    assert families["sixnet_escaped_total"].help == 'Help with a \\ and a\nnewline "q".'


def test_gauges_set_or_read_when_scraped() -> None:
    registry = Registry()
    depth = [3]
    queue = registry.gauge("sixnet_queue", "Read when scraped.", read=lambda: depth[0])
    registry.gauge("sixnet_sessions", "By state.", ("state",),
                   read=lambda: {("connected",): 2, ("detached",): 1})
    level = registry.gauge("sixnet_level", "Set.")
    level.set(7)
    level.dec(2)
    registry.gauge("sixnet_special", "Odd values.", ("v",),
                   read=lambda: {("nan",): math.nan, ("inf",): math.inf, ("half",): 0.5})
    families = parse(registry.render().decode())
    assert value(families, "sixnet_queue") == 3
    depth[0] = 10
    families = parse(registry.render().decode())
    assert value(families, "sixnet_queue") == 10  # read again at each scrape
    assert value(families, "sixnet_sessions", state="detached") == 1
    assert value(families, "sixnet_level") == 5
    assert math.isnan(value(families, "sixnet_special", v="nan"))
    assert value(families, "sixnet_special", v="inf") == math.inf
    assert value(families, "sixnet_special", v="half") == 0.5
    with pytest.raises(ValueError, match="read when scraped"):
        queue.set(1)


def test_a_counter_read_when_scraped() -> None:
    registry = Registry()
    tally = {"publish": 4, "subscribe": 0}
    registry.counter("sixnet_refused_total", "Kept elsewhere.", ("operation",),
                     read=lambda: {(k,): v for k, v in tally.items()})
    families = parse(registry.render().decode())
    assert families["sixnet_refused_total"].kind == "counter"
    assert value(families, "sixnet_refused_total", operation="publish") == 4


def test_a_broken_reading_costs_only_its_own_metric() -> None:
    registry = Registry()
    registry.gauge("sixnet_before", "x", read=lambda: 1)
    registry.gauge("sixnet_broken", "x", read=lambda: 1 / 0)
    registry.gauge("sixnet_wrong_labels", "x", ("a",), read=lambda: {("1", "2"): 1})
    registry.gauge("sixnet_after", "x", read=lambda: 2)
    families = parse(registry.render().decode())
    assert sorted(families) == ["sixnet_after", "sixnet_before"]


def test_process_metrics_from_proc(tmp_path: Path) -> None:
    registry = Registry()
    assert register_process_metrics(registry)
    families = parse(registry.render().decode())
    assert families["process_cpu_seconds_total"].kind == "counter"
    assert value(families, "process_resident_memory_bytes") > 1_000_000
    assert value(families, "process_open_fds") >= 3
    assert value(families, "process_max_fds") >= value(families, "process_open_fds")
    assert value(families, "process_start_time_seconds") > 1_600_000_000
    nothing = Registry()
    assert not register_process_metrics(nothing, proc=str(tmp_path))  # no /proc: not Linux
    assert nothing.render() == b""


def test_metrics_section(pki: Any, tmp_path: Path) -> None:
    base = localhost_config(pki)
    config = load_config(config_file(tmp_path, base))
    assert not config.metrics.enabled  # off by default: nothing listens
    assert config.metrics.listen == "tcp:9464:interface=127.0.0.1"  # loopback by default
    assert problem(tmp_path, base + "[metrics]\nlisten = 'tcp:99999'\n") == \
        "FILE: metrics.listen: 'tcp:99999': port 99999 is out of range 0-65535"
    assert problem(tmp_path, base + "[metrics]\nlisten = ['tcp:9464']\n") == \
        "FILE: metrics.listen: expected a string, got a list"
    assert problem(tmp_path, base + "[metrics]\nport = 9464\n") == \
        "FILE: metrics.port: unknown key (known keys: enabled, listen)"
    assert problem(tmp_path, base + "[metrics]\nenabled = 1\n") == \
        "FILE: metrics.enabled: expected true or false, got integer 1"


def test_loopback_is_recognised() -> None:
    assert is_loopback("tcp:9464:interface=127.0.0.1")
    assert is_loopback("tcp6:9464:interface=\\:\\:1")
    assert is_loopback("unix:/run/sixnet/metrics.sock")
    assert not is_loopback("tcp:9464")  # every interface
    assert not is_loopback("tcp:9464:interface=0.0.0.0")
    assert not is_loopback("tcp:9464:interface=192.0.2.1")


class EndpointTests(unittest.TestCase):
    timeout = 20

    async def test_get_metrics_and_refusals(self) -> None:
        registry = Registry()
        registry.counter("sixnet_scraped_total", "x").inc(3)
        service = metrics_service("tcp:0:interface=127.0.0.1", registry)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.ports[0].getHost().port
        response = await http_request(port)
        assert response.code == 200
        assert response.headers["content-type"] == CONTENT_TYPE.decode()
        assert value(parse(response.body.decode()), "sixnet_scraped_total") == 3
        response = await http_request(port, "/metrics?debug=1")  # a query is no other path
        assert response.code == 200 and b"sixnet_scraped_total 3" in response.body
        for path in ("/", "/metrics/", "/other", "/metricsx"):
            assert (await http_request(port, path)).code == 404, path
        for method in ("POST", "PUT", "DELETE"):
            response = await http_request(port, "/metrics", method)
            assert response.code == 405, method
            assert response.headers["allow"] == "GET, HEAD"
        response = await http_request(port, "/metrics", "HEAD")
        assert response.code == 200 and response.body == b""


class GridMetricsTests(unittest.TestCase):
    """A real grid and the real endpoint, built by the composition root, over real sockets."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _root(self, metrics: bool) -> Any:
        write_config(self.tmp, self.pki, lockout_after=2)
        path = self.tmp / "sixnet.toml"
        if metrics:
            with path.open("a") as f:
                f.write('[metrics]\nenabled = true\nlisten = "tcp:0:interface=127.0.0.1"\n')
        root = make_root(load_config(path))
        root.startService()
        self.addCleanup(root.stopService)
        self.grid = root.getServiceNamed("grid")
        await self.grid.ready
        for name in ("alice", "bob"):
            await self.grid.accounts.add(name, f"{name} secret")
        return root

    async def _scrape(self, port: int) -> dict[str, Any]:
        response = await http_request(port)
        assert response.code == 200
        return parse(response.body.decode())

    async def test_logins_and_stanzas_move_the_counters(self) -> None:
        root = await self._root(metrics=True)
        port = root.getServiceNamed("metrics").ports[0].getHost().port
        self.grid.offline_count.interval = 0  # count the offline table at every scrape
        before = await self._scrape(port)
        assert value(before, "sixnet_grid_logins_total", mechanism="SCRAM-SHA-256",
                     outcome="success") == 0
        assert value(before, "process_open_fds") > 0

        grid_port, _ = ports(self.grid)
        alice = await RawClient.connect(grid_port)
        self.addCleanup(alice.transport.abortConnection)
        await alice.starttls(self.grid.tls.store)
        await alice.open_stream()
        assert b"<success" in await alice.scram_login("alice", "alice secret")
        await alice.bind("lab")
        bob = await RawClient.connect(grid_port)
        self.addCleanup(bob.transport.abortConnection)
        await bob.starttls(self.grid.tls.store)
        await bob.open_stream()
        for _ in range(2):  # the second wrong password locks bob out for this address
            assert b"<not-authorized/>" in await bob.scram_login("bob", "wrong")
        alice.send("<presence/>")
        for n in range(3):  # bob is offline: stored for him
            alice.send(f"<message to='bob@localhost' id='m{n}'><body>hi</body></message>")
        alice.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        await alice.until(rb"id=.p1.")

        after = await self._scrape(port)
        assert value(after, "sixnet_grid_logins_total", mechanism="SCRAM-SHA-256",
                     outcome="success") == 1
        assert value(after, "sixnet_grid_logins_total", mechanism="SCRAM-SHA-256",
                     outcome="failure") == 2
        assert value(after, "sixnet_grid_lockouts_total") == 1
        assert value(after, "sixnet_grid_stanzas_received_total", kind="message") == 3
        assert value(after, "sixnet_grid_stanzas_received_total", kind="presence") == 1
        assert value(after, "sixnet_grid_stanzas_received_total", kind="iq") == 1
        assert value(after, "sixnet_grid_sessions", state="connected") == 1
        assert value(after, "sixnet_grid_connections") == 2
        assert value(after, "sixnet_grid_revoked_platforms") == 0
        assert after["sixnet_grid_stanzas_received_total"].kind == "counter"
        # The offline table is counted in the background: a later scrape has it.
        for _ in range(50):
            offline = await self._scrape(port)
            if value(offline, "sixnet_grid_offline_messages") == 3:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert value(offline, "sixnet_grid_offline_messages") == 3
        assert value(offline, "sixnet_grid_offline_accounts") == 1

    async def test_off_by_default(self) -> None:
        root = await self._root(metrics=False)
        assert "metrics" not in root.namedServices
        assert all(not isinstance(s, ListeningService) or s.name != "metrics" for s in root)


class IRPMetricsTests(RegistryHarness, unittest.TestCase):
    """The registry's counters and gauges, over a real registry's sockets."""

    timeout = 60

    def setUp(self) -> None:
        self.lab = LabSetup(Path(self.mktemp()).absolute())

    async def test_requests_failures_lockouts_watches(self) -> None:
        registry = Registry()
        config = dataclasses.replace(
            IRPConfig(), enabled=True, listen=["tcp:0:interface=127.0.0.1"],
            database=self.database_url(), failure_delay=0.01, lockout_after=2)
        service = build_service(config, self.lab.server_store(), self.lab.host,
                                Path(self.mktemp()).absolute(), self.lab.ca, metrics=registry)
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        await wait_for(lambda: bool(service.listening.ports))
        await service.registry.store.set_password("erin@example.test", hash_password("right"), 0)
        anonymous = await self.client(service)
        for _ in range(2):
            with pytest.raises(IRPError):
                await anonymous.enroll("erin@example.test", generate_key(), password="wrong")
        alice = await self.client(service, self.lab.person("alice@example.test"))
        await alice.register([("192.0.2.1", 4605)], device="laptop")
        await alice.watch("alice@example.test", lambda record: None)
        families = parse(registry.render().decode())
        assert value(families, "sixnet_irp_requests_total", operation="enroll",
                     outcome="error") == 2
        assert value(families, "sixnet_irp_requests_total", operation="register",
                     outcome="ok") == 1
        assert value(families, "sixnet_irp_auth_failures_total", method="password") == 2
        assert value(families, "sixnet_irp_lockouts_total") == 1
        assert value(families, "sixnet_irp_connections") == 2
        assert value(families, "sixnet_irp_watches") == 1


class ChatMetricsTests(AgentHarness):
    """The agent's counters: handshakes by outcome, messages each way."""

    async def test_handshakes_and_messages(self) -> None:
        alice, bob = await self.agent(ALICE), await self.agent(BOB)
        await alice.agent.send(BOB, "one")
        await alice.agent.send(BOB, "two")
        await until(lambda: self.delivered(ALICE) == ["one", "two"])
        sent, received = alice.agent.counters.sent, bob.agent.counters.received
        assert (sent.value, received.value) == (2, 2)
        assert alice.agent.counters.handshakes["established"].value == 1
        assert bob.agent.counters.handshakes["established"].value == 1
        # A peer that presents someone else's certificate: refused in the handshake.
        mallory = await self.agent(MALLORY)
        make_session = mallory.agent._new_session

        def pretend(transport: Any) -> Any:
            session = make_session(transport)
            session.me = CAROL
            return session

        mallory.agent._new_session = pretend  # type: ignore[method-assign]
        self.shared.register(CAROL, [PeerAddress("127.0.0.1", self.port(mallory))], 60)
        await alice.agent.send(CAROL, "for carol only")
        await until(lambda: alice.agent.counters.handshakes["refused"].value >= 1)
        await until(lambda: mallory.agent.counters.handshakes["peer-refused"].value >= 1)
        assert mallory.agent.counters.received.value == 0
        assert alice.agent.counters.handshakes["established"].value == 1
