"""The registry as ``twistd sixnet-irp`` with ``[irp] workers = 2``, on SQLite and on
PostgreSQL: what one worker commits is seen through the other at once (lookups, kept answers,
watches), a killed worker is started again, and stopping the main process stops them all.

Which worker accepts a connection is the kernel's choice; a test stops the other worker
(SIGSTOP) while it connects, so the connection is the one it wants.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

from twisted.internet import reactor, task
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from sixnet.core.events import SecurityEvent
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.irp.client import connect
from sixnet.irp.workers import (
    REPORTS,
    AcceptShares,
    AdoptedPorts,
    WorkerReports,
    WorkerSupervisor,
    _Worker,
)
from sixnet.pki.store import NodeIdentity

from .support.configs import config_file, sixnet_toml
from .support.databases import drop_postgres_schema, fresh_postgres_schema, postgres_unavailable
from .support.pki import IdentityFiles
from .support.ports import free_port
from .support.twistd import TwistdProcess
from .test_irp import HOST, LabSetup, wait_for


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


def established(pid: int, port: int) -> int:
    """The connections to `port` that process `pid` holds open (its sockets, by inode)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class WorkersHarness:
    lab: LabSetup

    def database_url(self, base: Path) -> str:
        return f"sqlite:{base / 'irp.sqlite3'}"

    async def start_registry(self) -> tuple[TwistdProcess, int]:
        base = Path(self.mktemp()).absolute()  # type: ignore[attr-defined]
        self.lab = LabSetup(base)
        port = free_port()
        config = config_file(base, sixnet_toml(
            self.lab.ca.directory, {"host": IdentityFiles(HOST, base / "host" / "cert.pem",
                                                          base / "host" / "key.pem")},
            lab_ca=True, sixnet={"state_dir": base / "state"},
            irp={"enabled": True, "listen": [f"tcp:{port}:interface=127.0.0.1"],
                 "workers": 2, "database": self.database_url(base)}))
        process = TwistdProcess(config, plugin="sixnet-irp")
        self.addCleanup(process.kill)  # type: ignore[attr-defined]
        await process.start()
        assert process.transport is not None
        await wait_for(lambda: len(children(process.transport.pid)) == 2, timeout=20)
        return process, port

    async def client_on(self, pid: int, others: list[int], port: int, identity: NodeIdentity):
        """A client whose connection worker `pid` accepted (the `others` are stopped)."""
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            client = await connect("127.0.0.1", port, self.lab.client_store(),
                                   identity=identity, server_name=HOST)
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    async def test_changes_through_one_worker_are_seen_through_the_other(self) -> None:
        process, port = await self.start_registry()
        one, two = children(process.transport.pid)
        # workers adopt the sockets after opening the database: wait until both answer
        alice = await self.client_on(one, [two], port, self.lab.person("alice@example.test"))
        bob = await self.client_on(two, [one], port, self.lab.person("bob@example.test"))
        await bob.register([("2001:db8::1", 4605)], device="phone")
        assert (await alice.lookup("bob@example.test")).addresses[0][0] == "2001:db8::1"
        # the first worker keeps that answer; the change through the other is seen at once,
        # before any notification can arrive (the main process, which relays them on
        # SQLite, is stopped meanwhile)
        os.kill(process.transport.pid, signal.SIGSTOP)
        try:
            await bob.register([("2001:db8::2", 4605)], device="phone")
            assert (await alice.lookup("bob@example.test")).addresses[0][0] == "2001:db8::2"
        finally:
            os.kill(process.transport.pid, signal.SIGCONT)
        seen = []
        await alice.watch("bob@example.test", seen.append)
        started = time.monotonic()
        await bob.register([("2001:db8::3", 4605)], device="phone")
        await wait_for(lambda: seen, timeout=2.0)
        assert time.monotonic() - started < 2.0
        assert seen[-1].addresses[0][0] == "2001:db8::3"

    async def test_a_killed_worker_is_started_again_and_stop_stops_all(self) -> None:
        process, port = await self.start_registry()
        one, two = children(process.transport.pid)
        carol = await self.client_on(one, [two], port, self.lab.person("carol@example.test"))
        await carol.register([("2001:db8::7", 4605)])
        os.kill(one, signal.SIGKILL)
        await carol.lost
        # the other worker serves meanwhile
        dave = await self.client_on(two, [], port, self.lab.person("dave@example.test"))
        assert (await dave.lookup("carol@example.test")).addresses[0][0] == "2001:db8::7"
        await wait_for(lambda: len(children(process.transport.pid)) == 2
                       and one not in children(process.transport.pid), timeout=20)
        three = next(p for p in children(process.transport.pid) if p != two)
        await sleep(0.5)  # let the new worker open the database and adopt the ports
        again = await self.client_on(three, [two], port, self.lab.person("carol@example.test"))
        assert (await again.lookup("carol@example.test")).addresses[0][0] == "2001:db8::7"
        assert any("irp worker 0 ended" in line for line in process.output)
        workers = children(process.transport.pid)
        assert await process.terminate() == 0
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}/status") or \
                "zombie" in open(f"/proc/{pid}/status").read()


    async def test_connections_spread_evenly_over_the_workers(self) -> None:
        """Whichever worker the kernel wakes first, long-lived connections end up shared
        out within one of each other (`AcceptShares`)."""
        process, port = await self.start_registry()
        one, two = children(process.transport.pid)
        await self.client_on(one, [two], port, self.lab.person("alice@example.test"))
        await self.client_on(two, [one], port, self.lab.person("bob@example.test"))
        for i in range(8):
            client = await connect("127.0.0.1", port, self.lab.client_store(),
                                   identity=self.lab.person(f"p{i}@example.test"),
                                   server_name=HOST)
            self.addCleanup(client.close)
            await sleep(3 * AdoptedPorts.BALANCE_EVERY)  # each worker has looked again
        counts = [established(pid, port) for pid in (one, two)]
        assert counts == [5, 5], counts

    async def test_worker_logs_reach_the_main_processs_log(self) -> None:
        process, _ = await self.start_registry()
        await wait_for(lambda: sum("[irp-worker-" in line and "adopted" in line
                                   for line in process.output) == 2, timeout=10)


def test_a_worker_accepts_unless_a_live_accepting_worker_holds_fewer(tmp_path: Path) -> None:
    now = [100.0]
    one, two, three = (AcceptShares(tmp_path / "shares", 3, i, clock=lambda: now[0])
                       for i in range(3))
    assert one.may_accept(5)  # nobody else has reported: alive is only who says so
    two.report(3, True)
    assert not one.may_accept(5) and one.may_accept(3)  # equal counts: both accept
    assert two.may_accept(3)
    two.report(3, False)  # a worker that stopped accepting is not waited for
    assert one.may_accept(5)
    two.report(3, True)
    three.report(1, True)
    assert not two.may_accept(3) and three.may_accept(1)  # the fewest never stop
    now[0] += AcceptShares.ALIVE + 0.01  # two and three fell silent (stopped, or dead)
    assert one.may_accept(5)
    for shares in (one, two, three):
        shares.close()


def test_reports_carry_log_and_security_events_to_the_main_process() -> None:
    """What a worker writes (`WorkerReports`) the main process logs as its own, marked with
    the worker, and hands to its bus; an unreadable line is dropped and logged."""
    out = io.BytesIO()
    reports = WorkerReports(out)
    reports.log_observer({"log_format": "lookup of {user} refused", "user": "eve@x.test",
                          "log_level": LogLevel.warn, "log_namespace": "sixnet.irp",
                          "log_time": 1.0})
    detected = SecurityEvent("irp.certificate-refused", subject="eve@x.test",
                             source="192.0.2.1", detail="foreign", facts={"check": "x"},
                             time=2.0)
    reports.emit(detected)
    logged: list[dict] = []
    bus: list[SecurityEvent] = []
    supervisor = WorkerSupervisor(lambda i: [], [], 2, Path("unused"), reactor=object(),
                                  events=_Sink(bus), publisher=logged.append)
    worker = _Worker(supervisor, 1)
    data = out.getvalue() + b"not json\n"
    with capturedLogs() as own:
        worker.childDataReceived(REPORTS, data[:7])  # lines may arrive in pieces
        worker.childDataReceived(REPORTS, data[7:])
    assert bus == [detected]
    [first] = logged
    assert formatEvent(first) == "lookup of eve@x.test refused"
    assert (first["irp_worker"], first["log_system"]) == (1, "irp-worker-1")
    assert [e for e in own if "unreadable report" in formatEvent(e)]


def test_the_main_process_shows_each_workers_latest_metrics() -> None:
    """A worker's metrics appear on the main process's endpoint labelled with the worker, in
    the family of the same name when the main process has one (process metrics)."""
    main, worker_side = MetricsRegistry(), MetricsRegistry()
    main.counter("process_cpu_seconds_total", "CPU", read=lambda: 1.5)
    worker_side.counter("process_cpu_seconds_total", "CPU", read=lambda: 7.0)
    lookups = worker_side.counter("irp_requests_total", "requests", ["op"])
    lookups.inc(3, op="lookup")
    out = io.BytesIO()
    WorkerReports(out).metrics(worker_side.families())
    supervisor = WorkerSupervisor(lambda i: [], [], 2, Path("unused"), reactor=object(),
                                  metrics=main)
    worker = _Worker(supervisor, 1)
    worker.childDataReceived(REPORTS, out.getvalue())
    text = main.render().decode()
    assert text.count("# TYPE process_cpu_seconds_total counter") == 1
    assert "process_cpu_seconds_total 1.5\n" in text
    assert 'process_cpu_seconds_total{worker="1"} 7\n' in text
    assert 'irp_requests_total{worker="1",op="lookup"} 3\n' in text
    # a worker that ended shows nothing until its successor reports
    supervisor.workers[1] = worker
    supervisor.transports[1] = object()
    supervisor.running = False
    supervisor.ended(worker, Failure(ConnectionError()))
    assert 'worker="1"' not in main.render().decode()


class _Sink:
    def __init__(self, into: list[SecurityEvent]) -> None:
        self.into = into

    def emit(self, event: SecurityEvent) -> None:
        self.into.append(event)


class SQLiteWorkersTests(WorkersHarness, unittest.TestCase):
    timeout = 60


class PostgreSQLWorkersTests(WorkersHarness, unittest.TestCase):
    skip = postgres_unavailable()
    timeout = 60

    def database_url(self, base: Path) -> str:
        url, schema = fresh_postgres_schema()
        self.addCleanup(drop_postgres_schema, schema)
        return url
