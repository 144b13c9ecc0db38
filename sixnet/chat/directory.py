"""Where people are: the seam between the agent and the IRP registry.

The agent needs three things from a directory: announce its own addresses, find a person's
addresses (most recent first), and hear when a person moves. `IPeerDirectory` is that seam;
`IRPDirectory` (``sixnet.chat.irp``) speaks to a real registry, `SharedDirectory` keeps
records in memory for tests and for agents that share one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from zope.interface import Interface, implementer

from sixnet.pki.identity import normalize_user_id


@dataclass(frozen=True, order=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """``host:port`` or ``[v6]:port``."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise ValueError(f"{text!r} is not host:port or [address]:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: an IPv6 address must be in brackets")
        return cls(host, int(port))


@dataclass(frozen=True)
class PeerRecord:
    """A person's current addresses, most recently registered first."""

    user_id: str
    addresses: tuple[PeerAddress, ...]
    chain: tuple[Any, ...] = ()  # the certificate chain the registry holds, when it has one


Watcher = Callable[[PeerRecord], None]


class IPeerDirectory(Interface):
    """Find peers, announce this agent, hear about moves."""

    def announce(addresses: Sequence[PeerAddress], lifetime: float) -> defer.Deferred[None]:
        """Register this agent's person at `addresses` for `lifetime` seconds."""

    def lookup(user_id: str) -> defer.Deferred[PeerRecord | None]:
        """The person's record, or None when they are not registered."""

    def watch(user_id: str, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher` whenever the person's record changes; returns a cancel function.

        A directory that may have missed changes (it was disconnected) also calls it with
        the current record when the watch (re)starts.
        """

    def close() -> None:
        """Stop: no more watcher calls, no more connections."""


@dataclass
class _Entry:
    addresses: dict[PeerAddress, tuple[float, float]] = field(default_factory=dict)
    watchers: list[Watcher] = field(default_factory=list)


class SharedDirectory:
    """An in-memory registry several agents share (tests; one-process setups)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def for_person(self, user_id: str) -> InMemoryDirectory:
        return InMemoryDirectory(self, normalize_user_id(user_id))

    def entry(self, user_id: str) -> _Entry:
        return self._entries.setdefault(normalize_user_id(user_id), _Entry())

    def record(self, user_id: str) -> PeerRecord | None:
        entry = self.entry(user_id)
        now = self.clock()
        live = [(registered, a) for a, (registered, expires) in entry.addresses.items()
                if expires > now]
        if not live:
            return None
        live.sort(key=lambda item: -item[0])
        return PeerRecord(normalize_user_id(user_id), tuple(a for _, a in live))

    def register(self, user_id: str, addresses: Sequence[PeerAddress], lifetime: float) -> None:
        entry = self.entry(user_id)
        before = self.record(user_id)
        now = self.clock()
        for offset, address in enumerate(addresses):
            # the first address given is the preferred one: registered "latest"
            entry.addresses[address] = (now + (len(addresses) - offset) * 1e-6, now + lifetime)
        after = self.record(user_id)
        if after is not None and (before is None or before.addresses != after.addresses):
            for watcher in list(entry.watchers):
                watcher(after)


@implementer(IPeerDirectory)
class InMemoryDirectory:
    """One agent's view of a `SharedDirectory`."""

    def __init__(self, shared: SharedDirectory, me: str) -> None:
        self.shared = shared
        self.me = me

    def announce(self, addresses: Sequence[PeerAddress], lifetime: float) -> defer.Deferred[None]:
        self.shared.register(self.me, addresses, lifetime)
        return defer.succeed(None)

    def lookup(self, user_id: str) -> defer.Deferred[PeerRecord | None]:
        return defer.succeed(self.shared.record(user_id))

    def watch(self, user_id: str, watcher: Watcher) -> Callable[[], None]:
        watchers = self.shared.entry(user_id).watchers
        watchers.append(watcher)

        def cancel() -> None:
            if watcher in watchers:
                watchers.remove(watcher)

        return cancel

    def close(self) -> None:
        """Nothing to release: the shared records stay for the other agents."""
