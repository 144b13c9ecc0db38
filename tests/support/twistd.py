"""A real ``twistd`` process as an operator runs it (no daemon, no pid file), for tests that
need the whole program: start it, know when it has started, kill or stop it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor

TWISTD = str(Path(sys.executable).parent / "twistd")
ROOT = Path(__file__).resolve().parent.parent.parent


def twistd_command(plugin: str, config: Path, *options: str,
                   twistd_options: Sequence[str] = ()) -> list[str]:
    """The command line of a foreground ``twistd PLUGIN --config CONFIG`` with no pid file:
    `options` are the plugin's (``--log-format``), `twistd_options` twistd's (``--profile``)."""
    return [TWISTD, "--nodaemon", "--pidfile=", *twistd_options, plugin, "--config", str(config),
            *options]


class TwistdProcess(protocol.ProcessProtocol):
    """One run of ``twistd --nodaemon --pidfile= PLUGIN --config CONFIG``.

    `start` fires once the root service has logged that it started; `output` keeps every
    line the process wrote (standard output and error), for the message of a failed test.
    """

    def __init__(self, config: Path, plugin: str = "sixnet") -> None:
        self.config = config
        self.plugin = plugin
        self.output: list[str] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self._partial = b""
        self._started: defer.Deferred[float] | None = None
        self._spawned_at = 0.0

    def start(self, timeout: float = 60.0) -> defer.Deferred[float]:
        """Spawn the process; fires with the seconds until "sixnet ... started" was logged."""
        self._started = defer.Deferred()
        self._spawned_at = time.monotonic()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        reactor.spawnProcess(self, TWISTD, twistd_command(self.plugin, self.config), env=env,
                             path=ROOT)

        def timed_out(*_: Any) -> None:
            raise AssertionError(f"twistd did not start within {timeout} s:\n{self.tail()}")

        return self._started.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)

    @property
    def running(self) -> bool:
        return self.transport is not None and not self.ended.called

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output[-lines:])

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.output.append(line)
            if (self._started is not None and not self._started.called
                    and " started: " in line and "sixnet " in line):
                self._started.callback(time.monotonic() - self._spawned_at)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        if self._started is not None and not self._started.called:
            self._started.errback(AssertionError(
                f"twistd ended (status {self.exit_code}) before it started:\n{self.tail()}"))
        self.ended.callback(self.exit_code)

    async def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        if self.running:
            self.transport.signalProcess("KILL")
        await self.ended

    async def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, the clean stop; the exit status (SIGKILL after `timeout`)."""
        if self.running:
            self.transport.signalProcess("TERM")
            stopper = reactor.callLater(timeout, self.transport.signalProcess, "KILL")
            await self.ended
            if stopper.active():
                stopper.cancel()
        return self.exit_code
