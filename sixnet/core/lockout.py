"""When failed logins lock an account: one rule for every service that checks passwords.

The policy is arithmetic on a `Failures` record and the time; each service keeps the records
in its own database (`LockoutTable`: IRP's ``irp_lockout``, the grid's ``grid_lockout``) and
asks the policy what they mean. The policy has no reactor and no storage: tests drive it with
plain numbers. An attempt is counted before its password is checked (`LockoutTable.reserve`);
`PendingAttempts` keeps, in one process's memory, the attempts still being checked, so that
right passwords sent at once wait for each other instead of locking each other out.

A record belongs to an account *and the network a login comes from* (`source_of`): five wrong
passwords from a stranger lock the stranger's network out of that account, not the owner,
whose right password from elsewhere is still accepted. The guesser is slowed by the rest:
the delay before each failure is answered, the few failures a stream may have, and the
connections one address may hold before it has authenticated.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

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


#: Counts one attempt before its check (`LockoutTable.reserve` in the service's database):
#: given whether the attempt may lock the record, the record and whether it was counted.
Count = Callable[[bool], Awaitable[tuple[Failures, bool]]]


class PendingAttempts:
    """Password attempts one server process has counted (`LockoutTable.reserve`) and is still
    checking, per account and source network.

    A login that would lock the record, or finds it locked, while some of these are pending
    waits for them instead of being refused: a right password among them clears the count.
    So ten right logins of one account opened at once are all accepted, while of ten guesses
    still only ``lockout_after`` are checked. An attempt stops being pending when its outcome
    is known or after the `timeout` given with it (the service's deadline for a login), and a
    login waits at most as long. Other processes on the same database count together but are
    not waited for: their attempts are not known here.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}
        self._expiries: set[IDelayedCall] = set()
        self._waiting: dict[tuple[str, str], list[defer.Deferred[None]]] = {}
        #: One reservation at a time per key, so that two cannot both see none pending.
        self._turns: dict[tuple[str, str], defer.DeferredLock] = {}

    async def reserve(self, account: str, source: str, count: Count, clock: IReactorTime,
                      timeout: float) -> tuple[Failures, Callable[[], None] | None]:
        """Count an attempt on `account` from the network `source` before its check: the
        record, and the function that ends it as pending once its outcome is known (None:
        refused, the record is locked)."""
        key = (account, source)
        deadline = clock.seconds() + timeout
        while True:
            turn = self._turns.setdefault(key, defer.DeferredLock())
            await turn.acquire()
            try:
                lock = not self._held.get(key)
                failures, counted = await count(lock)
                if counted:
                    return failures, self._hold(key, clock, timeout)
            finally:
                turn.release()
                if not turn.locked and not turn.waiting and self._turns.get(key) is turn:
                    del self._turns[key]
            if lock:
                return failures, None  # locked, and no attempt of ours left to clear it
            if self._held.get(key):
                left = deadline - clock.seconds()
                if left <= 0 or not await self._changed(key, clock, left):
                    return failures, None
            # else: the attempts it would have waited for ended meanwhile; count it again

    def close(self) -> None:
        """The server stops: forget every pending attempt, and refuse the logins waiting."""
        for expiry in list(self._expiries):
            expiry.cancel()
        self._expiries.clear()
        self._held.clear()
        for waiters in list(self._waiting.values()):
            for waiter in list(waiters):
                waiter.cancel()

    def _hold(self, key: tuple[str, str], clock: IReactorTime,
              timeout: float) -> Callable[[], None]:
        self._held[key] = self._held.get(key, 0) + 1
        expiry = clock.callLater(timeout, lambda: release())
        self._expiries.add(expiry)

        def release() -> None:
            if expiry not in self._expiries:
                return  # released already, or forgotten by `close`
            self._expiries.discard(expiry)
            if expiry.active():
                expiry.cancel()
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]
            for waiter in self._waiting.pop(key, []):
                waiter.callback(None)

        return release

    async def _changed(self, key: tuple[str, str], clock: IReactorTime, seconds: float) -> bool:
        """Wait until an attempt on `key` stops being pending (True) or `seconds` pass."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.setdefault(key, []).append(waiter)
        timer = clock.callLater(seconds, waiter.cancel)
        try:
            await waiter
        except defer.CancelledError:
            waiters = self._waiting.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiting.pop(key, None)
            return False
        finally:
            if timer.active():
                timer.cancel()
        return True
