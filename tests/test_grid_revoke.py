"""``sixnet grid revoke`` from another process against a running server, over real sockets.

A platform logged in twice (SCRAM and EXTERNAL with its certificate), owning a topic and
subscribed to it, is revoked by the CLI: both streams end with <policy-violation/> within
seconds, its subscription and affiliation are gone, SCRAM and EXTERNAL logins are refused,
all of it audited; ``--undo`` lets it in again. On SQLite (the server polls the table) and on
PostgreSQL (NOTIFY).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task, threads
from twisted.trial import unittest

from tests.grid_harness import RawClient, ports, start_grid, write_config

from .support.databases import drop_postgres_schema, fresh_postgres_schema, postgres_unavailable

PS = "http://jabber.org/protocol/pubsub"
PLATFORM = "platform@localhost"
#: Seconds from the command's exit to the stream error (the SQLite poll is 1 s).
PROMPT = 3.0


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sixnet", "grid", "revoke", *args,
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)


class RevokeTests(unittest.TestCase):
    database: str | None = None

    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    def _config(self) -> None:
        settings: dict[str, Any] = {}
        if self.database is not None:
            settings = {"database": self.database, "broker": {"database": self.database}}
        self.config = write_config(self.tmp, self.pki, **settings)

    async def _grid(self) -> None:
        self._config()
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, _ = ports(self.grid)
        await self.grid.accounts.add("platform", "platform secret")

    async def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await threads.deferToThread(cli, self.config.path, *args)

    async def _connect(self, identity: Any = None) -> RawClient:
        client = await RawClient.connect(self.port)
        self.addCleanup(lambda: client.transport.abortConnection())
        await client.starttls(self.grid.tls.store, identity)
        await client.open_stream()
        return client

    async def _scram(self) -> tuple[RawClient, bytes]:
        client = await self._connect()
        return client, await client.scram_login("platform", "platform secret")

    async def _external(self) -> tuple[RawClient, bytes]:
        client = await self._connect(self.pki.identity("user", PLATFORM))
        client.clear()
        client.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
                    f"{base64.b64encode(PLATFORM.encode()).decode()}</auth>")
        return client, await client.until(rb"<success[^>]*/>|</success>|</failure>")

    async def _iq(self, client: RawClient, stanza_id: str, body: str) -> bytes:
        client.clear()
        client.send(f"<iq type='set' id='{stanza_id}' to='broker.localhost'>"
                    f"<pubsub xmlns='{PS}'>{body}</pubsub></iq>")
        data = await client.until(rf"id=.{stanza_id}.[^>]*(/>|>.*?</iq>)".encode())
        assert b"type='result'" in data or b'type="result"' in data, data
        return data

    async def _stream_error(self, client: RawClient, started: float) -> float:
        data = await client.until(rb"</stream:error>")
        assert b"<policy-violation " in data and b"revoked" in data, data
        await client.closed
        return time.monotonic() - started

    async def _subscribed_platform(self) -> tuple[RawClient, RawClient]:
        scram, result = await self._scram()
        assert b"<success" in result, result
        await scram.bind("a")
        external, result = await self._external()
        assert b"<success" in result, result
        await external.bind("b")
        await self._iq(scram, "c", "<create node='feed'/>")
        await self._iq(scram, "s", f"<subscribe node='feed' jid='{PLATFORM}'/>")
        node = self.grid.broker.engine.nodes["feed"]
        assert node.affiliations == {PLATFORM: "owner"} and node.of_platform(PLATFORM)
        return scram, external

    async def test_revoke_cuts_off_refuses_and_undo(self) -> None:
        await self._grid()
        scram, external = await self._subscribed_platform()
        unbound, result = await self._scram()  # authenticated before, binds after
        assert b"<success" in result, result

        done = await self._cli(PLATFORM, "--reason", "key leaked", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"revoked": PLATFORM, "new": True}
        # The command returns once the row is committed; the server acts within PROMPT s.
        started = time.monotonic()
        for client in (scram, external):
            assert await self._stream_error(client, started) < PROMPT
        assert self.grid.router.sessions_of(PLATFORM) == []
        await unbound.open_stream()
        unbound.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        await self._stream_error(unbound, started)
        assert self.grid.router.sessions_of(PLATFORM) == []

        # Its subscription and affiliation are gone, in memory and in the broker's store.
        await self.grid.broker.idle()
        node = self.grid.broker.engine.nodes["feed"]
        assert node.of_platform(PLATFORM) == [] and node.affiliations == {}
        stored = await self.grid.broker.store.load()
        assert [s.jid for s in stored.subscriptions] == []
        assert [a.jid for a in stored.affiliations] == []

        # Later logins are refused, whatever the credentials.
        _, result = await self._scram()
        assert b"<not-authorized/>" in result and b"revoked" in result, result
        _, result = await self._external()
        assert b"<not-authorized/>" in result and b"revoked" in result, result

        listed = await self._cli("--list", "--json")
        [row] = json.loads(listed.stdout)
        assert row["jid"] == PLATFORM and row["reason"] == "key leaked"
        again = await self._cli("platform")
        assert again.stdout.strip() == f"{PLATFORM} was revoked already"

        audit = [json.loads(line) for line in
                 (self.config.sixnet.state_dir / "grid-audit.jsonl").read_text().splitlines()]
        events = [(e["event"], e.get("user")) for e in audit]
        assert ("platform-revoked", PLATFORM) in events
        assert sorted(e["user"] for e in audit if e["event"] == "session-revoked") == \
            [f"{PLATFORM}/a", f"{PLATFORM}/b"]
        refused = [e for e in audit if e["event"] == "auth-failure"]
        assert {e["mechanism"] for e in refused} == {"SCRAM-SHA-256", "EXTERNAL"}
        assert all("revoked" in e["reason"] for e in refused)
        broker_audit = (self.config.sixnet.state_dir /
                        self.config.grid.broker.audit_log).read_text()
        assert '"event":"revoke"' in broker_audit

        # A mistake is undone: the platform logs in again (its subscriptions stay removed).
        undone = await self._cli("--undo", PLATFORM)
        assert undone.returncode == 0 and undone.stdout.strip() == \
            f"{PLATFORM} is no longer revoked"
        deadline = time.monotonic() + PROMPT
        while PLATFORM in self.grid.revocations.revoked and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        _, result = await self._scram()
        assert b"<success" in result, result
        await self.grid.broker.idle()
        assert PLATFORM not in self.grid.broker.engine.revoked
        assert (await self._cli("--list")).stdout.strip() == "no revoked platforms"

    async def test_revoked_while_the_server_was_down(self) -> None:
        """The table is read at start: the platform is refused and the broker told."""
        self._config()
        done = await self._cli(PLATFORM)
        assert done.returncode == 0, done.stderr
        await self._grid()
        _, result = await self._scram()
        assert b"<not-authorized/>" in result, result
        await self.grid.broker.idle()
        assert PLATFORM in self.grid.broker.engine.revoked


class PostgresRevokeTests(RevokeTests):
    skip = postgres_unavailable()

    def setUp(self) -> None:
        self.database, schema = fresh_postgres_schema()
        self.addCleanup(drop_postgres_schema, schema)


def test_command_line_mistakes(pki: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path, pki).path
    for args, status, message in [
        (("a/b@localhost",), 2, "not a bare JID"),
        (("x@elsewhere.test",), 2, "not a platform of localhost"),
        ((), 2, "PLATFORM is missing"),
        (("--list", PLATFORM), 2, "--list takes no PLATFORM"),
        (("--undo", PLATFORM), 1, f"{PLATFORM} is not revoked"),
    ]:
        result = cli(config, *args)
        assert result.returncode == status, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
