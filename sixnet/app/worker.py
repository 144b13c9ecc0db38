"""One worker of a registry with ``[irp] workers`` above 1: ``python -m sixnet.app.worker
CONFIG INDEX``, spawned by the main process's `sixnet.irp.workers.WorkerSupervisor` with the
listening sockets and the change feed as inherited file descriptors (not for people to run).

The worker is a root service of its own (the CRL timer, the signal handling, the exit
policy) with the one registry child. Its log events and security events go to the main
process as reports (`sixnet.irp.workers.WorkerReports`, on its standard output), so that
they reach twistd's log and the bridge there; it stops when the main process's end of the
feed closes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import task
from twisted.logger import globalLogBeginner

from sixnet.app.config import load_config
from sixnet.app.root import SixnetService
from sixnet.core.errors import EXIT_USAGE, ConfigError
from sixnet.core.runtime import settle_heap
from sixnet.irp.service import make_service
from sixnet.irp.workers import WorkerReports
from sixnet.pki.store import store_from_config

#: Seconds between a worker's metrics reports (the main process shows the latest).
METRICS_EVERY = 5.0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not (argv[1].isascii() and argv[1].isdigit()):
        print("usage: python -m sixnet.app.worker CONFIG INDEX", file=sys.stderr)
        return EXIT_USAGE
    from twisted.internet import reactor

    try:
        config = load_config(Path(argv[0]))
        store = store_from_config(config)
        root = SixnetService(config, store)
        reports = WorkerReports(sys.stdout.buffer)
        root.events.subscribe(reports.emit)
        reporting = task.LoopingCall(lambda: reports.metrics(root.metrics.families()))
        make_service(config, store, events=root.events, metrics=root.metrics,
                     worker=int(argv[1])).setServiceParent(root)
    except ConfigError as e:
        print(f"sixnet: {e}", file=sys.stderr)
        return EXIT_USAGE
    globalLogBeginner.beginLoggingTo([reports.log_observer], redirectStandardIO=False)
    reactor.callWhenRunning(root.startService)
    reactor.callWhenRunning(settle_heap)
    reactor.callWhenRunning(reporting.start, METRICS_EVERY)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
