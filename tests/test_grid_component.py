"""Component mode in memory: the XEP-0114 connection against a scripted host (handshake good
and bad, stream errors, silence, reconnecting), `HostRouter` as the broker's `IRouter`
(namespaces, fan-out, presence), the machine's table, and the ``[grid]`` keys."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from sixnet.core.errors import ConfigError
from sixnet.grid.client.errors import ClientError
from sixnet.grid.component import IComponent
from sixnet.grid.external import (
    MAX_BACKLOG,
    ComponentStream,
    HostRouter,
    component_service,
    from_host,
    to_host,
)
from sixnet.grid.service import GridService
from sixnet.pki.store import store_from_config
from tests.grid_harness import write_config
from tests.support.ports import free_port
from tests.test_machines import cells, expected, table

NAME = "broker.example.test"
SECRET = "s3cret"
HOST_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
               b"xmlns:stream='http://etherx.jabber.org/streams' from='broker.example.test' "
               b"id='3BF96D32'>")
ACCEPTED = b"<handshake/>"


@implementer(IComponent)
class RecordingComponent:
    domain = NAME

    def __init__(self) -> None:
        self.received: list[etree._Element] = []
        self.events: list[tuple[str, str]] = []

    def attach(self, router: Any) -> None:
        self.router = router

    def receive(self, stanza: etree._Element) -> None:
        self.received.append(stanza)

    def session_available(self, full_jid: str) -> None:
        self.events.append(("available", full_jid))

    def session_unavailable(self, full_jid: str) -> None:
        self.events.append(("unavailable", full_jid))


class Host:
    """A component stream and the host side of the test, which writes what it wants."""

    def __init__(self, router: HostRouter | None = None, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.component = RecordingComponent()
        if router is None:
            router = HostRouter("example.test", NAME)
            router.attach(self.component)
        self.router = router
        self.stream = ComponentStream(router, SECRET, self.clock, timeout=5.0, keepalive=30.0)
        self.transport = StringTransport()
        self.stream.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def accept(self) -> None:
        assert b"xmlns=\"jabber:component:accept\"" in self.sent()
        self.stream.dataReceived(HOST_HEADER)
        digest = hashlib.sha1(b"3BF96D32" + SECRET.encode()).hexdigest()
        assert self.sent() == f"<handshake>{digest}</handshake>".encode()
        self.stream.dataReceived(ACCEPTED)
        assert self.stream.state == "ready"


def parse(data: bytes) -> list[etree._Element]:
    wrapper = etree.fromstring(b"<w xmlns='jabber:component:accept'>" + data + b"</w>")
    return list(wrapper)


def test_header_handshake_and_stanzas_both_ways() -> None:
    host = Host()
    header = host.transport.value()
    assert b"to=\"broker.example.test\"" in header and b"version" not in header.split(b"?>")[1]
    host.accept()
    assert host.router.stream is host.stream
    host.stream.dataReceived(
        b"<iq type='get' from='consumer@example.test/c' to='broker.example.test' id='1'>"
        b"<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    (iq,) = host.component.received
    assert iq.tag == "{jabber:client}iq" and iq[0].tag.endswith("disco#info}query")
    reply = etree.Element("{jabber:client}iq", {"type": "result", "to": "consumer@example.test/c",
                                                 "id": "1"}, nsmap={None: "jabber:client"})
    host.router.route(reply)
    (written,) = parse(host.sent())
    assert written.tag == "{jabber:component:accept}iq"
    assert written.get("from") == NAME  # filled in: the host needs it


def test_fanout_is_one_write_with_each_recipient() -> None:
    host = Host()
    host.accept()
    message = etree.Element("{jabber:client}message", {"from": NAME, "type": "normal"},
                            nsmap={None: "jabber:client"})
    etree.SubElement(message, "{http://jabber.org/protocol/pubsub#event}event",
                     nsmap={None: "http://jabber.org/protocol/pubsub#event"})
    host.router.route_fanout(message, ["a@example.test", "b@example.test", "c@example.test/r"])
    copies = parse(host.sent())
    assert [c.get("to") for c in copies] == ["a@example.test", "b@example.test",
                                             "c@example.test/r"]
    assert all(c.tag == "{jabber:component:accept}message" for c in copies)


def test_namespaces_are_translated_without_touching_payloads() -> None:
    stanza = etree.fromstring(
        "<message xmlns='jabber:component:accept' from='a@example.test/x'>"
        "<body>jabber:component:accept</body><error type='cancel'/>"
        "<x xmlns='urn:example'><y/></x></message>")
    converted = from_host(stanza)
    assert [e.tag for e in converted.iter()] == [
        "{jabber:client}message", "{jabber:client}body", "{jabber:client}error",
        "{urn:example}x", "{urn:example}y"]
    assert converted.findtext("{jabber:client}body") == "jabber:component:accept"
    plain = etree.Element("{jabber:client}iq", type="get")  # no default namespace
    assert etree.fromstring(to_host(plain)).tag == "{jabber:component:accept}iq"


def test_presence_drives_availability_and_subscriptions_are_answered() -> None:
    host = Host()
    host.accept()
    host.stream.dataReceived(b"<presence from='owner@example.test/laptop' to='" + NAME.encode()
                             + b"'/><presence from='owner@example.test/phone' to='"
                             + NAME.encode() + b"'/>")
    assert host.router.is_available("owner@example.test")
    assert host.router.is_available("owner@example.test/laptop")
    assert not host.router.is_available("owner@example.test/desk")
    host.stream.dataReceived(b"<presence type='unavailable' from='owner@example.test/laptop'/>")
    assert host.component.events == [("available", "owner@example.test/laptop"),
                                      ("available", "owner@example.test/phone"),
                                      ("unavailable", "owner@example.test/laptop")]
    assert host.router.is_available("owner@example.test")
    assert host.component.received == []  # presence is the router's business
    host.stream.dataReceived(b"<presence type='subscribe' from='p@example.test' to='"
                             + NAME.encode() + b"'/>")
    answers = parse(host.sent())
    assert [(a.get("type"), a.get("to")) for a in answers] == [
        ("subscribed", "p@example.test"), ("subscribe", "p@example.test"),
        (None, "p@example.test")]
    host.stream.dataReceived(b"<presence type='probe' from='q@example.test/r'/>")
    (answer,) = parse(host.sent())
    assert (answer.get("type"), answer.get("to"), answer.get("from")) == (
        None, "q@example.test", NAME)


def test_bad_secret_is_a_stream_error_named_in_the_log() -> None:
    host = Host()
    host.sent()
    host.stream.dataReceived(HOST_HEADER)
    host.sent()
    host.stream.dataReceived(
        b"<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        b"</stream:error></stream:stream>")
    assert host.stream.state == "closed"
    assert host.stream.failure is not None
    assert host.stream.failure.condition == "not-authorized"
    assert host.sent().endswith(b"</stream:stream>")
    assert host.transport.disconnecting and host.router.stream is None


@pytest.mark.parametrize(("data", "condition"), [
    (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
     b"id='x'>", b"invalid-namespace"),
    (b"<stream:stream xmlns='jabber:component:accept' "
     b"xmlns:stream='http://etherx.jabber.org/streams'>", b"bad-format"),
    (HOST_HEADER + b"<message to='x@example.test'/>", b"unsupported-stanza-type"),
])
def test_foreign_streams_and_stanzas_before_the_handshake(data: bytes,
                                                          condition: bytes) -> None:
    host = Host()
    host.sent()
    host.stream.dataReceived(data)
    assert condition in host.sent()
    assert host.stream.closed and host.component.received == []


def test_a_silent_host_times_out_and_keepalives_are_sent() -> None:
    host = Host()
    host.sent()
    host.clock.advance(6)
    assert b"connection-timeout" in host.sent() and host.stream.closed
    ready = Host()
    ready.accept()
    ready.clock.advance(30)
    assert ready.sent() == b" "


class ScriptedEndpoint:
    """Each connect() makes a protocol on a StringTransport; fails while `down`."""

    def __init__(self) -> None:
        self.streams: list[tuple[Any, StringTransport]] = []
        self.down = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.down:
            return defer.fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.streams.append((protocol, transport))
        return defer.succeed(protocol)


def test_reconnects_with_backoff_and_flushes_what_waited() -> None:
    clock = Clock()
    component = RecordingComponent()
    router = HostRouter("example.test", NAME)
    router.attach(component)
    endpoint = ScriptedEndpoint()
    service = component_service(router, endpoint, SECRET, clock, max_delay=8.0)
    service.startService()

    def accept() -> StringTransport:
        protocol, transport = endpoint.streams[-1]
        protocol.dataReceived(HOST_HEADER)
        protocol.dataReceived(ACCEPTED)
        transport.clear()
        return transport

    first = accept()
    protocol = endpoint.streams[-1][0]
    protocol.dataReceived(b"<presence from='owner@example.test/laptop'/>")
    endpoint.down = True
    first.loseConnection()
    protocol.connectionLost(None)
    assert router.stream is None and not router.is_available("owner@example.test")
    assert component.events[-1] == ("unavailable", "owner@example.test/laptop")
    for n in range(3):  # held while the host is away
        router.route(etree.Element("{jabber:client}message",
                                   {"to": "a@example.test", "id": str(n)},
                                   nsmap={None: "jabber:client"}))
    clock.advance(1.5)
    clock.advance(3)
    assert len(endpoint.streams) == 1  # refused twice, backing off
    endpoint.down = False
    clock.advance(10)
    assert len(endpoint.streams) == 2
    protocol, transport = endpoint.streams[-1]
    protocol.dataReceived(HOST_HEADER)
    transport.clear()
    protocol.dataReceived(ACCEPTED)
    written = parse(transport.value())
    assert [m.get("id") for m in written if m.tag.endswith("message")] == ["0", "1", "2"]
    assert [(p.get("type"), p.get("to")) for p in written if p.tag.endswith("presence")] == [
        ("probe", "owner@example.test")]
    service.stopService()


def test_backlog_is_bounded() -> None:
    router = HostRouter("example.test", NAME)
    for n in range(MAX_BACKLOG + 5):
        router.route(etree.Element("{jabber:client}message", {"to": "a@example.test",
                                                              "id": str(n)},
                                   nsmap={None: "jabber:client"}))
    assert len(router.backlog) == MAX_BACKLOG and router.dropped == 5
    assert b'id="5"' in router.backlog[0]


ELEMENTS = ("got_handshake", "got_stanza", "got_other")
INPUTS = (*ELEMENTS, "got_header", "got_stream_error", "end")


def test_every_state_and_input_of_the_component_machine() -> None:
    allowed = {
        ("header", "got_header"): ("handshake", ("_send_handshake",)),
        ("handshake", "got_handshake"): ("ready", ("_accepted",)),
        ("ready", "got_stanza"): ("ready", ("_deliver",)),
        ("ready", "got_other"): ("ready", ("_ignore",)),
        ("ready", "got_handshake"): ("ready", ("_ignore",)),
    }
    for state in ("header", "handshake", "ready"):
        allowed[state, "got_stream_error"] = ("closed", ("_host_error",))
    refused = {"header": ("_unexpected", ELEMENTS),
               "handshake": ("_unexpected", ("got_stanza", "got_other"))}
    rows = expected(allowed, refused, "closed", INPUTS, ("end",))
    assert table(ComponentStream) == rows
    impossible = cells(ComponentStream) - set(rows)
    assert impossible == {("handshake", "got_header"), ("ready", "got_header")}


# -- configuration -------------------------------------------------------------------------


def component_config(tmp: Path, pki: Any, **grid: Any) -> Any:
    secret = tmp / "component-secret"
    if not secret.exists():
        secret.write_text(SECRET + "\n")
    keys = {"mode": "component", "component_host": "127.0.0.1:1",
            "component_secret_file": str(secret), **grid}
    return write_config(tmp, pki, **{k: v for k, v in keys.items() if v is not None})


def test_component_keys_load(tmp_path: Path, pki: Any) -> None:
    config = component_config(tmp_path, pki, component_name="pubsub.localhost")
    assert config.grid.service_name == "pubsub.localhost"
    assert component_config(tmp_path, pki).grid.service_name == "broker.localhost"


@pytest.mark.parametrize(("keys", "key", "words"), [
    ({"mode": "cluster"}, "grid.mode", "not one of server, component"),
    ({"component_host": None}, "grid.component_host", "needs host:port"),
    ({"component_host": "localhost"}, "grid.component_host", "is not host:port"),
    ({"component_host": "h:99999"}, "grid.component_host", "is not host:port"),
    ({"component_host": "h:\u00b2"}, "grid.component_host", "is not host:port"),
    ({"component_host": "h:\u0664\u0666\u0660\u0665"}, "grid.component_host",
     "is not host:port"),
    ({"component_secret_file": None}, "grid.component_secret_file", "needs the file"),
    ({"component_secret_file": "/nonexistent/secret"}, "grid.component_secret_file",
     "does not exist"),
    ({"component_name": "pubsub.elsewhere.test"}, "grid.component_name",
     "must be a subdomain of the host's domain 'localhost'"),
])
def test_component_key_errors_are_one_line(tmp_path: Path, pki: Any, keys: dict[str, Any],
                                           key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        component_config(tmp_path, pki, **keys)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'sixnet.toml'}: {key}: ") and words in message
    assert "\n" not in message


def test_an_empty_secret_file_is_refused_when_the_service_is_built(tmp_path: Path,
                                                                   pki: Any) -> None:
    config = component_config(tmp_path, pki)
    (tmp_path / "component-secret").write_text("\n")
    with pytest.raises(ConfigError, match="grid.component_secret_file: .* is empty"):
        GridService(config, store_from_config(config))


class ComponentModeServiceTests(unittest.TestCase):
    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def test_component_mode_does_not_listen_for_clients(self) -> None:
        config = component_config(self.tmp, self.pki, component_host=f"127.0.0.1:{free_port()}")
        service = GridService(config, store_from_config(config))
        service.startService()
        await service.ready
        try:
            assert service.broker.domain == "broker.localhost"
            assert service.broker.router is service.host_router
            assert service.starttls_port.parent is None and not service.starttls_port.ports
            assert service.direct_tls_port.parent is None
            assert service.component_link is not None and service.component_link.running
            with pytest.raises(ClientError, match="component mode"):
                await service.local_session("bridge")
            text = service.metrics.render().decode()
            assert "sixnet_grid_component_connected 0" in text  # nothing at that port
            assert "sixnet_grid_component_backlog 0" in text
        finally:
            await service.stopService()


def test_the_host_router_tells_no_client_address() -> None:
    """In component mode the host server keeps its platforms' addresses: a security event
    from the broker says whose platform it was instead."""
    router = HostRouter("example.test", NAME)
    assert router.origin_of("sensor@example.test/r") == \
        (None, "platform of the host server (component mode)")
