"""Where the registry keeps persons, accounts, certificates, addresses and backups.

`IRegistryStore` is the seam; `SQLRegistryStore` implements it on `Database`,
so the same code serves SQLite (the embedded default) and PostgreSQL (several registry
processes on one database). Every method returns a Deferred that fires after the
transaction committed: the registry answers a client only then, so an acknowledged
registration survives a crash. Every change to a person's record notifies the channel
``irp_change`` with ``{"person": ..., "kind": ..., "origin": ..., "change": ...}`` (kind
``record``, ``certificate``, ``revoked`` or ``removed``; origin and change number say which
store made it), which reaches the other processes on PostgreSQL.
Times are integer milliseconds since the epoch.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer
from zope.interface import Interface, implementer

from sixnet.core.lockout import Failures, LockoutPolicy, LockoutTable
from sixnet.core.storage.batch import GroupCommit
from sixnet.core.storage.database import Cursor, Database

CHANGE_CHANNEL = "irp_change"

T = TypeVar("T")

MIGRATIONS = {
    1: [
        "CREATE TABLE irp_person (id TEXT PRIMARY KEY, created {bigint} NOT NULL)",
        "CREATE TABLE irp_account (person TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " failures INTEGER NOT NULL DEFAULT 0, locked_until {bigint} NOT NULL DEFAULT 0,"
        " created {bigint} NOT NULL)",
        "CREATE TABLE irp_invite (code_hash TEXT PRIMARY KEY, person TEXT NOT NULL,"
        " created {bigint} NOT NULL, expires {bigint} NOT NULL, used {bigint})",
        "CREATE TABLE irp_certificate (serial TEXT PRIMARY KEY, person TEXT NOT NULL,"
        " issued {bigint} NOT NULL, not_after {bigint} NOT NULL, chain {blob} NOT NULL,"
        " revoked {bigint})",
        "CREATE INDEX irp_certificate_person ON irp_certificate (person, issued)",
        "CREATE TABLE irp_device (seq {serial}, person TEXT NOT NULL, device TEXT NOT NULL,"
        " registered {bigint} NOT NULL, expires {bigint} NOT NULL, addresses TEXT NOT NULL)",
        "CREATE UNIQUE INDEX irp_device_person ON irp_device (person, device)",
        "CREATE INDEX irp_device_expires ON irp_device (expires)",
        "CREATE TABLE irp_backup (person TEXT PRIMARY KEY, data {blob} NOT NULL,"
        " updated {bigint} NOT NULL)",
    ],
    2: [
        # Failed logins per user id *and source network* (sixnet/core/lockout.py), for any
        # user id tried, account or not: a stranger cannot lock the owner out, and a lockout
        # does not tell which accounts exist. The old per-account counters are dropped.
        "CREATE TABLE irp_lockout (person TEXT NOT NULL, source TEXT NOT NULL,"
        " failures INTEGER NOT NULL, locked_until {bigint} NOT NULL,"
        " updated {bigint} NOT NULL, PRIMARY KEY (person, source))",
        "CREATE INDEX irp_lockout_updated ON irp_lockout (updated)",
        "ALTER TABLE irp_account DROP COLUMN failures",
        "ALTER TABLE irp_account DROP COLUMN locked_until",
    ],
    3: [
        # The record's version (docs/irp.rst, "Signed records"): raised by every change, to
        # the change's time in ms or one more than before, whichever is larger.
        "ALTER TABLE irp_person ADD COLUMN version {bigint} NOT NULL DEFAULT 0",
    ],
    4: [
        # Each person's signed record (docs/irp.rst, "Signed records") as signed last, for
        # every worker and after a restart: good while the person's version, the CRLs it was
        # signed under (`CertificateStore.revocations`) and its re-signing time still hold.
        "CREATE TABLE irp_record (person TEXT PRIMARY KEY, version {bigint} NOT NULL,"
        " crls TEXT NOT NULL, changes_at {bigint} NOT NULL, resign_at {bigint} NOT NULL,"
        " statement {blob} NOT NULL)",
    ],
}

#: Lockout records kept; the oldest beyond it are dropped, so guessing random user ids
#: cannot fill the database.
LOCKOUT_RECORDS = 100_000


class TooManyDevices(Exception):
    """A registration would give a person more devices than allowed."""


@dataclass(frozen=True)
class Account:
    person: str
    password_hash: str


@dataclass(frozen=True)
class CertificateRow:
    serial: str
    person: str
    issued: int
    not_after: int
    chain_pem: bytes
    revoked: int | None


@dataclass(frozen=True)
class DeviceRow:
    device: str
    registered: int
    expires: int
    addresses: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class StoredRecord:
    """A person's signed record as kept in the database (`SQLRegistryStore.keep_record`)."""

    statement: bytes  # the signed <record> and its <signature>
    changes_at: int  # ms: the record's first expiry (`Answer.changes_at`)
    resign_at: int  # ms: from then on it is signed again


@dataclass(frozen=True)
class PersonView:
    """Everything a lookup needs, read in one transaction: the person's stored signed
    record when it is still good, else the rows to make the record from."""

    person: str
    exists: bool
    devices: tuple[DeviceRow, ...]  # most recently registered first, unexpired only
    certificates: tuple[CertificateRow, ...]  # newest first
    #: Raised by every change of the record (`_OwnChanges.notify`); for a person who does
    #: not exist (removed), the time of the read, above any version the record had.
    version: int = 0
    record: StoredRecord | None = None


@dataclass(frozen=True)
class PersonSummary:
    person: str
    created: int
    certificates: int
    has_password: bool


class IRegistryStore(Interface):
    """The registry's persistent state; every method returns a Deferred fired after commit."""

    def open() -> defer.Deferred[None]:
        """Create or upgrade the schema and start hearing change notifications."""

    def close() -> None:
        """Release connections; committed data is already durable."""

    def on_change(callback: Callable[[str | None, str, bool], object]) -> None:
        """Call ``callback(person, kind, seen)`` whenever a person's record changed (any
        process); ``callback(None, "gap", False)`` when changes may have been missed.

        `seen` is true for a change made through this store whose write had returned (so
        its caller acted on it) before the notification came: on a shared database a
        process hears its own changes again, some time after they committed."""

    def ensure_person(person: str, now: int) -> defer.Deferred[None]: ...

    def person_view(person: str, now: int, crls: str = "") -> defer.Deferred[PersonView]:
        """The person's view; with the stored signed record instead of the rows when one is
        good at `now` under the CRLs `crls` (`CertificateStore.revocations`)."""

    def stored_view(person: str, now: int, crls: str) -> PersonView | None:
        """The person's view with their stored signed record, read at once on the calling
        thread (no Deferred), when one is good as `person_view` judges it; None when there
        is none, or when this database is only read through its thread pool (then use
        `person_view`)."""

    def keep_record(person: str, version: int, crls: str,
                    record: StoredRecord) -> defer.Deferred[None]:
        """Store the person's signed record of `version`, unless a later one is stored."""

    def get_account(person: str) -> defer.Deferred[Account | None]: ...

    def set_password(person: str, password_hash: str, now: int) -> defer.Deferred[None]: ...

    def reserve_attempt(person: str, source: str, policy: LockoutPolicy, now: int,
                        lock: bool = True) -> defer.Deferred[tuple[Failures, bool]]:
        """Count a password attempt for `person` from `source` as a failure before it is
        checked, as `policy` says, unless the record is locked (or, without `lock`, would be)
        (whether or not there is such an account), in one transaction: the record and
        whether the attempt was counted. A right password takes the count back with
        `clear_failures`."""

    def clear_failures(person: str, source: str) -> defer.Deferred[None]:
        """Forget the failures from `source` only (a success there)."""

    def add_invite(code_hash: str, person: str, now: int,
                   expires: int) -> defer.Deferred[None]: ...

    def consume_invite(code_hash: str, person: str, now: int) -> defer.Deferred[bool]:
        """Mark an unused, unexpired code for `person` used; True if this call did so."""

    def add_certificate(row: CertificateRow) -> defer.Deferred[None]: ...

    def certificate(serial: str) -> defer.Deferred[CertificateRow | None]: ...

    def mark_revoked(serial: str, now: int) -> defer.Deferred[bool]: ...

    def register(person: str, device: str, addresses: tuple[tuple[str, int], ...], now: int,
                 expires: int, max_devices: int) -> defer.Deferred[PersonView]:
        """Replace one device's addresses; the person's record after the change (committed).
        Fails with TooManyDevices (and changes nothing) beyond `max_devices`."""

    def unregister(person: str, device: str | None) -> defer.Deferred[int]: ...

    def put_backup(person: str, data: bytes, now: int) -> defer.Deferred[None]: ...

    def get_backup(person: str) -> defer.Deferred[bytes | None]: ...

    def list_persons(after: str | None, limit: int) -> defer.Deferred[list[PersonSummary]]: ...

    def remove_person(person: str) -> defer.Deferred[bool]: ...

    def purge_expired(now: int) -> defer.Deferred[int]: ...


class _OwnChanges:
    """Tells which of a store's own change notifications come after its write returned.

    Each notification carries the store's origin and a number. A number is noted when its
    write returns, and when its notification arrives first (on SQLite always: it is
    delivered as the transaction commits); whichever comes second finds the other's note.
    Both notes are bounded: a note lost to the bound only makes a change count as unseen.
    """

    LIMIT = 10_000

    def __init__(self) -> None:
        self.origin = secrets.token_hex(8)
        self._numbers = itertools.count(1)
        self._returned: set[int] = set()
        self._heard: set[int] = set()

    def notify(self, cursor: Cursor, numbers: list[int], person: str,
               kind: str = "record") -> None:
        """Notify a change inside the write's transaction; its number goes to `numbers`."""
        number = next(self._numbers)
        numbers.append(number)
        now = int(time.time() * 1000)
        cursor.execute("UPDATE irp_person SET version = CASE WHEN version + 1 > ? THEN"
                       " version + 1 ELSE ? END WHERE id = ?", (now, now, person))
        cursor.notify(CHANGE_CHANNEL, json.dumps({"person": person, "kind": kind,
                                                  "origin": self.origin, "change": number}))

    def returned(self, result: T, numbers: list[int]) -> T:
        """The write that made the changes `numbers` returned (a Deferred callback)."""
        for number in numbers:
            if number in self._heard:
                self._heard.discard(number)
            else:
                _bounded(self._returned).add(number)
        return result

    def seen(self, change: dict[str, Any]) -> bool:
        """Whether a notification is of this store's change, heard after its write returned."""
        number = change.get("change")
        if change.get("origin") != self.origin or not isinstance(number, int):
            return False
        if number in self._returned:
            self._returned.discard(number)
            return True
        _bounded(self._heard).add(number)
        return False


def _bounded(notes: set[int]) -> set[int]:
    if len(notes) >= _OwnChanges.LIMIT:
        notes.clear()
    return notes


@implementer(IRegistryStore)
class SQLRegistryStore:
    """The registry on SQLite or PostgreSQL, through `Database`."""

    def __init__(self, db: Database, lockout_records: int = LOCKOUT_RECORDS) -> None:
        self.db = db
        self.lockout = LockoutTable("irp_lockout", "person", lockout_records)
        self._own = _OwnChanges()
        self._callbacks: list[Callable[[str | None, str, bool], object]] = []
        self._reads = GroupCommit(db, "irp read batch", _person_views)
        self._writes = GroupCommit(db, "irp write batch", _each)
        #: Signed records are kept in their own batches: a failure there fails no change.
        self._records = GroupCommit(db, "irp record batch", _keep_records)

    # -- lifetime -----------------------------------------------------------------------------

    async def _open(self) -> None:
        await self.db.migrate("irp", MIGRATIONS)
        await self.db.listen(CHANGE_CHANNEL, self._heard, self._gap)

    def open(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._open())

    def close(self) -> None:
        self.db.close()

    def on_change(self, callback: Callable[[str | None, str, bool], object]) -> None:
        self._callbacks.append(callback)

    def _gap(self) -> None:
        """Notifications may have been lost (the database connection broke): anything may
        have changed."""
        for callback in list(self._callbacks):
            callback(None, "gap", False)

    def _heard(self, payload: str) -> None:
        try:
            change = json.loads(payload)
            person, kind = str(change["person"]), str(change["kind"])
        except (ValueError, KeyError, TypeError):
            return  # not ours: someone else notified on the channel
        seen = self._own.seen(change)
        for callback in list(self._callbacks):
            callback(person, kind, seen)

    # -- persons and lookups --------------------------------------------------------------------

    def ensure_person(self, person: str, now: int) -> defer.Deferred[None]:
        return self.db.run("irp ensure person", _ensure_person, person, now)

    def person_view(self, person: str, now: int, crls: str = "") -> defer.Deferred[PersonView]:
        return self._reads.submit(person, now, crls)

    def stored_view(self, person: str, now: int, crls: str) -> PersonView | None:
        if not crls or not self.db.immediate_reads:
            return None
        row = self.db.fetch_now("irp stored record", _STORED_RECORD, (person, crls, now))
        if row is None:
            return None
        return _stored_view(person, row[0], StoredRecord(bytes(row[3]), row[1], row[2]))

    def keep_record(self, person: str, version: int, crls: str,
                    record: StoredRecord) -> defer.Deferred[None]:
        return self._records.submit(person, version, crls, record)

    def list_persons(self, after: str | None, limit: int) -> defer.Deferred[list[PersonSummary]]:
        def read(cursor: Cursor) -> list[PersonSummary]:
            rows = cursor.execute(
                "SELECT p.id, p.created,"
                " (SELECT count(*) FROM irp_certificate c WHERE c.person = p.id),"
                " (SELECT count(*) FROM irp_account a WHERE a.person = p.id)"
                " FROM irp_person p WHERE p.id > ? ORDER BY p.id LIMIT ?",
                (after or "", limit)).fetchall()
            return [PersonSummary(r[0], r[1], r[2], bool(r[3])) for r in rows]

        return self.db.run("irp list persons", read)

    def remove_person(self, person: str) -> defer.Deferred[bool]:
        changes: list[int] = []

        def remove(cursor: Cursor) -> bool:
            found = cursor.execute("DELETE FROM irp_person WHERE id = ?",
                                   (person,)).rowcount > 0
            for table, column in (("irp_account", "person"), ("irp_device", "person"),
                                  ("irp_backup", "person"), ("irp_invite", "person"),
                                  ("irp_record", "person")):
                cursor.execute(f"DELETE FROM {table} WHERE {column} = ?", (person,))  # noqa: S608
            if found:
                self._own.notify(cursor, changes, person, "removed")
            return found

        return self.db.run("irp remove person", remove).addCallback(self._own.returned, changes)

    # -- accounts and invitations ----------------------------------------------------------------

    def get_account(self, person: str) -> defer.Deferred[Account | None]:
        return self.db.run("irp get account", _get_account, person)

    def set_password(self, person: str, password_hash: str, now: int) -> defer.Deferred[None]:
        def write(cursor: Cursor) -> None:
            _ensure_person(cursor, person, now)
            cursor.execute("DELETE FROM irp_lockout WHERE person = ?", (person,))
            if cursor.execute("UPDATE irp_account SET password_hash = ? WHERE person = ?",
                              (password_hash, person)).rowcount == 0:
                cursor.execute("INSERT INTO irp_account (person, password_hash, created)"
                               " VALUES (?, ?, ?)", (person, password_hash, now))

        return self.db.run("irp set password", write)

    def reserve_attempt(self, person: str, source: str, policy: LockoutPolicy, now: int,
                        lock: bool = True) -> defer.Deferred[tuple[Failures, bool]]:
        return self.db.run("irp reserve attempt", self.lockout.reserve, person, source,
                           policy, now, lock)

    def clear_failures(self, person: str, source: str) -> defer.Deferred[None]:
        return self.db.run("irp clear failures", self.lockout.clear, person, source)

    def add_invite(self, code_hash: str, person: str, now: int,
                   expires: int) -> defer.Deferred[None]:
        def write(cursor: Cursor) -> None:
            _ensure_person(cursor, person, now)
            cursor.execute("INSERT INTO irp_invite (code_hash, person, created, expires)"
                           " VALUES (?, ?, ?, ?)", (code_hash, person, now, expires))

        return self.db.run("irp add invite", write)

    def consume_invite(self, code_hash: str, person: str, now: int) -> defer.Deferred[bool]:
        return self.db.run("irp consume invite", lambda c: c.execute(
            "UPDATE irp_invite SET used = ? WHERE code_hash = ? AND person = ?"
            " AND used IS NULL AND expires > ?", (now, code_hash, person, now)).rowcount == 1)

    # -- certificates ---------------------------------------------------------------------------

    def add_certificate(self, row: CertificateRow) -> defer.Deferred[None]:
        changes: list[int] = []

        def write(cursor: Cursor) -> None:
            _ensure_person(cursor, row.person, row.issued)
            cursor.execute(
                "INSERT INTO irp_certificate (serial, person, issued, not_after, chain, revoked)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING",
                (row.serial, row.person, row.issued, row.not_after, row.chain_pem, row.revoked))
            self._own.notify(cursor, changes, row.person, "certificate")

        return self.db.run("irp add certificate", write).addCallback(self._own.returned, changes)

    def certificate(self, serial: str) -> defer.Deferred[CertificateRow | None]:
        def read(cursor: Cursor) -> CertificateRow | None:
            row = cursor.execute(
                "SELECT serial, person, issued, not_after, chain, revoked FROM irp_certificate"
                " WHERE serial = ?", (serial,)).fetchone()
            return _certificate(row) if row else None

        return self.db.run("irp certificate", read)

    def mark_revoked(self, serial: str, now: int) -> defer.Deferred[bool]:
        changes: list[int] = []

        def write(cursor: Cursor) -> bool:
            row = cursor.execute("SELECT person FROM irp_certificate WHERE serial = ?"
                                 " AND revoked IS NULL", (serial,)).fetchone()
            if row is None:
                return False
            cursor.execute("UPDATE irp_certificate SET revoked = ? WHERE serial = ?",
                           (now, serial))
            self._own.notify(cursor, changes, row[0], "revoked")
            return True

        return self.db.run("irp mark revoked", write).addCallback(self._own.returned, changes)

    # -- addresses --------------------------------------------------------------------------------

    def register(self, person: str, device: str, addresses: tuple[tuple[str, int], ...],
                 now: int, expires: int, max_devices: int) -> defer.Deferred[PersonView]:
        packed = json.dumps([[ip, port] for ip, port in addresses], separators=(",", ":"))
        changes: list[int] = []

        def write(cursor: Cursor) -> PersonView | TooManyDevices:
            count = cursor.execute("SELECT count(*) FROM irp_device WHERE person = ?"
                                   " AND device <> ? AND expires > ?",
                                   (person, device, now)).fetchone()
            if count is not None and count[0] >= max_devices:
                return TooManyDevices(f"{person} has {count[0]} devices registered already")
            _ensure_person(cursor, person, now)
            # An upsert, so that two registry processes registering the same device at once
            # cannot fail each other's batch on the unique index.
            cursor.execute("INSERT INTO irp_device (person, device, registered, expires,"
                           " addresses) VALUES (?, ?, ?, ?, ?) ON CONFLICT (person, device)"
                           " DO UPDATE SET registered = excluded.registered,"
                           " expires = excluded.expires, addresses = excluded.addresses",
                           (person, device, now, expires, packed))
            self._own.notify(cursor, changes, person)
            return _person_view(cursor, person, now)

        def outcome(result: PersonView | TooManyDevices) -> PersonView:
            if isinstance(result, TooManyDevices):
                raise result
            return result

        return self._writes.submit(write).addCallback(self._own.returned, changes) \
            .addCallback(outcome)

    def unregister(self, person: str, device: str | None) -> defer.Deferred[int]:
        changes: list[int] = []

        def write(cursor: Cursor) -> int:
            if device is None:
                count = cursor.execute("DELETE FROM irp_device WHERE person = ?",
                                       (person,)).rowcount
            else:
                count = cursor.execute("DELETE FROM irp_device WHERE person = ? AND device = ?",
                                       (person, device)).rowcount
            if count:
                self._own.notify(cursor, changes, person)
            return count

        return self.db.run("irp unregister", write).addCallback(self._own.returned, changes)

    def purge_expired(self, now: int) -> defer.Deferred[int]:
        def purge(cursor: Cursor) -> int:
            cursor.execute("DELETE FROM irp_record WHERE resign_at <= ?", (now,))
            return cursor.execute("DELETE FROM irp_device WHERE expires <= ?", (now,)).rowcount

        return self.db.run("irp purge expired", purge)

    # -- backups --------------------------------------------------------------------------------

    def put_backup(self, person: str, data: bytes, now: int) -> defer.Deferred[None]:
        def write(cursor: Cursor) -> None:
            if cursor.execute("UPDATE irp_backup SET data = ?, updated = ? WHERE person = ?",
                              (data, now, person)).rowcount == 0:
                cursor.execute("INSERT INTO irp_backup (person, data, updated) VALUES (?, ?, ?)",
                               (person, data, now))

        return self.db.run("irp put backup", write)

    def get_backup(self, person: str) -> defer.Deferred[bytes | None]:
        def read(cursor: Cursor) -> bytes | None:
            row = cursor.execute("SELECT data FROM irp_backup WHERE person = ?",
                                 (person,)).fetchone()
            return bytes(row[0]) if row else None

        return self.db.run("irp get backup", read)


def _ensure_person(cursor: Cursor, person: str, now: int) -> None:
    cursor.execute("INSERT INTO irp_person (id, created) VALUES (?, ?)"
                   " ON CONFLICT (id) DO NOTHING", (person, now))


def _each(cursor: Cursor, items: list[tuple[Any, ...]]) -> list[Any]:
    """A write batch: each item is ``(work, *args)``, run as ``work(cursor, *args)``."""
    return [work(cursor, *args) for work, *args in items]


def _keep_records(cursor: Cursor, items: list[tuple[Any, ...]]) -> list[None]:
    """A batch of ``(person, version, crls, StoredRecord)``: each replaces the stored record
    of an earlier (or the same) version."""
    for person, version, crls, record in items:
        cursor.execute(
            "INSERT INTO irp_record (person, version, crls, changes_at, resign_at, statement)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (person) DO UPDATE SET"
            " version = excluded.version, crls = excluded.crls,"
            " changes_at = excluded.changes_at, resign_at = excluded.resign_at,"
            " statement = excluded.statement WHERE irp_record.version <= excluded.version",
            (person, version, crls, record.changes_at, record.resign_at, record.statement))
    return [None] * len(items)


def _person_views(cursor: Cursor, items: list[tuple[Any, ...]]) -> list[PersonView]:
    """A read batch: the views of the ``(person, now, crls)`` items. The persons' good
    stored records first (one query), then, for the others, three queries in all."""
    latest = max(now for _, now, _ in items)
    stored: dict[str, tuple[int, StoredRecord]] = {}
    for crls in {crls for _, _, crls in items if crls}:
        wanted = sorted({person for person, _, c in items if c == crls})
        marks = ",".join("?" * len(wanted))  # placeholders only: the ids are parameters
        for row in cursor.execute(
                "SELECT r.person, r.version, r.changes_at, r.resign_at, r.statement"  # noqa: S608
                " FROM irp_record r JOIN irp_person p ON p.id = r.person AND"
                f" p.version = r.version WHERE r.person IN ({marks}) AND r.crls = ?"
                " AND r.resign_at > ?", (*wanted, crls, latest)).fetchall():
            stored[row[0]] = (row[1], StoredRecord(bytes(row[4]), row[2], row[3]))
    persons = sorted({person for person, _, _ in items} - set(stored))
    if not persons:
        return [_stored_view(person, *stored[person]) for person, _, _ in items]
    marks = ",".join("?" * len(persons))
    versions = {row[0]: row[1] for row in cursor.execute(
        f"SELECT id, version FROM irp_person WHERE id IN ({marks})",  # noqa: S608
        persons).fetchall()}
    devices: dict[str, list[Any]] = {}
    for row in cursor.execute(
            f"SELECT person, device, registered, expires, addresses FROM irp_device"  # noqa: S608
            f" WHERE person IN ({marks}) AND expires > ?"
            " ORDER BY person, registered DESC, seq DESC",
            (*persons, min(now for _, now, _ in items))).fetchall():
        devices.setdefault(row[0], []).append(row[1:])
    certificates: dict[str, list[CertificateRow]] = {}
    for row in cursor.execute(
            f"SELECT serial, person, issued, not_after, chain, revoked FROM irp_certificate"  # noqa: S608
            f" WHERE person IN ({marks}) ORDER BY person, issued DESC, serial",
            persons).fetchall():
        certificates.setdefault(row[1], []).append(_certificate(row))
    return [_stored_view(person, *stored[person]) if person in stored else
            PersonView(person, person in versions,
                       tuple(_device(r) for r in devices.get(person, ()) if r[2] > now),
                       tuple(certificates.get(person, ())), versions.get(person, now))
            for person, now, _ in items]


#: A person's good stored record (as `_person_views` finds them) by person, CRLs and time.
_STORED_RECORD = (
    "SELECT r.version, r.changes_at, r.resign_at, r.statement FROM irp_record r"
    " JOIN irp_person p ON p.id = r.person AND p.version = r.version"
    " WHERE r.person = ? AND r.crls = ? AND r.resign_at > ?")


def _stored_view(person: str, version: int, record: StoredRecord) -> PersonView:
    return PersonView(person, True, (), (), version, record)


def _person_view(cursor: Cursor, person: str, now: int) -> PersonView:
    row = cursor.execute("SELECT version FROM irp_person WHERE id = ?", (person,)).fetchone()
    devices = cursor.execute(
        "SELECT device, registered, expires, addresses FROM irp_device"
        " WHERE person = ? AND expires > ? ORDER BY registered DESC, seq DESC",
        (person, now)).fetchall()
    certs = cursor.execute(
        "SELECT serial, person, issued, not_after, chain, revoked FROM irp_certificate"
        " WHERE person = ? ORDER BY issued DESC, serial", (person,)).fetchall()
    return PersonView(person, row is not None, tuple(_device(r) for r in devices),
                      tuple(_certificate(r) for r in certs), row[0] if row else now)


def _get_account(cursor: Cursor, person: str) -> Account | None:
    row = cursor.execute("SELECT person, password_hash FROM irp_account WHERE person = ?",
                         (person,)).fetchone()
    return Account(row[0], row[1]) if row else None


def _device(row: Any) -> DeviceRow:
    return DeviceRow(row[0], row[1], row[2], tuple((ip, int(port)) for ip, port in
                                                   json.loads(row[3])))


def _certificate(row: Any) -> CertificateRow:
    return CertificateRow(row[0], row[1], row[2], row[3], bytes(row[4]), row[5])
