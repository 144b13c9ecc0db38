"""The process: twistd plugins, the root service, listening endpoints, clean shutdown."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest

from sixnet.core.runtime import ListeningService

from .support.configs import config_file, localhost_config
from .support.pki import LabPKI
from .support.twistd import twistd_command


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class PingClient(protocol.Protocol):
    def __init__(self) -> None:
        self.reply: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.transport.loseConnection()
        self.reply.callback(data)


class ListeningServiceTests(unittest.TestCase):
    timeout = 20

    async def test_listens_on_every_endpoint_and_closes_on_stop(self) -> None:
        service = ListeningService("echo", ["tcp:0:interface=127.0.0.1",
                                            "tcp6:0:interface=\\:\\:1"],
                                   protocol.Factory.forProtocol(Echo))
        service.startService()
        assert len(service.ports) == 2
        addresses = [(p.getHost().host, p.getHost().port) for p in service.ports]
        for host, port in addresses:
            client = await protocol.ClientCreator(reactor, PingClient).connectTCP(host, port)
            assert await client.reply == b"ping"
        await service.stopService()
        assert service.ports == []
        for host, port in addresses:
            with self.assertRaises(ConnectionRefusedError):
                await protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(host, port)


def test_twistd_starts_and_stops_cleanly_on_sigterm(pki: LabPKI, tmp_path: Path) -> None:
    config = config_file(tmp_path, localhost_config(pki))
    started = time.monotonic()
    proc = subprocess.Popen(twistd_command("sixnet", config, "--log-format", "json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "sixnet 0.1.0 started: no services" in line:
                break
        assert time.monotonic() - started < 60
        assert all(line.startswith('{"time": "') for line in lines), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read()
        assert '"message": "signal SIGTERM: stopping"' in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()



def test_a_port_in_use_stops_twistd_with_status_1(pki: LabPKI, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = config_file(tmp_path, localhost_config(
            pki, sixnet={"state_dir": tmp_path / "state"},
            grid={"enabled": True, "listen": [f"tcp:{port}:interface=127.0.0.1"],
                  "listen_tls": ["tcp:0:interface=127.0.0.1"]}))
        r = subprocess.run(twistd_command("sixnet", config), capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1
    assert f"grid: cannot listen on tcp:{port}:interface=127.0.0.1: Couldn't listen on " \
           f"127.0.0.1:{port}: [Errno 98] Address already in use." in r.stdout
