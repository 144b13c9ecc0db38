"""XEP-0198 stream management counters: what the client has handled, what it has not acked.

The state belongs to the session, not to the TCP connection, so a resumed stream carries on
with the same counters and re-sends exactly the stanzas the client never acknowledged.
"""

from __future__ import annotations

from collections import deque

from sixnet.core.stream.protocol import StreamError
from sixnet.grid.xmpp import NS_SM

_MOD = 2**32


class StreamManagement:
    __slots__ = ("resume_id", "max_resume", "handled_in", "acked_out", "unacked")

    def __init__(self, resume_id: str | None, max_resume: int) -> None:
        #: Set when the client asked for resumption; the key to `<resume previd=...>`.
        self.resume_id = resume_id
        self.max_resume = max_resume
        #: Stanzas received from the client and handled (the 'h' we report).
        self.handled_in = 0
        #: The last 'h' the client reported.
        self.acked_out = 0
        #: Serialised stanzas sent and not yet acknowledged, oldest first.
        self.unacked: deque[bytes] = deque()

    @property
    def sent_count(self) -> int:
        return (self.acked_out + len(self.unacked)) % _MOD

    def received(self) -> None:
        self.handled_in = (self.handled_in + 1) % _MOD

    def sent(self, data: bytes) -> None:
        self.unacked.append(data)

    def ack(self, h: int) -> None:
        """The client reports it has handled `h` stanzas; forget those."""
        count = (h - self.acked_out) % _MOD
        if count > len(self.unacked):
            raise StreamError(
                "undefined-condition", "acknowledged more stanzas than were sent",
                extra=(f"<handled-count-too-high xmlns='{NS_SM}' h='{h}' "
                       f"send-count='{self.sent_count}'/>").encode())
        for _ in range(count):
            self.unacked.popleft()
        self.acked_out = h % _MOD
