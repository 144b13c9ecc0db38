"""What an idle authenticated TLS session costs the grid server (issue 12: at most 30 KB).

The clients run in another process (`tests.support.idle_clients`), so everything allocated in
this process while they log in and sit idle is the server's. Two measures, each with margin
over what was measured when the bound was set (see docs/performance.rst):

* Python objects, by `tracemalloc` (streams, sessions, parser and TLS wrappers, timers);
* the C heap, by glibc's ``mallinfo2`` (OpenSSL's connection and record buffers, libxml2's
  parser contexts), which `tracemalloc` cannot see.

Measured on 2026-12-03 (OpenSSL 4.0, Python 3.11): 4.43 KB of Python objects and 24.4 KB of
C heap per session, of which about 21 KB is OpenSSL's connection (its two record layers alone
8.8 KB, ``SSL_new``'s connection object 6 KB). Before slots on the stream parser, the shared
root start tag and no stream id kept: 4.85 KB and 24.7 KB; before new memory BIOs for quiet
streams, slots on ``ClientStream`` and no SASL state kept: 6.9 KB and 29.4 KB (2026-12-02);
before the release-buffers mode and the parser given back by quiet streams: 10.4 KB and 76 KB.
The C heap figure counts Python blocks over 512 bytes a second time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.grid_harness import ports, start_grid, write_config
from tests.support import idle_clients
from tests.support.twistd import ROOT

#: Sessions measured (after a warm-up batch that pays the one-time costs).
SESSIONS = 300
WARM_UP = 20
PYTHON_BOUND = 5.25 * 1024
C_HEAP_BOUND = 27 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    function = getattr(libc, "mallinfo2", None)
    if function is None:
        return None
    function.restype = _MallInfo2
    return function


MALLINFO2 = _mallinfo2()


def c_heap_in_use() -> int:
    """Bytes malloc has handed out and not had back (arena and mmapped blocks)."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


class _Clients(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(AssertionError(f"clients ended: {self.output[-2000:]!r}"))
        self.ended.callback(None)


@pytest.mark.skipif(MALLINFO2 is None, reason="needs glibc's mallinfo2 to read the C heap")
class IdleSessionMemoryTests(unittest.TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _setup(self, pki: Any, tmp_path: Path) -> None:
        self.pki = pki
        self.tmp = tmp_path

    async def _hold(self, user: str, count: int) -> None:
        clients = _Clients()
        command = idle_clients.command(self.port, self.pki.root.directory / "ca.pem", user,
                                       f"{user} secret", count)
        reactor.spawnProcess(clients, command[0], command,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), path=str(ROOT))

        async def stop() -> None:
            clients.transport.closeStdin()
            await clients.ended

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        await clients.ready

    @staticmethod
    def _c_heap() -> int:
        """The C heap without what tracemalloc itself takes to store its traces."""
        return c_heap_in_use() - tracemalloc.get_tracemalloc_memory()

    def _sessions(self) -> int:
        return sum(len(r) for r in self.grid.router.sessions.values())

    async def test_idle_session_memory(self) -> None:
        config = write_config(self.tmp, self.pki)
        self.grid = await start_grid(config)
        self.addCleanup(self.grid.stopService)
        self.port = ports(self.grid)[0]
        for user in ("alice", "bob"):
            await self.grid.accounts.add(user, f"{user} secret")
        await self._hold("alice", WARM_UP)
        gc.collect()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        python_before, c_before = tracemalloc.get_traced_memory()[0], self._c_heap()
        await self._hold("bob", SESSIONS)
        assert self._sessions() == WARM_UP + SESSIONS
        for _ in range(2):  # what the service's sweep does every two seconds
            self.grid.server.release_parsers()
        gc.collect()
        python = (tracemalloc.get_traced_memory()[0] - python_before) / SESSIONS
        c_heap = (self._c_heap() - c_before) / SESSIONS
        print(f"per idle session: Python {python:.0f} B, C heap {c_heap:.0f} B")
        assert python < PYTHON_BOUND, f"{python:.0f} B of Python objects per idle session"
        assert c_heap < C_HEAP_BOUND, f"{c_heap:.0f} B of C heap per idle session"
