"""SixChat against Twisted TLS 1.3 (mutual certificates) on loopback, in one run; prints JSON.

    .venv/bin/python benchmarks/chat.py [--handshakes N] [--seconds S] [--key-type T]

Both peers run in this process on one reactor, as do the TLS client and server, so each
figure includes both ends' CPU. Measured:

* handshakes/s: sequential connect + full handshake (both ends done, peers verified by
  the same lab CA) + close;
* messages/s and MB/s for 1 KiB and 64 KiB chat messages over one connection: the same
  ``<message>`` elements in the same ``<session>`` XML stream, parsed on arrival by the same
  hardened `StreamParser`; the receiver answers every 16 messages with a ``<receipt>`` and
  the sender keeps at most 64 messages unacknowledged. Storage is not involved.
* for SixChat alone, messages/s between two whole agents (``agents_1k_durable``): each
  message committed to the sender's outbox, the receiver's history and back as a receipt,
  SQLite with synchronous=FULL, so it measures the disk more than the protocol.
* for SixChat alone, what a flood costs the responder (``refused``): CPU microseconds per
  connection that the handshake limit refuses (connect, closed before any byte is read; both
  ends, as they share this process), against CPU microseconds per initiator hello answered
  when the limit lets it in (the same public hello replayed: parse, chain check, X25519,
  signature, the answer written).

The ratios are SixChat / TLS (above 1: SixChat is faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sixnet.chat.protocol import SessionFactory, SessionProtocol
from sixnet.chat.session import APP_HEADER, Session
from sixnet.core.stream.parser import StreamOpened, StreamParser
from sixnet.pki.ca import LabCA
from sixnet.pki.store import CertificateStore, NodeIdentity
from sixnet.pki.tls import ClientTLS, ServerTLS, peer_chain

WINDOW = 64
ACK_EVERY = 16


def message(i: int, size: int) -> bytes:
    head = f'<message id="m{i}" sent="2026-11-22T00:00:00.000Z">'.encode()
    return head + b"x" * size + b"</message>"


class Flow:
    """Window-limited message flow with receipts: the same for both transports."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.payloads = [message(i, size) for i in range(min(count, 256))]
        self.sent = 0
        self.received = 0
        self.acked = 0
        self.send: Callable[[bytes], None] = lambda data: None
        self.reply: Callable[[bytes], None] = lambda data: None
        self.done: defer.Deferred[float] = defer.Deferred()
        self.started = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.pump()

    def pump(self) -> None:
        while self.sent < self.count and self.sent - self.acked < WINDOW:
            self.send(self.payloads[self.sent % len(self.payloads)])
            self.sent += 1

    def on_receiver_stanza(self, element: etree._Element) -> None:
        self.received += 1
        if self.received % ACK_EVERY == 0 or self.received == self.count:
            self.reply(f'<receipt id="m{self.received}"/>'.encode())

    def on_sender_stanza(self, element: etree._Element) -> None:
        self.acked = int(element.get("id")[1:])
        if self.acked >= self.count:
            if not self.done.called:
                self.done.callback(time.perf_counter() - self.started)
        else:
            self.pump()


# -- SixChat ----------------------------------------------------------------------------------


class ChatOwner:
    def __init__(self) -> None:
        self.established: defer.Deferred[Session] = defer.Deferred()
        self.on_stanza: Callable[[etree._Element], None] = lambda e: None

    def session_established(self, session: Session) -> None:
        if not self.established.called:
            self.established.callback(session)

    def stanza_received(self, session: Session, element: etree._Element) -> None:
        self.on_stanza(element)

    def session_ended(self, session: Session, reason: str) -> None:
        if not self.established.called:
            self.established.errback(RuntimeError(reason))


class ChatPair:
    def __init__(self, alice: NodeIdentity, bob: NodeIdentity, store: CertificateStore) -> None:
        self.alice, self.bob, self.store = alice, bob, store
        self.bob_owner = ChatOwner()

    def accept(self, _: str | None) -> SessionProtocol:
        self.bob_owner = owner = ChatOwner()
        return SessionProtocol(lambda t: Session(self.bob, self.store, t, owner,
                                                 me=self.bob.name), reactor)

    async def listen(self) -> None:
        self.port = await endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(SessionFactory(self.accept))

    async def connect(self) -> tuple[SessionProtocol, Session, Session]:
        owner = ChatOwner()
        proto = SessionProtocol(lambda t: Session(self.alice, self.store, t, owner,
                                                  me=self.alice.name),
                                reactor, dial_to=self.bob.name)
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", self.port.getHost().port), proto)
        mine = await owner.established
        theirs = await self.bob_owner.established
        self.alice_owner = owner
        return proto, mine, theirs


async def chat_handshakes(pair: ChatPair, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        proto, _, _ = await pair.connect()
        proto.transport.loseConnection()
        await proto.lost
    return count / (time.perf_counter() - started)


async def chat_flow(pair: ChatPair, flow: Flow) -> float:
    proto, mine, theirs = await pair.connect()
    flow.send = lambda data: mine.send_stanza(data)
    flow.reply = lambda data: theirs.send_stanza(data)
    pair.bob_owner.on_stanza = flow.on_receiver_stanza
    pair.alice_owner.on_stanza = flow.on_sender_stanza
    flow.start()
    elapsed = await flow.done
    proto.transport.loseConnection()
    await proto.lost
    return elapsed


# -- TLS 1.3 ----------------------------------------------------------------------------------


@implementer(IHandshakeListener)
class TLSStanzas(protocol.Protocol):
    """The same application XML stream, over TLS."""

    def __init__(self, check: Callable[[Any], None] | None = None) -> None:
        self.check = check
        self.handshake: defer.Deferred[TLSStanzas] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.parser = StreamParser(max_element_bytes=66560, max_depth=4)
        self.on_stanza: Callable[[etree._Element], None] = lambda e: None
        self.header_sent = False

    def handshakeCompleted(self) -> None:
        if self.check is not None:  # what a sixnet TLS service does next: who is the peer?
            self.check(peer_chain(self.transport.getHandle()))
        self.handshake.callback(self)

    def send(self, data: bytes) -> None:
        if not self.header_sent:
            self.header_sent = True
            data = APP_HEADER + data
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        for event in self.parser.feed(data):
            if not isinstance(event, StreamOpened):
                self.on_stanza(event)

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


class TLSPair:
    def __init__(self, alice: NodeIdentity, server: NodeIdentity,
                 store: CertificateStore, *, identify: bool = False) -> None:
        self.client_tls = ClientTLS(store, alice, hostname=server.name)
        self.server_tls = ServerTLS(store, server, "required")
        self.accepted: defer.Deferred[TLSStanzas] = defer.Deferred()
        self.check_client = self.check_server = None
        if identify:
            self.check_client = lambda chain: store.verify(chain, "client")
            self.check_server = lambda chain: store.verify(chain, "server", server.name)

    async def listen(self) -> None:
        def accept() -> TLSStanzas:
            proto = TLSStanzas(self.check_client)
            proto.handshake.chainDeferred(self.accepted)
            return proto

        factory = TLSMemoryBIOFactory(self.server_tls, False,
                                      protocol.Factory.forProtocol(accept))
        self.port = await endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1").listen(factory)

    async def connect(self) -> tuple[TLSStanzas, TLSStanzas]:
        self.accepted = defer.Deferred()
        client = TLSStanzas(self.check_server)
        factory = TLSMemoryBIOFactory(self.client_tls, True,
                                      protocol.Factory.forProtocol(lambda: client))
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1",
                                           self.port.getHost().port).connect(factory)
        await client.handshake
        server = await self.accepted
        return client, server


async def tls_handshakes(pair: TLSPair, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        client, _ = await pair.connect()
        client.transport.loseConnection()
        await client.lost
    return count / (time.perf_counter() - started)


async def tls_flow(pair: TLSPair, flow: Flow) -> float:
    client, server = await pair.connect()
    flow.send = client.send
    flow.reply = server.send
    server.on_stanza = flow.on_receiver_stanza
    client.on_stanza = flow.on_sender_stanza
    flow.start()
    elapsed = await flow.done
    client.transport.loseConnection()
    await client.lost
    return elapsed


# -- whole agents, with durable storage --------------------------------------------------------


async def agents_flow(directory: Path, alice: NodeIdentity, bob: NodeIdentity,
                      store: CertificateStore, count: int) -> float:
    """Messages/s between two complete agents: committed outbox, inbox, receipts on disk."""
    import dataclasses

    from sixnet.chat.config import ChatConfig
    from sixnet.chat.service import ChatService
    from sixnet.core.storage.database import Database
    from tests.support.chat import SharedDirectory

    shared = SharedDirectory(reactor.seconds)
    services = []
    for identity in (alice, bob):
        home = directory / identity.name.split("@")[0]
        chat = dataclasses.replace(ChatConfig(), enabled=True,
                                   listen=["tcp:0:interface=127.0.0.1"])
        service = ChatService(chat, identity, store, Database(f"sqlite:{home / 'chat.sqlite'}"),
                              shared.for_person(identity.name), home / "control.sock", reactor)
        service.startService()
        await service.ready
        services.append(service)
    delivered: list[int] = []
    done: defer.Deferred[None] = defer.Deferred()

    def on_event(event: str, _: object) -> None:
        if event == "delivered":
            delivered.append(1)
            if len(delivered) == count and not done.called:
                done.callback(None)

    services[0].agent.listen(on_event)
    text = "x" * 1024
    started = time.perf_counter()
    for _ in range(count):
        await services[0].agent.send(bob.name, text)
    await done
    elapsed = time.perf_counter() - started
    for service in services:
        await service.stopService()
    return count / elapsed


# -- the run ----------------------------------------------------------------------------------


class Closed(protocol.Protocol):
    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any) -> None:
        self.lost.callback(None)


async def refused_handshakes(pair: ChatPair, count: int) -> float:
    """CPU microseconds (this process: both ends) per connection the global limit refuses,
    while one silent caller holds the only slot."""
    factory = SessionFactory(pair.accept, max_handshakes=1)
    port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    target = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    holder = await endpoints.connectProtocol(target, Closed())
    pair.bob_owner.established.addErrback(lambda _: None)  # it never handshakes
    started = time.process_time()
    for _ in range(count):
        caller = Closed()
        await endpoints.connectProtocol(target, caller)
        await caller.lost
    elapsed = time.process_time() - started
    assert factory.refused == count
    holder.transport.loseConnection()
    await holder.lost
    await port.stopListening()
    return elapsed / count * 1e6


def answered_hellos(pair: ChatPair, count: int) -> float:
    """CPU microseconds for the responder to answer one replayed initiator hello (no
    sockets: what the limit saves for each connection it refuses)."""
    owner = ChatOwner()
    owner.established.addErrback(lambda _: None)  # it never hears the answers
    dialer = SessionProtocol(lambda t: Session(pair.alice, pair.store, t, owner,
                                               me=pair.alice.name), reactor,
                             dial_to=pair.bob.name)
    sent = StringTransport()
    dialer.makeConnection(sent)
    hello = sent.value()
    started = time.process_time()
    for _ in range(count):
        answer = StringTransport()
        responder = pair.accept(None)
        pair.bob_owner.established.addErrback(lambda _: None)
        responder.makeConnection(answer)
        responder.dataReceived(hello)
        assert b"</sixchat>" in answer.value()
        responder.connectionLost()
    elapsed = time.process_time() - started
    dialer.connectionLost()
    return elapsed / count * 1e6


def lab(directory: Path, key_type: str) -> tuple[NodeIdentity, NodeIdentity, NodeIdentity,
                                                 CertificateStore]:
    ca = LabCA.init(directory / "ca", name="benchmark CA")

    def issue(kind: str, name: str) -> NodeIdentity:
        out = directory / name
        ca.issue(kind, name, key_type=key_type, out=out)
        return NodeIdentity.load(name, out / "cert.pem", out / "key.pem")

    store = CertificateStore.from_files([directory / "ca" / "ca.pem"],
                                        [directory / "ca" / "crl.pem"])
    return (issue("user", "alice@example.test"), issue("user", "bob@example.test"),
            issue("host", "bob.example.test"), store)


def figures(elapsed: float, count: int, size: int) -> dict[str, float]:
    return {"messages_per_s": round(count / elapsed, 1),
            "mb_per_s": round(count * size / elapsed / 1e6, 2)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        alice, bob, bob_host, store = lab(Path(tmp), args.key_type)
        chat, tls = ChatPair(alice, bob, store), TLSPair(alice, bob_host, store)
        tls_identified = TLSPair(alice, bob_host, store, identify=True)
        for pair in (chat, tls, tls_identified):
            await pair.listen()
        result: dict[str, Any] = {"key_type": args.key_type, "sixchat": {}, "tls13": {}}
        # warm up both
        await chat_handshakes(chat, 5)
        await tls_handshakes(tls, 5)
        hs_chat, hs_tls, hs_tls_id = [], [], []
        for _ in range(args.rounds):  # interleaved, so background load hits both alike
            hs_chat.append(await chat_handshakes(chat, args.handshakes))
            hs_tls.append(await tls_handshakes(tls, args.handshakes))
            hs_tls_id.append(await tls_handshakes(tls_identified, args.handshakes))
        result["sixchat"]["handshakes_per_s"] = round(max(hs_chat), 1)
        result["tls13"]["handshakes_per_s"] = round(max(hs_tls), 1)
        # the same TLS handshakes, then CertificateStore.verify on both ends, as sixnet's TLS
        # services do to learn who the peer is (SixChat's figure includes that work)
        result["tls13"]["handshakes_per_s_with_store_verify"] = round(max(hs_tls_id), 1)
        for size, count in ((1024, args.small), (65536, args.large)):
            best_chat = best_tls = float("inf")
            for _ in range(args.rounds):
                best_chat = min(best_chat, await chat_flow(chat, Flow(count, size)))
                best_tls = min(best_tls, await tls_flow(tls, Flow(count, size)))
            label = f"{size // 1024}k"
            result["sixchat"][label] = figures(best_chat, count, size)
            result["tls13"][label] = figures(best_tls, count, size)
        result["sixchat"]["agents_1k_durable_messages_per_s"] = round(
            await agents_flow(Path(tmp), alice, bob, store, args.durable), 1)
        refused = [await refused_handshakes(chat, args.handshakes) for _ in range(args.rounds)]
        answered = [answered_hellos(chat, args.handshakes) for _ in range(args.rounds)]
        result["sixchat"]["refused"] = {
            "refused_connection_us": round(min(refused), 1),
            "answered_hello_us": round(min(answered), 1),
            "answered_per_refused": round(min(answered) / min(refused), 2)}
        result["ratios"] = {
            "handshakes": round(result["sixchat"]["handshakes_per_s"]
                                / result["tls13"]["handshakes_per_s"], 2),
            "handshakes_vs_tls_with_store_verify": round(
                result["sixchat"]["handshakes_per_s"]
                / result["tls13"]["handshakes_per_s_with_store_verify"], 2),
            **{label: round(result["sixchat"][label]["messages_per_s"]
                            / result["tls13"][label]["messages_per_s"], 2)
               for label in ("1k", "64k")},
        }
        for pair in (chat, tls, tls_identified):
            await pair.port.stopListening()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--small", type=int, default=20000, help="1 KiB messages per round")
    parser.add_argument("--large", type=int, default=2000, help="64 KiB messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--durable", type=int, default=300,
                        help="1 KiB messages between two whole agents (SQLite, receipts)")
    parser.add_argument("--key-type", default="ecdsa-p256",
                        choices=["ecdsa-p256", "ed25519", "rsa2048"])
    args = parser.parse_args()

    async def body(_: Any) -> None:
        print(json.dumps(await run(args), indent=2))

    task.react(lambda r: defer.Deferred.fromCoroutine(body(r)))


if __name__ == "__main__":
    main()
