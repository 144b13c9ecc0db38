"""What component mode costs: the same broker behind its own c2s, and behind Prosody 0.12.

One publisher and N subscribers (default 50), 1 KB IODEF items, every client the project's
own XMPP client (``sixnet.grid.client``, SCRAM over STARTTLS on loopback) in this process.
The broker runs in its own ``twistd sixnet-grid`` process in both shapes:

* ``server``: ``[grid] mode = "server"``, the clients log in to sixnet;
* ``component``: ``[grid] mode = "component"``, the clients log in to a Prosody of this
  script's own (temp directory, free ports, accounts written as Prosody's plain account
  files), and the broker is its XEP-0114 component.

For each shape: the publisher keeps `--window` publishes in flight until `--publishes` are
acknowledged; it reports notifications delivered per second, publish-to-delivery latency
p50/p99, losses, and the CPU seconds of the broker process and of Prosody.

Usage: flock /work/notes/bench.lock python benchmarks/grid_component.py
           [--subscribers 50] [--publishes 400] [--window 8]
Prints one JSON document (both shapes and the ratio component/server) on standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lxml import etree
from twisted.internet import defer, reactor, task

from sixnet.grid.client import PubSubClient, connect
from sixnet.pki.ca import LabCA
from sixnet.pki.store import CertificateStore
from tests.support.accounts import add_accounts
from tests.support.configs import config_file, sixnet_toml
from tests.support.iodef import IODEF
from tests.support.pki import IdentityFiles
from tests.support.ports import free_port, wait_for_port
from tests.support.procfs import cpu_seconds
from tests.support.twistd import twistd_command

DOMAIN = "example.test"
SERVICE = f"broker.{DOMAIN}"
PASSWORD = "bench secret"
PROSODY = Path("/usr/bin/prosody")


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def lab(directory: Path) -> tuple[LabCA, IdentityFiles]:
    ca = LabCA.init(directory / "ca", name="sixnet benchmark CA")
    out = directory / "host"
    ca.issue("host", DOMAIN, key_type="ecdsa-p256", out=out)
    return ca, IdentityFiles(DOMAIN, out / "cert.pem", out / "key.pem")


def sixnet_config(directory: Path, ca: LabCA, host: IdentityFiles, port: int,
                  component: dict[str, Any]) -> Path:
    grid: dict[str, Any] = {"enabled": True, "domain": DOMAIN, "scram_iterations": 4096,
                            "listen": [f"tcp:{port}:interface=127.0.0.1"],
                            "listen_tls": [f"tcp:{free_port()}:interface=127.0.0.1"],
                            "broker": {"open_access": True, "default_access_model": "open"},
                            **component}
    return config_file(directory, sixnet_toml(ca.directory, {"host": host},
                                              sixnet={"state_dir": directory / "state"},
                                              grid=grid))


def prosody_config(directory: Path, host: IdentityFiles, c2s: int, component: int,
                   secret: str, names: list[str]) -> Path:
    data = directory / "data"
    accounts = data / DOMAIN.replace(".", "%2e") / "accounts"
    accounts.mkdir(parents=True)
    for name in names:  # mod_auth_internal_plain's files: no prosodyctl per account
        (accounts / f"{name}.dat").write_text(f'return {{ ["password"] = "{PASSWORD}"; }};\n')
    config = directory / "prosody.cfg.lua"
    config.write_text(f"""run_as_root = true
pidfile = "{directory}/prosody.pid"
data_path = "{data}"
daemonize = false
log = {{ warn = "{directory}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ {component} }}
component_interfaces = {{ "127.0.0.1" }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "tls", "saslauth", "disco", "ping", "offline" }}
modules_disabled = {{ "s2s", "c2s_direct_tls" }}
authentication = "internal_plain"
storage = "internal"
c2s_require_encryption = true
limits = {{ c2s = {{ rate = "100mb/s" }}, component = {{ rate = "100mb/s" }} }}
certificates = "{directory}/certs"
ssl = {{ certificate = "{host.certificate}", key = "{host.key}" }}
VirtualHost "{DOMAIN}"
Component "{SERVICE}"
    component_secret = "{secret}"
""")
    (directory / "certs").mkdir()
    return config


async def broker_answers(session: Any) -> None:
    """Until the broker answers disco#info (through the host: once it is attached)."""
    for _ in range(300):
        query = etree.fromstring(f"<iq xmlns='jabber:client' type='get' to='{SERVICE}'>"
                                 "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        try:
            await session.iq(query)
            return
        except Exception:
            await task.deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError("the broker never answered")


async def run(c2s_port: int, store: CertificateStore, names: list[str], args: Any,
              cpu: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """Log in, subscribe, publish; `cpu()` reads the servers' CPU seconds (read once the
    broker answers, so its start-up is not counted)."""
    sessions = []
    for name in ["publisher", *names]:
        session = await connect(reactor, "127.0.0.1", c2s_port, f"{name}@{DOMAIN}/b",
                                password=PASSWORD, store=store, presence=True, keepalive=0,
                                timeout=30, mechanisms=["SCRAM-SHA-1"])
        sessions.append(session)
    publisher, subscribers = sessions[0], sessions[1:]
    await broker_answers(publisher)
    before = cpu()
    owner = PubSubClient(publisher, SERVICE)
    await owner.create("bench", access_model="open")
    sent: dict[str, float] = {}
    latencies: list[float] = []
    received = 0
    done: defer.Deferred[None] = defer.Deferred()
    expected = args.publishes * len(subscribers)

    def arrived(message: etree._Element) -> None:
        nonlocal received
        for item in message.iter("{http://jabber.org/protocol/pubsub#event}item"):
            started = sent.get(item.get("id", ""))
            if started is not None:
                latencies.append(time.monotonic() - started)
                received += 1
        if received >= expected and not done.called:
            done.callback(None)

    for session in subscribers:
        await PubSubClient(session, SERVICE).subscribe("bench")
        session.add_message_handler(arrived)
    payload = etree.fromstring(IODEF)
    started = time.monotonic()
    queue = list(range(args.publishes))

    async def worker() -> None:
        while queue:
            n = queue.pop(0)
            sent[f"i{n}"] = time.monotonic()
            await owner.publish("bench", payload, item_id=f"i{n}")

    await defer.DeferredList([defer.Deferred.fromCoroutine(worker())
                              for _ in range(args.window)])
    timeout = reactor.callLater(60, lambda: done.called or done.callback(None))
    await done
    if timeout.active():
        timeout.cancel()
    elapsed = time.monotonic() - started
    used = {k: round(v - before[k], 2) for k, v in cpu().items()}
    for session in sessions:
        await session.close()
    return {**{f"cpu_s_{k}": v for k, v in used.items()},
            "notifications": received, "lost": expected - received,
            "notifications_per_s": round(received / elapsed),
            "latency_p50_ms": round(1000 * (percentile(latencies, 50) or 0), 1),
            "latency_p99_ms": round(1000 * (percentile(latencies, 99) or 0), 1)}


async def shape(kind: str, base: Path, ca: LabCA, host: IdentityFiles,
                args: Any) -> dict[str, Any]:
    directory = base / kind
    names = [f"s{i}" for i in range(args.subscribers)]
    store = CertificateStore.from_files([ca.directory / "ca.pem"], [ca.directory / "crl.pem"])
    port = free_port()
    prosody = None
    if kind == "component":
        secret_file = directory / "component-secret"
        directory.mkdir(parents=True)
        secret_file.write_text("bench component secret\n")
        component_port = free_port()
        pconfig = prosody_config(directory / "prosody", host, port, component_port,
                                 "bench component secret", ["publisher", *names])
        prosody = subprocess.Popen([str(PROSODY), "--config", str(pconfig), "-F"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, running=lambda: prosody.poll() is None)
        config = sixnet_config(directory, ca, host, free_port(), {
            "mode": "component", "component_host": f"127.0.0.1:{component_port}",
            "component_secret_file": str(secret_file)})
        c2s = port
    else:
        config = sixnet_config(directory, ca, host, port, {})
        await add_accounts(config, PASSWORD, ["publisher", *names])
        c2s = port
    grid = subprocess.Popen(twistd_command("sixnet-grid", config),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    try:
        if kind == "server":
            wait_for_port(port, running=lambda: grid.poll() is None)

        def cpu() -> dict[str, float]:
            found = {"broker": cpu_seconds(grid.pid)}
            if prosody is not None:
                found["prosody"] = cpu_seconds(prosody.pid)
            return found

        return await run(c2s, store, names, args, cpu)
    finally:
        grid.terminate()
        grid.wait(30)
        if prosody is not None:
            prosody.terminate()
            prosody.wait(30)


async def main(args: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="sixnet-component-bench-") as tmp:
        base = Path(tmp)
        ca, host = lab(base)
        results = {}
        for kind in ("server", "component"):
            if kind == "component" and not PROSODY.exists():
                results[kind] = {"skipped": "prosody not installed"}
                continue
            results[kind] = await shape(kind, base, ca, host, args)
    report: dict[str, Any] = {"subscribers": args.subscribers, "publishes": args.publishes,
                              "window": args.window, "results": results}
    if "notifications_per_s" in results.get("component", {}):
        report["ratio_component_over_server"] = {
            key: round(results["component"][key] / results["server"][key], 2)
            for key in ("notifications_per_s", "latency_p99_ms") if results["server"][key]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--publishes", type=int, default=400)
    parser.add_argument("--window", type=int, default=8)
    options = parser.parse_args()
    failures: list[Any] = []
    d = defer.Deferred.fromCoroutine(main(options))
    d.addErrback(failures.append)
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    if failures:
        failures[0].raiseException()
