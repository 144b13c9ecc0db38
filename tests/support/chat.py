"""Chat test helpers: an in-memory directory that several agents in one process share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from zope.interface import implementer

from sixnet.chat.directory import IPeerDirectory, PeerAddress, PeerRecord, Watcher
from sixnet.pki.identity import normalize_user_id


@dataclass
class _Entry:
    addresses: dict[PeerAddress, tuple[float, float]] = field(default_factory=dict)
    watchers: list[Watcher] = field(default_factory=list)


class SharedDirectory:
    """An in-memory registry that several agents in one process share."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        #: DER of the certificates revoked here (`revoke`).
        self.revoked: set[bytes] = set()

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

    def revoke(self, user_id: str, certificate: x509.Certificate) -> None:
        """Revoke a person's certificate; their watchers hear of it, as from IRP."""
        self.revoked.add(certificate.public_bytes(Encoding.DER))
        record = self.record(user_id) or PeerRecord(normalize_user_id(user_id), ())
        for watcher in list(self.entry(user_id).watchers):
            watcher(record)

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

    def certificate_status(self, user_id: str,
                           certificate: x509.Certificate) -> defer.Deferred[str | None]:
        revoked = certificate.public_bytes(Encoding.DER) in self.shared.revoked
        return defer.succeed("revoked" if revoked else None)

    def close(self) -> defer.Deferred[None]:
        """Nothing to release: the shared records stay for the other agents."""
        return defer.succeed(None)
