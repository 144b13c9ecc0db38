"""The bridge's remote target: a second sixnet grid in another process (twistd), and Prosody
when it is installed. While the controller is down incidents queue durably, across a restart
of the bridge, and arrive in order once it is back."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import reactor
from twisted.trial import unittest

from sixnet.app.config import load_config
from sixnet.bridge.service import BridgeService, make_service
from sixnet.core.events import EventBus, SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator
from sixnet.core.metrics import Registry
from sixnet.grid.client import PubSubClient, connect
from sixnet.pki.store import store_from_config
from tests.grid_harness import write_config

from .support.accounts import add_accounts
from .support.configs import config_file, sixnet_toml
from .support.ports import free_port, wait_for_port
from .support.twistd import TwistdProcess
from .support.waiting import wait_for

X = f"{{{IODEF_NS}}}"
TOPIC = "sixnet-security"
PROSODY = "/usr/bin/prosody"


def sources(items: list[Any]) -> list[str | None]:
    return [i.payload.findtext(f".//{X}System[@category='source']/{X}Node/{X}Address")
            for i in items]


class RemoteTargetBase(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    def bridge_config(self, remote: dict[str, Any], external: bool = False) -> Any:
        """The bridge's own process: no grid, the remote target, logging in with the
        certificate of bridge@localhost (EXTERNAL) or the password in a file (SCRAM)."""
        secret = self.tmp / "bridge-password"
        secret.write_text("bridge secret\n")
        login = {"identity": "bridge"} if external else {"password_file": secret}
        text = sixnet_toml(
            self.pki.root.directory, {"host": self.pki.files("host", "localhost"),
                                      "bridge": self.pki.files("user", "bridge@localhost")},
            sixnet={"state_dir": self.tmp / "bridge-state"},
            bridge={"enabled": True, "target": "remote", "window": 0.05,
                    "remote": {**login, **remote}})
        return load_config(config_file(self.tmp / "bridge", text))

    def start_bridge(self, config: Any) -> BridgeService:
        bridge: BridgeService = make_service(  # type: ignore[assignment]
            config, store_from_config(config), events=self.bus, metrics=Registry())
        bridge.backoff = backoffPolicy(initialDelay=0.1, maxDelay=0.5)
        bridge.startService()
        self.addCleanup(lambda: bridge.stopService() if bridge.running else None)
        return bridge

    def incident(self, n: int) -> None:
        self.bus.emit(SecurityEvent("irp.login-failed", subject="alice@example.test",
                                    source=f"192.0.2.{n}", detail="wrong password"))

    async def queued_while_down(self, config: Any, first: int, last: int) -> None:
        """Incidents first..last queue while nothing answers, across a bridge restart."""
        bridge = self.start_bridge(config)
        await bridge.ready
        for n in range(first, last):
            self.incident(n)
        await wait_for(lambda: bridge.queue.depth == last - first, what="queued")
        await bridge.stopService()
        self.bridge = self.start_bridge(config)
        await self.bridge.ready
        assert self.bridge.queue.depth == last - first  # still there after the restart
        self.incident(last)
        await wait_for(lambda: self.bridge.queue.depth == last - first + 1, what="queued")


class SixnetRemoteTests(RemoteTargetBase):
    async def test_queued_while_down_delivered_in_order_across_a_restart(self) -> None:
        self.bus = EventBus()
        port = free_port()
        (self.tmp / "remote").mkdir()
        remote = write_config(self.tmp / "remote", self.pki,
                              listen=[f"tcp:{port}:interface=127.0.0.1"],
                              listen_tls=["tcp:0:interface=127.0.0.1"],
                              broker={"admins": ["siem@localhost"]})
        await add_accounts(remote.path, "bridge secret", ["bridge"])  # for SCRAM
        await add_accounts(remote.path, "siem secret", ["siem"])
        remote_target = {"server": f"127.0.0.1:{port}", "jid": "bridge@localhost",
                         "service": "broker.localhost"}
        config = self.bridge_config(remote_target, external=True)
        await self.queued_while_down(config, 1, 4)

        grid = TwistdProcess(remote.path, plugin="sixnet-grid")
        self.addCleanup(grid.terminate)
        await grid.start()
        await wait_for(lambda: self.bridge.queue.depth == 0, timeout=20, what="delivered")
        assert self.bridge._session.protocol.mechanism == "EXTERNAL"
        # the same bridge (and queue) logging in with SCRAM instead
        await self.bridge.stopService()
        self.bridge = self.start_bridge(self.bridge_config(remote_target))
        await self.bridge.ready
        self.incident(5)
        await wait_for(lambda: self.bridge.queue.depth == 0 and
                       not self.bridge.aggregator.open_groups and
                       self.bridge._session is not None, what="delivered")
        assert self.bridge._session.protocol.mechanism.startswith("SCRAM-SHA-256")

        siem = await connect(reactor, "127.0.0.1", port, "siem@localhost",
                             password="siem secret", store=store_from_config(config))
        self.addCleanup(siem.close)
        client = PubSubClient(siem, "broker.localhost")
        page = await client.items(TOPIC)
        assert sources(page.items) == [f"192.0.2.{n}" for n in range(1, 6)]
        validator = IODEFValidator()
        assert all(validator.problem(i.payload) is None for i in page.items)
        assert (await client.info(TOPIC)).node == TOPIC


def prosody_config(directory: Path, port: int, pki: Any) -> Path:
    """A Prosody of our own in `directory`: c2s on `port`, mod_pubsub at pubsub.localhost,
    its certificate from the lab CA, accounts in files; never the system's instance."""
    files = pki.files("host", "localhost")
    data = directory / "data"
    data.mkdir(parents=True)
    config = directory / "prosody.cfg.lua"
    config.write_text(textwrap.dedent(f"""\
        run_as_root = true
        pidfile = "{directory}/prosody.pid"
        data_path = "{data}"
        daemonize = false
        log = {{ debug = "{directory}/prosody.log" }}
        interfaces = {{ "127.0.0.1" }}
        c2s_ports = {{ {port} }}
        c2s_direct_tls_ports = {{ }}
        s2s_ports = {{ }}
        component_ports = {{ }}
        http_ports = {{ }}
        https_ports = {{ }}
        modules_enabled = {{ "tls", "saslauth", "disco", "ping", "roster" }}
        modules_disabled = {{ "s2s", "offline", "c2s_direct_tls" }}
        authentication = "internal_hashed"
        -- Prosody's pubsub lets only owners (admins) create nodes.
        admins = {{ "bridge@localhost" }}
        c2s_require_encryption = true
        allow_registration = false
        certificates = "{directory}/certs"
        ssl = {{ certificate = "{files.certificate}", key = "{files.key}" }}
        VirtualHost "localhost"
        Component "pubsub.localhost" "pubsub"
        """))
    return config


class ProsodyRemoteTests(RemoteTargetBase):
    skip = None if Path(PROSODY).exists() else "prosody not installed: apt-get install prosody"

    async def test_queued_while_down_delivered_in_order_to_prosody(self) -> None:
        self.bus = EventBus()
        port = free_port()
        directory = self.tmp / "prosody"
        (directory / "certs").mkdir(parents=True)
        cfg = prosody_config(directory, port, self.pki)
        prosodyctl = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"
        subprocess.run([prosodyctl, "--config", str(cfg), "register", "bridge", "localhost",
                        "bridge secret"], check=True, capture_output=True, timeout=60)
        config = self.bridge_config({"server": f"127.0.0.1:{port}", "jid": "bridge@localhost",
                                     "service": "pubsub.localhost"})
        await self.queued_while_down(config, 1, 3)

        server = subprocess.Popen([PROSODY, "--config", str(cfg), "-F"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(server.wait, 30)
        self.addCleanup(server.terminate)
        wait_for_port(port, running=lambda: server.poll() is None, timeout=30)
        await wait_for(lambda: self.bridge.queue.depth == 0, timeout=20, what="delivered")

        session = await connect(reactor, "127.0.0.1", port, "bridge@localhost",
                                password="bridge secret", store=store_from_config(config))
        self.addCleanup(session.close)
        page = await PubSubClient(session, "pubsub.localhost").items(TOPIC)
        assert sources(page.items) == [f"192.0.2.{n}" for n in range(1, 4)]
