"""Shared database plumbing: SQLite (embedded default) or PostgreSQL, off the reactor thread.

Every service's store builds on `Database`: blocking DB-API calls run in a thread pool
(`twisted.enterprise.adbapi`), each transaction has a name (it appears in slow-query logs),
SQL is written once with ``?`` placeholders and ``{blob}``/``{serial}`` type names, and a
schema is a numbered list of migrations applied in order. Every difference between the two
databases lives in its `Engine` object; call sites never test which one they have.

SQLite runs in WAL mode with ``synchronous=FULL``: a transaction whose Deferred has fired is on
disk and survives a crash of the process or the machine.

Notifications: a transaction may call ``cursor.notify(channel, payload)``; once it commits,
every `Database.listen` callback for that channel gets the payload. On PostgreSQL this is
``NOTIFY``/``LISTEN``, so it reaches every process using the database (the listening
connection is watched by the reactor, no polling); on SQLite it reaches the listeners of this
process. A rolled-back transaction notifies nobody. PostgreSQL's channel names are
database-wide, so each channel is scoped to the schema the connection works in (its
``search_path``): two installations, or two test suites, in schemas of one database do not
hear each other.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="sixnet.core.storage.database")

T = TypeVar("T")
#: A transaction slower than this (seconds) is logged with its name.
SLOW_TRANSACTION = 0.5

class Engine:
    """What differs between the two databases, so that call sites never test a dialect."""

    #: The database's name in a setting (``sqlite:``, ``postgresql://``).
    name: str
    #: Several server processes may use this database at once, and a transaction's
    #: notifications reach all of them (PostgreSQL). False: one server process (SQLite),
    #: notifications stay in it.
    shared: bool
    #: The column types named ``{blob}``, ``{serial}`` and ``{bigint}`` in schema SQL.
    types: Mapping[str, str]
    #: A short read may run on the calling thread (`Database.fetch_now`): an embedded
    #: database, where a reader takes no lock a writer holds (SQLite in WAL mode).
    immediate_reads = False

    def connection_pool(self, target: str, pool_size: int) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def translate(self, sql: str) -> str:
        """SQL written with ``?`` placeholders, in this driver's parameter style."""
        return sql

    def notify(self, cursor: Any, channel: str, payload: str) -> bool:
        """Send a notification inside the transaction; False: deliver it here after commit."""
        return False

    def lock_migrations(self, cursor: Any) -> None:
        """Keep a second process from migrating the same schema at the same time."""

    def listener(self, target: str, deliver: Callable[[str, str], None],
                 gap: Callable[[], None]) -> _PostgresListener:
        """The connection that hears other processes' notifications (`shared` engines)."""
        raise NotImplementedError

    def reader(self, target: str) -> Any:
        """A read-only DB-API connection for `Database.fetch_now` (`immediate_reads`)."""
        raise NotImplementedError


class SQLiteEngine(Engine):
    name = "sqlite"
    shared = False
    types = {"blob": "BLOB", "serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER"}
    immediate_reads = True

    def reader(self, target: str) -> Any:
        # Autocommit: each query of `fetch_now` is a read transaction of its own.
        connection = sqlite3.connect(target, isolation_level=None)
        connection.execute("PRAGMA query_only=ON")
        connection.execute("PRAGMA busy_timeout=1000")
        return connection

    def connection_pool(self, target: str, pool_size: int) -> adbapi.ConnectionPool:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer, and one connection keeps WAL simple.
        # (A migration needs no lock: IMMEDIATE transactions already take the write lock.)
        return adbapi.ConnectionPool(
            "sqlite3", target, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_sqlite_connected, isolation_level="IMMEDIATE",
        )


class PostgreSQLEngine(Engine):
    name = "postgresql"
    shared = True
    types = {"blob": "BYTEA", "serial": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT"}

    def connection_pool(self, target: str, pool_size: int) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "psycopg", target, cp_min=1, cp_max=pool_size, cp_reconnect=True,
        )

    def translate(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def notify(self, cursor: Any, channel: str, payload: str) -> bool:
        cursor.execute(f"SELECT pg_notify(%s || {_SCOPE}, %s)", (channel, payload))
        return True

    def lock_migrations(self, cursor: Any) -> None:
        cursor.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")

    def listener(self, target: str, deliver: Callable[[str, str], None],
                 gap: Callable[[], None]) -> _PostgresListener:
        return _PostgresListener(target, deliver, gap)


#: SQL for the suffix that scopes a PostgreSQL channel to the connection's schema: ``_`` and
#: ten hex digits of the schema name's MD5 (channel names are at most 63 bytes).
_SCOPE = "'_' || left(md5(coalesce(current_schema(), '')), 10)"

ENGINES: dict[str, Engine] = {e.name: e for e in (SQLiteEngine(), PostgreSQLEngine())}


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

    def __init__(self, cursor: Any, engine: Engine) -> None:
        self._cursor = cursor
        self.engine = engine
        #: (channel, payload) to deliver to this process's listeners after commit (SQLite).
        self.notifications: list[tuple[str, str]] = []

    def notify(self, channel: str, payload: str) -> None:
        """Send `payload` to the listeners of `channel` when this transaction commits."""
        if not _CHANNEL.fullmatch(channel):
            raise ValueError(f"{channel!r} is not a channel name (a-z 0-9 _, at most 52)")
        if not self.engine.notify(self._cursor, channel, payload):
            self.notifications.append((channel, payload))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        self._cursor.execute(self.engine.translate(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        self._cursor.executemany(self.engine.translate(sql), [tuple(r) for r in rows])
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)


#: A channel's name, short enough for PostgreSQL once scoped (`_SCOPE` adds 11 characters).
_CHANNEL = re.compile(r"[a-z_][a-z0-9_]{0,51}")


def _sqlite_connected(connection: Any) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


class Database:
    """One database, reached through a small thread pool."""

    def __init__(self, url: str, *, base: Path = Path("."), pool_size: int = 4) -> None:
        name, self.target = parse_url(url, base)
        self.engine = ENGINES[name]
        self.closed = False
        self.pool = self.engine.connection_pool(self.target, pool_size)
        self._listeners: dict[str, list[Callable[[str], object]]] = {}
        self._gap_callbacks: list[Callable[[], object]] = []
        self._listener: _PostgresListener | None = None
        #: Also gets every notification delivered here after a commit (SQLite): how a
        #: registry's workers pass their notifications to each other (`hear`).
        self.relay: Callable[[str, str], object] | None = None
        #: The connection of `fetch_now`, made by its first call.
        self._reader: Any = None

    @property
    def immediate_reads(self) -> bool:
        """Whether `fetch_now` may be used (the engine's `Engine.immediate_reads`)."""
        return self.engine.immediate_reads and not self.closed

    def sql(self, text: str) -> str:
        """Fill the ``{blob}``, ``{serial}`` and ``{bigint}`` type names for this dialect."""
        return text.format(**self.engine.types)

    def run(self, name: str, interaction: Callable[..., T], *args: Any,
            **kwargs: Any) -> defer.Deferred[T]:
        """Run ``interaction(cursor, *args)`` in one transaction, committed when it returns."""
        def body(txn: Any) -> tuple[T, list[tuple[str, str]]]:
            started = time.monotonic()
            cursor = Cursor(txn, self.engine)
            try:
                return interaction(cursor, *args, **kwargs), cursor.notifications
            finally:
                elapsed = time.monotonic() - started
                if elapsed > SLOW_TRANSACTION:
                    log.warn("slow transaction {name}: {elapsed:.3f}s", name=name,
                             elapsed=elapsed)

        def committed(outcome: tuple[T, list[tuple[str, str]]]) -> T:
            result, notifications = outcome
            for channel, payload in notifications:
                self._deliver(channel, payload)
                if self.relay is not None:
                    self.relay(channel, payload)
            return result

        return self.pool.runInteraction(body).addCallback(committed)

    def fetch_now(self, name: str, sql: str,
                  params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of the read-only query `sql`, run at once on the calling thread:
        no thread hop and no wait behind the writes queued for the pool, for a row read by
        key. Only where `immediate_reads`; every call must come from the same thread (the
        reactor's). The query is its own read transaction: it sees every transaction
        committed before it began, as a read through `run` would.
        """
        if self._reader is None:
            self._reader = self.engine.reader(self.target)
        started = time.monotonic()
        try:
            return self._reader.execute(self.engine.translate(sql), params).fetchone()
        finally:
            elapsed = time.monotonic() - started
            if elapsed > SLOW_TRANSACTION:
                log.warn("slow read {name}: {elapsed:.3f}s", name=name, elapsed=elapsed)

    # -- notifications ------------------------------------------------------------------------

    def listen(self, channel: str, callback: Callable[[str], object],
               on_gap: Callable[[], object] | None = None) -> defer.Deferred[None]:
        """Call ``callback(payload)`` for every notification on `channel` from now on.

        The Deferred fires once listening has started (on PostgreSQL: ``LISTEN`` is done), so
        a notification committed after it fired is not missed. On PostgreSQL the listening
        connection is made again if it breaks; ``on_gap()`` is then called, because
        notifications sent while it was down are lost.
        """
        if not _CHANNEL.fullmatch(channel):
            raise ValueError(f"{channel!r} is not a channel name (a-z 0-9 _, at most 52)")
        first = channel not in self._listeners
        self._listeners.setdefault(channel, []).append(callback)
        if on_gap is not None:
            self._gap_callbacks.append(on_gap)
        if not self.engine.shared or not first:
            return defer.succeed(None)
        if self._listener is None:
            self._listener = self.engine.listener(self.target, self._deliver, self._gap)
        return self._listener.listen(channel)

    def _gap(self) -> None:
        for callback in list(self._gap_callbacks):
            try:
                callback()
            except Exception:
                log.failure("notification gap handler failed", Failure())

    def unlisten(self, channel: str, callback: Callable[[str], object]) -> None:
        callbacks = self._listeners.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)

    def hear(self, channel: str, payload: str) -> None:
        """A notification another process committed (relayed to this one): deliver it."""
        self._deliver(channel, payload)

    def _deliver(self, channel: str, payload: str) -> None:
        for callback in list(self._listeners.get(channel, ())):
            try:
                callback(payload)
            except Exception:
                log.failure("notification listener for {channel} failed", Failure(),
                            channel=channel)

    def migrate(self, component: str,
                migrations: Mapping[int, Sequence[str]]) -> defer.Deferred[int]:
        """Apply the migrations of `component` not yet applied; return the schema version."""

        def apply(cursor: Cursor) -> int:
            cursor.execute("CREATE TABLE IF NOT EXISTS schema_version "
                           "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            self.engine.lock_migrations(cursor)
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
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._listeners.clear()
        self._gap_callbacks.clear()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if not self.closed:
            # Also before the pool started: close() cancels its pending start, which would
            # otherwise leave a worker thread behind that keeps the process from exiting.
            self.closed = True
            self.pool.close()


class _PostgresListener:
    """One autocommit connection that LISTENs; the reactor reads it when its socket is ready.

    Connecting and ``LISTEN`` are short blocking calls made in a thread; afterwards the
    connection's socket is watched with ``addReader`` and notifications are read without
    blocking (``consume_input``), so a quiet channel costs nothing. When the connection
    breaks (a server restart) it is made again with backoff, every channel is listened to
    again, and ``gap()`` is called: notifications sent meanwhile are lost, so listeners must
    re-read what they care about.
    """

    #: Seconds before the n-th attempt to listen again (Twisted's policy, as ClientService's).
    retry_delay = staticmethod(backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0))

    def __init__(self, target: str, deliver: Callable[[str, str], None],
                 gap: Callable[[], None]) -> None:
        self.target = target
        self._deliver = deliver
        self.gap = gap
        self.channels: list[str] = []
        self.connection: Any = None
        #: The suffix that scopes this schema's channels (read once connected).
        self.scope = ""
        self._reader: _SocketReader | None = None
        self._lock = defer.DeferredLock()
        self._retry: Any = None
        self._attempts = 0
        self._closed = False

    def listen(self, channel: str) -> defer.Deferred[None]:
        self.channels.append(channel)
        return self._lock.run(self._connect_and_listen, [channel])

    def _connect_and_listen(self, channels: list[str]) -> defer.Deferred[None]:
        from twisted.internet import reactor, threads

        def blocking() -> Any:
            import psycopg

            connection = self.connection
            if connection is None:
                connection = psycopg.connect(self.target, autocommit=True, connect_timeout=5)
                # Notifications that arrive while psycopg itself reads (during a later
                # LISTEN) reach this handler; idle ones are read by _SocketReader.
                connection.add_notify_handler(
                    lambda n: reactor.callFromThread(self.deliver, n.channel, n.payload))
                self.scope = connection.execute(f"SELECT {_SCOPE}").fetchone()[0]
            for channel in channels:
                # Names checked by Database.listen; the suffix is hex digits.
                connection.execute(f'LISTEN "{channel}{self.scope}"')
            return connection

        def connected(connection: Any) -> None:
            if self._closed:
                connection.close()
                return
            if self.connection is None:
                self.connection = connection
                self._reader = _SocketReader(connection, self.deliver, self._broken)
            reactor.addReader(self._reader)  # type: ignore[attr-defined]
            self._reader.drain()  # type: ignore[union-attr]

        # While psycopg waits for LISTEN's answer in the thread, the reactor must not read
        # the same socket (it would take the answer, and LISTEN would wait forever).
        def failed(failure: Failure) -> Failure:
            if self.connection is not None and not self._closed:
                self._broken()  # in an unknown state, and no longer read: made again
            return failure

        if self._reader is not None:
            reactor.removeReader(self._reader)  # type: ignore[attr-defined]
        return threads.deferToThread(blocking).addCallbacks(connected, failed)

    def deliver(self, channel: str, payload: str) -> None:
        """A notification heard: passed on under the channel's unscoped name."""
        if self.scope and channel.endswith(self.scope):
            self._deliver(channel[:-len(self.scope)], payload)

    def _broken(self) -> None:
        """The connection failed: drop it and make it again later."""
        self._drop()
        if not self._closed and (self._retry is None or not self._retry.active()):
            from twisted.internet import reactor

            delay = self.retry_delay(self._attempts)
            self._attempts += 1
            log.warn("PostgreSQL notifications: connection lost; reconnecting in {delay:.1f}s",
                     delay=delay)
            self._retry = reactor.callLater(delay, self._reconnect)  # type: ignore[attr-defined]

    def _reconnect(self) -> None:
        def done(_: object) -> None:
            if self._closed or self.connection is None:
                return
            self._attempts = 0
            log.info("PostgreSQL notifications: listening again")
            self.gap()

        def failed(failure: Failure) -> None:
            log.warn("PostgreSQL notifications: reconnect failed: {error}",
                     error=failure.getErrorMessage())
            self._broken()

        d = self._lock.run(self._connect_and_listen, list(self.channels))
        d.addCallbacks(done, failed)

    def _drop(self) -> None:
        from twisted.internet import reactor

        if self._reader is not None:
            reactor.removeReader(self._reader)  # type: ignore[attr-defined]
            self._reader.close()
            self._reader = None
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: S110 - closing a broken connection may fail too
                pass
            self.connection = None

    def close(self) -> None:
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._drop()


class _SocketReader:
    """The reactor's view of a listening PostgreSQL connection (an IReadDescriptor)."""

    def __init__(self, connection: Any, deliver: Callable[[str, str], None],
                 broken: Callable[[], None]) -> None:
        self.connection = connection
        self.deliver = deliver
        self.broken = broken
        # The reactor watches a duplicate of libpq's socket: libpq closes its own when the
        # connection breaks, and the reactor must still be able to unregister it then.
        self._fd = os.dup(int(connection.pgconn.socket))

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def logPrefix(self) -> str:
        return "postgresql-listen"

    def doRead(self) -> None:
        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
        except Exception:
            self.broken()
            return
        self.drain()

    def drain(self) -> None:
        pgconn = self.connection.pgconn
        while (note := pgconn.notifies()) is not None:
            self.deliver(note.relname.decode(), note.extra.decode())

    def connectionLost(self, reason: object) -> None:
        self.broken()

