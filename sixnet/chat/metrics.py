"""The agent's metrics: counters the agent increments, a gauge of its sessions.

Every series is taken once when the service is built, so counting is one attribute increment.
A handshake's outcome is one of a closed set, whatever the peer sent.
"""

from __future__ import annotations

from collections.abc import Callable

from sixnet.core.metrics import Registry

#: How a handshake ended: established, or before that with an alert we sent (refused), an
#: alert the peer sent (peer-refused), a close (closed) or a lost connection (lost).
HANDSHAKE_OUTCOMES = ("established", "refused", "peer-refused", "closed", "lost")


def handshake_outcome(reason: str) -> str:
    """The outcome label of a session that ended before it was established."""
    if reason == "close-notify":
        return "closed"
    if reason == "connection-lost":
        return "lost"
    if reason.startswith("peer:"):
        return "peer-refused"
    return "refused"


class ChatCounters:
    """The series the agent increments."""

    def __init__(self, registry: Registry) -> None:
        handshakes = registry.counter(
            "sixnet_chat_handshakes_total", "Handshakes, by outcome.", ("outcome",))
        self.handshakes = {o: handshakes.labels(outcome=o) for o in HANDSHAKE_OUTCOMES}
        messages = registry.counter(
            "sixnet_chat_messages_total",
            "Messages sent to peers (each transmission) and received (new ones stored).",
            ("direction",))
        self.sent = messages.labels(direction="sent")
        self.received = messages.labels(direction="received")
        self.registry = registry

    def register_gauges(self, sessions: Callable[[], int]) -> None:
        self.registry.gauge("sixnet_chat_sessions", "Established sessions with peers.",
                            read=sessions)
