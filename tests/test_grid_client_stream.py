"""The grid client's negotiation in memory: a scripted server over StringTransport with a fake
clock and a fake TLS layer, for what a real sixnet server never does (no STARTTLS, a forged
SCRAM signature, a success without one, a required legacy session, silence)."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sixnet.grid.client.errors import AuthenticationError, ClientError
from sixnet.grid.client.session import XMPPClientSession
from sixnet.grid.client.stream import ClientStream, Login
from sixnet.grid.jid import parse_jid
from sixnet.grid.scram import ScramCredentials, ScramExchange

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='s1' "
          b"version='1.0'>")
STARTTLS = (b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>"
            b"</starttls></stream:features>")
SASL = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>SCRAM-SHA-256-PLUS</mechanism><mechanism>SCRAM-SHA-256</mechanism>"
        b"</mechanisms><sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>"
        b"<channel-binding type='tls-exporter'/></sasl-channel-binding></stream:features>")
EXPORTER = b"k" * 32


class FakeTLSConnection:
    """What the client asks of pyOpenSSL's Connection once the handshake is done."""

    def __init__(self, chain: list[Any]) -> None:
        self.chain = chain

    def get_peer_certificate(self, as_cryptography: bool) -> Any:
        return self.chain[0]

    def get_peer_cert_chain(self, as_cryptography: bool) -> list[Any]:
        return self.chain

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        return EXPORTER


class TLSTransport(StringTransport):
    def __init__(self, connection: FakeTLSConnection) -> None:
        super().__init__()
        self.connection = connection
        self.tls: object = None

    def startTLS(self, context: object) -> None:
        self.tls = context

    def getHandle(self) -> FakeTLSConnection:
        return self.connection


class Scripted:
    """A client stream and the server side of the test, which writes what it wants."""

    def __init__(self, pki: Any, **login: Any) -> None:
        self.clock = Clock()
        self.session = XMPPClientSession(self.clock, 5.0)
        self.errors: list[Any] = []
        self.session.ready.addErrback(lambda f: self.errors.append(f.value))
        login.setdefault("password", "pencil")
        self.stream = ClientStream(Login(parse_jid("alice@localhost"), pki.store(), **login),
                                   self.session, self.clock, direct_tls=False, timeout=5.0)
        self.session.protocol = self.stream
        self.transport = TLSTransport(FakeTLSConnection(pki.chain("host", "localhost")))
        self.stream.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def to_tls(self) -> None:
        self.stream.dataReceived(HEADER + STARTTLS)
        assert b"<starttls" in self.sent()
        self.stream.dataReceived(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert self.transport.tls is self.stream.tls
        self.stream.handshakeCompleted()
        assert b"<stream:stream" in self.sent()
        assert self.stream.state == "tls-features"

    def scram_until_final(self) -> tuple[ScramExchange, bytes]:
        """Run SCRAM to the point where the server would send success; its v=... data."""
        self.to_tls()
        self.stream.dataReceived(HEADER + SASL)
        auth = self.sent()
        assert b"mechanism='SCRAM-SHA-256-PLUS'" in auth
        server = ScramExchange("SHA-256", True, {"tls-exporter": EXPORTER}, b"s" * 32, 4096)
        assert server.client_first(_payload(auth)) == "alice"
        first = server.server_first(ScramCredentials.derive("SHA-256", "pencil", 4096))
        self.stream.dataReceived(b"<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                 + base64.b64encode(first) + b"</challenge>")
        return server, server.client_final(_payload(self.sent()))

    def failure(self) -> Any:
        assert self.errors, "the session did not fail"
        return self.errors[0]


def _payload(data: bytes) -> bytes:
    match = re.search(rb">([A-Za-z0-9+/=]+)</", data)
    assert match, data
    return base64.b64decode(match[1])


def success(data: bytes) -> bytes:
    return (b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" + base64.b64encode(data)
            + b"</success>")


def test_scram_plus_with_tls_exporter_then_bind_and_a_required_session(pki: Any) -> None:
    s = Scripted(pki)
    _, final = s.scram_until_final()
    s.stream.dataReceived(success(final))
    assert s.stream.state == "bound-features" and b"<stream:stream" in s.sent()
    s.stream.dataReceived(HEADER + b"<stream:features><bind xmlns='urn:ietf:params:xml:ns:"
                          b"xmpp-bind'/><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>"
                          b"</stream:features>")
    assert b"<bind" in s.sent()
    s.stream.dataReceived(b"<iq type='result' id='bind-1'><bind xmlns='urn:ietf:params:xml:"
                          b"ns:xmpp-bind'><jid>alice@localhost/r1</jid></bind></iq>")
    assert b"<session" in s.sent() and s.stream.state == "session-iq"
    s.stream.dataReceived(b"<iq type='result' id='session-1'/>")
    assert s.stream.state == "ready" and s.session.ready.called and not s.errors
    assert s.session.jid == "alice@localhost/r1"
    # The server's ping is answered; an unknown request is refused.
    s.stream.dataReceived(b"<iq type='get' id='p' from='localhost'><ping xmlns='urn:xmpp:ping'/>"
                          b"</iq><iq type='get' id='q'><query xmlns='urn:x'/></iq>")
    answers = s.sent()
    assert b"type=\"result\"" in answers and b"service-unavailable" in answers


@pytest.mark.parametrize("answer", ["forged", "missing"])
def test_a_server_that_does_not_prove_it_knows_the_password(pki: Any, answer: str) -> None:
    s = Scripted(pki)
    s.scram_until_final()
    s.stream.dataReceived(success(b"v=" + base64.b64encode(b"x" * 32)) if answer == "forged"
                          else b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    error = s.failure()
    assert isinstance(error, AuthenticationError) and error.condition == "server-not-trusted"
    assert s.stream.closed and s.stream.state == "closed"


def test_sasl_failure_names_the_condition(pki: Any) -> None:
    s = Scripted(pki)
    s.scram_until_final()
    s.stream.dataReceived(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                          b"<account-disabled/><text>locked</text></failure>")
    error = s.failure()
    assert isinstance(error, AuthenticationError)
    assert (error.condition, error.text) == ("account-disabled", "locked")


def test_no_starttls_is_never_plaintext(pki: Any) -> None:
    s = Scripted(pki)
    s.stream.dataReceived(HEADER + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:"
                          b"ns:xmpp-sasl'><mechanism>PLAIN</mechanism></mechanisms>"
                          b"</stream:features>")
    assert s.failure().condition == "no-tls"
    assert b"<auth" not in s.sent()


def test_stream_errors_foreign_streams_and_silence(pki: Any) -> None:
    s = Scripted(pki)
    s.stream.dataReceived(HEADER + b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:"
                          b"ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>"
                          b"not here</text></stream:error>")
    assert s.failure().condition == "host-unknown" and "not here" in str(s.failure())
    other = Scripted(pki)
    other.stream.dataReceived(b"<irp xmlns='urn:example'>")
    assert other.failure().condition == "invalid-namespace"
    silent = Scripted(pki)
    silent.clock.advance(5.0)
    assert silent.failure().condition == "connection-timeout"
    assert isinstance(silent.failure(), ClientError)


def test_only_the_mechanisms_allowed(pki: Any) -> None:
    s = Scripted(pki, mechanisms=["SCRAM-SHA-1"])
    s.to_tls()
    s.stream.dataReceived(HEADER + SASL)
    error = s.failure()
    assert isinstance(error, AuthenticationError) and error.condition == "invalid-mechanism"
    assert "SCRAM-SHA-256-PLUS, SCRAM-SHA-256" in error.text
