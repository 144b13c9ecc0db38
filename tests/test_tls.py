"""TLS contexts built from the certificate store, over real loopback sockets."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from zope.interface import implementer

from sixnet.pki.ca import LabCA
from sixnet.pki.store import CertificateStore, VerificationError
from sixnet.pki.tls import ClientTLS, ServerTLS, peer_chain, release_bio_buffers

from .support.pki import LabPKI

OPENSSL = shutil.which("openssl")


@implementer(IHandshakeListener)
class VerdictServer(protocol.Protocol):
    """Tells the client who the store says it is, then closes."""

    def handshakeCompleted(self) -> None:
        store: CertificateStore = self.factory.store
        try:
            peer = store.verify(peer_chain(self.transport.getHandle()), "client")
            self.transport.write(f"identity {peer.identity}".encode())
        except VerificationError as e:
            self.transport.write(f"refused {e.check}".encode())
        self.transport.loseConnection()


@implementer(IHandshakeListener)
class VerdictClient(protocol.Protocol):
    def connectionMade(self) -> None:
        self.received = b""
        self.handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.server_chain = peer_chain(self.transport.getHandle())
        self.version = self.transport.getHandle().get_protocol_version_name()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.factory.done.callback(self)


class TLSTests(unittest.TestCase):
    timeout = 30
    pki: LabPKI

    def setUp(self) -> None:
        base = Path(self.mktemp())
        root = LabCA.init(base / "root", name="tls test CA")
        self.pki = LabPKI(root, root, LabCA.init(base / "f", name="foreign"), base)
        self.store = self.pki.store(identities=[self.pki.identity("host", "localhost")])

    def listen(self, client_auth: str) -> int:
        factory = protocol.Factory.forProtocol(VerdictServer)
        factory.store = self.store
        tls = ServerTLS(self.store, self.store.identity("localhost"), client_auth)
        port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def connect(self, port: int, identity: object = None) -> VerdictClient:
        factory = protocol.ClientFactory.forProtocol(VerdictClient)
        factory.done = defer.Deferred()
        reactor.connectSSL("127.0.0.1", port, factory,
                           ClientTLS(self.store, identity, hostname="localhost"))
        return await factory.done

    async def test_required_accepts_valid_client_and_names_it(self) -> None:
        port = self.listen("required")
        client = await self.connect(port, self.pki.identity("user", "alice@example.test"))
        assert client.received == b"identity alice@example.test"
        assert client.version == "TLSv1.3"
        server = self.store.verify(client.server_chain, "server", "localhost")
        assert server.identity == "localhost"

    async def test_required_refuses_missing_revoked_and_foreign(self) -> None:
        port = self.listen("required")
        assert (await self.connect(port)).received == b""
        foreign = self.pki.identity("user", "alice@example.test", ca=self.pki.foreign)
        assert (await self.connect(port, foreign)).received == b""
        revoked = self.pki.identity("user", "revoked@example.test")
        self.pki.root.revoke(revoked.certificate.serial_number)
        self.store.reload_crls()  # rebuilds the context: OpenSSL now has the new CRL
        client = await self.connect(port, revoked)
        assert client.received == b""
        assert (await self.connect(port, self.pki.identity(
            "user", "ok@example.test"))).received == b"identity ok@example.test"

    async def test_requested_completes_handshake_and_store_decides(self) -> None:
        port = self.listen("requested")
        assert (await self.connect(port)).received == b"refused malformed"
        foreign = self.pki.identity("user", "alice@example.test", ca=self.pki.foreign)
        assert (await self.connect(port, foreign)).received == b"refused unknown-issuer"
        revoked = self.pki.identity("user", "gone@example.test")
        self.pki.root.revoke(revoked.certificate.serial_number)
        self.store.reload_crls()
        assert (await self.connect(port, revoked)).received == b"refused revoked"
        good = self.pki.identity("user", "bob@example.test")
        assert (await self.connect(port, good)).received == b"identity bob@example.test"

    async def openssl(self, port: int, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            OPENSSL, ["s_client", "-connect", f"127.0.0.1:{port}", *args], env={})
        return (out + err).decode(errors="replace")

    async def test_openssl_negotiates_tls13_and_tls12_with_aead_only(self) -> None:
        if OPENSSL is None:
            raise unittest.SkipTest("the openssl command is not installed")
        port = self.listen("none")
        ca = str(self.pki.root.directory / "ca.pem")
        text = await self.openssl(port, "-CAfile", ca, "-verify_return_error")
        assert "New, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256" in text, text
        assert "Verification: OK" in text
        text = await self.openssl(port, "-tls1_2", "-CAfile", ca)
        assert "New, TLSv1.2, Cipher is ECDHE-ECDSA-AES256-GCM-SHA384" in text
        text = await self.openssl(port, "-tls1_2", "-cipher", "AES128-SHA")
        assert "New, (NONE)" in text or "handshake failure" in text

    async def test_openssl_tls10_and_tls11_refused(self) -> None:
        if OPENSSL is None:
            raise unittest.SkipTest("the openssl command is not installed")
        port = self.listen("none")
        for flag in ("-tls1", "-tls1_1"):
            # SECLEVEL=0 makes the client really offer the old version
            text = await self.openssl(port, flag, "-cipher", "DEFAULT:@SECLEVEL=0")
            assert "alert protocol version" in text, text

    async def test_offers_x25519_p256_p384_and_no_other_group(self) -> None:
        """Mozilla's intermediate profile: a client offering only X448 or P-521 is refused.

        TLS 1.3 keeps the key share apart from the certificate's curve, so each group is
        tried alone (in TLS 1.2 the client's list must also hold the certificate's curve).
        """
        if OPENSSL is None:
            raise unittest.SkipTest("the openssl command is not installed")
        port = self.listen("none")
        for group, shown in (("X25519", "X25519"), ("P-256", "ECDH, prime256v1"),
                             ("P-384", "ECDH, secp384r1")):
            text = await self.openssl(port, "-tls1_3", "-groups", group)
            assert "New, TLSv1.3" in text and f"Server Temp Key: {shown}" in text, text
        for refused in ("X448", "P-521", "ffdhe2048"):
            text = await self.openssl(port, "-tls1_3", "-groups", refused)
            assert "New, (NONE)" in text and "handshake failure" in text, text

    def test_idle_connection_gets_new_memory_bios_without_losing_a_byte(self) -> None:
        """`release_bio_buffers` swaps only empty BIOs, and a record half-received when it
        does (its bytes already in OpenSSL's record layer) is completed through the new one."""
        tls = ServerTLS(self.store, self.store.identity("localhost"))
        server = tls.serverConnectionForTLS(None)
        server.set_accept_state()
        client = ClientTLS(self.store, hostname="localhost").clientConnectionForTLS(None)

        def move(source: SSL.Connection, sink: SSL.Connection, limit: int = 1 << 20) -> None:
            with contextlib.suppress(SSL.WantReadError):
                sink.bio_write(source.bio_read(limit))

        def read_all(connection: SSL.Connection) -> bytes:
            data = b""
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    data += connection.recv(1 << 16)
            return data

        for _ in range(4):
            for side in (client, server):
                with contextlib.suppress(SSL.WantReadError):
                    side.do_handshake()
            move(client, server)
            move(server, client)
        big = bytes(range(256)) * 200
        for _ in range(2):
            old = server._into_ssl, server._from_ssl
            assert release_bio_buffers(server)
            assert (server._into_ssl, server._from_ssl) != old
            client.sendall(big)
            move(client, server)
            assert read_all(server) == big
            client.sendall(b"half a record")
            move(client, server, 20)
            assert not release_bio_buffers(server)  # unread bytes in the read BIO
            assert read_all(server) == b""  # now they wait in OpenSSL's record layer
            assert release_bio_buffers(server)
            move(client, server)
            assert read_all(server) == b"half a record"
            server.sendall(big)
            assert not release_bio_buffers(server)  # output not yet taken
            move(server, client)
            assert read_all(client) == big
