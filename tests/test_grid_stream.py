"""The negotiation state machine in memory: StringTransport, a fake clock, no sockets."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from sixnet.core.audit import AuditLog
from sixnet.core.lockout import LockoutPolicy
from sixnet.core.storage.database import Database
from sixnet.grid.router import Router
from sixnet.grid.sasl import SaslPolicy, TLSFacts
from sixnet.grid.storage.accounts import AccountStore, LockoutStore
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.stream import C2SServer, ClientStream, Limits, State

HEADER = (b"<stream:stream to='localhost' version='1.0' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams'>")
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"

#: One element per input name of the state machine.
INPUTS = {
    "starttls": b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>",
    "auth": f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'/>".encode(),
    "response": f"<response xmlns='{SASL}'/>".encode(),
    "abort": f"<abort xmlns='{SASL}'/>".encode(),
    "bind": b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
    "session": b"<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>"
               b"</iq>",
    "stanza": b"<message to='bob@localhost'><body>x</body></message>",
    "sm-enable": b"<enable xmlns='urn:xmpp:sm:3'/>",
    "sm-resume": b"<resume xmlns='urn:xmpp:sm:3' previd='x' h='0'/>",
    "sm-r": b"<r xmlns='urn:xmpp:sm:3'/>",
    "sm-a": b"<a xmlns='urn:xmpp:sm:3' h='0'/>",
    "unknown": b"<foo xmlns='urn:example'/>",
}
#: What each state reachable by a header alone accepts, and its error for anything else.
ACCEPTED = {State.STARTTLS: {"starttls", "auth"}, State.AUTH: {"auth", "response", "abort"}}
REFUSED_WITH = {State.STARTTLS: "policy-violation", State.AUTH: "not-authorized"}


class StreamMachineTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _server(self) -> C2SServer:
        db = Database("sqlite:grid.sqlite3", base=self.tmp)
        self.addCleanup(db.close)
        accounts = AccountStore(db, 4096)
        await accounts.prepare()
        await accounts.add("alice", "pw")
        self.clock = task.Clock()
        audit = AuditLog(self.tmp / "audit.jsonl")
        self.addCleanup(audit.close)
        store = self.pki.store()
        lockout = LockoutStore(db, LockoutPolicy(5, 60), clock=self.clock.seconds)
        policy = SaslPolicy("localhost", accounts, store, lockout, audit, self.clock, b"k" * 32,
                            4096, 0.0, False)
        router = Router("localhost", OfflineStore(db, 10), self.clock)
        identity = self.pki.identity("host", "localhost")
        return C2SServer("localhost", identity, None, policy, router,  # type: ignore[arg-type]
                         Limits(negotiation_timeout=5.0), self.clock)

    def _stream(self, server: C2SServer, tls: bool = True
                ) -> tuple[ClientStream, StringTransport]:
        stream = ClientStream(server, direct_tls=tls)
        transport = StringTransport()
        stream.makeConnection(transport)
        if tls:  # as if the TLS handshake had completed
            stream.tls = TLSFacts("TLSv1.3", {"tls-exporter": b"E" * 32}, [])
            stream.tls_pending = False
            stream.tls_up()
        return stream, transport

    async def test_every_refused_input_gets_the_states_stream_error(self) -> None:
        server = await self._server()
        checked = 0
        for state in (State.STARTTLS, State.AUTH):
            for name, data in INPUTS.items():
                if name in ACCEPTED[state]:
                    continue
                stream, transport = self._stream(server, tls=state is not State.STARTTLS)
                stream.dataReceived(HEADER)
                assert stream.state is state
                stream.dataReceived(data)
                out = transport.value()
                condition = REFUSED_WITH[state]
                assert f"<{condition} ".encode() in out, (state, name, out)
                assert transport.disconnecting and stream.state is State.CLOSED
                checked += 1
        assert checked >= 15

    async def test_features_by_stage(self) -> None:
        server = await self._server()
        stream, transport = self._stream(server, tls=False)
        stream.dataReceived(HEADER)
        assert b"<required/></starttls>" in transport.value()
        stream, transport = self._stream(server)
        stream.dataReceived(b"<?xml version='1.0'?>" + HEADER)
        out = transport.value()
        assert b"<mechanism>SCRAM-SHA-256-PLUS</mechanism>" in out
        assert b"<max-bytes>262144</max-bytes>" in out

    async def test_sasl_failures(self) -> None:
        server = await self._server()
        stream, transport = self._stream(server)
        stream.dataReceived(HEADER)
        cases = [
            (f"<auth xmlns='{SASL}' mechanism='DIGEST-MD5'/>", b"<invalid-mechanism/>"),
            (f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>!!!</auth>",
             b"<incorrect-encoding/>"),
        ]
        for element, condition in cases:
            transport.clear()
            stream.dataReceived(element.encode())
            await server.router.drain()
            assert condition in transport.value()
        transport.clear()
        stream.dataReceived(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'/>".encode())
        assert transport.value() == f"<challenge xmlns='{SASL}'></challenge>".encode()
        transport.clear()
        stream.dataReceived(f"<abort xmlns='{SASL}'/>".encode())
        assert b"<aborted/>" in transport.value()
        transport.clear()
        first = base64.b64encode(b"n,,n=alice,r=abc").decode()
        stream.dataReceived(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>"
                            .encode())
        await task.deferLater(reactor, 0.05, lambda: None)  # the account lookup
        assert b"<challenge" in transport.value()
        assert b"r=abc" in base64.b64decode(transport.value().split(b">")[1].split(b"<")[0])

    async def test_negotiation_timeout(self) -> None:
        server = await self._server()
        stream, transport = self._stream(server)
        stream.dataReceived(HEADER[:10])
        self.clock.advance(4.9)
        assert not transport.disconnecting
        self.clock.advance(0.2)
        assert b"<connection-timeout " in transport.value() and transport.disconnecting

    async def test_whitespace_keepalive_and_close(self) -> None:
        server = await self._server()
        stream, transport = self._stream(server)
        stream.dataReceived(HEADER + b"  \n  ")
        assert stream.state is State.AUTH
        transport.clear()
        stream.dataReceived(b"</stream:stream>")
        assert transport.value() == b"</stream:stream>" and transport.disconnecting

    async def test_bytes_after_starttls_are_a_policy_violation(self) -> None:
        """The same rule as IRP's: cleartext after <starttls/> is refused in the clear."""
        server = await self._server()
        stream, transport = self._stream(server, tls=False)
        transport.startTLS = lambda context: None  # type: ignore[attr-defined]
        stream.dataReceived(HEADER + INPUTS["starttls"] + INPUTS["stanza"])
        out = transport.value()
        assert out.index(b"<proceed") < out.index(b"<policy-violation ")
        assert out.endswith(b"</stream:stream>") and stream.state is State.CLOSED

    async def test_the_negotiation_deadline_covers_the_tls_handshake(self) -> None:
        server = await self._server()
        stream, transport = self._stream(server, tls=False)
        started: list[object] = []
        transport.startTLS = started.append  # type: ignore[attr-defined]
        stream.dataReceived(HEADER + INPUTS["starttls"])
        assert started and stream.state is State.TLS_HANDSHAKE
        self.clock.advance(5.1)
        assert transport.disconnected and stream.state is State.CLOSED
