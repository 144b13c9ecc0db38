"""Limits every listener shares: what one peer address may hold, and how fast one may go.

`AddressLimiter` counts what each address holds at once (IRP and grid connections, chat
handshakes under way) against one ceiling, an IPv6 address by its /64; `TokenBucket` is the
one rate limit (grid stanzas, pubsub publishes and subscription requests). Both are plain
objects: the caller supplies the time, so tests need no reactor.
"""

from __future__ import annotations

from collections import Counter

from sixnet.core.lockout import source_of


class AddressLimiter:
    """At most `limit` of something held at once per peer address: per IPv4 address (also when
    IPv4-mapped) and per IPv6 /64 (`source_of`), since one IPv6 host is given a whole /64 to
    pick its addresses from."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        """Take one for `address`; False (and nothing taken) when it already holds `limit`."""
        source = source_of(address)
        if self._held[source] >= self.limit:
            return False
        self._held[source] += 1
        return True

    def release(self, address: str) -> None:
        """Give back one taken by `acquire`; an address holding none is forgotten."""
        source = source_of(address)
        self._held[source] -= 1
        if self._held[source] <= 0:
            del self._held[source]

    def held(self, address: str) -> int:
        """How many `address` holds, with the other addresses of its /64 (IPv6)."""
        return self._held.get(source_of(address), 0)

    def __len__(self) -> int:
        """How many addresses hold something (the table does not grow with departed peers)."""
        return len(self._held)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; one token per event."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend a token if one is there (refilling for the time since the last call)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def full(self, now: float) -> bool:
        """Whether the whole burst is back: an idle bucket that can be dropped and remade."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst
