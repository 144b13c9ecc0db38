"""A Prosody 0.12 of our own for component-mode tests: a temp directory, free ports, the lab
PKI's certificate, accounts made with ``prosodyctl --config FILE register``, and one
``Component`` with a secret for the sixnet broker. Never the system's instance.

Usage (a module-scoped fixture; tests skip with the reason below without Prosody)::

    from tests.support.prosody import prosody  # noqa: F401  (the fixture)

    def test_x(prosody: ProsodyHost) -> None:
        prosody.c2s_port, prosody.component_port, prosody.secret, prosody.register("alice")
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .ports import free_port, wait_for_port

PROSODY = Path("/usr/bin/prosody")
SKIP = None if PROSODY.exists() else "prosody not installed: apt-get install prosody"


def password(local: str) -> str:
    return f"{local} secret"


class ProsodyHost:
    """One Prosody process: c2s with STARTTLS on `c2s_port`, the component port on
    `component_port` for `component` (secret `secret`), internal file storage (offline
    messages kept by mod_offline)."""

    def __init__(self, directory: Path, pki: Any, domain: str = "example.test",
                 component: str = "broker.example.test",
                 more_domains: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.domain = domain
        self.component = component
        self.secret = "component secret for tests"
        self.c2s_port = free_port()
        self.component_port = free_port()
        self.prosodyctl = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"
        files = pki.files("host", domain)
        data = directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.config = directory / "prosody.cfg.lua"
        self.config.write_text(textwrap.dedent(f"""\
            run_as_root = true
            pidfile = "{directory}/prosody.pid"
            data_path = "{data}"
            daemonize = false
            log = {{ info = "{directory}/prosody.log" }}
            interfaces = {{ "127.0.0.1" }}
            c2s_ports = {{ {self.c2s_port} }}
            c2s_direct_tls_ports = {{ }}
            s2s_ports = {{ }}
            component_ports = {{ {self.component_port} }}
            component_interfaces = {{ "127.0.0.1" }}
            http_ports = {{ }}
            https_ports = {{ }}
            modules_enabled = {{ "tls", "saslauth", "disco", "ping", "roster", "offline" }}
            modules_disabled = {{ "s2s", "c2s_direct_tls" }}
            authentication = "internal_hashed"
            storage = "internal"
            c2s_require_encryption = true
            allow_registration = false
            certificates = "{directory}/certs"
            ssl = {{ certificate = "{files.certificate}", key = "{files.key}" }}
            VirtualHost "{domain}"
            Component "{component}"
                component_secret = "{self.secret}"
            """))
        with self.config.open("a") as out:
            for other in more_domains:  # platforms of other domains on the same host
                extra = pki.files("host", other)
                out.write(f'VirtualHost "{other}"\n    ssl = {{ certificate = '
                          f'"{extra.certificate}", key = "{extra.key}" }}\n')
        (directory / "certs").mkdir(exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    def register(self, *jids: str) -> None:
        """Make accounts (``local`` at our domain, or ``local@domain``), in parallel."""
        running = []
        for jid in jids:
            local, _, domain = jid.partition("@")
            running.append(subprocess.Popen(
                [self.prosodyctl, "--config", str(self.config), "register", local,
                 domain or self.domain, password(local)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for process in running:
            _, err = process.communicate(timeout=60)
            if process.returncode:
                raise RuntimeError(f"prosodyctl register failed: {err.decode().strip()}")

    def start(self) -> None:
        self.process = subprocess.Popen([str(PROSODY), "--config", str(self.config), "-F"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running = self.process
        for port in (self.c2s_port, self.component_port):
            wait_for_port(port, running=lambda: running.poll() is None, timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.process = None

    def log(self) -> str:
        path = self.directory / "prosody.log"
        return path.read_text() if path.exists() else ""


#: Accounts every component-mode conversation may log in as.
ACCOUNTS = ("provider", "consumer", "other", "x", "stranger", "root", "policy", "outsider",
            *(f"c{i}" for i in range(5)), "s1@sensors.example.test")


@pytest.fixture(scope="module")
def prosody(pki: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProsodyHost]:
    """A running Prosody with `ACCOUNTS` registered, for the tests of one module."""
    if SKIP:
        pytest.skip(SKIP)
    host = ProsodyHost(tmp_path_factory.mktemp("prosody"), pki,
                       more_domains=("sensors.example.test",))
    host.register(*ACCOUNTS)
    host.start()
    yield host
    host.stop()
