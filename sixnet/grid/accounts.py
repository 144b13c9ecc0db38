"""Accounts of the XMPP server, failed-login lockout, and the authentication audit log.

An account is a localpart of the server's domain. A password account stores SCRAM keys for
SHA-1 and SHA-256 (`sixnet.grid.scram.ScramCredentials`), never the password. A certificate
account is recorded the first time a platform logs in with SASL EXTERNAL: it has no keys,
but it exists, so messages to it are stored while it is offline.
"""

from __future__ import annotations

import datetime
import json
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from sixnet.core.storage.database import Cursor, Database
from sixnet.grid.jid import JIDError, normalize_localpart
from sixnet.grid.scram import HASHES, ScramCredentials

log = Logger(namespace="sixnet.grid")

_HASH_COLUMNS = {"SHA-1": "sha1", "SHA-256": "sha256"}

MIGRATIONS = {
    1: [
        "CREATE TABLE grid_accounts ("
        " username TEXT PRIMARY KEY,"
        " kind TEXT NOT NULL,"
        " created TEXT NOT NULL,"
        " sha1_salt {blob}, sha1_iterations INTEGER, sha1_stored {blob}, sha1_server {blob},"
        " sha256_salt {blob}, sha256_iterations INTEGER, sha256_stored {blob},"
        " sha256_server {blob})",
        "CREATE TABLE grid_offline ("
        " id {serial},"
        " username TEXT NOT NULL,"
        " stamp TEXT NOT NULL,"
        " stanza {blob} NOT NULL)",
        "CREATE INDEX grid_offline_user ON grid_offline (username, id)",
    ],
}


class AccountError(Exception):
    """An account operation was refused (exists already, does not exist, bad name)."""


def normalize_username(name: str) -> str:
    """The account name as stored: a JID localpart in comparison form."""
    try:
        return normalize_localpart(name)
    except JIDError as e:
        raise AccountError(str(e)) from None


def prepare_password(password: str) -> str:
    """RFC 8265 OpaqueString, as far as SCRAM clients apply it: non-ASCII spaces become
    ASCII spaces, then NFC."""
    mapped = "".join(" " if unicodedata.category(c) == "Zs" else c for c in password)
    prepared = unicodedata.normalize("NFC", mapped)
    if not prepared or any(unicodedata.category(c) == "Cc" for c in prepared):
        raise AccountError("the password is empty or contains control characters")
    return prepared


@dataclass(frozen=True)
class Account:
    username: str
    kind: str  # "password" or "certificate"
    created: str


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


class AccountStore:
    """Accounts in the grid database (`Database`)."""

    def __init__(self, db: Database, iterations: int) -> None:
        self.db = db
        self.iterations = iterations

    def prepare(self) -> defer.Deferred[int]:
        return self.db.migrate("grid", MIGRATIONS)

    def add(self, username: str, password: str, *, replace: bool = False) -> defer.Deferred[None]:
        """Create a password account (or set a new password when `replace`)."""
        name = normalize_username(username)
        password = prepare_password(password)
        keys = {h: ScramCredentials.derive(h, password, self.iterations) for h in HASHES}

        def txn(cursor: Cursor) -> None:
            row = cursor.execute("SELECT kind FROM grid_accounts WHERE username = ?",
                                 (name,)).fetchone()
            if row is None and replace:
                raise AccountError(f"no account {name!r}")
            if row is not None and not replace:
                raise AccountError(f"account {name!r} exists already")
            values: list[Any] = []
            for h in HASHES:
                k = keys[h]
                values += [k.salt, k.iterations, k.stored_key, k.server_key]
            cursor.execute("DELETE FROM grid_accounts WHERE username = ?", (name,))
            cursor.execute(
                "INSERT INTO grid_accounts VALUES (?, 'password', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, _now(), *values])

        return self.db.run("grid add account", txn)

    def remove(self, username: str) -> defer.Deferred[None]:
        """Delete an account and its stored offline messages."""
        name = normalize_username(username)

        def txn(cursor: Cursor) -> None:
            if cursor.execute("DELETE FROM grid_accounts WHERE username = ?",
                              (name,)).rowcount == 0:
                raise AccountError(f"no account {name!r}")
            cursor.execute("DELETE FROM grid_offline WHERE username = ?", (name,))

        return self.db.run("grid remove account", txn)

    def list(self) -> defer.Deferred[list[Account]]:
        def txn(cursor: Cursor) -> list[Account]:
            rows = cursor.execute("SELECT username, kind, created FROM grid_accounts "
                                  "ORDER BY username").fetchall()
            return [Account(*row) for row in rows]

        return self.db.run("grid list accounts", txn)

    def credentials(self, username: str, hash_name: str
                    ) -> defer.Deferred[ScramCredentials | None]:
        """An account's SCRAM keys for one hash; None if there is no such password account."""
        col = _HASH_COLUMNS[hash_name]

        def txn(cursor: Cursor) -> ScramCredentials | None:
            row = cursor.execute(
                f"SELECT {col}_salt, {col}_iterations, {col}_stored, {col}_server "  # noqa: S608
                "FROM grid_accounts WHERE username = ? AND kind = 'password'",
                (username,)).fetchone()
            if row is None or row[0] is None:
                return None
            return ScramCredentials(bytes(row[0]), int(row[1]), bytes(row[2]), bytes(row[3]))

        return self.db.run("grid credentials", txn)

    def exists(self, username: str) -> defer.Deferred[bool]:
        def txn(cursor: Cursor) -> bool:
            return cursor.execute("SELECT 1 FROM grid_accounts WHERE username = ?",
                                  (username,)).fetchone() is not None

        return self.db.run("grid account exists", txn)

    def record_certificate_login(self, username: str) -> defer.Deferred[None]:
        """A platform logged in by certificate: make sure it has an account row."""

        def txn(cursor: Cursor) -> None:
            if cursor.execute("SELECT 1 FROM grid_accounts WHERE username = ?",
                              (username,)).fetchone() is None:
                cursor.execute("INSERT INTO grid_accounts (username, kind, created) "
                               "VALUES (?, 'certificate', ?)", (username, _now()))

        return self.db.run("grid certificate account", txn)


class LoginGuard:
    """Counts failed logins per account and locks an account for a while after too many.

    Kept in memory: a restart clears the counters (the audit log keeps the history). The table
    is bounded, so guessing random names cannot grow it without limit.
    """

    def __init__(self, max_failures: int, lockout_seconds: float,
                 clock: Any = time.monotonic, size: int = 100_000) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.clock = clock
        self.size = size
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def locked(self, username: str) -> bool:
        count, until = self._failures.get(username, (0, 0.0))
        if until and self.clock() >= until:
            del self._failures[username]
            return False
        return bool(until)

    def failed(self, username: str) -> bool:
        """Count a failure; return True when this failure locks the account."""
        count, until = self._failures.pop(username, (0, 0.0))
        count += 1
        locks = count >= self.max_failures and not until
        if locks:
            until = self.clock() + self.lockout_seconds
        self._failures[username] = (count, until)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)
        return locks

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)


class AuditLog:
    """Authentication events as JSON lines (``grid-audit.jsonl`` under the state directory)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def record(self, event: str, **fields: Any) -> None:
        entry = {"time": _now(), "event": event, **fields}
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")
        self._file.flush()
        log.info("audit {event} {fields}", event=event, fields=fields)

    def close(self) -> None:
        self._file.close()
