"""When failed logins lock an account: one rule for every service that checks passwords.

The policy is arithmetic on a `Failures` record and the time; each service keeps the records
in its own database (IRP on the account row, the grid in its ``grid_lockout`` table) and asks
the policy what they mean. No reactor, no storage: tests drive it with plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failures:
    """Failed logins of one account since its last success."""

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
