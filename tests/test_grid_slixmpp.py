"""slixmpp, a real XMPP client, against the grid server: loopback TLS, lab-CA certificates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import reactor, task
from twisted.trial import unittest

from tests.grid_harness import SlixClient, ports, start_grid, user_files, write_config


class SlixmppTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path
        self.ca = str(pki.root.directory / "ca.pem")

    async def _grid(self, **settings: Any) -> Any:
        self.config = write_config(self.tmp, self.pki, **settings)
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, self.tls_port = ports(self.grid)
        for name in ("alice", "bob"):
            await self.grid.accounts.add(name, f"{name} secret")
        return self.grid

    def _client(self, jid: str, **options: Any) -> SlixClient:
        options.setdefault("port", self.port)
        options.setdefault("password", f"{jid.split('@')[0]} secret")
        client = SlixClient.spawn(jid=jid, ca=self.ca, **options)
        self.addCleanup(client.stop)
        return client

    async def test_scram_sha256_messages_and_iq(self) -> None:
        await self._grid()
        alice = self._client("alice@localhost", mechanisms=["SCRAM-SHA-256"])
        bob = self._client("bob@localhost", port=self.tls_port, direct_tls=True)
        a = await alice.expect("session")
        b = await bob.expect("session")
        assert a["tls"] == "TLSv1.3" and b["tls"] == "TLSv1.3"
        assert a["mechanism"] == "SCRAM-SHA-256"
        # slixmpp has no tls-exporter, so on TLS 1.3 it falls back from -PLUS by itself.
        assert b["mechanism"] in ("SCRAM-SHA-256", "SCRAM-SHA-1")
        await task.deferLater(reactor, 0.2, lambda: None)  # initial presences routed
        alice.command(op="send", to="bob@localhost", body="hello bob")
        got = await bob.expect("message", body="hello bob")
        assert got["frm"] == a["jid"] and got["type"] == "chat"
        bob.command(op="send", to=a["jid"], body="hello alice")
        await alice.expect("message", body="hello alice")
        alice.command(op="ping", to=b["jid"])  # an iq answered by the other client
        await alice.expect("pong")
        alice.command(op="ping", to="localhost")  # XEP-0199 to the server
        await alice.expect("pong")
        alice.command(op="ping", to="bob@localhost/nonexistent")
        error = await alice.expect("iq_error")
        assert error["condition"] == "service-unavailable"
        alice.command(op="ping", to="nobody.localhost")
        error = await alice.expect("iq_error")
        assert error["condition"] == "remote-server-not-found"

    async def test_external_with_a_lab_certificate_needs_no_account(self) -> None:
        await self._grid()
        cert, key = user_files(self.pki, "sensor1@localhost")
        sensor = self._client("sensor1@localhost", port=self.tls_port, direct_tls=True,
                              cert=cert, key=key, mechanisms=["EXTERNAL"], password="")
        s = await sensor.expect("session")
        assert s["mechanism"] == "EXTERNAL" and s["jid"].startswith("sensor1@localhost/")
        accounts = {a.username: a.kind for a in await self.grid.accounts.list()}
        assert accounts["sensor1"] == "certificate"

    async def test_wrong_password_is_refused(self) -> None:
        await self._grid()
        mallory = self._client("alice@localhost", password="guess",
                               mechanisms=["SCRAM-SHA-256"])
        failure = await mallory.expect("failed_auth")
        assert failure["condition"] == "not-authorized"
        await mallory.expect("failed_all_auth")
        audit = (self.config.sixnet.state_dir / "grid-audit.jsonl").read_text()
        assert '"event":"auth-failure"' in audit and '"user":"alice"' in audit

    async def test_revoked_certificate_is_refused(self) -> None:
        cert, key = user_files(self.pki, "revoked1@localhost")
        from cryptography import x509

        serial = x509.load_pem_x509_certificate(Path(cert).read_bytes()).serial_number
        self.pki.root.revoke(serial, "key compromise")
        await self._grid()
        client = self._client("revoked1@localhost", cert=cert, key=key,
                              mechanisms=["EXTERNAL"], password="")
        failure = await client.expect("failed_auth")
        assert failure["condition"] == "not-authorized"

    async def test_offline_messages_delivered_in_order_with_delay(self) -> None:
        await self._grid()
        alice = self._client("alice@localhost")
        await alice.expect("session")
        for i in range(3):
            alice.command(op="send", to="bob@localhost", body=f"offline {i}", type="normal")
            await alice.expect("sent", body=f"offline {i}")
        await task.deferLater(reactor, 0.3, lambda: None)
        assert await self.grid.offline.count("bob") == 3
        bob = self._client("bob@localhost")
        for i in range(3):
            got = await bob.expect("message", body=f"offline {i}")
            assert got["delay"] is not None
        bodies = [e["body"] for e in bob.events if e["event"] == "message"]
        assert bodies == ["offline 0", "offline 1", "offline 2"]
        assert await self.grid.offline.count("bob") == 0

    async def test_stream_management_resumes_after_the_connection_is_cut(self) -> None:
        await self._grid()
        alice = self._client("alice@localhost", sm=True, reconnect=True)
        a = await alice.expect("session")
        await alice.expect("sm_enabled")
        resource = a["jid"].split("/", 1)[1]
        session = self.grid.router.sessions["alice@localhost"][resource]

        def message(i: int) -> etree._Element:
            return etree.fromstring(
                f"<message xmlns='jabber:client' from='bob@localhost/x' to='{a['jid']}' "
                f"type='chat'><body>m{i}</body></message>")

        # Written to the socket buffer and thrown away by the cut: never seen by the client.
        for i in range(3):
            self.grid.router.route(message(i))
        session.connection.transport.abortConnection()
        await alice.expect("disconnected")
        for i in range(3, 6):  # while the session waits to be resumed
            self.grid.router.route(message(i))
        await alice.expect("resumed")
        for i in range(6):
            await alice.expect("message", body=f"m{i}")
        await task.deferLater(reactor, 0.5, lambda: None)
        bodies = [e["body"] for e in alice.events if e["event"] == "message"]
        assert bodies == [f"m{i}" for i in range(6)]
