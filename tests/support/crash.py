"""Crash consistency of a real ``twistd sixnet``: acknowledged writes survive SIGKILL.

One process runs the IRP registry, the chat agent and the grid server with its broker on one
state directory. Three writers keep acknowledged writes going over real sockets, several in
flight at once: pubsub publishes (STARTTLS, SCRAM, then iq sets to the broker), IRP
registrations (`sixnet.irp.client`, a person's devices) and chat sends (the agent's control
socket, to people who are offline, so each message stays queued). The process is killed with
SIGKILL at a random moment, started again on the same state directory, and every write that
had been acknowledged before the kill must be there; then the writers go on, and so on.

`CrashLab.run` does that for a number of iterations and returns `Figures`;
tests/test_crash_consistency.py runs a few, benchmarks/crash.py many.
"""

from __future__ import annotations

import ipaddress
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree
from twisted.internet import defer, endpoints, reactor
from twisted.protocols import amp

from sixnet.chat.control import ListMessages, Send, Show
from sixnet.irp.client import IRPClient, connect
from sixnet.pki.store import CertificateStore, NodeIdentity
from tests.grid_harness import RawClient
from tests.support.accounts import add_accounts
from tests.support.configs import config_file, sixnet_toml
from tests.support.pki import LabPKI
from tests.support.ports import free_port
from tests.support.twistd import TwistdProcess
from tests.support.waiting import pause, retry

DOMAIN = "localhost"
BROKER = f"broker.{DOMAIN}"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
WRITER = f"writer@{DOMAIN}"
AGENT = f"agent@{DOMAIN}"
PASSWORD = "crash test password"
#: Writes each writer keeps in flight.
WINDOW = 8
#: The IRP writer's devices (the registry's default limit per person).
DEVICES = 8
#: Items asked for in one retrieval, and most messages one chat run sends (one listing).
CHUNK = 100
MAX_CHAT_PER_RUN = 5000
#: Items a topic keeps: more than one run publishes, so none is dropped for space.
MAX_ITEMS = 1000000
#: Seconds a restarted process may take until every writer is connected again.
CONNECT_TIMEOUT = 30.0
ADDRESS_BASE = int(ipaddress.IPv6Address("2001:db8::"))
PORT = 4605
#: Each service's audit log (its default name under the state directory).
AUDIT_LOGS = {"pubsub": "grid-broker-audit.jsonl", "irp": "irp-audit.jsonl"}


def address_of(counter: int) -> str:
    return str(ipaddress.IPv6Address(ADDRESS_BASE + counter))


def counter_of(address: str) -> int:
    return int(ipaddress.IPv6Address(address)) - ADDRESS_BASE


class WriteFailed(AssertionError):
    """A write was refused while the process was up: the test cannot say anything then."""


# -- writers ------------------------------------------------------------------------------------


class GridStream(RawClient):
    """A logged-in XMPP stream whose stanzas, once bound, are parsed and handed on."""

    def __init__(self) -> None:
        super().__init__()
        self._parser: etree.XMLPullParser | None = None
        self._answers: dict[str, defer.Deferred[etree._Element]] = {}
        self._ids = 0

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._parser is None:
            return
        self._parser.feed(data)
        for _, node in self._parser.read_events():
            parent = node.getparent()
            if parent is None or parent.getparent() is not None:
                continue
            waiter = self._answers.pop(node.get("id", ""), None)
            if waiter is not None:
                waiter.callback(node)
            parent.remove(node)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        answers, self._answers = self._answers, {}
        for waiter in answers.values():
            waiter.errback(ConnectionError("stream closed"))

    def parse_stanzas(self) -> None:
        self._parser = etree.XMLPullParser(events=("end",), resolve_entities=False,
                                           no_network=True)
        self._parser.feed(b"<stream:stream xmlns='jabber:client' "
                          b"xmlns:stream='http://etherx.jabber.org/streams'>")

    def iq(self, kind: str, inner: str) -> defer.Deferred[etree._Element]:
        """Send an iq to the broker; fires with its answer (result or error)."""
        self._ids += 1
        stanza_id = f"q{self._ids}"
        answer: defer.Deferred[etree._Element] = defer.Deferred()
        self._answers[stanza_id] = answer
        self.send(f"<iq type='{kind}' to='{BROKER}' id='{stanza_id}'>"
                  f"<pubsub xmlns='{PUBSUB_NS}'>{inner}</pubsub></iq>")
        return answer


def _refusal(answer: etree._Element) -> str | None:
    if answer.get("type") == "result":
        return None
    return etree.tostring(answer, encoding="unicode")[:400]


class RunWriter:
    """A writer whose writes are named per run: run -> what was acknowledged in it."""

    kind: str

    def __init__(self, lab: CrashLab) -> None:
        self.lab = lab
        self.acknowledged: dict[int, set[str]] = {}

    def count(self) -> int:
        return sum(map(len, self.acknowledged.values()))

    async def lost(self, runs: list[int]) -> list[str]:
        """The acknowledged writes of `runs` that are not there (and what else is wrong)."""
        lost = []
        for run in runs:
            if run not in self.acknowledged:
                continue
            wanted = sorted(self.acknowledged[run])
            found, problems = await self.found(run, wanted)
            lost += problems + [f"{self.kind} {run}: {w}" for w in wanted if w not in found]
        return lost

    async def found(self, run: int, wanted: list[str]) -> tuple[set[str], list[str]]:
        """Which of `wanted` the restarted process has, and any problem in asking it."""
        raise NotImplementedError

    def unaudited(self, audit: list[dict[str, Any]]) -> list[str]:
        """The acknowledged writes its service's audit log does not record (none kept)."""
        return []


class GridWriter(RunWriter):
    """Each run makes a topic and publishes items to it; an iq result is the acknowledgement.

    A run is in `acknowledged` once its topic is: the topic is a write too.
    """

    kind = "pubsub"
    stream: GridStream | None = None

    async def connect(self) -> None:
        stream = await GridStream.connect(self.lab.ports["grid"])
        try:
            await stream.starttls(self.lab.client_store())
            await stream.open_stream()
            if b"<success" not in await stream.scram_login("writer", PASSWORD):
                raise WriteFailed("the grid refused the writer's password")
            await stream.bind("crash")
        except BaseException:
            stream.transport.abortConnection()
            raise
        stream.parse_stanzas()
        self.stream = stream

    def count(self) -> int:
        return len(self.acknowledged) + super().count()

    def unaudited(self, audit: list[dict[str, Any]]) -> list[str]:
        audited = {(r["node"], r["item"]) for r in audit if r.get("event") == "publish"}
        return [f"publish {item}" for run, items in sorted(self.acknowledged.items())
                for item in sorted(items) if (f"crash-{run}", item) not in audited]

    async def write(self, run: int, crashing: defer.Deferred[None]) -> None:
        assert self.stream is not None
        answer = await self.stream.iq("set", f"<create node='crash-{run}'/>")
        if (problem := _refusal(answer)) is not None:
            raise WriteFailed(f"create crash-{run}: {problem}")
        items = self.acknowledged[run] = set()

        async def publisher(lane: int) -> None:
            assert self.stream is not None
            for n in range(lane, 1 << 30, WINDOW):
                item = f"{run}-{n}"
                answer = await self.stream.iq(
                    "set", f"<publish node='crash-{run}'><item id='{item}'>"
                           f"<entry xmlns='urn:example:crash'>{item}</entry></item></publish>")
                if (problem := _refusal(answer)) is not None:
                    raise WriteFailed(f"publish {item}: {problem}")
                items.add(item)

        await _lanes(publisher, crashing)

    async def found(self, run: int, wanted: list[str]) -> tuple[set[str], list[str]]:
        assert self.stream is not None
        found: set[str] = set()
        for start in range(0, max(len(wanted), 1), CHUNK):
            ids = "".join(f"<item id='{i}'/>" for i in wanted[start:start + CHUNK])
            answer = await self.stream.iq("get", f"<items node='crash-{run}'>{ids}</items>")
            if (problem := _refusal(answer)) is not None:
                return found, [f"topic crash-{run}: {problem}"]
            found |= {i.get("id") for i in answer.iter(f"{{{PUBSUB_NS}}}item")}
        return found, []

    def close(self) -> None:
        if self.stream is not None and self.stream.transport is not None:
            self.stream.transport.abortConnection()
        self.stream = None


class IRPWriter:
    """Registers the writer's devices again and again, each time at a new address.

    A device's address carries a counter that only grows, so after a restart each device
    must show the last acknowledged address or a later one (sent, not yet acknowledged).
    """

    kind = "irp"

    def __init__(self, lab: CrashLab) -> None:
        self.lab = lab
        self.client: IRPClient | None = None
        #: the addresses of acknowledged registrations (each is registered once)
        self.acknowledged: set[str] = set()
        #: device -> (highest counter acknowledged, highest counter sent)
        self.devices: dict[str, tuple[int, int]] = {}
        self._counter = 0

    async def connect(self) -> None:
        files = self.lab.writer_files
        self.client = await connect("127.0.0.1", self.lab.ports["irp"], self.lab.client_store(),
                                    identity=NodeIdentity.load(WRITER, files.certificate,
                                                               files.key),
                                    server_name=DOMAIN)

    def count(self) -> int:
        return len(self.acknowledged)

    def unaudited(self, audit: list[dict[str, Any]]) -> list[str]:
        audited = {a for r in audit if r.get("event") == "register" for a in r["addresses"]}
        return [f"irp register {a}" for a in sorted(self.acknowledged)
                if f"[{a}]:{PORT}" not in audited]

    async def write(self, run: int, crashing: defer.Deferred[None]) -> None:
        async def registrar(lane: int) -> None:
            assert self.client is not None
            device = f"d{lane}"
            while True:
                self._counter += 1
                counter = self._counter
                acked, _ = self.devices.get(device, (0, 0))
                self.devices[device] = (acked, counter)
                await self.client.register([(address_of(counter), PORT)], device=device,
                                           lifetime=self.lab.lifetime)
                self.devices[device] = (counter, counter)
                self.acknowledged.add(address_of(counter))

        await _lanes(registrar, crashing, lanes=DEVICES)

    async def lost(self, runs: list[int]) -> list[str]:
        assert self.client is not None
        record = await self.client.lookup(WRITER)
        found = {device: counter_of(ip) for ip, _, device in record.addresses}
        lost = []
        for device, (acked, sent) in sorted(self.devices.items()):
            if acked and device not in found:
                lost.append(f"device {device}: gone (acknowledged {acked})")
            elif acked and not acked <= found[device] <= sent:
                lost.append(f"device {device}: at {found[device]}, acknowledged {acked}, "
                            f"last sent {sent}")
        return lost

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None


class ControlClient(amp.AMP):
    """The agent's control socket; keeps what the agent shows."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: list[dict[str, Any]] = []

    @Show.responder
    def show(self, event: str, message: str) -> dict[str, Any]:
        self.shown.append(json.loads(message))
        return {}


class ChatWriter(RunWriter):
    """Each run sends messages to one person who is offline; the Send answer acknowledges."""

    kind = "chat"
    control: ControlClient | None = None

    async def connect(self) -> None:
        endpoint = endpoints.UNIXClientEndpoint(reactor, str(self.lab.control_socket))
        self.control = await endpoints.connectProtocol(endpoint, ControlClient())

    @staticmethod
    def peer(run: int) -> str:
        return f"offline-{run}@{DOMAIN}"

    async def write(self, run: int, crashing: defer.Deferred[None]) -> None:
        texts = self.acknowledged[run] = set()

        async def sender(lane: int) -> None:
            assert self.control is not None
            for n in range(lane, MAX_CHAT_PER_RUN, WINDOW):
                text = f"{run}-{n}"
                await self.control.callRemote(Send, to=self.peer(run), text=text)
                texts.add(text)

        await _lanes(sender, crashing)

    async def found(self, run: int, wanted: list[str]) -> tuple[set[str], list[str]]:
        assert self.control is not None
        self.control.shown = []
        answer = await self.control.callRemote(ListMessages, direction="out",
                                               peer=self.peer(run), limit=10000)
        shown = self.control.shown
        problems = [] if answer["count"] == len(shown) else [
            f"messages to {self.peer(run)}: {answer['count']} listed, {len(shown)} shown"]
        return {m["body"] for m in shown}, problems

    def close(self) -> None:
        if self.control is not None and self.control.transport is not None:
            self.control.transport.loseConnection()
        self.control = None


async def _lanes(lane: Any, crashing: defer.Deferred[None], lanes: int = WINDOW) -> None:
    """Run `lanes` write loops until the process is killed.

    A failure before the kill is a real one and is raised; once `crashing` has fired, every
    lane ends with its connection, which is what a kill looks like from outside.
    """
    running = [defer.Deferred.fromCoroutine(lane(i)) for i in range(lanes)]
    results = await defer.DeferredList(running, consumeErrors=True)
    for ok, result in results:
        if not ok and not crashing.called:
            result.raiseException()


# -- the lab ------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a run of `CrashLab.run` measured; `lost` must be all zeros."""

    iterations: int = 0
    acknowledged: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    lost_examples: list[str] = field(default_factory=list)
    #: acknowledged writes an audit log does not record, and audit lines that are not JSON
    unaudited: dict[str, int] = field(default_factory=dict)
    torn_audit_lines: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        restarts = self.restart_seconds or [0.0]
        return {
            "iterations": self.iterations,
            "acknowledged_writes": sum(self.acknowledged.values()),
            "acknowledged": self.acknowledged,
            "lost_writes": sum(self.lost.values()),
            "lost": self.lost,
            "lost_examples": self.lost_examples[:20],
            "unaudited_writes": self.unaudited,
            "torn_audit_lines": self.torn_audit_lines,
            "restart_to_writers_connected_seconds": {
                "mean": round(sum(restarts) / len(restarts), 3),
                "max": round(max(restarts), 3)},
            "seconds": round(self.seconds, 1),
        }


#: The databases of a lab, one per service: the ``database`` key of each section.
DATABASE_KEYS = ("irp", "chat", "grid", "grid.broker")


def sqlite_databases() -> dict[str, str]:
    """Each service's own SQLite file under the state directory (the default)."""
    return {"irp": "sqlite:irp.sqlite3", "chat": "sqlite:chat.sqlite", "grid":
            "sqlite:grid.sqlite3", "grid.broker": "sqlite:grid-broker.sqlite3"}


class CrashLab:
    """A configuration (every service enabled) and the three writers.

    `databases` maps each of `DATABASE_KEYS` to its URL (SQLite files by default; a
    PostgreSQL URL each, with a schema of its own, for that backend).
    """

    def __init__(self, directory: Path, pki: LabPKI, *, lifetime: int = 86400,
                 databases: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.pki = pki
        self.lifetime = lifetime
        self.databases = databases or sqlite_databases()
        self.state = directory / "state"
        self.control_socket = directory / "control.sock"
        self.ports = {name: free_port() for name in ("irp", "chat", "grid", "grid_tls")}
        self.writer_files = pki.files("user", WRITER)
        self.config = config_file(directory, self._config_text())
        self.writers = [GridWriter(self), IRPWriter(self), ChatWriter(self)]

    def client_store(self) -> CertificateStore:
        return CertificateStore.from_files([self.pki.root.directory / "ca.pem"])

    def _config_text(self) -> str:
        ports = self.ports
        databases = self.databases
        return sixnet_toml(
            self.pki.root.directory,
            {"host": self.pki.files("host", DOMAIN), "user": self.pki.files("user", AGENT)},
            sixnet={"state_dir": self.state},
            irp={"enabled": True, "listen": [f"tcp:{ports['irp']}:interface=127.0.0.1"],
                 "max_lifetime": self.lifetime, "database": databases["irp"]},
            chat={"enabled": True, "listen": [f"tcp:{ports['chat']}:interface=127.0.0.1"],
                  "control_socket": self.control_socket, "database": databases["chat"],
                  "irp_server": f"127.0.0.1:{ports['irp']}", "irp_server_name": DOMAIN,
                  "retry_initial": 300.0, "retry_max": 300.0},
            grid={"enabled": True, "domain": DOMAIN, "database": databases["grid"],
                  "listen": [f"tcp:{ports['grid']}:interface=127.0.0.1"],
                  "listen_tls": [f"tcp:{ports['grid_tls']}:interface=127.0.0.1"],
                  "scram_iterations": 4096, "stanzas_per_second": 100000.0,
                  "stanza_burst": 100000,
                  "broker": {"database": databases["grid.broker"],
                             "default_access_model": "whitelist",
                             "default_max_items": MAX_ITEMS, "max_items_limit": MAX_ITEMS,
                             "rate_limits": {"publishes_per_second": 100000.0,
                                             "publish_burst": 100000}}})

    async def _start(self) -> tuple[TwistdProcess, float]:
        process = TwistdProcess(self.config)
        return process, await process.start()

    async def _connect_all(self, process: TwistdProcess) -> float:
        started = time.monotonic()
        for writer in self.writers:
            try:
                await retry(writer.connect, timeout=CONNECT_TIMEOUT, interval=0.1)
            except Exception as e:
                raise AssertionError(f"{writer.kind}: cannot connect after a restart ({e}):\n"
                                     f"{process.tail()}") from e
        return time.monotonic() - started

    async def _check(self, runs: list[int], figures: Figures) -> None:
        for writer in self.writers:
            lost = await writer.lost(runs)
            figures.lost[writer.kind] = figures.lost.get(writer.kind, 0) + len(lost)
            figures.lost_examples += lost

    async def _write_until_killed(self, process: TwistdProcess, run: int,
                                  seconds: float) -> None:
        crashing: defer.Deferred[None] = defer.Deferred()
        writes = [defer.Deferred.fromCoroutine(w.write(run, crashing)) for w in self.writers]
        done = defer.DeferredList(writes, fireOnOneErrback=True, consumeErrors=True)
        await defer.DeferredList([done, defer.Deferred.fromCoroutine(pause(seconds))],
                                 fireOnOneCallback=True, fireOnOneErrback=True)
        crashing.callback(None)
        await process.kill()
        for writer in self.writers:
            writer.close()
        for d in writes:
            try:
                await d
            except WriteFailed:
                raise
            except Exception:
                pass

    async def run(self, iterations: int, rng: random.Random,
                  write_seconds: tuple[float, float] = (0.3, 1.0),
                  after_kill: Callable[[int], object] | None = None) -> Figures:
        """Write, SIGKILL, restart, check; `iterations` times. Then the earlier runs' writes
        are checked again and the process stops cleanly (SIGTERM, status 0).

        `after_kill(run)` is called while the process is down (a test that the check finds
        losses uses it to put back an older state directory).
        """
        figures = Figures()
        began = time.monotonic()
        await add_accounts(self.config, PASSWORD, ["writer"])
        process, _ = await self._start()
        await self._connect_all(process)
        try:
            for run in range(iterations):
                await self._write_until_killed(process, run, rng.uniform(*write_seconds))
                if after_kill is not None:
                    after_kill(run)
                process, starting = await self._start()
                figures.restart_seconds.append(starting + await self._connect_all(process))
                await self._check([run], figures)
                figures.iterations += 1
            # after every crash, the earlier runs' writes are all still there
            await self._check(list(range(iterations - 1)), figures)
            for writer in self.writers:
                writer.close()
            status = await process.terminate()
            if status != 0:
                raise AssertionError(f"twistd stopped with status {status}:\n{process.tail()}")
        finally:
            for writer in self.writers:
                writer.close()
            await process.kill()
        figures.acknowledged = {w.kind: w.count() for w in self.writers}
        self._check_audit(figures)
        figures.seconds = time.monotonic() - began
        return figures

    def _check_audit(self, figures: Figures) -> None:
        """Every acknowledged write that its service audits is in its audit log, whole: the
        record is written before the answer (docs/operator.rst, "Audit logs")."""
        for writer in self.writers:
            audit: list[dict[str, Any]] = []
            name = AUDIT_LOGS.get(writer.kind)
            for line in (self.state / name).read_text().splitlines() if name else ():
                try:
                    audit.append(json.loads(line))
                except ValueError:
                    figures.torn_audit_lines += 1
            missing = writer.unaudited(audit)
            figures.unaudited[writer.kind] = len(missing)
            figures.lost_examples += missing
