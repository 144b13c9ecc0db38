"""Shared database plumbing: SQLite (embedded default) or PostgreSQL, off the reactor thread.

Every service's store builds on `Database`: blocking DB-API calls run in a thread pool
(`twisted.enterprise.adbapi`), each transaction has a name (it appears in slow-query logs),
SQL is written once with ``?`` placeholders and ``{blob}``/``{serial}`` type names that are
translated per dialect, and a schema is a numbered list of migrations applied in order.

SQLite runs in WAL mode with ``synchronous=FULL``: a transaction whose Deferred has fired is on
disk and survives a crash of the process or the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

log = Logger(namespace="sixnet.storage")

T = TypeVar("T")
#: A transaction slower than this (seconds) is logged with its name.
SLOW_TRANSACTION = 0.5

_TYPES = {
    "sqlite": {"blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
               "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT"},
}


class DatabaseURLError(ValueError):
    """A database setting is neither ``sqlite:PATH`` nor a ``postgresql://`` URL."""


def parse_url(url: str, base: Path) -> tuple[str, str]:
    """Split a database setting into (dialect, target); a relative SQLite path is under base."""
    if url.startswith("sqlite:"):
        raw = url[len("sqlite:"):]
        path = Path(raw)
        if not raw:
            raise DatabaseURLError(f"{url!r}: the SQLite file name is missing")
        return "sqlite", str(path if path.is_absolute() else base / path)
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise DatabaseURLError(f"{url!r} is neither sqlite:PATH nor a postgresql:// URL")


class Cursor:
    """A DB-API cursor that takes ``?`` placeholders in either dialect."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cursor.execute(self._translate(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        self._cursor.executemany(self._translate(sql), [tuple(r) for r in rows])
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def _translate(self, sql: str) -> str:
        if self.dialect == "postgresql":
            sql = sql.replace("%", "%%").replace("?", "%s")
        return sql


def _sqlite_connected(connection: Any) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


class Database:
    """One database, reached through a small thread pool."""

    def __init__(self, url: str, *, base: Path = Path("."), pool_size: int = 4) -> None:
        self.dialect, self.target = parse_url(url, base)
        if self.dialect == "sqlite":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            # One connection: SQLite has one writer, and one connection keeps WAL simple.
            self.pool = adbapi.ConnectionPool(
                "sqlite3", self.target, check_same_thread=False, cp_min=1, cp_max=1,
                cp_openfun=_sqlite_connected, isolation_level="IMMEDIATE",
            )
        else:
            self.pool = adbapi.ConnectionPool(
                "psycopg", self.target, cp_min=1, cp_max=pool_size, cp_reconnect=True,
            )

    def sql(self, text: str) -> str:
        """Fill the ``{blob}``, ``{serial}`` and ``{bigint}`` type names for this dialect."""
        return text.format(**_TYPES[self.dialect])

    def run(self, name: str, interaction: Callable[..., T], *args: Any,
            **kwargs: Any) -> defer.Deferred[T]:
        """Run ``interaction(cursor, *args)`` in one transaction, committed when it returns."""
        dialect = self.dialect

        def body(txn: Any) -> T:
            started = time.monotonic()
            try:
                return interaction(Cursor(txn, dialect), *args, **kwargs)
            finally:
                elapsed = time.monotonic() - started
                if elapsed > SLOW_TRANSACTION:
                    log.warn("slow transaction {name}: {elapsed:.3f}s", name=name,
                             elapsed=elapsed)

        return self.pool.runInteraction(body)

    def migrate(self, component: str,
                migrations: Mapping[int, Sequence[str]]) -> defer.Deferred[int]:
        """Apply the migrations of `component` not yet applied; return the schema version."""

        def apply(cursor: Cursor) -> int:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version "
                           "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            if self.dialect == "postgresql":
                # Two processes starting at once on one PostgreSQL must not both migrate.
                cursor.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")
            row = cursor.execute("SELECT version FROM schema_version WHERE component = ?",
                                 (component,)).fetchone()
            current = row[0] if row else 0
            for version in sorted(v for v in migrations if v > current):
                for statement in migrations[version]:
                    cursor.execute(self.sql(statement))
                current = version
            if row is None:
                cursor.execute("INSERT INTO schema_version VALUES (?, ?)", (component, current))
            else:
                cursor.execute("UPDATE schema_version SET version = ? WHERE component = ?",
                               (current, component))
            return current

        return self.run(f"migrate {component}", apply)

    def close(self) -> None:
        """Close the pool's connections; committed data is already on disk."""
        if self.pool.running:
            self.pool.close()

