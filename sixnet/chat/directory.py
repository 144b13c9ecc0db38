"""Where people are: the seam between the agent and the IRP registry.

The agent needs four things from a directory: announce its own addresses, find a person's
addresses (most recent first), hear when a person's record changes (a move, a revocation),
and say whether a certificate it knows is revoked. `IPeerDirectory` is that seam;
`IRPDirectory` (``sixnet.chat.irp``) speaks to a real registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from zope.interface import Interface


@dataclass(frozen=True, order=True)
class PeerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """``host:port`` or ``[v6]:port``; the port in ASCII digits only (``str.isdigit``
        takes "٤٦٠٥" and "²" too, which `int` reads as 4605 or refuses with its own error)."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port or [address]:port")
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: the port must be 1-65535 in ASCII digits")
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

    def certificate_status(user_id: str, certificate: Any) -> defer.Deferred[str | None]:
        """What the directory says of this certificate of the person now: ``valid``,
        ``revoked`` or ``expired``; ``unknown`` when it publishes certificates for the person
        and this is not one of them (a man in the middle); None when it cannot say (it does
        not know the person, or cannot be asked)."""

    def close() -> defer.Deferred[None]:
        """Stop: no more watcher calls, no more connections; fires when they are closed."""
