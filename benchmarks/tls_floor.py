"""The least a Twisted TLS server does per IRP request: the floor under benchmarks/irp.py.

It speaks just enough of IRP for that benchmark's client (header, STARTTLS, a client
certificate required by OpenSSL, the session element) with the same TLS settings as the
registry (`sixnet.pki.tls.ServerTLS`), then answers every request with the bytes of a real
lookup answer recorded from the registry, only its id changed: no parsing, no registry, no
signing. What this server reaches with the same load generator is what any registry written
on Twisted and pyOpenSSL can at most reach on this machine.

Usage (run by benchmarks/irp.py): python benchmarks/tls_floor.py PORT CA_PEM CERT KEY ANSWER
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from twisted.internet import protocol, reactor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sixnet.pki.store import CertificateStore, NodeIdentity
from sixnet.pki.tls import ServerTLS

HEADER = (b'<irp xmlns="urn:sixnet:irp:1" version="1.2" from="localhost" id="floor">')
REQUEST_END = re.compile(rb"/>|</register>")
REQUEST_ID = re.compile(rb' id="([^"]*)"')


class FloorProtocol(protocol.Protocol):
    def __init__(self, tls: ServerTLS, answer: bytes) -> None:
        self.tls, self.answer = tls, answer
        self.stage = 0  # 0 clear header, 1 starttls, 2 TLS header, 3 requests
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.stage == 0 and b">" in self.buffer:
            self.buffer = b""
            self.stage = 1
            self.transport.write(HEADER + b'<features><starttls required="true"/></features>')
        elif self.stage == 1 and b"<starttls" in self.buffer:
            self.buffer = b""
            self.stage = 2
            self.transport.write(b"<proceed/>")
            self.transport.startTLS(self.tls)
        elif self.stage == 2 and b">" in self.buffer:
            self.buffer = b""
            self.stage = 3
            self.transport.write(HEADER + b'<session user="floor@example.test"/>')
        elif self.stage == 3:
            while (end := REQUEST_END.search(self.buffer)) is not None:
                request, self.buffer = self.buffer[:end.end()], self.buffer[end.end():]
                found = REQUEST_ID.search(request)
                self.transport.write(self.answer.replace(b"@ID@", found.group(1) if found
                                                         else b""))


class FloorFactory(protocol.Factory):
    def __init__(self, tls: ServerTLS, answer: bytes) -> None:
        self.tls, self.answer = tls, answer

    def buildProtocol(self, addr: object) -> FloorProtocol:
        return FloorProtocol(self.tls, self.answer)


def main(argv: list[str]) -> None:
    port, ca, cert, key, answer = argv
    identity = NodeIdentity.load("host", Path(cert), Path(key))
    store = CertificateStore.from_files([Path(ca)], [], [identity])
    tls = ServerTLS(store, identity, client_auth="required")
    reactor.listenTCP(int(port), FloorFactory(tls, Path(answer).read_bytes()),
                      interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
