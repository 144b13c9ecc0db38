"""Many idle logged-in grid sessions from another process, so that what the server holds for
them can be measured in the test's own process without the clients' share.

Run as ``python -m tests.support.idle_clients PORT CA_PEM USER PASSWORD COUNT`` from the
repository root: it logs in COUNT sessions of USER (STARTTLS, SCRAM-SHA-256, a resource
each), prints ``ready``, says nothing more and exits when its standard input closes.
`command` is that command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import defer, stdio, task
from twisted.internet.protocol import Protocol

from sixnet.pki.store import CertificateStore
from tests.grid_harness import RawClient

#: Logins under way at once (within the server's unauthenticated allowance per address).
CONCURRENCY = 8


class _StdinWatch(Protocol):
    def __init__(self) -> None:
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


def command(port: int, ca: Path, user: str, password: str, count: int) -> list[str]:
    return [sys.executable, "-m", "tests.support.idle_clients", str(port), str(ca), user,
            password, str(count)]


async def hold(port: int, ca: str, user: str, password: str, count: int) -> None:
    store = CertificateStore.from_files([Path(ca)], [], [])
    clients: list[RawClient] = []
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            client = await RawClient.connect(port)
            await client.starttls(store)
            await client.open_stream()
            answer = await client.scram_login(user, password)
            if b"<success" not in answer:
                raise RuntimeError(f"login {i} failed: {answer[-300:]!r}")
            await client.bind(f"idle{i}")
            client.clear()
            clients.append(client)

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker())
                               for _ in range(CONCURRENCY)])
    watch = _StdinWatch()
    stdio.StandardIO(watch)
    print("ready", flush=True)
    await watch.closed
    for client in clients:
        client.transport.abortConnection()


def main(_: object, port: str, ca: str, user: str, password: str,
         count: str) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(hold(int(port), ca, user, password, int(count)))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
