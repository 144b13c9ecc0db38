"""Accounts of the XMPP server and their failed logins (the lockout records).

An account is a localpart of the server's domain. A password account stores SCRAM keys for
SHA-1 and SHA-256 (`sixnet.grid.scram.ScramCredentials`), never the password. A certificate
account is recorded the first time a platform logs in with SASL EXTERNAL: it has no keys,
but it exists, so messages to it are stored while it is offline.
"""

from __future__ import annotations

import os
import time
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from sixnet.core.lockout import Failures, LockoutPolicy, LockoutTable, source_of
from sixnet.core.storage.database import Cursor, Database
from sixnet.core.timefmt import rfc3339
from sixnet.grid.jid import JIDError, normalize_localpart
from sixnet.grid.scram import HASHES, ScramCredentials
from sixnet.grid.storage.schema import prepare_grid

_HASH_COLUMNS = {"SHA-1": "sha1", "SHA-256": "sha256"}
#: Names per ``IN (...)`` query (SQLite allows 999 parameters in old versions).
_NAMES_PER_QUERY = 500
#: What `AccountStore.add_many` does with a name that has an account already.
EXISTING = ("error", "skip", "update")


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


Keys = dict[str, ScramCredentials]


def derive_keys(password: str, iterations: int) -> Keys:
    """The SCRAM keys of every hash for one prepared password."""
    return {h: ScramCredentials.derive(h, password, iterations) for h in HASHES}


def derive_many(passwords: Sequence[str], iterations: int,
                workers: int | None = None) -> list[Keys]:
    """`derive_keys` for many passwords, in order, on a thread per CPU: PBKDF2 is all the
    cost, and ``hashlib.pbkdf2_hmac`` releases the GIL while it runs."""
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(passwords) < 2:
        return [derive_keys(p, iterations) for p in passwords]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: derive_keys(p, iterations), passwords))


def _key_columns(keys: Keys) -> list[Any]:
    values: list[Any] = []
    for h in HASHES:
        k = keys[h]
        values += [k.salt, k.iterations, k.stored_key, k.server_key]
    return values


def _existing(cursor: Cursor, names: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(names), _NAMES_PER_QUERY):
        chunk = list(names[start:start + _NAMES_PER_QUERY])
        marks = ", ".join("?" * len(chunk))
        found.update(row[0] for row in cursor.execute(
            f"SELECT username FROM grid_accounts WHERE username IN ({marks})",  # noqa: S608
            chunk).fetchall())
    return found


@dataclass
class BulkResult:
    """What `AccountStore.add_many` did, by name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _now() -> str:
    return rfc3339(precision="seconds")


class AccountStore:
    """Accounts in the grid database (`Database`)."""

    def __init__(self, db: Database, iterations: int) -> None:
        self.db = db
        self.iterations = iterations

    def prepare(self) -> defer.Deferred[int]:
        return prepare_grid(self.db)

    def add(self, username: str, password: str, *, replace: bool = False) -> defer.Deferred[None]:
        """Create a password account (or set a new password when `replace`)."""
        name = normalize_username(username)
        keys = derive_keys(prepare_password(password), self.iterations)

        def txn(cursor: Cursor) -> None:
            row = cursor.execute("SELECT kind FROM grid_accounts WHERE username = ?",
                                 (name,)).fetchone()
            if row is None and replace:
                raise AccountError(f"no account {name!r}")
            if row is not None and not replace:
                raise AccountError(f"account {name!r} exists already")
            cursor.execute("DELETE FROM grid_accounts WHERE username = ?", (name,))
            cursor.execute(
                "INSERT INTO grid_accounts VALUES (?, 'password', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, _now(), *_key_columns(keys)])

        return self.db.run("grid add account", txn)

    def existing(self, names: Sequence[str]) -> defer.Deferred[set[str]]:
        """Which of `names` (normalised) have an account, password or certificate."""
        return self.db.run("grid accounts existing", _existing, names)

    def add_many(self, accounts: Sequence[tuple[str, Keys]],
                 existing: str = "error") -> defer.Deferred[BulkResult]:
        """Create many password accounts (normalised names, derived keys) in one transaction.

        A name with an account already: `existing` "error" (AccountError naming every such
        name; nothing is created), "skip" (left as it is) or "update" (its password is set,
        and a certificate account becomes a password account).
        """
        if existing not in EXISTING:
            raise ValueError(f"existing must be one of {EXISTING}")

        def txn(cursor: Cursor) -> BulkResult:
            found = _existing(cursor, [name for name, _ in accounts])
            if found and existing == "error":
                raise AccountError(f"{len(found)} account(s) exist already: "
                                   f"{', '.join(sorted(found))}")
            result = BulkResult()
            now = _now()
            rows = []
            for name, keys in accounts:
                if name in found:
                    if existing == "skip":
                        result.skipped.append(name)
                        continue
                    result.updated.append(name)
                else:
                    result.created.append(name)
                rows.append([name, now, *_key_columns(keys)])
            if result.updated:
                cursor.executemany("DELETE FROM grid_accounts WHERE username = ?",
                                   [(name,) for name in result.updated])
            if rows:
                cursor.executemany(
                    "INSERT INTO grid_accounts VALUES (?, 'password', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows)
            return result

        return self.db.run("grid add accounts", txn)

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


class LockoutStore:
    """Failed logins per account name and source network (``grid_lockout``), judged by a
    `LockoutPolicy`: a lock refuses that account to that network only.

    Kept for any name asked for, account or not, so that a lockout does not tell which
    accounts exist; the oldest records beyond `size` are dropped, so guessing random names
    cannot grow the table without limit. A record survives a restart and is shared by every
    server on the same database.
    """

    def __init__(self, db: Database, policy: LockoutPolicy,
                 clock: Callable[[], float] = time.time, size: int = 100_000) -> None:
        self.db = db
        self.policy = policy
        self.clock = clock
        self.table = LockoutTable("grid_lockout", "username", size)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def failures(self, username: str, address: str) -> defer.Deferred[Failures]:
        return self.db.run("grid lockout read", self.table.read, username, source_of(address))

    def locked(self, failures: Failures) -> bool:
        return self.policy.locked(failures, self.now_ms())

    def reserve(self, username: str, address: str,
                lock: bool = True) -> defer.Deferred[tuple[Failures, bool]]:
        """Count a login attempt as a failure before its password is checked, unless the record
        is locked (or, without `lock`, would be): the record and whether it was counted
        (`LockoutTable.reserve`)."""
        return self.db.run("grid lockout reserve", self.table.reserve, username,
                           source_of(address), self.policy, self.now_ms(), lock)

    def succeeded(self, username: str, address: str) -> defer.Deferred[None]:
        """A success clears the count of its own source only."""
        return self.db.run("grid lockout clear", self.table.clear, username,
                           source_of(address))
