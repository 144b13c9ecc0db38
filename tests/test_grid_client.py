"""The grid client library against a real sixnet grid server over loopback with real TLS:
every SASL mechanism, the refusals (wrong password, a server certificate for another name),
iq errors and timeouts, and the pubsub requests the lab commands are made of."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import defer, reactor
from twisted.trial import unittest

from sixnet.grid.client import (
    AuthenticationError,
    ClientError,
    IQError,
    IQTimeout,
    IXMPPSession,
    Notification,
    PubSubClient,
    connect,
)
from sixnet.grid.client.pubsub import PubSubClientError
from sixnet.grid.client.sasl import ScramClient, ScramError, choose
from sixnet.grid.scram import ScramCredentials, ScramExchange
from sixnet.pki.store import CertificateStore
from tests.grid_harness import ports, start_grid, write_config
from tests.support.iodef import IODEF, IODEF_NS
from tests.support.waiting import wait_for

SERVICE = "broker.localhost"


def test_choice_prefers_external_then_plus_then_sha256() -> None:
    offered = ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS",
               "EXTERNAL"]
    both = {"tls_version": "TLSv1.3", "advertised": None}
    assert choose(offered, password=True, certificate=True, **both).mechanism == "EXTERNAL"
    plus = choose(offered, password=True, certificate=False, **both)
    assert (plus.mechanism, plus.binding) == ("SCRAM-SHA-256-PLUS", "tls-exporter")
    tls12 = choose(offered, password=True, certificate=False, tls_version="TLSv1.2",
                   advertised=["tls-server-end-point", "tls-unique"])
    assert (tls12.mechanism, tls12.binding) == ("SCRAM-SHA-256-PLUS", "tls-server-end-point")
    # Restricted to a non-PLUS mechanism while the server offers -PLUS: flag n, not y.
    only = choose(offered, password=True, certificate=False, allowed=["SCRAM-SHA-1"], **both)
    assert (only.mechanism, only.flag) == ("SCRAM-SHA-1", "n")
    # The server offers no -PLUS although we could bind: y, so it can detect a downgrade.
    plain = choose(["SCRAM-SHA-1"], password=True, certificate=False, **both)
    assert plain.flag == "y"
    # Only tls-unique advertised, or TLS 1.2 and no list (Prosody 0.12): no binding we do.
    for advertised in (["tls-unique"], None):
        unique = choose(offered[:4], password=True, certificate=False,
                        tls_version="TLSv1.2", advertised=advertised)
        assert (unique.mechanism, unique.flag) == ("SCRAM-SHA-256", "n")
    assert choose(["PLAIN"], password=True, certificate=False, **both) is None


def test_scram_against_the_servers_exchange_and_a_forged_signature() -> None:
    creds = ScramCredentials.derive("SHA-256", "pencil", 4096)
    server = ScramExchange("SHA-256", True, {"tls-exporter": b"x" * 32}, b"s" * 32, 4096)
    client = ScramClient("SCRAM-SHA-256-PLUS", "user", "pencil", binding="tls-exporter",
                         binding_data=b"x" * 32)
    assert server.client_first(client.first()) == "user"
    final = server.client_final(client.final(server.server_first(creds)))
    client.verify(final)
    assert client.verified
    forged = ScramClient("SCRAM-SHA-256", "user", "pencil")
    other = ScramExchange("SHA-256", False, {}, b"s" * 32, 4096)
    other.client_first(forged.first())
    forged.final(other.server_first(creds))
    with pytest.raises(ScramError, match="signature is wrong"):
        forged.verify(b"v=" + b"A" * 44)
    low = ScramClient("SCRAM-SHA-1", "user", "pencil")
    with pytest.raises(ScramError, match="iterations"):
        low.final(f"r={low.nonce}abc,s=c2FsdA==,i=100".encode())


class GridClientTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    def setUp(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.config = write_config(self.tmp, self.pki, broker={"open_access": True})
        self.grid = await start_grid(self.config)
        self.addCleanup(self.grid.stopService)
        self.port, self.tls_port = ports(self.grid)
        self.store = self.grid.tls.store
        for name in ("alice", "bob"):
            await self.grid.accounts.add(name, f"{name} secret")

    async def _login(self, user: str = "alice", **options: Any) -> Any:
        options.setdefault("password", f"{user} secret")
        options.setdefault("store", self.store)
        session = await connect(reactor, "127.0.0.1", options.pop("port", self.port),
                                f"{user}@localhost", **options)
        self.addCleanup(session.close)
        return session

    async def test_scram_sha256_plus_is_chosen_and_binds(self) -> None:
        session = await self._login()
        assert IXMPPSession.providedBy(session)
        assert session.jid.startswith("alice@localhost/")
        assert session.protocol.mechanism == "SCRAM-SHA-256-PLUS"
        assert session.protocol.tls_version == "TLSv1.3"

    async def test_every_scram_mechanism_and_direct_tls(self) -> None:
        for mechanism in ("SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1"):
            session = await self._login(mechanisms=[mechanism])
            assert session.protocol.mechanism == mechanism
            await session.close()
        direct = await self._login(port=self.tls_port, direct_tls=True)
        assert direct.protocol.mechanism == "SCRAM-SHA-256-PLUS"

    async def test_external_with_a_client_certificate(self) -> None:
        identity = self.pki.identity("user", "carol@localhost")
        session = await self._login("carol", password=None, identity=identity)
        assert session.protocol.mechanism == "EXTERNAL"
        assert session.jid.startswith("carol@localhost/")

    async def test_wrong_password_is_an_authentication_error(self) -> None:
        with pytest.raises(AuthenticationError) as caught:
            await self._login(password="not it")
        assert caught.value.condition == "not-authorized"

    async def test_a_certificate_for_another_name_is_refused(self) -> None:
        with pytest.raises(ClientError) as caught:
            await self._login(server_name="grid.example.org")
        assert caught.value.condition == "bad-certificate"
        assert "not for host" in str(caught.value)
        foreign = CertificateStore.from_files([self.pki.foreign.directory / "ca.pem"])
        with pytest.raises(ClientError) as caught:
            await self._login(store=foreign)
        assert caught.value.condition == "tls-failed"
        assert "certificate verify failed" in str(caught.value)

    async def test_nothing_listening_and_a_silent_server(self) -> None:
        from twisted.internet.protocol import Factory, Protocol

        with pytest.raises(ClientError) as caught:
            await self._login(port=1)
        assert caught.value.condition == "connection-failed"
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        with pytest.raises(ClientError) as caught:
            await self._login(port=silent.getHost().port, timeout=0.3)
        assert caught.value.condition == "connection-timeout"

    async def test_iq_errors_timeouts_and_the_end_of_a_session(self) -> None:
        session = await self._login(iq_timeout=0.3)

        def query(to: str) -> etree._Element:
            iq = etree.Element("{jabber:client}iq", type="get", to=to,
                               nsmap={None: "jabber:client"})
            etree.SubElement(iq, "{urn:example}query")
            return iq

        with pytest.raises(IQError) as caught:
            await session.iq(query("nobody@localhost/x"))
        assert caught.value.condition == "service-unavailable"
        bob = await self._login("bob")
        with pytest.raises(IQError) as caught:  # bob's session answers what it does not know
            await session.iq(query(bob.jid))
        assert caught.value.condition == "service-unavailable"
        bob._iq = lambda iq: None  # now bob says nothing
        with pytest.raises(IQTimeout):
            await session.iq(query(bob.jid))
        pending = session.iq(query(bob.jid))
        await session.close()
        with pytest.raises(ClientError) as caught:
            await pending
        assert caught.value.condition == "closed"
        assert session.closed.called
        with pytest.raises(ClientError):
            await session.iq(query(bob.jid))

    async def test_pubsub_round_trip(self) -> None:
        owner = PubSubClient(await self._login(), SERVICE)
        reader_session = await self._login("bob", presence=True)
        reader = PubSubClient(reader_session, SERVICE)
        assert await owner.create("alerts", access_model="authorize",
                                  options={"pubsub#type": IODEF_NS,
                                           "pubsub#title": "Alerts"}) == "alerts"
        info = await reader.info("alerts")
        assert info.type == IODEF_NS
        assert info.value("pubsub#access_model") == "authorize"
        for n in range(5):
            await owner.create(f"t{n}")
        first = await reader.topics(max=2)
        assert [t.node for t in first.topics] == ["alerts", "t0"]
        assert first.page.count == 6
        second = await reader.topics(max=2, after=first.page.last)
        assert [t.node for t in second.topics] == ["t1", "t2"]
        assert [t.name for t in first.topics] == ["Alerts", None]

        sub = await reader.subscribe("alerts")
        assert sub.state == "pending"
        assert [s.jid for s in await owner.pending("alerts")] == ["bob@localhost"]
        with pytest.raises(PubSubClientError):
            await owner.approve("alerts", "mallory@localhost")
        approved = await owner.approve("alerts", "bob@localhost")
        assert [s.jid for s in approved] == ["bob@localhost"]
        assert await owner.pending("alerts") == []

        got: list[Notification] = []
        reader_session.add_message_handler(lambda m: got.extend(Notification.parse(m)))
        payload = etree.fromstring(IODEF)
        assert await owner.publish("alerts", payload, item_id="one") == "one"
        assigned = await owner.publish("alerts", payload)
        assert assigned and assigned != "one"
        await wait_for(lambda: len(got) == 2)
        assert [n.item_id for n in got] == ["one", assigned]
        assert got[0].node == "alerts" and got[0].delay is None
        assert etree.QName(got[0].payload).namespace == IODEF_NS

        for n in range(3):
            await owner.publish("alerts", payload, item_id=f"more{n}")
        page = await reader.items("alerts", max=2)
        assert [i.id for i in page.items] == ["one", assigned]
        assert page.page.count == 5
        rest = await reader.items("alerts", max=10, after=page.page.last)
        assert [i.id for i in rest.items] == ["more0", "more1", "more2"]

        with pytest.raises(IQError) as caught:
            await owner.publish("alerts", etree.fromstring(b"<x xmlns='urn:other'/>"))
        assert (caught.value.condition, caught.value.pubsub_condition) == \
            ("bad-request", "invalid-payload")
        config = await owner.configure("alerts", {"pubsub#max_items": "3"})
        assert config["pubsub#max_items"] == ["3"]
        assert (await owner.configuration("alerts"))["pubsub#max_items"] == ["3"]
        with pytest.raises(PubSubClientError, match="not an option"):
            await owner.configure("alerts", {"pubsub#nonsense": "1"})
        assert ("alice@localhost", "owner") in await owner.affiliations("alerts")
        await reader.unsubscribe("alerts")
        await owner.delete("alerts")
        with pytest.raises(IQError) as caught:
            await reader.info("alerts")
        assert caught.value.condition == "item-not-found"

    async def test_offline_notifications_arrive_with_delay_stamps(self) -> None:
        owner = PubSubClient(await self._login(), SERVICE)
        await owner.create("open", access_model="open")
        follower = await self._login("bob")
        await PubSubClient(follower, SERVICE).subscribe("open")
        await follower.close()
        payload = etree.fromstring(IODEF)
        await owner.publish("open", payload, item_id="while-away")
        await self.grid.broker.idle()
        got: list[Notification] = []
        back = await self._login("bob")
        back.add_message_handler(lambda m: got.extend(Notification.parse(m)))
        back.send(etree.Element("{jabber:client}presence", nsmap={None: "jabber:client"}))
        await wait_for(lambda: got)
        assert got[0].item_id == "while-away" and got[0].delay is not None
        assert got[0].delay.endswith("Z")
