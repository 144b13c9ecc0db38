"""When failed logins lock an account: one rule for every service that checks passwords.

The policy is arithmetic on a `Failures` record and the time; each service keeps the records
in its own database (IRP on the account row, the grid in its ``grid_lockout`` table) and asks
the policy what they mean. No reactor, no storage: tests drive it with plain numbers.

A record belongs to an account *and the network a login comes from* (`source_of`): five wrong
passwords from a stranger lock the stranger's network out of that account, not the owner,
whose right password from elsewhere is still accepted. The guesser is slowed by the rest:
the delay before each failure is answered, the few failures a stream may have, and the
connections one address may hold before it has authenticated.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sixnet.core.storage.database import Cursor

#: IPv6 sources are judged by their /64: one host is given a whole /64 to pick from.
IPV6_SOURCE_PREFIX = 64


def source_of(address: str) -> str:
    """The network a login comes from: the IPv4 address (also when IPv4-mapped), the IPv6
    /64, or the text itself when it is no IP address (a UNIX socket, a test transport)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_SOURCE_PREFIX), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Failures:
    """Failed logins of one account (from one source) since its last success."""

    count: int = 0
    #: Milliseconds since the epoch until which the account is locked (0: never locked).
    locked_until: int = 0


class LockoutPolicy:
    """`after` failures in a row lock an account for `seconds`; a success starts over.

    While locked, logins are refused before the password is checked, so they do not count.
    Once a lock has run out, the count stands until a success: the next failure locks again.
    """

    def __init__(self, after: int, seconds: int) -> None:
        self.after = after
        self.seconds = seconds

    def locked(self, failures: Failures, now_ms: int) -> bool:
        return failures.locked_until > now_ms

    def failed(self, failures: Failures, now_ms: int) -> Failures:
        """The record after one more failure at `now_ms`."""
        count = failures.count + 1
        until = now_ms + self.seconds * 1000 if count >= self.after else failures.locked_until
        return Failures(count, until)


class LockoutTable:
    """The failure records of one service in its database: one row per (account, source).

    The table has the columns ``(<key>, source, failures, locked_until, updated)`` with
    ``(<key>, source)`` as its primary key; each service names its own table and key column
    in its schema. At most `size` rows are kept: a new row pushes out the least recently
    updated ones, so a guesser inventing names cannot grow the table without bound.
    """

    def __init__(self, table: str, key: str, size: int) -> None:
        self.table = table
        self.key = key
        self.size = size

    def read(self, cursor: Cursor, account: str, source: str) -> Failures:
        row = cursor.execute(
            f"SELECT failures, locked_until FROM {self.table}"  # noqa: S608 - names are ours
            f" WHERE {self.key} = ? AND source = ?", (account, source)).fetchone()
        return Failures(int(row[0]), int(row[1])) if row else Failures()

    def reserve(self, cursor: Cursor, account: str, source: str, policy: LockoutPolicy,
                now_ms: int, lock: bool = True) -> tuple[Failures, bool]:
        """Count an attempt as a failure *before* its password is checked, unless the record is
        locked (inside the caller's transaction): the record and whether it was counted.
        With `lock` False, an attempt that would lock the record is not counted either (the
        caller waits for attempts still being checked, one of which may be right).

        Checking the lock and counting in one step means that guesses sent at once on several
        connections count one each, and the one after the threshold is refused without a
        hash; a right password then takes its count back with `clear`.
        """
        while True:
            before = self.read(cursor, account, source)
            if policy.locked(before, now_ms):
                return before, False
            after = policy.failed(before, now_ms)
            if not lock and policy.locked(after, now_ms):
                return before, False
            if self._swap(cursor, account, source, before, after, now_ms):
                return after, True

    def _swap(self, cursor: Cursor, account: str, source: str, before: Failures,
              after: Failures, now_ms: int) -> bool:
        """Write `after` if the row still holds `before`; False when another transaction
        changed it since it was read (PostgreSQL: read it again), so no count is lost."""
        if cursor.execute(
                f"UPDATE {self.table} SET failures = ?, locked_until = ?, updated = ?"  # noqa: S608
                f" WHERE {self.key} = ? AND source = ? AND failures = ? AND locked_until = ?",
                (after.count, after.locked_until, now_ms, account, source, before.count,
                 before.locked_until)).rowcount:
            return True
        if before != Failures():
            return False
        if not cursor.execute(
                f"INSERT INTO {self.table} ({self.key}, source, failures, locked_until, updated)"  # noqa: S608
                f" VALUES (?, ?, ?, ?, ?) ON CONFLICT ({self.key}, source) DO NOTHING",
                (account, source, after.count, after.locked_until, now_ms)).rowcount:
            return False
        row = cursor.execute(f"SELECT count(*) FROM {self.table}").fetchone()  # noqa: S608
        excess = int(row[0]) - self.size if row else 0
        if excess > 0:
            cursor.execute(
                f"DELETE FROM {self.table} WHERE ({self.key}, source) IN"  # noqa: S608
                f" (SELECT {self.key}, source FROM {self.table} ORDER BY updated LIMIT ?)",
                (excess,))
        return True

    def clear(self, cursor: Cursor, account: str, source: str) -> None:
        cursor.execute(f"DELETE FROM {self.table} WHERE {self.key} = ?"  # noqa: S608
                       " AND source = ?", (account, source))
