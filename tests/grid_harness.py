"""Running the grid server in a test, and two kinds of client to talk to it over loopback:
slixmpp in a subprocess (`SlixClient`, a real client), and `RawClient`, which sends exactly the
bytes a test wants (hostile input, SCRAM-PLUS with tls-exporter, protocol corner cases)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from sixnet.app.config import Config, load_config
from sixnet.grid.service import GridService
from sixnet.pki.store import store_from_config
from sixnet.pki.tls import ClientTLS

HERE = Path(__file__).parent
DOMAIN = "localhost"


def write_config(directory: Path, pki: Any, **grid: Any) -> Config:
    pki.identity("host", DOMAIN)  # issued once per test session
    host_dir = pki.directory / "issued" / pki.root.directory.name / "host" / DOMAIN / "ecdsa-p256"
    settings = {
        "domain": DOMAIN, "listen": ["tcp:0:interface=127.0.0.1"],
        "listen_tls": ["tcp:0:interface=127.0.0.1"], "failure_delay": 0.05,
        "scram_iterations": 4096, **grid,
    }
    lines = [
        "[sixnet]", f"state_dir = {json.dumps(str(directory / 'state'))}",
        "[pki]", f"trust_anchors = [{json.dumps(str(pki.root.directory / 'ca.pem'))}]",
        f"crls = [{json.dumps(str(pki.root.directory / 'crl.pem'))}]",
        "[pki.identities.host]", f"subject = {json.dumps(DOMAIN)}",
        f"certificate = {json.dumps(str(host_dir / 'cert.pem'))}",
        f"key = {json.dumps(str(host_dir / 'key.pem'))}",
        "[grid]", "enabled = true",
    ]
    broker = settings.pop("broker", {})
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    if broker:
        lines += ["[grid.broker]"] + [f"{k} = {json.dumps(v)}" for k, v in broker.items()]
    path = directory / "sixnet.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


async def start_grid(config: Config) -> GridService:
    service = GridService(config, store_from_config(config))
    service.startService()
    await service.ready
    return service


def ports(service: GridService) -> tuple[int, int]:
    return (service.starttls_port.ports[0].getHost().port,
            service.direct_tls_port.ports[0].getHost().port)


def user_files(pki: Any, name: str) -> tuple[str, str]:
    pki.identity("user", name)
    base = pki.directory / "issued" / pki.root.directory.name / "user" / name / "ecdsa-p256"
    return str(base / "cert.pem"), str(base / "key.pem")


# -- slixmpp in a subprocess ------------------------------------------------------------------


class SlixClient(protocol.ProcessProtocol):
    """A slixmpp process; its JSON events are collected and can be awaited."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._waiters: list[tuple[Any, defer.Deferred[dict[str, Any]]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.stderr = b""

    @classmethod
    def spawn(cls, **options: Any) -> SlixClient:
        client = cls()
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        reactor.spawnProcess(client, sys.executable,
                             [sys.executable, str(HERE / "grid_client.py"), json.dumps(options)],
                             env=env)
        return client

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            event = json.loads(line)
            self.events.append(event)
            for waiter in list(self._waiters):
                match, d = waiter
                if match(event):
                    self._waiters.remove(waiter)
                    d.callback(event)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"client ended; events {self.events}; "
                                     f"stderr {self.stderr[-2000:]!r}"))
        self._waiters = []
        if not self.ended.called:
            self.ended.callback(None)

    def expect(self, event: str, timeout: float = 15.0, **fields: Any
               ) -> defer.Deferred[dict[str, Any]]:
        def match(e: dict[str, Any]) -> bool:
            return e.get("event") == event and all(e.get(k) == v for k, v in fields.items())

        for e in self.events:
            if match(e) and not e.get("_seen"):
                e["_seen"] = True
                return defer.succeed(e)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()

        def seen(e: dict[str, Any]) -> dict[str, Any]:
            e["_seen"] = True
            return e

        d.addCallback(seen)
        self._waiters.append((match, d))
        d.addTimeout(timeout, reactor, onTimeoutCancel=lambda *_: self._timed_out(event))
        return d

    def _timed_out(self, event: str) -> None:
        raise AssertionError(f"no {event!r} event; got {self.events}; "
                             f"stderr {self.stderr[-2000:]!r}")

    def command(self, **cmd: Any) -> None:
        self.transport.write(json.dumps(cmd).encode() + b"\n")

    async def stop(self) -> None:
        if not self.ended.called:
            try:
                self.transport.signalProcess("KILL")
            except Exception:
                pass
        await self.ended


# -- raw stream client ------------------------------------------------------------------------


class RawClient(protocol.Protocol):
    """Sends what a test says; `until` waits for a pattern in what the server sent."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiters: list[tuple[re.Pattern[bytes], defer.Deferred[bytes]]] = []
        #: The SCRAM exchange `scram_first` started: mechanism, binding, GS2 header, bare
        #: client-first message.
        self._scram: tuple[str, str | None, str, str] | None = None

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> RawClient:
        """Connect to 127.0.0.1, from another loopback address when `source` says so."""
        client = cls()
        bind = (source, 0) if source else None
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=bind),
                              client)
        return client

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        for waiter in list(self._waiters):
            pattern, d = waiter
            if pattern.search(self.received):
                self._waiters.remove(waiter)
                d.callback(self.received)

    def connectionLost(self, reason: Any) -> None:
        for _, d in self._waiters:
            d.errback(AssertionError(f"connection closed; received {self.received[-600:]!r}"))
        self._waiters = []
        self.closed.callback(None)

    def send(self, data: bytes | str) -> None:
        self.transport.write(data.encode() if isinstance(data, str) else data)

    def until(self, pattern: bytes, timeout: float = 10.0) -> defer.Deferred[bytes]:
        compiled = re.compile(pattern, re.S)
        if compiled.search(self.received):
            return defer.succeed(self.received)
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((compiled, d))

        def timed_out(*_: Any) -> None:
            raise AssertionError(f"no {pattern!r}; received {self.received[-600:]!r}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
        return d

    def clear(self) -> None:
        self.received = b""

    async def open_stream(self, to: str = DOMAIN) -> bytes:
        self.clear()
        self.send(f"<?xml version='1.0'?><stream:stream to='{to}' version='1.0' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        return await self.until(rb"</stream:features>|</stream:error>")

    async def starttls(self, store: Any, identity: Any = None) -> None:
        await self.open_stream()
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await self.until(rb"<proceed")
        self.transport.startTLS(ClientTLS(store, identity))

    def tls_connection(self) -> Any:
        return self.transport.getHandle()

    async def scram_login(self, user: str, password: str, mechanism: str = "SCRAM-SHA-256",
                          binding: str | None = None) -> bytes:
        """Run a SCRAM exchange; returns the server's final answer (success or failure)."""
        data = await self.scram_first(user, mechanism, binding)
        if b"<failure" in data:
            return data
        return await self.scram_final(password)

    async def scram_first(self, user: str, mechanism: str = "SCRAM-SHA-256",
                          binding: str | None = None) -> bytes:
        """Send the client-first message; the server's answer (a challenge or a failure)."""
        gs2 = f"p={binding},," if binding else "n,,"
        first_bare = f"n={user},r={base64.b64encode(os.urandom(18)).decode()}"
        self._scram = (mechanism, binding, gs2, first_bare)
        self.clear()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>"
                  + base64.b64encode((gs2 + first_bare).encode()).decode() + "</auth>")
        return await self.until(rb"</challenge>|</failure>")

    async def scram_final(self, password: str) -> bytes:
        """Answer the challenge `scram_first` received with the proof for `password`; the
        server's final answer (success or failure)."""
        assert self._scram is not None, "scram_first first"
        mechanism, binding, gs2, first_bare = self._scram
        hash_name = "sha256" if "SHA-256" in mechanism else "sha1"
        data = self.received
        server_first = base64.b64decode(re.search(rb"<challenge[^>]*>([^<]*)<", data)[1])
        attrs = dict(p.split("=", 1) for p in server_first.decode().split(","))
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        cb_data = b""
        if binding == "tls-exporter":
            cb_data = self.tls_connection().export_keying_material(
                b"EXPORTER-Channel-Binding", 32, b"")
        elif binding == "tls-server-end-point":  # RFC 5929 4.1, ECDSA-SHA256 certificate
            from cryptography.hazmat.primitives.serialization import Encoding

            cert = self.tls_connection().get_peer_certificate(as_cryptography=True)
            cb_data = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
        without = (f"c={base64.b64encode(gs2.encode() + cb_data).decode()},"
                   f"r={attrs['r']}")
        auth_message = f"{first_bare},{server_first.decode()},{without}".encode()
        client_key = hmac.digest(salted, b"Client Key", hash_name)
        stored = hashlib.new(hash_name, client_key).digest()
        signature = hmac.digest(stored, auth_message, hash_name)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.clear()
        self.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                  + base64.b64encode(f"{without},p={base64.b64encode(proof).decode()}"
                                     .encode()).decode() + "</response>")
        data = await self.until(rb"</success>|<success[^>]*/>|</failure>")
        if b"<success" in data:
            server_key = hmac.digest(salted, b"Server Key", hash_name)
            expected = base64.b64encode(hmac.digest(server_key, auth_message, hash_name))
            v = base64.b64decode(re.search(rb"<success[^>]*>([^<]*)<", data)[1])
            assert v == b"v=" + expected, "server signature mismatch"
        return data

    async def bind(self, resource: str | None = None) -> str:
        await self.open_stream()
        inner = f"<resource>{resource}</resource>" if resource else ""
        self.clear()
        self.send(f"<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"{inner}</bind></iq>")
        data = await self.until(rb"</jid>|</iq>")
        return re.search(rb"<jid>([^<]*)</jid>", data)[1].decode()
