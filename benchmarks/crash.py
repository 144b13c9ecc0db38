"""Crash consistency by hand: many more SIGKILLs of a real twistd than the test suite runs.

    .venv/bin/python benchmarks/crash.py [--iterations 100] [--seed N]
        [--backend sqlite|postgresql] [--write-min 0.2] [--write-max 1.5] [--keep DIRECTORY]

Each iteration keeps pubsub publishes, IRP registrations and chat sends going against one
``twistd sixnet`` (each service's database on SQLite, or on PostgreSQL in a schema of its
own: ``SIXNET_TEST_POSTGRES``, as the tests use), kills it with SIGKILL at a random moment,
starts it again on the same state directory and checks that every acknowledged write is
there (tests/support/crash.py). Prints JSON: iterations, acknowledged writes (per kind), lost
writes (must be 0, with examples if not), restart time and total time. Exit status 1 if a
write was lost.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.crash import DATABASE_KEYS, CrashLab
from tests.support.databases import drop_postgres_schema, fresh_postgres_schema
from tests.support.pki import LabPKI


async def main(args: argparse.Namespace, directory: Path) -> int:
    pki = LabPKI.create(directory / "pki")
    schemas: list[str] = []
    databases = None
    if args.backend == "postgresql":
        databases = {}
        for key in DATABASE_KEYS:
            databases[key], schema = fresh_postgres_schema()
            schemas.append(schema)
    try:
        figures = await CrashLab(directory / "lab", pki, databases=databases).run(
            args.iterations, random.Random(args.seed), (args.write_min, args.write_max))
    finally:
        for schema in schemas:
            drop_postgres_schema(schema)
    print(json.dumps({"seed": args.seed, "backend": args.backend, **figures.as_json()},
                     indent=2))
    return 1 if sum(figures.lost.values()) else 0


def run(reactor: Any, args: argparse.Namespace) -> defer.Deferred[None]:
    async def body() -> None:
        if args.keep:
            directory = Path(args.keep)
            directory.mkdir(parents=True)
            status = await main(args, directory)
        else:
            with tempfile.TemporaryDirectory(prefix="sixnet-crash-") as name:
                status = await main(args, Path(name))
        if status:
            raise SystemExit(status)

    return defer.Deferred.fromCoroutine(body())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--write-min", type=float, default=0.2,
                        help="shortest time of writing before a kill (seconds)")
    parser.add_argument("--write-max", type=float, default=1.5,
                        help="longest time of writing before a kill (seconds)")
    parser.add_argument("--keep", metavar="DIRECTORY",
                        help="make the lab in this new directory and leave it there")
    task.react(run, [parser.parse_args()])
