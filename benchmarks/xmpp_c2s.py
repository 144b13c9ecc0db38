"""Benchmark the XMPP server against Prosody and ejabberd on loopback; prints JSON.

    .venv/bin/python benchmarks/xmpp_c2s.py [--servers sixnet,prosody,ejabberd]
        [--clients 100] [--messages 200] [--login-seconds 10] [--login-concurrency 8]
    .venv/bin/python benchmarks/xmpp_c2s.py --idle 5000 [--servers ...] [--clients 100]

Measures, for each server, with the same load generator (Twisted + pyOpenSSL, one process):

* logins per second: TCP connect, STARTTLS (TLS 1.3), SASL SCRAM-SHA-1 (the mechanism all
  three offer out of the box), stream restart, resource binding, stream close; run by
  `--login-concurrency` loops for `--login-seconds`;
* one-to-one messages per second: `--clients` logged-in clients, each sending `--messages`
  chat messages to the next client's bare JID; the time until every message has arrived.

sixnet is also measured with SCRAM-SHA-256-PLUS (tls-exporter). Prosody and ejabberd (Debian
packages) are configured by this script in a temporary directory, on free loopback ports;
accounts there are made with in-band registration. Each server runs alone while measured.
The JSON has the figures and sixnet's ratios to the others (above 1: sixnet is faster; for
memory and CPU, below 1: sixnet needs less).

With ``--idle N`` the script measures what idle sessions cost instead: a canary client logs
in, then N sessions log in (TLS 1.3, SCRAM-SHA-256, resource binding; spread over `--clients`
accounts, distinct resources) and stay connected saying nothing. It reports, for the server
process only (ejabberd: its Erlang VM), the resident memory grown per session (RSS delta / N,
read after the sessions have idled a few seconds), the CPU per login (utime + stime delta /
N, from /proc) and the canary's XEP-0199 ping round trip (p50/p99) while the N sessions
idle. The fd limit is raised to the hard limit for the client and the servers.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import pwd
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sixnet.pki.ca import LabCA
from tests.support import accounts
from tests.support.configs import config_file, sixnet_toml
from tests.support.pki import IdentityFiles
from tests.support.ports import free_port, wait_for_port
from tests.support.procfs import cpu_seconds, rss_kib
from tests.support.twistd import ROOT, twistd_command

PASSWORD = "bench password"
NODE = f"sixnet_c2s_bench_{os.getpid()}@localhost"


SIXNET_PORT, PROSODY_PORT, EJABBERD_PORT = free_port(), free_port(), free_port()
HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
          "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
#: Logins under way at once while the idle sessions connect.
IDLE_CONCURRENCY = 32
IDLE_MECHANISM = "SCRAM-SHA-256"


@lru_cache(maxsize=64)
def salted(hash_name: str, password: str, salt: bytes, iterations: int) -> bytes:
    """Clients cache the salted password, as real ones do."""
    return hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)


class Client(protocol.Protocol):
    """A minimal XMPP client: waits for patterns while negotiating, then counts messages."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: tuple[re.Pattern[bytes], defer.Deferred[bytes]] | None = None
        self.counting = False
        self.received = 0
        self.errors = 0
        self.expected = 0
        self.all_received: defer.Deferred[None] | None = None
        self._tail = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.counting:
            chunk = self._tail + data
            self.received += chunk.count(b"<message")
            self.errors += chunk.count(b"type=\"error\"") + chunk.count(b"type='error'")
            self._tail = chunk[-12:]
            if self.received >= self.expected and self.all_received is not None:
                d, self.all_received = self.all_received, None
                d.callback(None)
            return
        self.buffer += data
        if self.waiter is not None and self.waiter[0].search(self.buffer):
            (_, d), self.waiter = self.waiter, None
            data, self.buffer = self.buffer, b""
            d.callback(data)

    def connectionLost(self, reason: Any) -> None:
        if self.waiter is not None:
            (_, d), self.waiter = self.waiter, None
            d.errback(RuntimeError(f"connection lost; got {self.buffer[-300:]!r}"))
        self.closed.callback(None)

    def until(self, pattern: bytes) -> defer.Deferred[bytes]:
        compiled = re.compile(pattern, re.S)
        if compiled.search(self.buffer):
            data, self.buffer = self.buffer, b""
            return defer.succeed(data)
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiter = (compiled, d)
        return d

    def send(self, text: str) -> None:
        self.transport.write(text.encode())


async def login(port: int, user: str, mechanism: str = "SCRAM-SHA-1",
                register: bool = False, resource: str | None = None) -> Client:
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.send(HEADER)
    await client.until(rb"</stream:features>")
    client.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    await client.until(rb"<proceed")
    client.transport.startTLS(ssl.CertificateOptions(verify=False))
    client.send(HEADER)
    await client.until(rb"</stream:features>")
    if register:
        client.send(f"<iq type='set' id='reg'><query xmlns='jabber:iq:register'>"
                    f"<username>{user}</username><password>{PASSWORD}</password></query></iq>")
        await client.until(rb"id=.reg.[^>]*>.*?</iq>|id=.reg.[^>]*/>")
    await scram(client, user, mechanism)
    client.send(HEADER)
    await client.until(rb"</stream:features>")
    wanted = f"<resource>{resource}</resource>" if resource else ""
    client.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                f"{wanted}</bind></iq>")
    await client.until(rb"</iq>")
    return client


async def scram(client: Client, user: str, mechanism: str) -> None:
    hash_name = "sha256" if "SHA-256" in mechanism else "sha1"
    binding = "tls-exporter" if mechanism.endswith("-PLUS") else None
    gs2 = f"p={binding},," if binding else "n,,"
    first_bare = f"n={user},r={base64.b64encode(os.urandom(18)).decode()}"
    client.send(f"<auth xmlns='{SASL}' mechanism='{mechanism}'>"
                f"{base64.b64encode((gs2 + first_bare).encode()).decode()}</auth>")
    data = await client.until(rb"</challenge>|</failure>")
    if b"<failure" in data:
        raise RuntimeError(f"{user}: {data[-200:]!r}")
    server_first = base64.b64decode(re.search(rb"<challenge[^>]*>([^<]*)<", data)[1])
    attrs = dict(p.split("=", 1) for p in server_first.decode().split(","))
    key = salted(hash_name, PASSWORD, base64.b64decode(attrs["s"]), int(attrs["i"]))
    cb = client.transport.getHandle().export_keying_material(
        b"EXPORTER-Channel-Binding", 32, b"") if binding else b""
    without = f"c={base64.b64encode(gs2.encode() + cb).decode()},r={attrs['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{without}".encode()
    client_key = hmac.digest(key, b"Client Key", hash_name)
    signature = hmac.digest(hashlib.new(hash_name, client_key).digest(), auth_message, hash_name)
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    client.send(f"<response xmlns='{SASL}'>"
                + base64.b64encode(f"{without},p={proof.decode()}".encode()).decode()
                + "</response>")
    data = await client.until(rb"</success>|<success[^>]*/>|</failure>")
    if b"<success" not in data:
        raise RuntimeError(f"{user}: {data[-200:]!r}")


async def close(client: Client) -> None:
    client.send("</stream:stream>")
    client.transport.loseConnection()
    await client.closed


async def measure_logins(port: int, seconds: float, concurrency: int, clients: int,
                         mechanism: str = "SCRAM-SHA-1") -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def loop(i: int) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            client = await login(port, f"bench{i % clients}", mechanism)
            await close(client)
            done += 1

    started = time.monotonic()
    await defer.gatherResults([defer.Deferred.fromCoroutine(loop(i))
                               for i in range(concurrency)])
    return done / (time.monotonic() - started)


async def measure_messages(port: int, count: int, per_client: int,
                           register: bool) -> tuple[float, int]:
    clients = []
    for i in range(count):  # sequential: IBR and logins do not pile up on the server
        clients.append(await login(port, f"bench{i}", register=register))
    for c in clients:
        c.send("<presence/>")
    await task.deferLater(reactor, 1.0, lambda: None)
    waits = []
    for c in clients:
        c.buffer = b""
        c.counting = True
        c.received = 0
        c.expected = per_client
        c.all_received = defer.Deferred()
        waits.append(c.all_received)
    started = time.monotonic()
    for i, c in enumerate(clients):
        to = f"bench{(i + 1) % count}@localhost"
        c.send("".join(f"<message to='{to}' type='chat' id='m{n}'><body>message {n}</body>"
                       "</message>" for n in range(per_client)))
    await defer.gatherResults(waits)
    elapsed = time.monotonic() - started
    errors = sum(c.errors for c in clients)
    for c in clients:
        c.counting = False
        await close(c)
    return count * per_client / elapsed, errors


async def register_accounts(port: int, count: int, mechanism: str) -> None:
    """In-band registration of bench0..bench{count-1} (Prosody, ejabberd), one at a time."""
    for i in range(count):
        await close(await login(port, f"bench{i}", mechanism, register=True))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def ping_round_trips(client: Client, seconds: float, interval: float) -> list[float]:
    """XEP-0199 pings to the server, one at a time, every `interval`; round trips in ms."""
    trips = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        started = time.monotonic()
        client.send(f"<iq type='get' id='ping{n}' to='localhost'>"
                    "<ping xmlns='urn:xmpp:ping'/></iq>")
        await client.until(rf"id=.ping{n}.".encode())
        trips.append((time.monotonic() - started) * 1000)
        await task.deferLater(reactor, interval, lambda: None)
    return trips


async def measure_idle(port: int, pid: int, sessions: int, accounts: int, concurrency: int,
                       settle: float, canary_seconds: float) -> dict[str, Any]:
    """Hold `sessions` idle logged-in streams; what they cost the server process `pid`."""
    mechanism = IDLE_MECHANISM
    canary = await login(port, "bench0", mechanism, resource="canary")
    await task.deferLater(reactor, settle, lambda: None)
    rss_before, cpu_before = rss_kib(pid), cpu_seconds(pid)
    clients: list[Client] = []
    queue = iter(range(sessions))
    started = time.monotonic()

    async def worker() -> None:
        for i in queue:
            clients.append(await login(port, f"bench{i % accounts}", mechanism,
                                       resource=f"idle{i}"))

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker())
                               for _ in range(concurrency)])
    login_seconds = time.monotonic() - started
    cpu_after = cpu_seconds(pid)
    await task.deferLater(reactor, settle, lambda: None)
    rss_after = rss_kib(pid)
    trips = await ping_round_trips(canary, canary_seconds, 0.01)
    alive = sum(1 for c in clients if not c.closed.called)
    return {
        "sessions": sessions, "sessions_alive_at_end": alive, "mechanism": mechanism,
        "rss_before_mib": round(rss_before / 1024, 1), "rss_after_mib": round(rss_after / 1024, 1),
        "kib_per_session": round((rss_after - rss_before) / sessions, 1),
        "cpu_ms_per_login": round((cpu_after - cpu_before) * 1000 / sessions, 2),
        "logins_per_s": round(sessions / login_seconds, 1),
        "canary_pings": len(trips), "canary_ping_p50_ms": round(percentile(trips, 0.5), 2),
        "canary_ping_p99_ms": round(percentile(trips, 0.99), 2),
    }


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the servers --------------------------------------------------------------------------------


def start_sixnet(work: Path, host: Path, ca: Path, clients: int,
                 sessions: int = 0) -> subprocess.Popen[bytes]:
    config = config_file(work, sixnet_toml(
        ca, {"host": IdentityFiles("localhost", host / "cert.pem", host / "key.pem")},
        sixnet={"state_dir": work / "sixnet-state", "log_format": "json"},
        grid={"enabled": True, "domain": "localhost",
              "listen": [f"tcp:{SIXNET_PORT}:interface=127.0.0.1"], "listen_tls": [],
              # Every benchmark client comes from 127.0.0.1.
              "max_connections_per_address": max(1000, sessions + 10),
              "max_unauthenticated_per_address": IDLE_CONCURRENCY + 10}))
    # The first account through the command, to check it works; the others straight into
    # the database (one `sixnet grid user add` per account would take a minute).
    subprocess.run([sys.executable, "-m", "sixnet", "grid", "user", "add", "bench0",
                    "--config", str(config)], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True, cwd=ROOT)
    subprocess.run(accounts.command(config, PASSWORD, [f"bench{i}" for i in range(1, clients)]),
                   check=True, cwd=ROOT)
    return subprocess.Popen(twistd_command("sixnet-grid", config), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_prosody(work: Path, host: Path, scram_hash: str) -> subprocess.Popen[bytes]:
    base = work / "prosody"
    (base / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(host / "cert.pem", base / "cert.pem")
    shutil.copy(host / "key.pem", base / "key.pem")
    config = base / "prosody.cfg.lua"
    config.write_text(f"""
pidfile = "{base}/prosody.pid"
run_as_root = true -- (when it is root, as on CI) or mod_posix shuts it down
data_path = "{base}/data"
log = {{ warn = "{base}/prosody.log" }}
c2s_ports = {{ {PROSODY_PORT} }}
c2s_direct_tls_ports = {{}}
s2s_ports = {{}}
component_ports = {{}}
http_ports = {{}}
https_ports = {{}}
modules_enabled = {{ "saslauth", "tls", "register", "ping", "disco", "roster", "presence",
                    "message" }}
modules_disabled = {{ "s2s" }}
allow_registration = true
min_seconds_between_registrations = 0
c2s_require_encryption = true
authentication = "internal_hashed"
password_hash = "{scram_hash}"
storage = "internal"
ssl = {{ certificate = "{base}/cert.pem", key = "{base}/key.pem" }}
VirtualHost "localhost"
""")
    return subprocess.Popen(["prosody", "-F", "--config", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_ejabberd(work: Path, host: Path, scram_hash: str) -> subprocess.Popen[bytes]:
    base = work / "ejabberd"
    (base / "spool").mkdir(parents=True, exist_ok=True)
    (base / "host.pem").write_bytes((host / "cert.pem").read_bytes()
                                    + (host / "key.pem").read_bytes())
    (base / "ejabberdctl.cfg").write_text('ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
    (base / "ejabberd.yml").write_text(f"""
hosts: [localhost]
loglevel: warning
certfiles: ["{base}/host.pem"]
listen:
  - port: {EJABBERD_PORT}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls_required: true
    max_stanza_size: 262144
    backlog: 1024
auth_method: internal
auth_password_format: scram
auth_scram_hash: {"sha256" if scram_hash == "SHA-256" else "sha"}
registration_timeout: infinity
access_rules:
  register: {{allow: all}}
  c2s: {{allow: all}}
modules:
  mod_register: {{ip_access: all, access: register}}
  mod_ping: {{}}
  mod_disco: {{}}
  mod_roster: {{}}
""")
    subprocess.run(["chown", "-R", "ejabberd", str(base)], check=False)
    os.chmod(work, 0o755)
    # Run by root, ejabberdctl starts the VM through `su`, which gives it the default fd limit
    # (1024): started as the ejabberd user it inherits ours.
    as_ejabberd: dict[str, Any] = {}
    if os.geteuid() == 0:
        as_ejabberd = {"user": "ejabberd", "group": "ejabberd",
                       "env": dict(os.environ, HOME=pwd.getpwnam("ejabberd").pw_dir)}
    return subprocess.Popen(
        ["ejabberdctl", "--config", str(base / "ejabberd.yml"),
         "--ctl-config", str(base / "ejabberdctl.cfg"), "--logs", str(base),
         "--spool", str(base / "spool"), "--node", NODE, "foreground"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        **as_ejabberd)


def our_beam_processes() -> list[int]:
    """The Erlang VM of our ejabberd node (ejabberdctl runs it as another user)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if NODE.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def server_pid(process: subprocess.Popen[bytes], name: str) -> int:
    """The process whose memory and CPU are measured: ejabberd's is its Erlang VM."""
    if name != "ejabberd":
        return process.pid
    for pid in our_beam_processes():
        if Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam"):
            return pid
    raise RuntimeError("ejabberd's Erlang VM is not running")


def stop(process: subprocess.Popen[bytes], name: str) -> None:
    if name == "ejabberd":
        for pid in our_beam_processes():
            if pid != process.pid:
                os.kill(pid, 15)
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_one(name: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    register = name != "sixnet"
    rate, errors = await measure_messages(port, args.clients, args.messages, register)
    result = {"messages_per_s": round(rate, 1), "message_errors": errors}
    result["logins_per_s"] = round(await measure_logins(
        port, args.login_seconds, args.login_concurrency, args.clients), 1)
    if name == "sixnet":
        result["logins_per_s_scram_sha256_plus"] = round(await measure_logins(
            port, args.login_seconds, args.login_concurrency, args.clients,
            "SCRAM-SHA-256-PLUS"), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="sixnet,prosody,ejabberd")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--login-seconds", type=float, default=10.0)
    parser.add_argument("--login-concurrency", type=int, default=8)
    parser.add_argument("--idle", type=int, default=0, metavar="N",
                        help="measure N idle sessions instead of throughput")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of quiet before each memory reading (--idle)")
    parser.add_argument("--canary-seconds", type=float, default=10.0,
                        help="seconds of canary pings while the sessions idle (--idle)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()  # before anything is spawned: the servers inherit it
    if args.measure:
        outcome: dict[str, Any] = {}

        async def run() -> None:
            try:
                if args.idle:
                    if args.measure != "sixnet":
                        await register_accounts(args.port, args.clients, IDLE_MECHANISM)
                    outcome.update(await measure_idle(
                        args.port, args.pid, args.idle, args.clients, IDLE_CONCURRENCY,
                        args.settle, args.canary_seconds))
                else:
                    outcome.update(await run_one(args.measure, args.port, args))
            except Exception as e:
                outcome["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(outcome), flush=True)

        task.react(lambda _: defer.Deferred.fromCoroutine(run()))
    work = Path(tempfile.mkdtemp(prefix="xmpp-bench-"))
    ca = LabCA.init(work / "ca")
    ca.issue("host", "localhost", out=work / "host")
    if args.idle:
        results: dict[str, Any] = {
            "idle_sessions": args.idle, "accounts": args.clients, "tls": "1.3",
            "login_concurrency": IDLE_CONCURRENCY, "mechanism": IDLE_MECHANISM,
        }
    else:
        results = {
            "clients": args.clients, "messages_per_client": args.messages,
            "login_concurrency": args.login_concurrency, "mechanism": "SCRAM-SHA-1",
            "tls": "1.3",
        }
    scram_hash = "SHA-256" if args.idle else "SHA-1"
    starters = {
        "sixnet": (SIXNET_PORT, "twistd",
                   lambda: start_sixnet(work, work / "host", work / "ca", args.clients,
                                        args.idle)),
        "prosody": (PROSODY_PORT, "prosody",
                    lambda: start_prosody(work, work / "host", scram_hash)),
        "ejabberd": (EJABBERD_PORT, "ejabberdctl",
                     lambda: start_ejabberd(work, work / "host", scram_hash)),
    }
    for name in [n for n in args.servers.split(",") if n]:
        port, program, start = starters[name]
        if name != "sixnet" and shutil.which(program) is None:
            results[name] = {"skipped": f"{program} is not installed"}
            continue
        process = start()
        try:
            for attempt in range(3):  # Prosody sometimes hangs while starting: start it again
                try:
                    wait_for_port(port, timeout=30.0)
                    break
                except RuntimeError:
                    stop(process, name)
                    if attempt == 2:
                        raise
                    process = start()
            time.sleep(1.0)
            child = subprocess.run(
                [sys.executable, __file__, "--measure", name, "--port", str(port),
                 "--pid", str(server_pid(process, name)),
                 "--clients", str(args.clients), "--messages", str(args.messages),
                 "--login-seconds", str(args.login_seconds),
                 "--login-concurrency", str(args.login_concurrency),
                 "--idle", str(args.idle), "--settle", str(args.settle),
                 "--canary-seconds", str(args.canary_seconds)],
                capture_output=True, text=True, check=False)
            lines = child.stdout.strip().splitlines()
            results[name] = json.loads(lines[-1]) if lines else {"error": child.stderr[-500:]}
        finally:
            stop(process, name)
    for other in ("prosody", "ejabberd"):
        mine, theirs = results.get("sixnet", {}), results.get(other, {})
        # Memory and CPU: below 1 means sixnet needs less.
        for key in ("logins_per_s", "messages_per_s", "kib_per_session", "cpu_ms_per_login"):
            if mine.get(key) and theirs.get(key):
                results.setdefault("ratios", {})[f"{key}_vs_{other}"] = round(
                    mine[key] / theirs[key], 2)
    print(json.dumps(results))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
