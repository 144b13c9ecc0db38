"""``sixnet irp`` commands, run as processes against a registry on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from twisted.internet import reactor, task, threads
from twisted.internet.error import ConnectError
from twisted.trial import unittest

from sixnet.app.config import load_config
from sixnet.core.errors import EXIT_USAGE, CommandError
from sixnet.irp.cli import _address, _parse_server
from sixnet.irp.client import IRPConnectionError, connect
from sixnet.irp.service import make_service
from sixnet.pki.store import store_from_config

from .test_irp import HOST, LabSetup, RegistryHarness


class CommandTests(RegistryHarness, unittest.TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.lab = LabSetup(self.base / "lab")
        self.state = self.base / "state"
        ca = self.lab.ca.directory
        self.config = self.base / "sixnet.toml"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(f"""
[sixnet]
state_dir = "{self.state}"
[pki]
trust_anchors = ["{ca / 'ca.pem'}"]
crls = ["{ca / 'crl.pem'}"]
lab_ca = "{ca}"
[pki.identities.host]
subject = "{HOST}"
certificate = "{self.base / 'lab/host/cert.pem'}"
key = "{self.base / 'lab/host/key.pem'}"
[pki.identities.user]
subject = "carol@example.test"
certificate = "{self.base / 'carol/cert.pem'}"
key = "{self.base / 'carol/key.pem'}"
[irp]
enabled = true
listen = ["tcp:0:interface=127.0.0.1"]
database = "sqlite:irp.sqlite3"
""")

    def database_url(self) -> str:
        return f"sqlite:{self.state / 'irp.sqlite3'}"

    async def sixnet(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "sixnet", *args, "--config", str(self.config)]
        return await threads.deferToThread(
            subprocess.run, command, input=stdin, capture_output=True, text=True, timeout=60)

    async def test_admin_and_client_commands(self) -> None:
        service = await self.start()
        server = ["--server", f"127.0.0.1:{self.port(service)}", "--server-name", HOST]

        done = await self.sixnet("irp", "user", "add", "carol@example.test", stdin="s3cret\n")
        assert done.returncode == 0, done.stderr
        done = await self.sixnet("irp", "enroll", "carol@example.test", *server,
                                 stdin="wrong\n")
        assert done.returncode == 1 and done.stderr.count("\n") == 1
        assert "not-authorized" in done.stderr
        done = await self.sixnet("irp", "enroll", "carol@example.test", *server,
                                 stdin="s3cret\n")
        assert done.returncode == 0, done.stderr
        assert (self.base / "carol/cert.pem").exists()

        done = await self.sixnet("irp", "register", "[2001:db8::5]:4605", "192.0.2.5:4605",
                                 "--device", "cli", "--json", *server)
        assert done.returncode == 0, done.stderr
        done = await self.sixnet("irp", "lookup", "carol@example.test", "--json", *server)
        record = json.loads(done.stdout)
        assert [(a["ip"], a["port"]) for a in record["addresses"]] == [
            ("2001:db8::5", 4605), ("192.0.2.5", 4605)]
        assert record["certificate"]["status"] == "valid"

        done = await self.sixnet("irp", "invite", "dave@example.test", "--json")
        code = json.loads(done.stdout)["code"]
        dave = ["--out", str(self.base / "dave")]
        done = await self.sixnet("irp", "enroll", "dave@example.test", "--code", code, *dave,
                                 *server)
        assert done.returncode == 0, done.stderr
        done = await self.sixnet("irp", "enroll", "dave@example.test", "--code", code, *dave,
                                 "--force", *server)
        assert done.returncode == 1 and "code is wrong, expired or used" in done.stderr

        done = await self.sixnet("irp", "user", "list", "--json")
        assert [u["user"] for u in json.loads(done.stdout)] == ["carol@example.test",
                                                               "dave@example.test"]
        done = await self.sixnet("irp", "lookup", "nobody@example.test", *server)
        assert done.returncode == 1 and "item-not-found" in done.stderr
        done = await self.sixnet("irp", "lookup", "not a user", *server)
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        done = await self.sixnet("irp", "revoke", *server)
        assert done.returncode == 0, done.stderr
        done = await self.sixnet("irp", "lookup", "carol@example.test", *server)
        assert done.returncode == 1 and "revoked" in done.stderr

        dave_serial = format(x509.load_pem_x509_certificate(
            (self.base / "dave/cert.pem").read_bytes()).serial_number, "X")
        done = await self.sixnet("irp", "user", "remove", "dave@example.test", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["revoked"] == [dave_serial]
        assert self.lab.ca.is_revoked(int(dave_serial, 16))
        done = await self.sixnet("irp", "user", "remove", "dave@example.test")
        assert done.returncode == 1 and "not registered" in done.stderr

    async def test_make_service_from_the_configuration(self) -> None:
        self.lab.ca.issue("user", "carol@example.test", out=self.base / "carol")
        config = load_config(self.config, check_files=False)
        service = make_service(config, store_from_config(config))
        service.startService()
        self.addCleanup(service.stopService)
        await service.ready
        port = service.listening.ports[0].getHost().port
        bob = await connect("127.0.0.1", port, self.lab.client_store(),
                            identity=self.lab.person("bob@example.test"), server_name=HOST)
        self.addCleanup(bob.close)
        assert bob.user == "bob@example.test"
        assert (await bob.register([("192.0.2.9", 4605)])).addresses

    async def test_acknowledged_registration_survives_kill(self) -> None:
        """twistd is killed with SIGKILL right after the answer; the record is there after."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        text = self.config.read_text().replace('"tcp:0:interface=127.0.0.1"',
                                               f'"tcp:{port}:interface=127.0.0.1"')
        self.config.write_text(text)
        self.lab.ca.issue("user", "carol@example.test", out=self.base / "carol")
        twistd = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
                  "sixnet-irp", "--config", str(self.config)]
        alice = self.lab.person("alice@example.test")

        async def started() -> subprocess.Popen:
            process = subprocess.Popen(twistd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, cwd=self.base)
            self.addCleanup(lambda: process.poll() is None and process.kill())
            for _ in range(200):
                try:
                    client = await connect("127.0.0.1", port, self.lab.client_store(),
                                           identity=alice, server_name=HOST, timeout=2)
                    return process, client
                except (IRPConnectionError, OSError, ConnectError):
                    await task.deferLater(reactor, 0.05, lambda: None)
            raise AssertionError("twistd did not start")

        process, client = await started()
        await client.register([("2001:db8::dead", 4605)], device="phone")
        os.kill(process.pid, signal.SIGKILL)
        await client.lost
        await threads.deferToThread(process.wait)
        process, client = await started()
        record = await client.lookup("alice@example.test")
        client.close()
        process.terminate()
        await threads.deferToThread(process.wait)
        assert record.addresses == [("2001:db8::dead", 4605, "phone")]

    async def test_watch_prints_changes(self) -> None:
        service = await self.start()
        self.lab.ca.issue("user", "carol@example.test", out=self.base / "carol")
        alice = await connect("127.0.0.1", self.port(service), self.lab.client_store(),
                              identity=self.lab.person("alice@example.test"), server_name=HOST)
        self.addCleanup(alice.close)
        await alice.register([("192.0.2.1", 4605)], device="laptop")
        command = [sys.executable, "-m", "sixnet", "irp", "watch", "alice@example.test",
                   "--count", "1", "--json", "--server", f"127.0.0.1:{self.port(service)}",
                   "--server-name", HOST, "--config", str(self.config)]
        watcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        self.addCleanup(lambda: watcher.poll() is None and watcher.kill())
        first = json.loads(await threads.deferToThread(watcher.stdout.readline))
        assert [a["ip"] for a in first["addresses"]] == ["192.0.2.1"]
        await alice.register([("192.0.2.2", 4605)], device="laptop")
        out, err = await threads.deferToThread(watcher.communicate, timeout=30)
        assert watcher.returncode == 0, err
        assert [a["ip"] for a in json.loads(out)["addresses"]] == ["192.0.2.2"]


@pytest.mark.parametrize("parse,text", [
    (_parse_server, "irp.example.test:\u0664\u0666\u0660\u0664"),
    (_parse_server, "[2001:db8::1]:\u00b2"),
    (_address, "192.0.2.1:\u0664\u0666\u0660\u0665"),
    (_address, "[2001:db8::1]:\u00b2"),
    (_address, "192.0.2.1:70000"),
])
def test_a_port_is_ascii_digits_only(parse: Any, text: str) -> None:
    """``str.isdigit`` takes Arabic-Indic digits (read as 4604) and "²" (which `int`
    refuses with its own traceback): a usage error naming the port instead."""
    with pytest.raises(CommandError) as caught:
        parse(text)
    assert caught.value.status == EXIT_USAGE
    assert "the port must be 1-65535 in ASCII digits" in str(caught.value)
