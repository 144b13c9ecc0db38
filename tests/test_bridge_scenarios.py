"""The issue's checks: a real attack on a service ends as the expected IODEF incident at a
platform subscribed to the in-process grid over a real socket.

(a) a relay in the middle of a SixChat handshake swaps alice's certificate for mallory's: alice's
agent refuses the handshake (chat.mitm), reported at once; (b) a burst of wrong passwords at
the IRP registry from one address: one incident with the count, then the lockout.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.trial import unittest

from sixnet.core.iodef import IODEF_NS, IODEFValidator
from sixnet.irp.client import IRPError
from sixnet.irp.engine.credentials import hash_password
from sixnet.pki.keys import generate_key

from .support.bridge import BridgedGrid, summary, text_of
from .support.waiting import wait_for
from .test_chat_agents import ALICE, BOB, MALLORY, AgentHarness
from .test_irp import LabSetup, RegistryHarness, _fails

X = f"{{{IODEF_NS}}}"


class ChatMITMToGridTests(AgentHarness):
    @pytest.fixture(autouse=True)
    def _grid(self, pki: Any, tmp_path: Path) -> None:
        self.lab = BridgedGrid(self, pki, tmp_path / "grid")

    async def test_a_man_in_the_middle_is_reported_at_once(self) -> None:
        lab = await self.lab.start({"window": 30.0})  # immediate: no waiting for the window
        got = await lab.subscriber()
        alice_chain = self.pki.identity("user", ALICE).chain
        mallory = self.pki.identity("user", MALLORY)

        def der(cert: Any) -> bytes:
            return base64.b64encode(cert.public_bytes(Encoding.DER))

        def swap(direction: str, data: bytes) -> bytes:
            if direction == "out":
                for mine, hers in zip(alice_chain, mallory.chain, strict=True):
                    data = data.replace(der(mine), der(hers))
            return data

        alice, bob, _ = await self._relayed(swap)
        for agent in (alice, bob):
            agent.agent.events.subscribe(lab.bus.emit)  # the root's bus, in the suite
        await alice.agent.send(BOB, "meet at the usual place")
        await wait_for(lambda: got, what="the incident")
        notification = got[0]
        assert summary(notification) == ("chat.mitm", 1, "127.0.0.1", BOB)
        doc = notification.payload
        assert IODEFValidator().problem(doc) is None
        impact = doc.find(f".//{X}SystemImpact")
        assert (impact.get("type"), impact.get("severity")) == ("monitoring-traffic", "high")
        assert doc.findtext(f".//{X}AdditionalData[@name='check']") == "hello-to"
        assert "usual place" not in text_of(notification)


class IRPBurstToGridTests(RegistryHarness, unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _grid(self, pki: Any, tmp_path: Path) -> None:
        self.lab = LabSetup(tmp_path / "irp")
        self.bridged = BridgedGrid(self, pki, tmp_path / "grid")

    async def test_a_burst_of_wrong_passwords_is_one_incident_then_the_lockout(self) -> None:
        lab = await self.bridged.start({"window": 60.0})
        got = await lab.subscriber()
        registry = await self.start(lockout_after=5)
        registry.registry.events.subscribe(lab.bus.emit)
        await registry.registry.store.set_password("erin@example.test",
                                                   hash_password("the right one"), 0)
        stranger = await self.client(registry, source="127.0.0.2")
        for attempt in range(5):
            await _fails(stranger.enroll("erin@example.test", generate_key(),
                                         password=f"guess-{attempt}-xyzzy"), IRPError)
        assert got == []  # counted, not reported: the window is still open
        lab.bridge.aggregator.flush()  # the window ends (as at its time, or at a stop)
        await wait_for(lambda: len(got) == 2, what="two incidents")
        assert sorted(summary(n) for n in got) == [
            ("irp.locked-out", 1, "127.0.0.2", "erin@example.test"),
            ("irp.login-failed", 5, "127.0.0.2", "erin@example.test"),
        ]
        for notification in got:
            assert IODEFValidator().problem(notification.payload) is None
            assert "xyzzy" not in text_of(notification)
            assert "the right one" not in text_of(notification)
