"""``sixnet chat``: talk to the running user agent through its control socket."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, task
from twisted.protocols import amp

from sixnet.chat.control import Follow, ListMessages, Peers, Refused, Send, Show
from sixnet.core.cli import CommandGroup, Output, config_of
from sixnet.core.errors import EXIT_USAGE, CommandError


def register(commands: Any) -> None:
    def socket(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", type=Path, default=None,
                       help="the agent's control socket (default: from the configuration)")

    command = CommandGroup(commands, "chat", "the SixChat user agent (send, inbox, follow...)",
                           socket).command

    p = command("send", run_send, "send a message (queued until the person is reachable)")
    p.add_argument("to", metavar="USER_ID", help="the person, e.g. bob@example.test")
    p.add_argument("text", help="the message")
    for name, direction, help_text in (("inbox", "in", "show received messages"),
                                       ("history", None, "show messages both ways")):
        p = command(name, run_list, help_text)
        p.add_argument("--peer", metavar="USER_ID", help="only messages with this person")
        p.add_argument("--limit", type=int, default=50, help="how many (default 50)")
        p.set_defaults(direction=direction)
    command("follow", run_follow, "print received messages and receipts as they arrive")
    command("peers", run_peers, "people with a live session or queued messages")


def _socket(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from sixnet.chat.service import control_socket_path

    return control_socket_path(config_of(args, check_files=False))


class _Client(amp.AMP):
    """Prints each message the agent shows."""

    def __init__(self, out: Output, *, collect: bool = False) -> None:
        super().__init__()
        self.out = out
        self.collect = collect
        self.shown: list[dict[str, Any]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    @Show.responder
    def show(self, event: str, message: str) -> dict[str, Any]:
        data = json.loads(message)
        data["event"] = event
        if self.collect:
            self.shown.append(data)
        else:  # follow: one line (or one JSON document) per event, as it happens
            self.out.result(data, lambda: format_message(data))
            sys.stdout.flush()
        return {}

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


def format_message(m: dict[str, Any]) -> str:
    when = m["sent"].replace("T", " ")[:19]
    if m.get("event") == "delivered":
        return f"{when}  delivered to {m['peer']}: {m['id']}"
    arrow = "<-" if m["direction"] == "in" else "->"
    state = "" if m["direction"] == "in" else f"  [{m['state']}]"
    return f"{when}  {arrow} {m['peer']}: {m['body']}{state}"


def _run(args: argparse.Namespace, out: Output, body: Any, *, collect: bool = False) -> int:
    path = _socket(args)
    result: dict[str, int] = {}

    async def main(reactor: Any) -> None:
        client = _Client(out, collect=collect)
        try:
            await endpoints.connectProtocol(
                endpoints.UNIXClientEndpoint(reactor, str(path), timeout=5), client)
        except Exception as e:
            raise CommandError(f"{path}: the chat agent is not running "
                               f"({getattr(e, 'osError', None) or e})") from None
        try:
            result["status"] = await body(client)
        except Refused as e:
            raise CommandError(f"the agent refused: {e}") from None
        finally:
            if client.transport is not None:
                client.transport.loseConnection()

    failures: list[BaseException] = []

    def run(reactor: Any) -> defer.Deferred[None]:
        d = defer.Deferred.fromCoroutine(main(reactor))
        d.addErrback(lambda f: failures.append(f.value))
        return d

    try:
        task.react(run)
    except SystemExit:
        pass
    if failures:
        error = failures[0]
        if isinstance(error, CommandError | KeyboardInterrupt):
            raise error
        raise CommandError(f"{path}: {error}")
    return result.get("status", 1)


def run_send(args: argparse.Namespace, out: Output) -> int:
    async def body(client: _Client) -> int:
        answer = await client.callRemote(Send, to=args.to, text=args.text)
        m = json.loads(answer["message"])
        out.result(m, f"queued {m['id']} for {m['peer']}")
        return 0

    return _run(args, out, body)


def run_list(args: argparse.Namespace, out: Output) -> int:
    if not 0 < args.limit <= 10000:
        raise CommandError("--limit must be 1-10000", EXIT_USAGE)

    async def body(client: _Client) -> int:
        kwargs: dict[str, Any] = {"limit": args.limit}
        if args.direction:
            kwargs["direction"] = args.direction
        if args.peer:
            kwargs["peer"] = args.peer
        await client.callRemote(ListMessages, **kwargs)
        shown = client.shown
        out.result(shown, lambda: "\n".join(format_message(m) for m in shown)
                   or "no messages")
        return 0

    return _run(args, out, body, collect=True)


def run_follow(args: argparse.Namespace, out: Output) -> int:
    async def body(client: _Client) -> int:
        await client.callRemote(Follow)
        await client.lost
        raise CommandError("the chat agent stopped")

    return _run(args, out, body)


def run_peers(args: argparse.Namespace, out: Output) -> int:
    async def body(client: _Client) -> int:
        answer = await client.callRemote(Peers)
        rows = json.loads(answer["peers"])

        def text() -> str:
            if not rows:
                return "no sessions and nothing queued"
            lines = []
            for r in rows:
                since = ""
                if r["connected"]:
                    started = datetime.datetime.fromtimestamp(r["since"], datetime.UTC)
                    since = (f"connected ({r['role']}, {r['method']}, {r['cipher']}) since "
                             f"{started:%H:%M:%S}")
                lines.append(f"{r['peer']:<32} {since or 'not connected'}"
                             f"  {r['queued']} queued")
            return "\n".join(lines)

        out.result(rows, text)
        return 0

    return _run(args, out, body)
