"""An ejabberd (Debian's 23.01) of our own for cluster tests: a temp directory, free ports, the
lab PKI's certificate, accounts made with ``ejabberdctl register``, and one
``ejabberd_service`` listener where several sixnet brokers attach under the same component
name (ejabberd balances the stanzas for that name over the connections). No mod_pubsub: the
broker is the only pubsub service. Never the system's instance (its own node name, config,
spool and logs; the package's service is not touched).

Usage (a module-scoped fixture; tests skip with the reason below without ejabberd)::

    from tests.support.ejabberd import ejabberd  # noqa: F401  (the fixture)

    def test_x(ejabberd: EjabberdHost) -> None:
        ejabberd.c2s_port, ejabberd.component_port, ejabberd.secret
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .ports import free_port, wait_for_port

EJABBERDCTL = shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl"


def _unavailable() -> str | None:
    if not Path(EJABBERDCTL).exists():
        return "ejabberd not installed: apt-get install ejabberd"
    try:
        pwd.getpwnam("ejabberd")
    except KeyError:
        return "ejabberd's system user is missing (a broken ejabberd package)"
    if os.getuid() != 0:
        return "ejabberdctl runs the node as the ejabberd user: these tests need root"
    return None


SKIP = _unavailable()


def password(local: str) -> str:
    return f"{local} secret"


class EjabberdHost:
    """One ejabberd node: c2s with STARTTLS on `c2s_port`, ``ejabberd_service`` on
    `component_port` for `component` (secret `secret`), mod_offline for offline messages."""

    def __init__(self, directory: Path, pki: Any, domain: str = "example.test",
                 component: str = "broker.example.test") -> None:
        self.directory = directory
        self.domain = domain
        self.component = component
        self.secret = "component secret for tests"
        self.node = f"sixnet-test-{uuid.uuid4().hex[:8]}@localhost"
        self.c2s_port = free_port()
        self.component_port = free_port()
        files = pki.files("host", domain)
        combined = directory / "host.pem"
        combined.write_bytes(Path(files.certificate).read_bytes()
                             + Path(files.key).read_bytes())
        (directory / "spool").mkdir(parents=True, exist_ok=True)
        (directory / "logs").mkdir(exist_ok=True)
        self.config = directory / "ejabberd.yml"
        self.config.write_text(textwrap.dedent(f"""\
            hosts: ["{domain}"]
            loglevel: info
            certfiles: ["{combined}"]
            listen:
              - port: {self.c2s_port}
                ip: "127.0.0.1"
                module: ejabberd_c2s
                starttls_required: true
              - port: {self.component_port}
                ip: "127.0.0.1"
                module: ejabberd_service
                hosts:
                  "{component}":
                    password: "{self.secret}"
            auth_method: internal
            auth_password_format: scram
            auth_scram_hash: sha256
            acl:
              local:
                user_regexp: ""
            access_rules:
              c2s:
                allow: all
            shaper_rules: {{}}
            modules:
              mod_disco: {{}}
              mod_ping: {{}}
              mod_roster: {{}}
              mod_offline: {{}}
            """))
        # Debian's ejabberdctl.cfg names /etc/ejabberd/ejabberd.yml; this one names ours.
        self.ctl_config = directory / "ejabberdctl.cfg"
        self.ctl_config.write_text(f'EJABBERD_CONFIG_PATH="{self.config}"\n'
                                   f'EJABBERD_PID_PATH="{directory}/ejabberd.pid"\n'
                                   'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        subprocess.run(["chown", "-R", "ejabberd:ejabberd", str(directory)], check=True)
        for parent in (directory, *directory.parents):  # the ejabberd user must reach it
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o005)
        self.process: subprocess.Popen[bytes] | None = None

    def ctl(self, *args: str) -> list[str]:
        return [EJABBERDCTL, "--ctl-config", str(self.ctl_config), "--node", self.node,
                "--spool", str(self.directory / "spool"), "--logs",
                str(self.directory / "logs"), *args]

    def start(self) -> None:
        self.process = subprocess.Popen(self.ctl("foreground"), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running = self.process
        for port in (self.c2s_port, self.component_port):
            wait_for_port(port, running=lambda: running.poll() is None, timeout=60)

    def register(self, *locals_: str) -> None:
        for local in locals_:
            done = subprocess.run(self.ctl("register", local, self.domain, password(local)),
                                  capture_output=True, text=True, timeout=60)
            if done.returncode:
                raise RuntimeError(f"ejabberdctl register {local}: {done.stdout}{done.stderr}")

    def stop(self) -> None:
        if self.process is None:
            return
        subprocess.run(self.ctl("stop"), capture_output=True, timeout=60)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log(self) -> str:
        path = self.directory / "logs" / "ejabberd.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def ejabberd(pki: Any) -> Iterator[EjabberdHost]:
    """A running ejabberd with the accounts `owner` and `reader`, for one module's tests.

    Its directory is not under pytest's temporary root: every pytest run that starts sets
    that root back to mode 0700, and an ejabberd (another user) then fails to read its
    configuration or, later, its certificate (and refuses STARTTLS)."""
    if SKIP:
        pytest.skip(SKIP)
    directory = Path(tempfile.mkdtemp(prefix="sixnet-ejabberd-"))
    try:
        host = EjabberdHost(directory, pki)
        host.start()
        try:
            host.register("owner", "reader")
            yield host
        finally:
            host.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
