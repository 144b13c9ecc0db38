"""The registry on N worker processes of one host (``[irp] workers``, docs/irp.rst).

The main (twistd) process binds every ``listen`` endpoint, never accepts on them, and
hands the listening sockets to N workers it spawns (``childFDs``); each worker adopts them
(``adoptStreamPort``), so the kernel queues connections once and whichever worker is free
accepts the next. A worker that dies leaves the queue to the others and is spawned again;
stopping the main process stops every worker first.

Coherence between workers, besides the database itself:

* **change feed**: PostgreSQL's ``NOTIFY`` already reaches every process. SQLite delivers a
  notification only in the process that committed it, so each worker also writes it on a
  pipe to the main process, which hands it to every other worker (`FeedRelay`,
  `WorkerFeed`): watches fire for changes made through any worker.
* **reports**: a worker's log events, security events and metrics go, as JSON lines on its
  standard output, to the main process, which logs them as its own (marked ``irp_worker``,
  so they land in twistd's log file when it runs as a daemon), hands the security events to
  its bus (the bridge runs there) and shows each worker's latest metrics on its own
  endpoint, labelled ``worker``.
* **kept answers**: a notification arrives a little after the writer acknowledged its
  client, so a lookup through another worker at once could still see the kept answer. The
  `VersionBoard`, a small file every worker maps into memory, closes that gap: a worker
  bumps the person's counter (in its own row of the board) after a change commits and before
  it answers; a kept answer is used only while the counters it was read under are unchanged.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from sixnet.core.events import IEventSink, SecurityEvent, event_from_record, event_record
from sixnet.core.metrics import Family
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.core.runtime import ListeningService

log = Logger(namespace="sixnet.irp")

#: Counters per worker on the board (one more: the "anyone may have changed" counter).
SLOTS = 1 << 16
_ANYONE = SLOTS
#: File descriptors of a worker: 0 the feed from the main process, 1 its reports (logs and
#: security events) to it, 3 the feed to it, 4... the listening sockets, in the order of
#: ``listen``.
FEED_IN, REPORTS, FEED_OUT, FIRST_PORT = 0, 1, 3, 4
#: Seconds before a dead worker is spawned again; doubled (up to `RESTART_MAX`) while
#: workers die within `RESTART_SETTLED` seconds of starting (a crash loop).
RESTART_DELAY, RESTART_MAX, RESTART_SETTLED = 0.5, 30.0, 10.0
#: The longest line a worker may write to the main process (a notification or a report).
MAX_REPORT = 1 << 20
#: Seconds a worker has to stop on SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 10.0


class VersionBoard:
    """Per-worker change counters of persons (hashed to `SLOTS`), in a shared file.

    Only worker `index` writes its row, so no counter has two writers; a reader sums the
    rows. Counters only grow, so an unchanged sum means no worker changed the slot.
    """

    def __init__(self, path: Path, workers: int, index: int) -> None:
        self.workers, self.index = workers, index
        self._map = _mapped(path, workers * (SLOTS + 1) * 8)
        self._counters = memoryview(self._map).cast("Q")
        self._rows = [w * (SLOTS + 1) for w in range(workers)]

    @staticmethod
    def slot(person: str) -> int:
        # The same in every worker (unlike hash()); not a defence: a person sharing a slot
        # only makes another's kept answer be read again.
        return zlib.crc32(person.encode()) % SLOTS

    def stamp(self, person: str) -> int:
        """The sum of the counters `person`'s answer depends on."""
        slot, counters = self.slot(person), self._counters
        return sum(counters[row + slot] + counters[row + _ANYONE] for row in self._rows)

    def bump(self, person: str | None) -> None:
        """`person`'s record (None: anyone's) changed here and committed."""
        at = self._rows[self.index] + (_ANYONE if person is None else self.slot(person))
        self._counters[at] += 1

    def close(self) -> None:
        self._counters.release()
        self._map.close()


def shares_path(board: Path) -> Path:
    """The `AcceptShares` file that goes with the `VersionBoard` file `board`."""
    return board.with_suffix(".shares")


def _mapped(path: Path, size: int) -> mmap.mmap:
    """The file at `path`, made `size` bytes long (zeros) if it is not, mapped shared."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class AcceptShares:
    """Each worker's open connections, whether it accepts, and when it last said so, in a
    shared file: a worker stops accepting while a live worker that accepts holds fewer.

    The kernel gives a shared socket's next connection to whichever worker asks first, so
    long-lived connections (sessions that watch) can pile up on one worker while another
    idles. With this, the counts stay within one or two of each other (more only while
    connections arrive faster than `AdoptedPorts.BALANCE_EVERY`). The worker with the
    fewest connections never stops, so someone always accepts; a worker silent for `ALIVE`
    seconds (stopped, dead, not started) is left out.
    """

    #: Seconds after its last report that a worker still counts as alive.
    ALIVE = 1.0
    _CONNECTIONS, _ACCEPTING, _SEEN = range(3)

    def __init__(self, path: Path, workers: int, index: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers, self.index, self.clock = workers, index, clock
        self._map = _mapped(path, workers * 3 * 8)
        self._values = memoryview(self._map).cast("q")

    def report(self, connections: int, accepting: bool) -> None:
        at = self.index * 3
        self._values[at + self._CONNECTIONS] = connections
        self._values[at + self._ACCEPTING] = int(accepting)
        self._values[at + self._SEEN] = int(self.clock() * 1000)

    def may_accept(self, connections: int) -> bool:
        """Whether this worker, holding `connections`, should accept more now."""
        values, oldest = self._values, int((self.clock() - self.ALIVE) * 1000)
        for worker in range(self.workers):
            at = worker * 3
            if worker != self.index and values[at + self._SEEN] > oldest and \
                    values[at + self._ACCEPTING] and values[at + self._CONNECTIONS] < connections:
                return False
        return True

    def close(self) -> None:
        self._values.release()
        self._map.close()


# -- the worker's side ---------------------------------------------------------------------------


class WorkerFeed(LineOnlyReceiver):
    """A worker's end of the change feed: its own notifications go to the main process,
    the other workers' come from it (``CHANNEL SP PAYLOAD`` lines). The main process
    closing the feed means it is gone: the worker stops."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, hear: Callable[[str, str], None], orphaned: Callable[[], None]) -> None:
        self.hear = hear
        self.orphaned = orphaned

    def send(self, channel: str, payload: str) -> None:
        if self.transport is not None:
            self.sendLine(f"{channel} {payload}".encode())

    def lineReceived(self, line: bytes) -> None:
        channel, _, payload = line.decode().partition(" ")
        self.hear(channel, payload)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.orphaned()


@implementer(IEventSink)
class WorkerReports:
    """A worker's end of its reports: log events (`log_observer`) and security events
    (`emit`), one JSON object per line, to the main process."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def log_observer(self, event: dict[str, Any]) -> None:
        self._write({"log": eventAsJSON(event)})

    def emit(self, event: SecurityEvent) -> None:
        self._write({"event": event_record(event)})

    def metrics(self, families: list[Family]) -> None:
        self._write({"metrics": [[f.name, f.kind, f.help, f.samples] for f in families]})

    def _write(self, report: dict[str, Any]) -> None:
        try:
            self.out.write(json.dumps(report).encode() + b"\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # the main process is gone (the feed closing stops this worker)


class AdoptedPorts(Service):
    """A worker's listening ports: the sockets the main process bound, adopted; with
    `shares`, accepting only while this worker's share of the connections allows
    (`AcceptShares`), told of every change by `connections_changed`."""

    #: Seconds between looks at the other workers' shares (and reports of this one's): a
    #: worker that stopped accepting starts again within this once it may.
    BALANCE_EVERY = 0.02

    def __init__(self, fds: list[int], factory: IProtocolFactory,
                 shares: AcceptShares | None = None) -> None:
        self.setName("irp-ports")
        self.fds = fds
        self.factory = factory
        self.shares = shares
        self.ports: list[IListeningPort] = []
        self.connections = 0
        self.accepting = True
        self._balancing: task.LoopingCall | None = None

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        for fd in self.fds:
            family = socket.socket(fileno=os.dup(fd))
            try:
                kind = family.family
            finally:
                family.close()
            self.ports.append(reactor.adoptStreamPort(fd, kind, self.factory))
            os.close(fd)  # adoptStreamPort keeps its own duplicate
        log.info("irp worker adopted {count} listening sockets (pid {pid})",
                 count=len(self.ports), pid=os.getpid())
        if self.shares is not None:
            self._balancing = task.LoopingCall(self._balance)
            self._balancing.start(self.BALANCE_EVERY)

    def connections_changed(self, count: int) -> None:
        self.connections = count
        if self._balancing is not None:
            self._balance()

    def _balance(self) -> None:
        assert self.shares is not None
        accept = self.shares.may_accept(self.connections)
        if accept != self.accepting:
            self.accepting = accept
            for port in self.ports:
                if accept:
                    port.startReading()  # type: ignore[attr-defined]
                else:
                    port.stopReading()  # type: ignore[attr-defined]
        self.shares.report(self.connections, accept)

    def stopService(self) -> defer.Deferred[object]:
        super().stopService()
        if self._balancing is not None:
            self._balancing.stop()
            self._balancing = None
            assert self.shares is not None
            self.shares.report(self.connections, False)  # the others no longer wait for us
            self.shares.close()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


# -- the main process's side ---------------------------------------------------------------------


class _Worker(protocol.ProcessProtocol):
    """One worker as the main process sees it: its feed, and its end."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = 0.0
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial: dict[int, bytes] = {FEED_OUT: b"", REPORTS: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self._partial:
            return
        lines = (self._partial[childFD] + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        if len(self._partial[childFD]) > MAX_REPORT:
            log.warn("irp worker {index} wrote an overlong line on fd {fd}: dropped",
                     index=self.index, fd=childFD)
            self._partial[childFD] = b""
        for line in lines:
            if childFD == FEED_OUT:
                self.supervisor.relay(self, line + b"\n")
            else:
                self.supervisor.reported(self, line)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(MultiService):
    """The main process of a registry with workers: binds the ports, spawns, relays, restarts
    and stops the workers. It opens no database and answers no request itself."""

    def __init__(self, command: Callable[[int], list[str]], listen: list[str], workers: int,
                 board: Path, reactor: Any = None, events: IEventSink | None = None,
                 publisher: Callable[[dict[str, Any]], None] = globalLogPublisher,
                 metrics: MetricsRegistry | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        super().__init__()
        self.setName("irp")
        self.command = command
        self.count = workers
        self.board = board
        self.reactor = reactor
        self.events = events
        self.publisher = publisher
        #: Each worker's latest metrics (as it reported them).
        self.worker_metrics: dict[int, list[Family]] = {}
        if metrics is not None:
            metrics.collect(self.collected_metrics)
        # Bound like any service's ports (before twistd sheds privileges), never read here.
        self.listening = ListeningService("irp", listen, protocol.Factory(), owner=self)
        self.listening.setServiceParent(self)
        self.workers: dict[int, _Worker] = {}
        self.transports: dict[int, Any] = {}
        self.restarts = 0
        self._delays: dict[int, float] = {}
        self._pending: dict[int, Any] = {}
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        for port in self.listening.ports:
            port.stopReading()  # type: ignore[attr-defined]  # the workers accept, not us
        VersionBoard(self.board, self.count, 0).close()  # create it at its size
        shares = shares_path(self.board)
        shares.unlink(missing_ok=True)  # nothing of an earlier run's workers
        AcceptShares(shares, self.count, 0).close()
        for index in range(self.count):
            self.spawn(index)
        self.ready.callback(None)

    def spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        worker = _Worker(self, index)
        fds: dict[int, int | str] = {FEED_IN: "w", REPORTS: "r", 2: 2, FEED_OUT: "r"}
        for i, port in enumerate(self.listening.ports):
            fds[FIRST_PORT + i] = port.fileno()  # type: ignore[attr-defined]
        worker.started = self.reactor.seconds()
        self.workers[index] = worker
        self.transports[index] = self.reactor.spawnProcess(
            worker, sys.executable, self.command(index), env=os.environ.copy(), childFDs=fds)
        log.info("irp worker {index} started (pid {pid})", index=index,
                 pid=self.transports[index].pid)

    def relay(self, source: _Worker, line: bytes) -> None:
        """A worker's notification: to every other worker."""
        for index, transport in self.transports.items():
            if index != source.index and self.workers.get(index) is not None:
                transport.writeToChild(FEED_IN, line)

    def reported(self, source: _Worker, line: bytes) -> None:
        """A worker's log event (logged here, as this process's) or security event (to
        this process's bus)."""
        try:
            report = json.loads(line)
            if "log" in report:
                event = eventFromJSON(report["log"])
                event["irp_worker"] = source.index
                event["log_system"] = f"irp-worker-{source.index}"  # shown in text logs
                self.publisher(event)
            elif "event" in report and self.events is not None:
                self.events.emit(event_from_record(report["event"]))
            elif "metrics" in report:
                self.worker_metrics[source.index] = [
                    Family(str(name), str(kind), str(text),
                           [(tuple((str(n), str(v)) for n, v in labels), float(value))
                            for labels, value in samples])
                    for name, kind, text, samples in report["metrics"]]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warn("irp worker {index} wrote an unreadable report ({error}): dropped",
                     index=source.index, error=e)

    def collected_metrics(self) -> list[Family]:
        """Every worker's latest metrics, each sample labelled with its worker."""
        return [Family(f.name, f.kind, f.help,
                       [((("worker", str(index)), *labels), value)
                        for labels, value in f.samples])
                for index, families in sorted(self.worker_metrics.items()) for f in families]

    def ended(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        if self.workers.get(index) is not worker:
            return
        self.worker_metrics.pop(index, None)
        del self.workers[index]
        del self.transports[index]
        if not self.running:
            return
        lived = self.reactor.seconds() - worker.started
        delay = RESTART_DELAY if lived >= RESTART_SETTLED else \
            min(RESTART_MAX, self._delays.get(index, RESTART_DELAY / 2) * 2)
        self._delays[index] = delay
        self.restarts += 1
        log.warn("irp worker {index} ended ({why}); starting it again in {delay:.1f}s",
                 index=index, why=reason.getErrorMessage(), delay=delay)
        self._pending[index] = self.reactor.callLater(delay, self.spawn, index)

    async def _stop(self) -> None:
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        ending = []
        for index, transport in list(self.transports.items()):
            ending.append(self.workers[index].ended)
            try:
                transport.signalProcess(signal.SIGTERM)
            except OSError:
                continue  # gone already
        if ending:
            killer = self.reactor.callLater(STOP_TIMEOUT, self._kill)
            await defer.DeferredList(ending)
            if killer.active():
                killer.cancel()
        await defer.maybeDeferred(super().stopService)

    def _kill(self) -> None:
        for index, transport in list(self.transports.items()):
            log.warn("irp worker {index} did not stop: killing it", index=index)
            try:
                transport.signalProcess(signal.SIGKILL)
            except OSError:
                pass

    def stopService(self) -> defer.Deferred[None]:
        self.running = False  # no restarts from here on
        return defer.Deferred.fromCoroutine(self._stop())
