"""The XMPP server over real loopback TLS, driven byte by byte: negotiation, SASL, binding,
routing, limits, and hostile input (each refused with its error while a logged-in client
connected at the same time carries on)."""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import reactor, task, utils
from twisted.trial import unittest

from tests.grid_harness import RawClient, ports, start_grid, write_config
from tests.support.databases import (
    drop_postgres_schema,
    fresh_postgres_schema,
    postgres_unavailable,
)

HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' version='1.0' "
          "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
PING = "<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"


class GridTestCase(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _grid(self, **settings: Any) -> Any:
        self.config = write_config(self.tmp, self.pki, **settings)
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, self.tls_port = ports(self.grid)
        existing = {a.username for a in await self.grid.accounts.list()}
        for name in ("alice", "bob"):
            await self.grid.accounts.add(name, f"{name} secret", replace=name in existing)
        return self.grid

    async def _connect(self, port: int | None = None) -> RawClient:
        client = await RawClient.connect(port or self.port)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    async def _login(self, user: str = "bob", resource: str | None = None) -> RawClient:
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        result = await c.scram_login(user, f"{user} secret")
        assert b"<success" in result, result
        c.jid = await c.bind(resource)
        return c

    async def _still_served(self, c: RawClient) -> None:
        c.clear()
        c.send(PING)
        await c.until(rb"<iq[^>]*type=.result.[^>]*id=.p1.|<iq[^>]*id=.p1.[^>]*type=.result.")

    async def _refused(self, c: RawClient, condition: str) -> bytes:
        data = await c.until(rb"</stream:error>")
        assert re.search(rb"<stream:error><" + condition.encode() + rb" ", data), data
        await c.closed
        return data


class NegotiationTests(GridTestCase):
    async def test_scram_sha256_plus_tls_exporter_on_tls13(self) -> None:
        await self._grid()
        c = await self._connect()
        plain = await c.open_stream()
        assert b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>" in plain
        assert b"mechanisms" not in plain
        c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await c.until(rb"<proceed")
        from sixnet.pki.tls import ClientTLS

        c.transport.startTLS(ClientTLS(self.grid.tls.store))
        features = await c.open_stream()
        assert c.tls_connection().get_protocol_version_name() == "TLSv1.3"
        mechanisms = re.findall(rb"<mechanism>([^<]+)</mechanism>", features)
        assert mechanisms[:4] == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-1-PLUS", b"SCRAM-SHA-256",
                                  b"SCRAM-SHA-1"]
        assert b"PLAIN" not in features and b"EXTERNAL" not in features  # no client cert
        assert b"<channel-binding type='tls-exporter'/>" in features
        assert b"<channel-binding type='tls-server-end-point'/>" in features
        result = await c.scram_login("alice", "alice secret", "SCRAM-SHA-256-PLUS",
                                     "tls-exporter")
        assert b"<success" in result
        features = await c.open_stream()
        assert b"urn:ietf:params:xml:ns:xmpp-bind" in features
        assert b"<sm xmlns='urn:xmpp:sm:3'/>" in features
        assert b"urn:ietf:params:xml:ns:xmpp-session" in features
        c.clear()
        c.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
               "<resource>desk</resource></bind></iq>")
        data = await c.until(rb"</iq>")
        assert b"<jid>alice@localhost/desk</jid>" in data
        c.clear()
        c.send("<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/>"
               "</iq>")
        await c.until(rb"type=.result.")
        await self._still_served(c)
        c.clear()
        c.send("</stream:stream>")
        await c.until(rb"</stream:stream>")
        await c.closed

    async def test_direct_tls_with_server_end_point_binding(self) -> None:
        await self._grid()
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from sixnet.pki.tls import ClientTLS

        c = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.tls_port,
                                                 ClientTLS(self.grid.tls.store)), c)
        self.addCleanup(lambda: c.transport.abortConnection())
        features = await c.open_stream()
        assert b"SCRAM-SHA-1-PLUS" in features
        result = await c.scram_login("bob", "bob secret", "SCRAM-SHA-1-PLUS",
                                     "tls-server-end-point")
        assert b"<success" in result
        assert c.tls_connection().get_protocol_version_name() == "TLSv1.3"

    async def _external(self, name: str, authzid: str = "", ca: Any = None) -> RawClient:
        identity = self.pki.identity("user", name, ca=ca)
        c = await self._connect()
        await c.starttls(self.grid.tls.store, identity)
        features = await c.open_stream()
        assert b"<mechanism>EXTERNAL</mechanism>" in features
        c.clear()
        payload = base64.b64encode(authzid.encode()).decode() if authzid else "="
        c.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
               f"{payload}</auth>")
        await c.until(rb"<success|</failure>")
        return c

    async def test_external_and_revocation_while_connected(self) -> None:
        await self._grid()
        c = await self._external("platform7@localhost", authzid="platform7@localhost")
        assert b"<success" in c.received
        jid = await c.bind()
        assert jid.startswith("platform7@localhost/")
        await self._still_served(c)
        serial = self.pki.identity("user", "platform7@localhost").certificate.serial_number
        self.pki.root.revoke(serial, "compromised")
        self.grid.store.reload_crls()  # what the CRL refresh timer or SIGHUP does
        data = await self._refused(c, "reset")
        assert b"revoked" in data
        assert "platform7@localhost" not in self.grid.router.sessions
        audit = (self.config.sixnet.state_dir / "grid-audit.jsonl").read_text()
        assert '"event":"session-revoked"' in audit

    async def test_password_guesses_do_not_lock_out_a_certificate_login(self) -> None:
        await self._grid(lockout_after=1)
        first = await self._external("platform6@localhost")
        assert b"<success" in first.received
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        assert b"<not-authorized/>" in await c.scram_login("platform6", "guess")
        again = await self._external("platform6@localhost")
        assert b"<success" in again.received

    async def test_external_refusals(self) -> None:
        await self._grid()
        c = await self._external("platform8@localhost", authzid="other@localhost")
        assert b"<invalid-authzid/>" in c.received
        c = await self._external("platform9@localhost", ca=self.pki.foreign)
        assert b"<not-authorized/>" in c.received and b"unknown-issuer" in c.received
        c = await self._external("someone@elsewhere.test")
        assert b"<not-authorized/>" in c.received

    async def test_client_that_skips_starttls_is_refused(self) -> None:
        await self._grid()
        c = await self._connect()
        await c.open_stream()
        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
               + base64.b64encode(b"\0alice\0alice secret").decode() + "</auth>")
        data = await self._refused(c, "policy-violation")
        assert b"<encryption-required/>" in data
        c = await self._connect()
        await c.open_stream()
        c.send("<message to='bob@localhost'><body>hi</body></message>")
        await self._refused(c, "policy-violation")

    async def test_bad_stream_headers(self) -> None:
        await self._grid()
        cases = [
            ("<stream:stream to='localhost' version='1.0' xmlns='jabber:server' "
             "xmlns:stream='http://etherx.jabber.org/streams'>", "invalid-namespace"),
            ("<stream:stream to='example.org' version='1.0' xmlns='jabber:client' "
             "xmlns:stream='http://etherx.jabber.org/streams'>", "host-unknown"),
            ("<stream:stream to='localhost' xmlns='jabber:client' "
             "xmlns:stream='http://etherx.jabber.org/streams'>", "unsupported-version"),
            ("<stream to='localhost' version='1.0' xmlns='jabber:client'>",
             "invalid-namespace"),
        ]
        for header, condition in cases:
            c = await self._connect()
            c.send(header)
            data = await self._refused(c, condition)
            assert data.startswith(b"<?xml version='1.0'?><stream:stream ")  # ours first

    async def test_lang_is_echoed(self) -> None:
        await self._grid()
        c = await self._connect()
        c.send(HEADER.replace("to='localhost'", "to='localhost' xml:lang='de'"))
        data = await c.until(rb"</stream:features>")
        assert b'xml:lang="de"' in data

    async def test_stanzas_before_authentication_and_binding(self) -> None:
        await self._grid()
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        c.send("<message to='bob@localhost'><body>hi</body></message>")
        await self._refused(c, "not-authorized")
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        assert b"<success" in await c.scram_login("alice", "alice secret")
        await c.open_stream()
        c.send(PING)
        await self._refused(c, "not-authorized")

    async def test_invalid_from_and_unknown_elements(self) -> None:
        await self._grid()
        c = await self._login("alice")
        c.send("<message from='bob@localhost/x' to='alice@localhost'><body>x</body></message>")
        await self._refused(c, "invalid-from")
        c = await self._login("alice")
        c.send("<foo xmlns='urn:example'/>")
        await self._refused(c, "unsupported-stanza-type")

    async def test_stanza_errors(self) -> None:
        await self._grid()
        c = await self._login("alice")
        c.clear()
        c.send("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        data = await c.until(rb"</iq>")
        assert b"<bad-request" in data
        c.clear()
        c.send("<iq type='get' id='x' to='a@b@c'><ping xmlns='urn:xmpp:ping'/></iq>")
        data = await c.until(rb"</iq>")
        assert b"<jid-malformed" in data
        c.clear()
        c.send("<message to='nobody@localhost' type='chat' id='m'><body>x</body></message>")
        data = await c.until(rb"</message>")
        assert b"type=\"error\"" in data and b"<service-unavailable" in data
        await self._still_served(c)

    async def test_disco_info_says_no_rosters(self) -> None:
        await self._grid()
        c = await self._login("alice")
        c.clear()
        c.send("<iq type='get' id='d' to='localhost'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        data = await c.until(rb"</iq>")
        assert b"(no rosters)" in data and b"jabber:iq:roster" not in data
        assert b"var=\"urn:xmpp:ping\"" in data and b"var=\"msgoffline\"" in data
        c.clear()
        c.send("<iq type='get' id='i' to='localhost'>"
               "<query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        data = await c.until(rb"</iq>")
        assert b"broker.localhost" in data
        c.clear()
        c.send("<iq type='get' id='n' to='localhost'>"
               "<query xmlns='http://jabber.org/protocol/disco#info' node='x'/></iq>")
        assert b"<item-not-found" in await c.until(rb"</iq>")
        c.clear()
        c.send("<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>")
        data = await c.until(rb"</iq>")
        assert b"<service-unavailable" in data

    async def test_the_broker_component_is_attached(self) -> None:
        """Stanzas to broker.<domain> reach the pubsub component and its answers come back."""
        await self._grid()
        c = await self._login("alice")
        c.clear()
        c.send("<iq type='get' id='bd' to='broker.localhost'>"
               "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        data = await c.until(rb"id=.bd.[^>]*>.*?</iq>")
        assert b'from="broker.localhost"' in data or b"from='broker.localhost'" in data
        assert b"pubsub" in data and b"type=\"result\"" in data

    async def test_broker_notifications_wait_offline(self) -> None:
        """RFC 8600 offline delivery: a notification for a subscriber who is offline is
        stored by the core and delivered, with a delay stamp, at its next login."""
        await self._grid(broker={"default_access_model": "open", "open_access": True})
        ps = "http://jabber.org/protocol/pubsub"
        bob = await self._login("bob")
        bob.clear()
        bob.send(f"<iq type='set' id='c' to='broker.localhost'><pubsub xmlns='{ps}'>"
                 "<create node='t1'/></pubsub></iq>")
        assert b'type="result"' in await bob.until(rb"id=.c.[^>]*>.*?</iq>|id=.c.[^>]*/>")
        alice = await self._login("alice")
        alice.clear()
        alice.send(f"<iq type='set' id='s' to='broker.localhost'><pubsub xmlns='{ps}'>"
                   "<subscribe node='t1' jid='alice@localhost'/></pubsub></iq>")
        data = await alice.until(rb"id=.s.[^>]*>.*?</iq>")
        assert b"subscription='subscribed'" in data or b'subscription="subscribed"' in data
        alice.send("</stream:stream>")
        await alice.closed
        bob.clear()
        bob.send(f"<iq type='set' id='p' to='broker.localhost'><pubsub xmlns='{ps}'>"
                 "<publish node='t1'><item id='i1'><entry xmlns='urn:example'>x</entry>"
                 "</item></publish></pubsub></iq>")
        await bob.until(rb"id=.p.[^>]*>.*?</iq>|id=.p.[^>]*/>")
        for _ in range(50):
            if await self.grid.offline.count("alice") == 1:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        assert await self.grid.offline.count("alice") == 1
        alice = await self._login("alice")
        alice.clear()
        alice.send("<presence/>")
        data = await alice.until(rb"</message>")
        assert b"urn:xmpp:delay" in data and b"<entry" in data and b"i1" in data

    async def test_quiet_streams_give_back_parser_and_tls_buffers_and_talk_on(self) -> None:
        """The sweep frees a quiet stream's parser and swaps its TLS memory BIOs for new,
        empty ones; both streams (STARTTLS and direct TLS) then carry stanzas bigger than a
        TLS record both ways, and are swept again after that traffic."""
        await self._grid()
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from sixnet.pki.tls import ClientTLS

        alice = await self._login("alice", "a")
        bob = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.tls_port,
                                                 ClientTLS(self.grid.tls.store)), bob)
        self.addCleanup(lambda: bob.transport.abortConnection())
        await bob.open_stream()
        assert b"<success" in await bob.scram_login("bob", "bob secret")
        await bob.bind("b")
        streams = list(self.grid.server.connections)
        assert sorted(s.direct_tls for s in streams) == [False, True]
        for round_ in range(2):
            bios = [(s.transport.getHandle()._into_ssl, s.transport.getHandle()._from_ssl)
                    for s in streams]
            for _ in range(2):
                self.grid.server.release_parsers()
            for stream, (into, out) in zip(streams, bios, strict=True):
                handle = stream.transport.getHandle()
                assert not stream.parser.holding
                assert handle._into_ssl != into and handle._from_ssl != out
            body = f"{round_}" + "x" * 60000
            for sender, receiver, to in ((alice, bob, "bob@localhost/b"),
                                         (bob, alice, "alice@localhost/a")):
                receiver.clear()
                sender.send(f"<message to='{to}' type='chat'><body>{body}</body></message>")
                data = await receiver.until(rb"</body></message>")
                assert f"<body>{body}</body>".encode() in data
            await self._still_served(alice)
            await self._still_served(bob)

    async def test_a_stream_that_only_receives_is_swept_too(self) -> None:
        """A subscriber that only takes fan-out says nothing: its stream is swept after a big
        stanza was written to it all the same, or it would keep BIOs of that size."""
        await self._grid()
        alice = await self._login("alice", "a")
        bob = await self._login("bob", "b")
        by_user = {str(s.jid): s for s in self.grid.server.connections}
        for _ in range(2):
            self.grid.server.release_parsers()
        handle = by_user["bob@localhost"].transport.getHandle()
        bios = handle._into_ssl, handle._from_ssl
        alice.send(f"<message to='bob@localhost/b' type='chat'><body>{'x' * 60000}</body>"
                   "</message>")
        await bob.until(rb"</body></message>")
        for _ in range(2):
            self.grid.server.release_parsers()
        assert (handle._into_ssl, handle._from_ssl) != bios
        await self._still_served(bob)

    async def test_two_clients_exchange_messages_iq_and_presence(self) -> None:
        await self._grid()
        alice = await self._login("alice", "a")
        bob = await self._login("bob", "b")
        for c in (alice, bob):
            c.send("<presence/>")
        await task.deferLater(reactor, 0.1, lambda: None)
        bob.clear()
        alice.send("<message to='bob@localhost' type='chat' id='m1'><body>hi</body></message>")
        data = await bob.until(rb"</message>")
        assert b'from="alice@localhost/a"' in data and b"<body>hi</body>" in data
        alice.clear()
        bob.send("<iq type='get' id='v' to='alice@localhost/a'>"
                 "<query xmlns='jabber:iq:version'/></iq>")
        data = await alice.until(rb"</iq>")
        assert b'from="bob@localhost/b"' in data
        bob.clear()
        alice.send("<iq type='result' id='v' to='bob@localhost/b'/>")
        await bob.until(rb"id=.v.")
        # directed presence, then its unavailable when alice goes
        bob.clear()
        alice.send("<presence to='bob@localhost/b'><status>here</status></presence>")
        await bob.until(rb"<status>here</status>")
        alice.transport.abortConnection()
        await bob.until(rb"type=.unavailable.")

    async def test_resource_conflict_replaces_the_old_session(self) -> None:
        await self._grid()
        first = await self._login("alice", "same")
        second = await self._login("alice", "same")
        await self._refused(first, "conflict")
        assert second.jid == "alice@localhost/same"
        await self._still_served(second)

    async def test_failed_logins_lock_the_account(self) -> None:
        await self._grid(lockout_after=2, lockout_seconds=60)
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        for _ in range(2):
            assert b"<not-authorized/>" in await c.scram_login("alice", "wrong")
        result = await c.scram_login("alice", "alice secret")
        assert b"<account-disabled/>" in result
        await self._refused(c, "policy-violation")  # the third failure on one stream
        audit = (self.config.sixnet.state_dir / "grid-audit.jsonl").read_text()
        assert '"event":"account-locked"' in audit

    async def test_plain_only_when_configured(self) -> None:
        await self._grid()
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        await c.open_stream()
        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
               + base64.b64encode(b"\0alice\0alice secret").decode() + "</auth>")
        assert b"<invalid-mechanism/>" in await c.until(rb"</failure>")
        await self.grid.stopService()
        await self._grid(allow_plain=True)
        c = await self._connect()
        await c.starttls(self.grid.tls.store)
        features = await c.open_stream()
        assert b"<mechanism>PLAIN</mechanism>" in features
        c.clear()
        c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
               + base64.b64encode(b"\0alice\0alice secret").decode() + "</auth>")
        await c.until(rb"<success")

    async def test_stream_management_acks(self) -> None:
        await self._grid()
        c = await self._login("alice")
        c.clear()
        c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        data = await c.until(rb"<enabled[^>]*/>")
        assert b"resume='true'" in data
        c.send(PING + "<r xmlns='urn:xmpp:sm:3'/>")
        await c.until(rb"<a xmlns='urn:xmpp:sm:3' h='1'/>")
        await c.until(rb"<r xmlns='urn:xmpp:sm:3'/>")  # the server asks for ours
        c.send("<a xmlns='urn:xmpp:sm:3' h='1'/>")
        await self._still_served(c)
        c.send("<a xmlns='urn:xmpp:sm:3' h='99'/>")
        data = await self._refused(c, "undefined-condition")
        assert b"handled-count-too-high" in data

    async def test_openssl_negotiates_tls13_and_old_versions_are_refused(self) -> None:
        await self._grid()
        base = ["s_client", "-starttls", "xmpp", "-xmpphost", "localhost",
                "-connect", f"127.0.0.1:{self.port}", "-brief"]
        out, err, code = await utils.getProcessOutputAndValue("openssl", base, stdinBytes=b"")
        assert b"Protocol version: TLSv1.3" in out + err, out + err
        for old in ("-tls1", "-tls1_1"):
            out, err, code = await utils.getProcessOutputAndValue(
                "openssl", [*base, old], stdinBytes=b"")
            assert code != 0 and b"CONNECTION ESTABLISHED" not in out + err
        out, err, code = await utils.getProcessOutputAndValue(
            "openssl", [*base, "-tls1_2"], stdinBytes=b"")
        assert b"Protocol version: TLSv1.2" in out + err


    async def test_tls_exporter_matches_openssl(self) -> None:
        """The server's tls-exporter binding (RFC 9266) equals what OpenSSL's own client
        exports for the same connection: an independent check of the label and context."""
        import sixnet.grid.stream as stream_module

        seen: list[bytes] = []
        original = stream_module.ClientStream.handshakeCompleted

        def recording(stream: Any) -> None:
            original(stream)
            seen.append(stream.tls.channel_bindings["tls-exporter"])

        self.patch(stream_module.ClientStream, "handshakeCompleted", recording)
        await self._grid()
        out, err, _ = await utils.getProcessOutputAndValue("openssl", [
            "s_client", "-starttls", "xmpp", "-xmpphost", "localhost", "-connect",
            f"127.0.0.1:{self.port}", "-keymatexport", "EXPORTER-Channel-Binding",
            "-keymatexportlen", "32"], stdinBytes=b"")
        exported = re.search(rb"Keying material: ([0-9A-F]+)", out + err)
        assert exported, out + err
        assert seen == [bytes.fromhex(exported[1].decode())]


class PostgresServerTests(GridTestCase):
    """The same server on PostgreSQL: accounts, logins and offline storage."""

    skip = postgres_unavailable()

    async def test_login_and_offline_storage(self) -> None:
        url, schema = fresh_postgres_schema()
        self.addCleanup(drop_postgres_schema, schema)
        await self._grid(database=url)
        alice = await self._login("alice")
        alice.send("<message to='bob@localhost' id='m'><body>stored</body></message>")
        for _ in range(50):
            if await self.grid.offline.count("bob") == 1:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        bob = await self._login("bob")
        bob.clear()
        bob.send("<presence/>")
        data = await bob.until(rb"</message>")
        assert b"<body>stored</body>" in data and b"urn:xmpp:delay" in data


class LimitTests(GridTestCase):
    async def test_connections_per_address(self) -> None:
        """Not yet authenticated: `max_unauthenticated_per_address`; after SASL success:
        `max_connections_per_address`."""
        await self._grid(max_unauthenticated_per_address=2, max_connections_per_address=2)
        await self._connect()
        await self._connect()
        third = await self._connect()
        await self._refused(third, "policy-violation")

    async def test_connection_limit_on_the_direct_tls_port(self) -> None:
        """On direct TLS the refusal is a stream error after the handshake."""
        await self._grid(max_unauthenticated_per_address=1)
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from sixnet.pki.tls import ClientTLS

        await self._connect(self.tls_port)
        c = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.tls_port,
                                                 ClientTLS(self.grid.tls.store)), c)
        await self._refused(c, "policy-violation")

    async def test_ipv4_mapped_counts_with_its_ipv4_address(self) -> None:
        """127.0.0.1 on the IPv4 port and IPv4-mapped on an IPv6 port is one address."""
        await self._grid(max_unauthenticated_per_address=1,
                         listen_tls=[r"tcp6:0:interface=\:\:ffff\:127.0.0.1"])
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from sixnet.pki.tls import ClientTLS

        await (await self._connect()).open_stream()
        c = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.tls_port,
                                                 ClientTLS(self.grid.tls.store)), c)
        await self._refused(c, "policy-violation")

    async def test_client_streams_have_no_nagle_delay(self) -> None:
        """TCP_NODELAY on both ports, as the kernel reports it for the server's sockets."""
        await self._grid()
        from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol

        from sixnet.pki.tls import ClientTLS

        await (await self._connect()).open_stream()
        c = RawClient()
        await connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", self.tls_port,
                                                 ClientTLS(self.grid.tls.store)), c)
        self.addCleanup(lambda: c.transport.abortConnection())
        await c.open_stream()
        tcp = [s.transport.transport if s.direct_tls else s.transport
               for s in self.grid.server.connections]
        assert len(tcp) == 2
        for transport in tcp:
            handle = transport.getHandle()
            assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    async def test_total_connections(self) -> None:
        await self._grid(max_sessions=1)
        await self._connect()
        second = await self._connect()
        await self._refused(second, "resource-constraint")

    async def test_stanza_rate(self) -> None:
        await self._grid(stanzas_per_second=5.0, stanza_burst=5)
        bob = await self._login("bob")
        c = await self._login("alice")
        c.send("".join(f"<message to='bob@localhost' id='{i}'><body>{i}</body></message>"
                       for i in range(20)))
        await self._refused(c, "policy-violation")
        await self._still_served(bob)

    async def test_a_client_that_reads_nothing_is_cut_off(self) -> None:
        import sixnet.grid.stream as stream_module

        self.patch(stream_module, "SLOW_CONSUMER_BYTES", 1_000_000)
        await self._grid()
        bob = await self._login("bob")
        deaf = await self._login("alice", "deaf")
        deaf.transport.pauseProducing()  # stops reading from its socket
        session = self.grid.router.sessions["alice@localhost"]["deaf"]
        stream = session.connection
        body = "x" * 10_000
        for i in range(2000):  # 20 MB for a client that takes none of it
            if session.connection is None:
                break
            self.grid.router.route(etree.fromstring(
                f"<message xmlns='jabber:client' from='bob@localhost/x' to='alice@localhost/deaf'"
                f" type='headline' id='{i}'><body>{body}</body></message>"))
            if i % 100 == 0:
                await task.deferLater(reactor, 0.01, lambda: None)
        await stream.lost
        assert i < 1999  # cut off long before all of it was queued
        await self._still_served(bob)

    async def test_silent_sessions_are_pinged_then_closed(self) -> None:
        await self._grid(idle_timeout=0.6)
        answering = await self._login("bob")
        silent = await self._login("alice")
        data = await answering.until(rb"<ping xmlns=.urn:xmpp:ping.")
        iq_id = re.search(rb"id='(idle-[0-9a-f]+)'", data)[1].decode()
        answering.send(f"<iq type='result' id='{iq_id}' to='localhost'/>")
        await self._refused(silent, "connection-timeout")
        await self._still_served(answering)

    async def test_max_stanza_size(self) -> None:
        await self._grid(max_stanza_bytes=10000)
        c = await self._login("alice")
        c.send("<message to='bob@localhost'><body>" + "x" * 20000 + "</body></message>")
        await self._refused(c, "policy-violation")
        c = await self._login("alice")
        c.send("<message to='bob@localhost'><body>" + "x" * 9000 + "</body></message>")
        await self._still_served(c)


class HostileInputTests(GridTestCase):
    """Each attack gets its stream error; bob, logged in meanwhile, notices nothing."""

    async def _attack(self, payload: bytes, condition: str, *, tls: bool = False,
                      **settings: Any) -> None:
        await self._grid(**settings)
        bob = await self._login("bob")
        attacker = await self._connect()
        if tls:
            await attacker.starttls(self.grid.tls.store)
        attacker.send(payload)
        await self._refused(attacker, condition)
        await self._still_served(bob)

    async def test_dtd(self) -> None:
        await self._attack(b"<?xml version='1.0'?><!DOCTYPE stream [<!ELEMENT x ANY>]>"
                           + HEADER.encode()[21:], "restricted-xml")

    async def test_entity_expansion(self) -> None:
        laughs = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
                  + b"".join(b"<!ENTITY lol%d '%s'>" % (i, b"&lol%d;" % (i - 1) * 10)
                             for i in range(1, 10)) + b"]>")
        await self._attack(laughs + HEADER.encode()[21:] + b"<message>&lol9;</message>",
                           "restricted-xml")

    async def test_undefined_entity(self) -> None:
        await self._attack(HEADER.encode() + b"<message><body>&lol9;</body></message>",
                           "not-well-formed", tls=True)

    async def test_ten_megabyte_stanza(self) -> None:
        await self._attack(HEADER.encode() + b"<message><body>" + b"a" * 10_000_000,
                           "policy-violation")

    async def test_ten_thousand_nested_elements(self) -> None:
        await self._attack(HEADER.encode() + b"<a>" * 10_000, "policy-violation")

    async def test_one_byte_a_second(self) -> None:
        await self._grid(negotiation_timeout=1.5)
        bob = await self._login("bob")
        slow = await self._connect()
        for byte in HEADER.encode()[:6]:
            slow.send(bytes([byte]))
            await task.deferLater(reactor, 0.3, lambda: None)
        await self._refused(slow, "connection-timeout")
        await self._still_served(bob)

    async def test_silent_client_on_the_direct_tls_port(self) -> None:
        """No TLS handshake at all: the negotiation timeout still closes the connection."""
        await self._grid(negotiation_timeout=0.5)
        bob = await self._login("bob")
        silent = await self._connect(self.tls_port)
        started = reactor.seconds()
        await silent.closed
        assert reactor.seconds() - started < 5
        await self._still_served(bob)
