"""Publish-subscribe fan-out: sixnet's broker against Prosody and ejabberd mod_pubsub.

One publisher, N subscribers (default 10, 100, 1000), 1 KB IODEF items, every client a real
XMPP client stream over loopback TLS (STARTTLS, SASL PLAIN, resource binding), driven by a
raw-socket asyncio load generator in this process (no XMPP library in the measured path).

For each server and N it measures
* saturation: the publisher keeps a window of publishes in flight; notifications delivered
  per second over the whole run, publish-to-delivery latency p50/p99, and losses;
* fixed rate: publishes paced at ``--fixed-rate`` notifications per second in total (below
  every server's saturation), latency p50/p99;
* in both, the time from each publish to its result (``result_p50_ms``, ``result_p99_ms``;
  not in ``--processes`` runs);
and the CPU seconds the server and the load generator used (a load generator near one full
core would be the bottleneck; the JSON says so).

Each server is set up by this script on loopback ports in a temporary directory with a lab CA
certificate: sixnet through ``twistd sixnet-grid``, Prosody (Debian package ``prosody``) with
its ``pubsub`` component, ejabberd (Debian package ``ejabberd``) with ``mod_pubsub``. Servers
that are not installed are skipped. Every server keeps its own default node configuration,
except the access model, which is ``open`` everywhere (sixnet: ``open_access = true``).

At the large end (``--processes P``, e.g. 10,000 subscribers) the subscribers live in P
child processes of this script (``--worker``), each multiplexing its share of the sessions on
one asyncio loop with plain `asyncio.Protocol` objects, so the load generator is not what
limits the run; every subscriber counts the distinct items it got, and an item it missed is
reported as lost. Each item's id carries its publish time (``CLOCK_MONOTONIC``, shared by the
processes), so a subscriber process measures the latency itself.

Usage: python benchmarks/grid_fanout.py [--servers sixnet,prosody,ejabberd]
           [--subscribers 10,100,1000] [--notifications 20000] [--fixed-rate 1000]
           [--processes 0] [--notification-type normal]
Prints one JSON document (results and ratios sixnet/other) on standard output. With
``GRID_FANOUT_PROFILE=FILE`` in the environment, sixnet runs under cProfile and saves its
statistics to FILE when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sixnet.pki.ca import LabCA
from tests.support import accounts
from tests.support.configs import config_file, sixnet_toml
from tests.support.pki import IdentityFiles
from tests.support.ports import free_port, wait_for_port
from tests.support.procfs import cpu_seconds
from tests.support.twistd import ROOT, twistd_command

DOMAIN = "localhost"
PASSWORD = "bench secret"
IODEF_NS = "urn:ietf:params:xml:ns:iodef-2.0"
PAYLOAD = (
    f'<IODEF-Document version="2.00" xml:lang="en" xmlns="{IODEF_NS}">'
    '<Incident purpose="reporting" restriction="private">'
    '<IncidentID name="csirt.example.com">492382</IncidentID>'
    "<GenerationTime>2015-07-18T09:00:00-05:00</GenerationTime>"
    "<Description>" + "Scan from 192.0.2.1 against 198.51.100.0/24. " * 13 + "</Description>"
    '<Contact type="organization" role="creator"><Email>'
    "<EmailTo>contact@csirt.example.com</EmailTo></Email></Contact>"
    "</Incident></IODEF-Document>"
)
ITEM_ID = re.compile(rb"<item[^>]*? id=['\"]b(\d+)['\"]")
#: An item id of the multi-process run: b<sequence>-<publish time in ns>.
STAMPED_ID = re.compile(rb"<item[^>]*? id=['\"]b(\d+)-(\d+)['\"]")


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (ejabberdctl -> su -> beam)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0.0
    for member in tree:
        with contextlib.suppress(OSError):
            total += cpu_seconds(member)
    return total


def _many_files() -> None:
    """Let a server hold thousands of connections (the default soft limit is often 1024)."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))


# -- certificates ------------------------------------------------------------------------------


def lab_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A lab CA and a host certificate for localhost: (ca.pem, cert.pem, key.pem)."""
    ca = LabCA.init(directory / "ca", name="grid_fanout benchmark CA")
    cert, key, _ = ca.issue("host", DOMAIN, out=directory / "host")
    return directory / "ca" / "ca.pem", cert, key


# -- servers -------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    directory: Path
    ca: Path
    cert: Path
    key: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None
    pubsub: ClassVar[str] = "pubsub." + DOMAIN
    register_in_band: ClassVar[bool] = False
    #: pubsub#notification_type of the benchmark's topics (sixnet and ejabberd).
    notification_type: str = "normal"

    def available(self) -> bool:
        return True

    async def prepare(self, users: list[str]) -> None:
        """Write configuration and accounts."""

    def command(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        log = (self.directory / f"{self.name}.out").open("wb")
        self.process = await asyncio.create_subprocess_exec(
            *self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
            start_new_session=True, preexec_fn=self.preexec, env=self.environment())
        process = self.process
        try:
            await asyncio.to_thread(wait_for_port, self.port, 60.0,
                                    lambda: process.returncode is None)
        except RuntimeError:
            raise RuntimeError(f"{self.name} did not start; see "
                               f"{self.directory}/{self.name}.out") from None
        await asyncio.sleep(0.5)

    def preexec(self) -> None:
        _many_files()

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def cpu(self) -> float:
        assert self.process is not None
        return process_tree_cpu(self.process.pid)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                os.killpg(self.process.pid, 9)
                await self.process.wait()


class Sixnet(Server):
    pubsub = "broker." + DOMAIN

    async def prepare(self, users: list[str]) -> None:
        state = self.directory / "state"
        self.config = config_file(self.directory, sixnet_toml(
            self.ca.parent, {"host": IdentityFiles(DOMAIN, self.cert, self.key)},
            sixnet={"state_dir": state},
            grid={"enabled": True, "domain": DOMAIN,
                  "listen": [f"tcp:{self.port}:interface=127.0.0.1"],
                  "listen_tls": [f"tcp:{free_port()}:interface=127.0.0.1"],
                  "allow_plain": True, "scram_iterations": 4096,
                  "stanzas_per_second": 1000000.0, "stanza_burst": 1000000,
                  "max_connections_per_address": 100000,
                  "max_unauthenticated_per_address": 100000,
                  "broker": {"open_access": True, "default_access_model": "open",
                             "notification_type": self.notification_type,
                             "rate_limits": {"publishes_per_second": 1000000.0,
                                             "publish_burst": 1000000,
                                             "subscriptions_per_second": 1000000.0,
                                             "subscription_burst": 1000000}}}))
        proc = await asyncio.create_subprocess_exec(
            *accounts.command(self.config, PASSWORD, users), cwd=ROOT)
        if await proc.wait() != 0:
            raise RuntimeError("creating sixnet accounts failed")

    def command(self) -> list[str]:
        profile = os.environ.get("GRID_FANOUT_PROFILE")  # cProfile statistics of the broker
        options = ["--profiler=cprofile", "--savestats", f"--profile={profile}"] \
            if profile else []
        return twistd_command("sixnet-grid", self.config, twistd_options=options)


class Prosody(Server):
    def available(self) -> bool:
        return shutil.which("prosody") is not None

    async def prepare(self, users: list[str]) -> None:
        data = self.directory / "data"
        accounts = data / DOMAIN / "accounts"
        accounts.mkdir(parents=True)
        for user in users:  # internal_plain storage: one Lua table per account
            (accounts / f"{user}.dat").write_text(
                f'return {{\n\t["password"] = "{PASSWORD}";\n}};\n')
        self.config = self.directory / "prosody.cfg.lua"
        self.config.write_text(f"""
run_as_root = true
admins = {{ "publisher@{DOMAIN}" }} -- only admins may create nodes on Prosody's pubsub
pidfile = "{self.directory}/prosody.pid"
data_path = "{data}"
log = {{ warn = "{self.directory}/prosody.log" }}
modules_enabled = {{ "saslauth"; "tls"; "disco"; "ping"; "posix" }}
modules_disabled = {{ "s2s" }}
c2s_ports = {{ {self.port} }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ }}
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = true
VirtualHost "{DOMAIN}"
  ssl = {{ certificate = "{self.cert}"; key = "{self.key}"; }}
Component "pubsub.{DOMAIN}" "pubsub"
""")

    def command(self) -> list[str]:
        return ["prosody", "-F", "--config", str(self.config)]


class Ejabberd(Server):
    register_in_band = True

    def available(self) -> bool:
        return shutil.which("ejabberdctl") is not None

    async def prepare(self, users: list[str]) -> None:
        combined = self.directory / "combined.pem"
        combined.write_text(self.cert.read_text() + self.key.read_text())
        self.node = f"bench{os.getpid()}@localhost"
        (self.directory / "spool").mkdir()
        (self.directory / "logs").mkdir()
        self.config = self.directory / "ejabberd.yml"
        self.config.write_text(f"""
hosts: ["{DOMAIN}"]
loglevel: warning
certfiles: ["{combined}"]
ca_file: "{self.ca}"
listen:
  - port: {self.port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: true
    max_stanza_size: 262144
acl:
  local:
    user_regexp: ""
access_rules:
  register:
    allow: all
  local:
    allow: local
shaper_rules: {{}}
auth_method: internal
auth_password_format: plain
registration_timeout: infinity
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_register:
    access: register
    ip_access: all
  mod_offline: {{}}
  mod_pubsub:
    host: "pubsub.@HOST@"
    access_createnode: local
    plugins: ["flat"]
    default_node_config:
      notification_type: {self.notification_type}
      persist_items: true
      max_items: 100
""")
        # The Debian ejabberdctl.cfg names /etc/ejabberd/ejabberd.yml; this one names ours.
        self.ctl_config = self.directory / "ejabberdctl.cfg"
        self.ctl_config.write_text(f'EJABBERD_CONFIG_PATH="{self.config}"\n'
                                   f'EJABBERD_PID_PATH="{self.directory}/ejabberd.pid"\n')
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(self.directory)], check=True)
        os.chmod(self.directory, 0o755)

    def preexec(self) -> None:
        """Raise the file limit, then become the ejabberd user ourselves: ejabberdctl would
        otherwise `su` to it, and PAM would put the limit back to 1024."""
        import pwd

        _many_files()
        account = pwd.getpwnam("ejabberd")
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)

    def environment(self) -> dict[str, str]:
        import pwd

        return {**os.environ, "HOME": pwd.getpwnam("ejabberd").pw_dir}

    def command(self) -> list[str]:
        return ["ejabberdctl", "--ctl-config", str(self.ctl_config), "--node", self.node,
                "--spool", str(self.directory / "spool"), "--logs",
                str(self.directory / "logs"), "foreground"]

    async def stop(self) -> None:
        stopper = await asyncio.create_subprocess_exec(
            "ejabberdctl", "--ctl-config", str(self.ctl_config), "--node", self.node, "stop",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        await stopper.wait()
        await super().stop()


SERVERS = {"sixnet": Sixnet, "prosody": Prosody, "ejabberd": Ejabberd}


# -- the raw-socket client -----------------------------------------------------------------------


class Client:
    """One XMPP client stream: negotiation by hand, then raw reads."""

    def __init__(self, user: str, server: Server, context: ssl.SSLContext) -> None:
        self.user = user
        self.server = server
        self.context = context
        self.buffer = b""
        self.latencies: list[float] = []
        self.received = 0
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def until(self, pattern: bytes, timeout: float = 30.0) -> bytes:
        compiled = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while not compiled.search(self.buffer):
            data = await asyncio.wait_for(self.reader.read(65536),
                                          max(0.01, deadline - time.monotonic()))
            if not data:
                raise ConnectionError(f"{self.user}: closed; got {self.buffer[-400:]!r}")
            self.buffer += data
        found = self.buffer
        self.buffer = b""
        return found

    def send(self, data: str) -> None:
        self.writer.write(data.encode())

    async def open_stream(self) -> bytes:
        self.send(f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        return await self.until(rb"</stream:features>")

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        await self.open_stream()
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.until(rb"<proceed")
        await self.writer.start_tls(self.context, server_hostname=DOMAIN)
        await self.open_stream()
        if self.server.register_in_band:
            self.send(f"<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
                      f"<username>{self.user}</username><password>{PASSWORD}</password>"
                      "</query></iq>")
            answer = await self.until(rb"<iq[^>]*id=.reg.[^>]*>.*?</iq>|<iq[^>]*id=.reg.[^>]*/>")
            if b"type='error'" in answer and b"conflict" not in answer:
                raise RuntimeError(f"registration of {self.user} failed: {answer[-300:]!r}")
        token = base64.b64encode(f"\0{self.user}\0{PASSWORD}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                  f"{token}</auth>")
        answer = await self.until(rb"<success|</failure>")
        if b"<success" not in answer:
            raise RuntimeError(f"{self.server.name}: login of {self.user} failed: {answer!r}")
        await self.open_stream()
        self.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  "<resource>bench</resource></bind></iq>")
        await self.until(rb"</jid>")
        self.send("<iq type='set' id='sess'><session "
                  "xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        await self.until(rb"id=.sess.")
        self.send("<presence/>")

    async def iq(self, body: str, stanza_id: str) -> bytes:
        self.send(body)
        return await self.until(rb"<iq[^>]*id=['\"]" + stanza_id.encode() +
                                rb"['\"][^>]*(/>|>.*?</iq>)")

    def count(self, sent: dict[int, float]) -> None:
        """Start counting notifications in the background."""
        self.task = asyncio.get_running_loop().create_task(self._count(sent))

    async def _count(self, sent: dict[int, float]) -> None:
        tail = self.buffer
        while True:
            data = await self.reader.read(262144)
            if not data:
                return
            now = time.perf_counter()
            buffer = tail + data
            last = 0
            for match in ITEM_ID.finditer(buffer):
                self.received += 1
                self.latencies.append(now - sent[int(match.group(1))])
                last = match.end()
            tail = buffer[max(last, len(buffer) - 200):]

    async def close(self) -> None:
        if hasattr(self, "task"):
            self.task.cancel()
        with contextlib.suppress(Exception):
            self.send("</stream:stream>")
            self.writer.close()


# -- the runs ------------------------------------------------------------------------------------


async def connect_all(server: Server, users: list[str], context: ssl.SSLContext,
                      parallel: int = 20) -> list[Client]:
    clients = [Client(u, server, context) for u in users]
    for start in range(0, len(clients), parallel):
        await asyncio.gather(*(c.connect() for c in clients[start:start + parallel]))
    return clients


async def run_one(server: Server, publisher: Client, subscribers: list[Client], n: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    node = f"bench{n}"
    answer = await publisher.iq(
        f"<iq type='set' to='{server.pubsub}' id='create{n}'>"
        f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='{node}'/>"
        "</pubsub></iq>", f"create{n}")
    if b"type='result'" not in answer and b'type="result"' not in answer:
        raise RuntimeError(f"{server.name}: create failed: {answer[-400:]!r}")
    chosen = subscribers[:n]
    for start in range(0, n, 50):
        batch = chosen[start:start + 50]
        results = await asyncio.gather(*(c.iq(
            f"<iq type='set' to='{server.pubsub}' id='sub{n}'>"
            "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
            f"<subscribe node='{node}' jid='{c.user}@{DOMAIN}'/></pubsub></iq>", f"sub{n}")
            for c in batch))
        for result in results:
            if b"subscribed" not in result:
                raise RuntimeError(f"{server.name}: subscribe failed: {result[-400:]!r}")
    sent: dict[int, float] = {}
    for c in chosen:
        c.latencies, c.received = [], 0
        c.count(sent)
    result: dict[str, Any] = {"subscribers": n}
    sequence = [0]

    async def publish_run(items: int, interval: float | None) -> dict[str, Any]:
        for c in chosen:
            c.latencies, c.received = [], 0
        outstanding = asyncio.Semaphore(args.window)
        acked = [0]
        #: Seconds from each publish to its result (the broker answers once the item is
        #: committed and its notifications are written).
        answers: list[float] = []
        done = asyncio.Event()

        async def read_acks() -> None:
            tail = b""
            while acked[0] < items:
                data = await publisher.reader.read(65536)
                if not data:
                    raise ConnectionError("publisher closed")
                buffer = tail + data
                matches = list(re.finditer(rb"<iq[^>]*id=['\"]p(\d+)['\"]", buffer))
                now = time.perf_counter()
                answers.extend(now - sent[int(m.group(1))] for m in matches)
                tail = buffer[max(matches[-1].end() if matches else 0, len(buffer) - 200):]
                for _ in matches:
                    acked[0] += 1
                    outstanding.release()
            done.set()

        reader_task = asyncio.get_running_loop().create_task(read_acks())
        server_cpu, own_cpu = server.cpu(), time.process_time()
        started = time.perf_counter()
        for i in range(items):
            await outstanding.acquire()
            sequence[0] += 1
            number = sequence[0]
            if interval is not None:
                await asyncio.sleep(max(0.0, started + i * interval - time.perf_counter()))
            sent[number] = time.perf_counter()
            publisher.send(
                f"<iq type='set' to='{server.pubsub}' id='p{number}'>"
                f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'>"
                f"<item id='b{number}'>{PAYLOAD}</item></publish></pubsub></iq>")
        await asyncio.wait_for(done.wait(), args.timeout)
        expected = items * n
        deadline = time.perf_counter() + args.timeout
        while sum(c.received for c in chosen) < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        reader_task.cancel()
        latencies = [x for c in chosen for x in c.latencies]
        received = sum(c.received for c in chosen)
        return {
            "items": items, "notifications": received, "lost": expected - received,
            "seconds": round(elapsed, 3),
            "notifications_per_second": round(received / elapsed, 1),
            "latency_p50_ms": round(1000 * percentile(latencies, 50), 2) if latencies else None,
            "latency_p99_ms": round(1000 * percentile(latencies, 99), 2) if latencies else None,
            "result_p50_ms": round(1000 * percentile(answers, 50), 2) if answers else None,
            "result_p99_ms": round(1000 * percentile(answers, 99), 2) if answers else None,
            "server_cpu_seconds": round(server.cpu() - server_cpu, 2),
            "loadgen_cpu_seconds": round(time.process_time() - own_cpu, 2),
        }

    items = max(10, args.notifications // n)
    result["saturation"] = await publish_run(items, None)
    rate = args.fixed_rate / n  # items per second
    fixed_items = max(10, int(rate * args.fixed_seconds))
    result["fixed_rate"] = {"notifications_per_second_target": args.fixed_rate,
                            **await publish_run(fixed_items, 1.0 / rate)}
    for c in chosen:
        c.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await c.task
    # Unsubscribe nobody: the next N uses a fresh node; the clients are reused.
    return result


async def bench_server(name: str, args: argparse.Namespace, certs: tuple[Path, Path, Path],
                       base: Path) -> dict[str, Any]:
    directory = base / name
    directory.mkdir()
    server = SERVERS[name](name, directory, *certs)
    if not server.available():
        return {"skipped": f"{name} is not installed"}
    server.notification_type = args.notification_type
    most = max(args.subscribers)
    users = ["publisher"] + [f"sub{i}" for i in range(most)]
    await server.prepare(users)
    await server.start()
    context = ssl.create_default_context(cafile=str(certs[0]))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    clients: list[Client] = []
    try:
        if args.processes:
            clients = await connect_all(server, users[:1], context)
            return {"runs": [await run_large(server, clients[0], n, args, certs[0])
                             for n in args.subscribers]}
        started = time.perf_counter()
        clients = await connect_all(server, users, context)
        print(f"{name}: {len(clients)} clients logged in in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        publisher, subscribers = clients[0], clients[1:]
        runs = []
        for n in args.subscribers:
            runs.append(await run_one(server, publisher, subscribers, n, args))
            print(f"{name} N={n}: {json.dumps(runs[-1])}", file=sys.stderr)
        return {"runs": runs}
    finally:
        for c in clients:
            await c.close()
        await server.stop()


# -- the large end: subscribers in worker processes ----------------------------------------------


class Subscriber(asyncio.Protocol):
    """One subscriber's stream, negotiated by hand, then counting stamped items."""

    def __init__(self, user: str, tally: Tally) -> None:
        self.user = user
        self.tally = tally
        self.buffer = b""
        self.pattern: re.Pattern[bytes] | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.counting = False
        self.items: set[int] = set()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"{self.user}: closed; "
                                                      f"got {self.buffer[-300:]!r}"))

    def data_received(self, data: bytes) -> None:
        if self.counting:
            now = time.monotonic_ns()
            buffer = self.buffer + data
            last = 0
            for match in STAMPED_ID.finditer(buffer):
                number = int(match.group(1))
                if number not in self.items:
                    self.items.add(number)
                    self.tally.latencies.append(now - int(match.group(2)))
                    self.tally.last_ns = now
                last = match.end()
            self.buffer = buffer[max(last, len(buffer) - 300):]
            return
        self.buffer += data
        self._check()

    def _check(self) -> None:
        if self.pattern is not None and self.pattern.search(self.buffer):
            found, self.buffer, self.pattern = self.buffer, b"", None
            assert self.waiter is not None
            self.waiter.set_result(found)

    async def until(self, pattern: bytes, timeout: float = 120.0) -> bytes:
        self.pattern = re.compile(pattern, re.S)
        self.waiter = asyncio.get_running_loop().create_future()
        self._check()
        return await asyncio.wait_for(self.waiter, timeout)

    def send(self, data: str) -> None:
        self.transport.write(data.encode())

    async def open_stream(self) -> bytes:
        self.send(f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        return await self.until(rb"</stream:features>")

    async def login(self, port: int, context: ssl.SSLContext, register: bool) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", port)
        await self.open_stream()
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.until(rb"<proceed")
        transport = await loop.start_tls(self.transport, self, context, server_hostname=DOMAIN)
        assert transport is not None
        self.transport = transport  # type: ignore[assignment]
        await self.open_stream()
        if register:
            self.send(f"<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
                      f"<username>{self.user}</username><password>{PASSWORD}</password>"
                      "</query></iq>")
            answer = await self.until(rb"<iq[^>]*id=.reg.[^>]*>.*?</iq>|<iq[^>]*id=.reg.[^>]*/>")
            if b"type='error'" in answer and b"conflict" not in answer:
                raise RuntimeError(f"registration of {self.user} failed: {answer[-300:]!r}")
        token = base64.b64encode(f"\0{self.user}\0{PASSWORD}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                  f"{token}</auth>")
        answer = await self.until(rb"<success|</failure>")
        if b"<success" not in answer:
            raise RuntimeError(f"login of {self.user} failed: {answer!r}")
        await self.open_stream()
        self.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  "<resource>bench</resource></bind></iq>")
        await self.until(rb"</jid>")
        self.send("<iq type='set' id='sess'><session "
                  "xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        await self.until(rb"id=.sess.")
        self.send("<presence/>")

    async def subscribe(self, service: str, node: str) -> None:
        self.send(f"<iq type='set' to='{service}' id='sub'>"
                  "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                  f"<subscribe node='{node}' jid='{self.user}@{DOMAIN}'/></pubsub></iq>")
        answer = await self.until(rb"<iq[^>]*id=['\"]sub['\"][^>]*(/>|>.*?</iq>)")
        if b"subscribed" not in answer:
            raise RuntimeError(f"subscribe of {self.user} failed: {answer[-300:]!r}")


@dataclass
class Tally:
    """What one worker process measured in one phase."""

    latencies: list[int] = field(default_factory=list)
    #: When the latest copy arrived (CLOCK_MONOTONIC ns).
    last_ns: int = 0


async def worker(spec: dict[str, Any]) -> None:
    """A child process: log in and subscribe its users, then count on command.

    Commands on standard input, one a line: ``count`` (forget what was counted),
    ``report ITEMS TIMEOUT`` (wait until every subscriber has ITEMS items or TIMEOUT seconds
    passed, then print the tally as one JSON line), ``quit``.
    """
    _many_files()
    context = ssl.create_default_context(cafile=spec["ca"])
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    tally = Tally()
    subscribers = [Subscriber(f"sub{i}", tally)
                   for i in range(spec["first"], spec["first"] + spec["count"])]

    async def one(s: Subscriber) -> None:
        await s.login(spec["port"], context, spec["register"])
        await s.subscribe(spec["service"], spec["node"])

    for start in range(0, len(subscribers), 50):
        await asyncio.gather(*(one(s) for s in subscribers[start:start + 50]))
    for s in subscribers:
        s.buffer, s.counting = b"", True
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    answer({"ready": len(subscribers)})
    while line := (await reader.readline()).decode().split():
        if line[0] == "count":
            tally.latencies.clear()
            tally.last_ns = 0
            for s in subscribers:
                s.items.clear()
            answer({"counting": True})
        elif line[0] == "report":
            items, deadline = int(line[1]), time.monotonic() + float(line[2])
            while time.monotonic() < deadline and \
                    any(len(s.items) < items for s in subscribers):
                await asyncio.sleep(0.02)
            missing = [items - len(s.items) for s in subscribers if len(s.items) < items]
            answer({"received": sum(len(s.items) for s in subscribers),
                    "incomplete_subscribers": len(missing), "lost": sum(missing),
                    "latencies_us": [x // 1000 for x in tally.latencies],
                    "last_ns": tally.last_ns,
                    "cpu_seconds": time.process_time()})
        elif line[0] == "quit":
            break
    for s in subscribers:
        with contextlib.suppress(Exception):
            s.send("</stream:stream>")
            s.transport.close()


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, command: str | None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command.encode() + b"\n")
            await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"a subscriber process ended (exit {await self.process.wait()})")
        return json.loads(line)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)


async def run_large(server: Server, publisher: Client, n: int, args: argparse.Namespace,
                    ca: Path) -> dict[str, Any]:
    """N subscribers in args.processes worker processes; saturation, then a fixed rate."""
    node = f"large{n}"
    answer = await publisher.iq(
        f"<iq type='set' to='{server.pubsub}' id='create{n}'>"
        f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><create node='{node}'/>"
        "</pubsub></iq>", f"create{n}")
    if b"type='result'" not in answer and b'type="result"' not in answer:
        raise RuntimeError(f"{server.name}: create failed: {answer[-400:]!r}")
    share = -(-n // args.processes)
    workers = []
    started = time.perf_counter()
    for part in range(args.processes):
        spec = {"first": part * share, "count": min(share, n - part * share),
                "port": server.port,
                "ca": str(ca), "register": server.register_in_band,
                "service": server.pubsub, "node": node}
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--worker", json.dumps(spec),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 30)
        workers.append(Worker(process))
    try:
        ready = await asyncio.wait_for(asyncio.gather(*(w.ask(None) for w in workers)),
                                       args.timeout * 5)
        print(f"{server.name}: {sum(r['ready'] for r in ready)} subscribers logged in and "
              f"subscribed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        sequence = [0]

        async def publish_run(items: int, interval: float | None) -> dict[str, Any]:
            await asyncio.gather(*(w.ask("count") for w in workers))
            outstanding = asyncio.Semaphore(args.window)
            acked = [0]
            done = asyncio.Event()

            async def read_acks() -> None:
                tail = b""
                while acked[0] < items:
                    data = await publisher.reader.read(65536)
                    if not data:
                        raise ConnectionError("publisher closed")
                    buffer = tail + data
                    ends = [m.end() for m in re.finditer(rb"<iq[^>]*id=['\"]p\d+['\"]", buffer)]
                    tail = buffer[max(ends[-1] if ends else 0, len(buffer) - 200):]
                    for _ in ends:
                        acked[0] += 1
                        outstanding.release()
                done.set()

            reader_task = asyncio.get_running_loop().create_task(read_acks())
            server_cpu = server.cpu()
            loadgen_cpu = [w.cpu() for w in workers]
            began, began_ns = time.perf_counter(), time.monotonic_ns()
            for i in range(items):
                await outstanding.acquire()
                if interval is not None:
                    await asyncio.sleep(max(0.0, began + i * interval - time.perf_counter()))
                sequence[0] += 1
                publisher.send(
                    f"<iq type='set' to='{server.pubsub}' id='p{sequence[0]}'>"
                    f"<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'>"
                    f"<item id='b{sequence[0]}-{time.monotonic_ns()}'>{PAYLOAD}</item>"
                    "</publish></pubsub></iq>")
            await asyncio.wait_for(done.wait(), args.timeout)
            reports = await asyncio.gather(*(w.ask(f"report {items} {args.timeout}")
                                             for w in workers))
            elapsed = time.perf_counter() - began
            reader_task.cancel()
            latencies = [x / 1000 for r in reports for x in r["latencies_us"]]
            received = sum(r["received"] for r in reports)
            # Throughput over the time until the last copy arrived, not the polling's end.
            last = max((r["last_ns"] for r in reports if r["last_ns"]), default=0)
            span = (last - began_ns) / 1e9 if last else elapsed
            return {
                "items": items, "notifications": received, "lost": items * n - received,
                "incomplete_subscribers": sum(r["incomplete_subscribers"] for r in reports),
                "seconds": round(span, 3),
                "notifications_per_second": round(received / span, 1),
                "latency_p50_ms": round(percentile(latencies, 50), 2) if latencies else None,
                "latency_p99_ms": round(percentile(latencies, 99), 2) if latencies else None,
                "latency_max_ms": round(max(latencies), 2) if latencies else None,
                "server_cpu_seconds": round(server.cpu() - server_cpu, 2),
                "loadgen_cpu_seconds": [round(w.cpu() - c, 2)
                                        for w, c in zip(workers, loadgen_cpu, strict=True)],
            }

        result: dict[str, Any] = {"subscribers": n, "processes": args.processes}
        result["saturation"] = await publish_run(max(2, args.notifications // n), None)
        print(f"{server.name} N={n} saturation: {json.dumps(result['saturation'])}",
              file=sys.stderr)
        rate = args.fixed_rate / n  # items per second
        result["fixed_rate"] = {"notifications_per_second_target": args.fixed_rate,
                                **await publish_run(max(3, int(rate * args.fixed_seconds)),
                                                    1.0 / rate)}
        print(f"{server.name} N={n} fixed rate: {json.dumps(result['fixed_rate'])}",
              file=sys.stderr)
        return result
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                assert w.process.stdin is not None
                w.process.stdin.write(b"quit\n")
                await asyncio.wait_for(w.process.wait(), 20)
            if w.process.returncode is None:
                w.process.kill()
                await w.process.wait()


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """sixnet's throughput over each other server's, and ejabberd's fixed-rate p99 over ours."""
    out: dict[str, Any] = {}
    ours = {r["subscribers"]: r for r in results.get("sixnet", {}).get("runs", [])}
    for other, data in results.items():
        if other == "sixnet" or "runs" not in data:
            continue
        for run in data["runs"]:
            mine = ours.get(run["subscribers"])
            if not mine:
                continue
            key = f"sixnet/{other} N={run['subscribers']}"
            theirs = run["saturation"]["notifications_per_second"]
            p99_theirs = run["fixed_rate"]["latency_p99_ms"]
            p99_ours = mine["fixed_rate"]["latency_p99_ms"]
            out[key] = {
                "throughput": round(mine["saturation"]["notifications_per_second"] / theirs, 2)
                if theirs else None,
                "fixed_rate_p99": round(p99_ours / p99_theirs, 2)
                if p99_ours and p99_theirs else None,
            }
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="sixnet,prosody,ejabberd")
    parser.add_argument("--subscribers", default="10,100,1000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--notifications", type=int, default=20000,
                        help="notifications per saturation run (items = this / N)")
    parser.add_argument("--fixed-rate", type=float, default=1000.0,
                        help="notifications per second in the fixed-rate run")
    parser.add_argument("--fixed-seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=32, help="publishes in flight")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--processes", type=int, default=0,
                        help="hold the subscribers in this many child processes (0: in this "
                             "one); for thousands of subscribers")
    parser.add_argument("--notification-type", default="normal", choices=("normal", "headline"),
                        help="pubsub#notification_type of the topics (sixnet and ejabberd)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.worker:
        await worker(json.loads(args.worker))
        return
    base = Path(tempfile.mkdtemp(prefix="grid-fanout-"))
    os.chmod(base, 0o755)
    try:
        certs = lab_certificates(base / "pki")
        for directory in (base / "pki", base / "pki" / "ca"):  # ejabberd reads the CA
            os.chmod(directory, 0o755)
        results: dict[str, Any] = {}
        for name in args.servers.split(","):
            try:
                results[name] = await bench_server(name, args, certs, base)
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "payload_bytes": len(PAYLOAD), "results": results, "ratios": ratios(results),
        }, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
