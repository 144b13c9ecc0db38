"""Grid accounts straight into the database of a config, many at once (``sixnet grid user
add`` runs once per account, which for a thousand benchmark clients takes minutes).

Run as ``python -m tests.support.accounts CONFIG PASSWORD NAME...`` from the repository root;
`command` is that command line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from twisted.internet import defer, task

from sixnet.app.config import load_config
from sixnet.core.storage.database import Database
from sixnet.grid.storage.accounts import AccountStore


def command(config: Path, password: str, names: Iterable[str]) -> list[str]:
    return [sys.executable, "-m", "tests.support.accounts", str(config), password, *names]


async def add_accounts(config: Path, password: str, names: Iterable[str]) -> None:
    settings = load_config(config)
    db = Database(settings.grid.database, base=settings.sixnet.state_dir)
    try:
        store = AccountStore(db, settings.grid.scram_iterations)
        await store.prepare()
        for name in names:
            await store.add(name, password)
    finally:
        db.close()


def main(reactor: object, config: str, password: str, *names: str) -> defer.Deferred[None]:
    return defer.Deferred.fromCoroutine(add_accounts(Path(config), password, names))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
