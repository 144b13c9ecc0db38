"""The XMPP server over real loopback TLS: negotiation, SASL, binding, routing, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.trial import unittest

from tests.grid_harness import RawClient, ports, start_grid, write_config


class RawStreamTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _grid(self, **settings: Any) -> Any:
        self.config = write_config(self.tmp, self.pki, **settings)
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, self.tls_port = ports(self.grid)
        await self.grid.accounts.add("alice", "correct horse")
        return self.grid

    async def test_scram_sha256_plus_tls_exporter(self) -> None:
        await self._grid()
        c = await RawClient.connect(self.port)
        await c.starttls(self.grid.tls.store)
        features = await c.open_stream()
        assert b"SCRAM-SHA-256-PLUS" in features
        assert b"<channel-binding type='tls-exporter'/>" in features
        assert c.tls_connection().get_protocol_version_name() == "TLSv1.3"
        result = await c.scram_login("alice", "correct horse", "SCRAM-SHA-256-PLUS",
                                     "tls-exporter")
        assert b"<success" in result
        jid = await c.bind()
        assert jid.startswith("alice@localhost/")
