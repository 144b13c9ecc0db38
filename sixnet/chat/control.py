"""The local control socket: AMP over a UNIX socket (mode 0600) for the ``sixnet chat`` commands.

Only the person who owns the state directory can connect; nothing controls the agent from
the network. Messages are shown by the agent calling `Show` on the client's connection,
once per message (``inbox``, ``history``) or as they happen (``follow``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from sixnet.chat.agent import Agent, MessageRefused
from sixnet.chat.store import StoredMessage
from sixnet.pki.identity import IdentitySyntaxError

log = Logger(namespace="sixnet.chat")

_CHUNK = 60000  # an AMP value holds at most 65535 bytes


class LongUnicode(amp.Argument):
    """Text of any length, split over ``name``, ``name.1``, ``name.2``... keys."""

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        parts = [strings[name]]
        index = 1
        while (key := name + b".%d" % index) in strings:
            parts.append(strings[key])
            index += 1
        objects[str(name, "ascii")] = b"".join(parts).decode("utf-8")

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        data = objects[str(name, "ascii")].encode("utf-8")
        strings[name] = data[:_CHUNK]
        for index, offset in enumerate(range(_CHUNK, len(data), _CHUNK), start=1):
            strings[name + b".%d" % index] = data[offset:offset + _CHUNK]


class Refused(Exception):
    """The agent refused the request; the text says why."""


class Send(amp.Command):
    arguments = [(b"to", amp.Unicode()), (b"text", LongUnicode())]
    response = [(b"message", LongUnicode())]
    errors = {Refused: b"REFUSED"}


class ListMessages(amp.Command):
    arguments = [(b"direction", amp.Unicode(optional=True)),
                 (b"peer", amp.Unicode(optional=True)), (b"limit", amp.Integer())]
    response = [(b"count", amp.Integer())]
    errors = {Refused: b"REFUSED"}


class Follow(amp.Command):
    arguments: list = []
    response: list = []


class Peers(amp.Command):
    arguments: list = []
    response = [(b"peers", LongUnicode())]


class Show(amp.Command):
    """Agent to client: one message (JSON of `StoredMessage`) and why it is shown."""

    arguments = [(b"event", amp.Unicode()), (b"message", LongUnicode())]
    response: list = []
    requiresAnswer = False


def message_json(message: StoredMessage) -> str:
    return json.dumps(message.as_json(), sort_keys=True)


class ControlProtocol(amp.AMP):
    """The agent's side of one control connection."""

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent
        self._unfollow: Any = None

    @Send.responder
    async def send(self, to: str, text: str) -> dict[str, str]:
        try:
            message = await self.agent.send(to, text)
        except (MessageRefused, IdentitySyntaxError) as e:
            raise Refused(str(e)) from None
        return {"message": message_json(message)}

    @ListMessages.responder
    async def list_messages(self, limit: int, direction: str | None = None,
                            peer: str | None = None) -> dict[str, int]:
        if direction not in (None, "in", "out") or not 0 < limit <= 10000:
            raise Refused("direction must be in or out, limit 1-10000")
        messages = await self.agent.messages.messages(direction=direction, peer=peer,
                                                      limit=limit)
        for message in messages:
            self.callRemote(Show, event="listed", message=message_json(message))
        return {"count": len(messages)}

    @Follow.responder
    def follow(self) -> dict[str, Any]:
        if self._unfollow is None:
            self._unfollow = self.agent.listen(self._show)
        return {}

    def _show(self, event: str, message: StoredMessage) -> None:
        self.callRemote(Show, event=event, message=message_json(message))

    @Peers.responder
    async def peers(self) -> dict[str, str]:
        counts = await self.agent.messages.queued_counts()
        live = {p["peer"]: p for p in self.agent.peers()}
        rows = []
        for peer in sorted(set(live) | set(counts)):
            row = dict(live.get(peer) or {"peer": peer, "role": None})
            row["connected"] = peer in live
            row["queued"] = counts.get(peer, 0)
            rows.append(row)
        return {"peers": json.dumps(rows, sort_keys=True)}

    def connectionLost(self, reason: Any) -> None:
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None
        super().connectionLost(reason)


class ControlFactory(Factory):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self.agent)
