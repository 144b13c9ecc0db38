"""pyOpenSSL TLS contexts for the services, built from the shared certificate store.

TLS 1.2 is the minimum, TLS 1.3 is preferred (RFC 7590), TLS 1.2 offers only ECDHE with AEAD
ciphers, compression and renegotiation are off. Trust comes from the store: its anchors and
CRLs are loaded into OpenSSL's verifier, and after the handshake a service passes the peer's
chain to `CertificateStore.verify`, which decides who the peer is.

Client certificates can be

``"none"``      not asked for;
``"required"``  asked for, and OpenSSL refuses the handshake unless the chain verifies against
                the store's anchors and CRLs;
``"requested"`` asked for but not required: a person enrolling has no certificate yet, and
                an XMPP client with a bad certificate must get a SASL failure, not a TLS
                alert (XEP-0178). The handshake goes on whatever the certificate; OpenSSL's
                verdict is kept, and nothing about the peer is trusted until the service's
                call to `CertificateStore.verify` succeeds (see `peer_chain`).
"""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from sixnet.pki.store import CertificateStore, NodeIdentity

ClientAuth = Literal["none", "requested", "required"]

TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)


#: TLS 1.3 cipher suites in the order of Mozilla's "intermediate" profile (OpenSSL's own
#: puts AES-256 first). With the server's preference, AES-128-GCM-SHA256 is chosen: its cipher
#: and transcript-hash contexts are 240 bytes smaller on every connection than those of
#: AES-256-GCM-SHA384, and it is the faster of the two.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: Key exchange groups, Mozilla's "intermediate" profile: no X448, no secp521r1.
KEY_EXCHANGE_GROUPS = b"X25519:P-256:P-384"


def _base_context(method: int) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(TLS12_CIPHERS)
    if not _lib.SSL_CTX_set_ciphersuites(ctx._context, TLS13_CIPHERSUITES):
        raise ValueError(f"OpenSSL refused the TLS 1.3 cipher suites {TLS13_CIPHERSUITES!r}")
    # pyOpenSSL has no call for the group list (only set_tmp_ecdh, one curve, TLS 1.2 only):
    # OpenSSL's own, through the binding pyOpenSSL is built on.
    if not _lib.SSL_CTX_set1_curves_list(ctx._context, KEY_EXCHANGE_GROUPS):
        raise ValueError(f"OpenSSL refused the key exchange groups {KEY_EXCHANGE_GROUPS!r}")
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    ctx.set_options(options)
    # A connection's read and write record buffers (about 34 KB together) are freed whenever
    # they are empty, instead of living as long as the connection: an idle session then
    # holds no buffer at all, and one taking traffic gets them back for each record.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


def _load_identity(ctx: SSL.Context, identity: NodeIdentity) -> None:
    ctx.use_certificate(identity.certificate)
    for extra in identity.chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(identity.key)  # type: ignore[arg-type]
    ctx.check_privatekey()


def _load_trust(ctx: SSL.Context, store: CertificateStore) -> None:
    x509store = ctx.get_cert_store()
    assert x509store is not None
    for anchor in store.anchors:
        x509store.add_cert(crypto.X509.from_cryptography(anchor))
    crls = store.crls()
    for crl in crls:
        x509store.add_crl(crl)
    if crls:
        # Checking every level needs a CRL for every issuer; the leaf's is what we have.
        x509store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


def _defer_to_store(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                    ok: int) -> bool:
    """In "requested" mode the handshake goes on; `CertificateStore.verify` decides later."""
    return True


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A TLS server context factory (for `ITLSTransport.startTLS` and ``ssl:`` endpoints).

    The context is built once and rebuilt when the store's CRLs change, because OpenSSL does
    not allow changing a context after a connection used it.
    """

    def __init__(
        self, store: CertificateStore, identity: NodeIdentity, client_auth: ClientAuth = "none"
    ) -> None:
        self.store = store
        self.identity = identity
        self.client_auth = client_auth
        self._context: SSL.Context | None = None
        self._generation = -1

    def getContext(self) -> SSL.Context:
        if self._context is None or self._generation != self.store.generation:
            self._context = self._build()
            self._generation = self.store.generation
        return self._context

    def _build(self) -> SSL.Context:
        ctx = _base_context(SSL.TLS_SERVER_METHOD)
        _load_identity(ctx, self.identity)
        ctx.set_session_id(b"sixnet")
        # TLS 1.3 session tickets stay at OpenSSL's default (two per handshake, stateless):
        # they cost an idle session no memory and about 30 us of a login's 5 ms of CPU
        # (measured 2026-12-03), the binding has no SSL_CTX_set_num_tickets, and
        # SSL_OP_NO_TICKET would make them stateful, keeping every session (1 KB) in the
        # context's cache; with the cache also off, no client could resume at all.
        if self.client_auth != "none":
            _load_trust(ctx, self.store)
        if self.client_auth == "required":
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        elif self.client_auth == "requested":
            ctx.set_verify(SSL.VERIFY_PEER, _defer_to_store)
        return ctx

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.getContext(), None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """A TLS client context factory: presents an identity if given, verifies the server.

    OpenSSL checks the server's chain against the store's anchors during the handshake and
    sends `hostname` as SNI; the caller must still check the host name with
    ``CertificateStore.verify(chain, "server", host)`` once the handshake completes.
    """

    def __init__(self, store: CertificateStore, identity: NodeIdentity | None = None,
                 hostname: str | None = None) -> None:
        self.store = store
        self.identity = identity
        self.hostname = hostname
        self._context: SSL.Context | None = None
        self._generation = -1

    def getContext(self) -> SSL.Context:
        if self._context is None or self._generation != self.store.generation:
            ctx = _base_context(SSL.TLS_CLIENT_METHOD)
            if self.identity is not None:
                _load_identity(ctx, self.identity)
            _load_trust(ctx, self.store)
            ctx.set_verify(SSL.VERIFY_PEER)
            self._context = ctx
            self._generation = self.store.generation
        return self._context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.getContext(), None)
        if self.hostname:
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        connection.set_connect_state()
        return connection


def peer_chain(connection: SSL.Connection) -> list[x509.Certificate]:
    """The certificates the peer sent (leaf first), to hand to `CertificateStore.verify`.

    On the server side OpenSSL's peer chain omits the client's own certificate; it is put
    back in front here, so both sides get the same shape.
    """
    leaf = connection.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return []
    chain = list(connection.get_peer_cert_chain(as_cryptography=True) or [])
    if not chain or chain[0] != leaf:
        chain.insert(0, leaf)
    return chain


def _mem_bio_pending(bio: object) -> int:
    """Bytes waiting in a memory BIO (the binding has no ``BIO_ctrl_pending``)."""
    return int(_lib.BIO_get_mem_data(bio, _ffi.new("char **")))


def release_bio_buffers(connection: object) -> bool:
    """Give an idle TLS connection new, empty memory BIOs; True when it did (False also for
    what is not a memory-BIO `SSL.Connection`, such as a plain socket).

    pyOpenSSL's memory BIOs (``Connection._into_ssl`` and ``_from_ssl``, between OpenSSL and
    Twisted's TLS layer) keep their buffer at the size of the largest burst they carried, for
    as long as the connection lives: the handshake's server flight (a few KB, grown by a
    third), or a big stanza either way. Record buffers are already released when empty
    (``SSL_MODE_RELEASE_BUFFERS``); this does the same for the BIOs of a stream gone quiet.

    Only when both BIOs are empty, so no byte is lost or reordered: Twisted's TLS layer writes
    what it receives into ``_into_ssl`` and reads OpenSSL's output from ``_from_ssl`` at once,
    so between two reactor events both are empty unless a record is half-received, in which
    case the bytes wait in OpenSSL's record layer, not in the BIO. ``SSL_set_bio`` frees the
    old pair (OpenSSL owns them: pyOpenSSL sets no finaliser on them) and hands the new ones
    to the record layers; the `Connection` is pointed at them for its ``bio_read``,
    ``bio_write`` and ``bio_shutdown``. Not for a connection whose peer sent EOF
    (``bio_shutdown``): the new read BIO would not remember it; a caller does this only on
    open streams.
    """
    if not isinstance(connection, SSL.Connection):
        return False
    into, out = connection._into_ssl, connection._from_ssl
    if into is None or out is None or _mem_bio_pending(into) or _mem_bio_pending(out):
        return False
    fresh_into = _lib.BIO_new(_lib.BIO_s_mem())
    fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh_into == _ffi.NULL or fresh_out == _ffi.NULL:
        for bio in (fresh_into, fresh_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(connection._ssl, fresh_into, fresh_out)
    connection._into_ssl, connection._from_ssl = fresh_into, fresh_out
    return True
