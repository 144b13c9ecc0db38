"""Benchmark the XMPP server against Prosody and ejabberd on loopback; prints JSON.

    .venv/bin/python benchmarks/xmpp_c2s.py [--servers sixnet,prosody,ejabberd]
        [--clients 100] [--messages 200] [--login-seconds 10] [--login-concurrency 8]

Measures, for each server, with the same load generator (Twisted + pyOpenSSL, one process):

* logins per second: TCP connect, STARTTLS (TLS 1.3), SASL SCRAM-SHA-1 (the mechanism all
  three offer out of the box), stream restart, resource binding, stream close; run by
  `--login-concurrency` loops for `--login-seconds`;
* one-to-one messages per second: `--clients` logged-in clients, each sending `--messages`
  chat messages to the next client's bare JID; the time until every message has arrived.

sixnet is also measured with SCRAM-SHA-256-PLUS (tls-exporter). Prosody and ejabberd (Debian
packages) are configured by this script in a temporary directory, on free loopback ports;
accounts there are made with in-band registration. Each server runs alone while measured.
The JSON has the figures and sixnet's ratios to the others (above 1: sixnet is faster).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
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
from tests.support.twistd import ROOT, twistd_command

PASSWORD = "bench password"
NODE = f"sixnet_c2s_bench_{os.getpid()}@localhost"


SIXNET_PORT, PROSODY_PORT, EJABBERD_PORT = free_port(), free_port(), free_port()
HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
          "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


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
                register: bool = False) -> Client:
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
    client.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
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


# -- the servers --------------------------------------------------------------------------------


def start_sixnet(work: Path, host: Path, ca: Path, clients: int) -> subprocess.Popen[bytes]:
    config = config_file(work, sixnet_toml(
        ca, {"host": IdentityFiles("localhost", host / "cert.pem", host / "key.pem")},
        sixnet={"state_dir": work / "sixnet-state", "log_format": "json"},
        grid={"enabled": True, "domain": "localhost",
              "listen": [f"tcp:{SIXNET_PORT}:interface=127.0.0.1"], "listen_tls": [],
              "max_connections_per_address": 1000}))
    # The first account through the command, to check it works; the others straight into
    # the database (one `sixnet grid user add` per account would take a minute).
    subprocess.run([sys.executable, "-m", "sixnet", "grid", "user", "add", "bench0",
                    "--config", str(config)], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True, cwd=ROOT)
    subprocess.run(accounts.command(config, PASSWORD, [f"bench{i}" for i in range(1, clients)]),
                   check=True, cwd=ROOT)
    return subprocess.Popen(twistd_command("sixnet-grid", config), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_prosody(work: Path, host: Path) -> subprocess.Popen[bytes]:
    base = work / "prosody"
    (base / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(host / "cert.pem", base / "cert.pem")
    shutil.copy(host / "key.pem", base / "key.pem")
    config = base / "prosody.cfg.lua"
    config.write_text(f"""
pidfile = "{base}/prosody.pid"
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
storage = "internal"
ssl = {{ certificate = "{base}/cert.pem", key = "{base}/key.pem" }}
VirtualHost "localhost"
""")
    return subprocess.Popen(["prosody", "-F", "--config", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_ejabberd(work: Path, host: Path) -> subprocess.Popen[bytes]:
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
auth_method: internal
auth_password_format: scram
auth_scram_hash: sha
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
    return subprocess.Popen(
        ["ejabberdctl", "--config", str(base / "ejabberd.yml"),
         "--ctl-config", str(base / "ejabberdctl.cfg"), "--logs", str(base),
         "--spool", str(base / "spool"), "--node", NODE, "foreground"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        outcome: dict[str, Any] = {}

        async def run() -> None:
            try:
                outcome.update(await run_one(args.measure, args.port, args))
            except Exception as e:
                outcome["error"] = f"{type(e).__name__}: {e}"
            print(json.dumps(outcome), flush=True)

        task.react(lambda _: defer.Deferred.fromCoroutine(run()))
    work = Path(tempfile.mkdtemp(prefix="xmpp-bench-"))
    ca = LabCA.init(work / "ca")
    ca.issue("host", "localhost", out=work / "host")
    results: dict[str, Any] = {
        "clients": args.clients, "messages_per_client": args.messages,
        "login_concurrency": args.login_concurrency, "mechanism": "SCRAM-SHA-1", "tls": "1.3",
    }
    starters = {
        "sixnet": (SIXNET_PORT, "twistd",
                   lambda: start_sixnet(work, work / "host", work / "ca", args.clients)),
        "prosody": (PROSODY_PORT, "prosody", lambda: start_prosody(work, work / "host")),
        "ejabberd": (EJABBERD_PORT, "ejabberdctl",
                     lambda: start_ejabberd(work, work / "host")),
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
                 "--clients", str(args.clients), "--messages", str(args.messages),
                 "--login-seconds", str(args.login_seconds),
                 "--login-concurrency", str(args.login_concurrency)],
                capture_output=True, text=True, check=False)
            lines = child.stdout.strip().splitlines()
            results[name] = json.loads(lines[-1]) if lines else {"error": child.stderr[-500:]}
        finally:
            stop(process, name)
    for other in ("prosody", "ejabberd"):
        mine, theirs = results.get("sixnet", {}), results.get(other, {})
        for key in ("logins_per_s", "messages_per_s"):
            if mine.get(key) and theirs.get(key):
                results.setdefault("ratios", {})[f"{key}_vs_{other}"] = round(
                    mine[key] / theirs[key], 2)
    print(json.dumps(results))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
