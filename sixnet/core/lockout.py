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
