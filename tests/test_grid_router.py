"""The router without sockets: sessions are fed through fake connections, storage is SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import task
from twisted.trial import unittest
from zope.interface import implementer

from sixnet.core.storage.database import Database
from sixnet.grid.component import IComponent, IRouter
from sixnet.grid.jid import JID, JIDError, parse_jid
from sixnet.grid.router import Router
from sixnet.grid.storage.accounts import AccountStore
from sixnet.grid.storage.offline import OfflineStore
from sixnet.grid.xmpp import StanzaError, splice_to


class FakeConnection:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.errors: list[str] = []
        self.dropped = False

    def send_stanza(self, data: bytes) -> None:
        self.sent.append(data)

    def close_with_error(self, condition: str, text: str = "") -> None:
        self.errors.append(condition)

    def drop(self) -> None:
        self.dropped = True

    def bodies(self) -> list[str]:
        return [etree.fromstring(d).findtext("{jabber:client}body") or "" for d in self.sent
                if d.startswith(b"<message")]


@implementer(IComponent)
class EchoComponent:
    domain = "echo.localhost"

    def __init__(self) -> None:
        self.received: list[etree._Element] = []
        self.available: list[str] = []
        self.unavailable: list[str] = []

    def attach(self, router: IRouter) -> None:
        self.router = router

    def receive(self, stanza: etree._Element) -> None:
        self.received.append(stanza)

    def session_available(self, full_jid: str) -> None:
        self.available.append(full_jid)

    def session_unavailable(self, full_jid: str) -> None:
        self.unavailable.append(full_jid)


def stanza(text: str) -> etree._Element:
    return etree.fromstring(text.replace("<message ", "<message xmlns='jabber:client' ")
                            .replace("<iq ", "<iq xmlns='jabber:client' ")
                            .replace("<presence", "<presence xmlns='jabber:client'"))


def test_jids() -> None:
    assert str(parse_jid("Alice@Example.ORG/Res")) == "alice@example.org/Res"
    assert parse_jid("example.org").local is None
    for bad in ("", "@x", "a@", "x/", "a b@x", "a@b@c"):
        with pytest.raises(JIDError):
            parse_jid(bad)


def test_splice_to() -> None:
    assert splice_to(b'<message from="x"/>', "a@b") == b'<message to="a@b" from="x"/>'
    assert splice_to(b"<message/>", "a&b") == b'<message to="a&amp;b"/>'


class RouterTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    async def _router(self) -> Router:
        db = Database("sqlite:grid.sqlite3", base=self.tmp)
        self.addCleanup(db.close)
        self.accounts = AccountStore(db, 4096)
        await self.accounts.prepare()
        for name in ("alice", "bob"):
            await self.accounts.add(name, "pw")
        self.offline = OfflineStore(db, max_per_account=3)
        self.clock = task.Clock()
        self.router = Router("localhost", self.offline, self.clock)
        self.component = EchoComponent()
        self.router.attach_component(self.component)
        return self.router

    async def _session(self, user: str, resource: str, available: bool = True) -> Any:
        conn = FakeConnection()
        session = self.router.bind(conn, JID(user, "localhost"), resource)
        if available:
            self.router.from_client(session, stanza(f"<presence from='{session.full}'/>"))
            await self._settle()  # stored messages first
        conn.sent.clear()
        return session, conn

    async def _settle(self) -> None:
        await self.router.drain()

    async def test_components_get_their_stanzas_and_presence_news(self) -> None:
        router = await self._router()
        session, conn = await self._session("alice", "a")
        assert self.component.available == ["alice@localhost/a"]
        iq = stanza("<iq type='get' id='1' from='alice@localhost/a' to='echo.localhost'>"
                    "<query xmlns='urn:example'/></iq>")
        router.from_client(session, iq)
        assert self.component.received == [iq]
        router.route(stanza("<iq type='result' id='1' from='echo.localhost' "
                            "to='alice@localhost/a'/>"))
        assert b'id="1"' in conn.sent[-1]
        router.connection_lost(session, clean=True)
        assert self.component.unavailable == ["alice@localhost/a"]
        with pytest.raises(StanzaError) as info:
            router.from_client(session, stanza(
                "<iq type='get' id='2' to='other.localhost'><q xmlns='urn:x'/></iq>"))
        assert info.value.condition == "remote-server-not-found"

    async def test_component_iq_to_missing_resource_gets_service_unavailable(self) -> None:
        router = await self._router()
        router.route(stanza("<iq type='get' id='9' from='echo.localhost' "
                            "to='bob@localhost/gone'><q xmlns='urn:x'/></iq>"))
        error = self.component.received[-1]
        assert error.get("type") == "error"
        assert error.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") \
            is not None

    async def test_fanout_serialises_once_and_stores_for_the_offline(self) -> None:
        router = await self._router()
        _, alice = await self._session("alice", "a")
        message = stanza("<message from='echo.localhost' type='normal'>"
                         "<event xmlns='urn:example'>x</event></message>")
        router.route_fanout(message, ["alice@localhost", "bob@localhost", "nobody@localhost"])
        await self._settle()
        assert len(alice.sent) == 1 and b'to="alice@localhost"' in alice.sent[0]
        assert await self.offline.count("bob") == 1
        errors = [s for s in self.component.received if s.get("type") == "error"]
        assert [e.get("from") for e in errors] == ["nobody@localhost"]

    async def test_fanout_to_full_and_uncanonical_jids_and_a_template_with_a_to(self) -> None:
        """Recipients that are not a canonical bare JID of a session take the general path;
        a template's own 'to' is neither sent nor removed from the caller's element."""
        router = await self._router()
        _, alice = await self._session("alice", "a")
        message = stanza("<message from='echo.localhost' to='someone@localhost' "
                         "type='normal'><event xmlns='urn:example'>x</event></message>")
        router.route_fanout(message, ["Alice@LOCALHOST", "alice@localhost/a",
                                      "alice@localhost"])
        await self._settle()
        assert [d.count(b" to=") for d in alice.sent] == [1, 1, 1]
        assert [d.split(b'to="')[1].split(b'"')[0] for d in alice.sent] == [
            b"Alice@LOCALHOST", b"alice@localhost/a", b"alice@localhost"]
        assert message.get("to") == "someone@localhost"

    async def test_offline_order_and_full_storage(self) -> None:
        router = await self._router()
        alice, _ = await self._session("alice", "a")
        for i in range(4):
            router.from_client(alice, stanza(
                f"<message from='alice@localhost/a' to='bob@localhost'><body>{i}</body>"
                "</message>"))
        await self._settle()
        assert await self.offline.count("bob") == 3  # the limit; the 4th bounced
        bob, conn = await self._session("bob", "b", available=False)
        router.from_client(bob, stanza("<presence/>"))
        # A live message while the stored ones are being read waits its turn.
        router.from_client(alice, stanza(
            "<message from='alice@localhost/a' to='bob@localhost'><body>live</body></message>"))
        await self._settle()
        await self.offline.take("bob")  # waits for the chained read to finish
        assert conn.bodies() == ["0", "1", "2", "live"]
        assert all(b"urn:xmpp:delay" in d for d in conn.sent[1:4])

    async def test_messages_to_bare_jid_go_to_non_negative_priorities(self) -> None:
        router = await self._router()
        alice, _ = await self._session("alice", "a")
        _, b1 = await self._session("bob", "one")
        b2s, b2 = await self._session("bob", "two", available=False)
        router.from_client(b2s, stanza("<presence><priority>-1</priority></presence>"))
        b2.sent.clear()
        router.from_client(alice, stanza("<message to='bob@localhost'><body>x</body></message>"))
        await self._settle()
        assert b1.bodies() == ["x"] and b2.bodies() == []

    async def test_stream_management_resume_and_timeout(self) -> None:
        router = await self._router()
        alice, _ = await self._session("alice", "a")
        bob, conn = await self._session("bob", "b")
        sm = router.enable_sm(bob, resume=True, max_resume=60)
        router.from_client(alice, stanza(
            "<message to='bob@localhost/b'><body>1</body></message>"))
        router.connection_lost(bob, clean=False)
        router.from_client(alice, stanza(
            "<message to='bob@localhost/b'><body>2</body></message>"))
        assert len(sm.unacked) == 2
        new = FakeConnection()
        with pytest.raises(StanzaError):
            router.resume(sm.resume_id or "", 0, new, JID("alice", "localhost"))
        resumed = router.resume(sm.resume_id or "", 1, new, JID("bob", "localhost"))
        assert resumed is bob and list(sm.unacked)[0].count(b"<body>2</body>") == 1
        # cut again, and let the resumption window pass: the unacked message goes offline
        router.connection_lost(bob, clean=False)
        self.clock.advance(61)
        await self._settle()
        assert bob.ended and await self.offline.count("bob") == 1

    async def test_a_cut_session_may_not_hoard_stanzas(self) -> None:
        import sixnet.grid.router as router_module

        self.patch(router_module, "MAX_WAITING", 4)
        router = await self._router()
        alice, _ = await self._session("alice", "a")
        bob, _ = await self._session("bob", "b")
        router.enable_sm(bob, resume=True, max_resume=60)
        router.connection_lost(bob, clean=False)
        for i in range(5):
            router.from_client(alice, stanza(
                f"<message to='bob@localhost/b'><body>{i}</body></message>"))
        await self._settle()
        assert bob.ended and "bob@localhost" not in router.sessions
        assert await self.offline.count("bob") == 3  # the rest bounced: storage is full
