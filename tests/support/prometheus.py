"""A strict reader of the Prometheus text format 0.0.4, for checking what /metrics serves.

Every line must be a ``# HELP``, a ``# TYPE`` or a sample of the metric the last ``# TYPE``
declared; anything else fails the test that parses it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)\Z")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|\Z)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Labels = frozenset[tuple[str, str]]


@dataclass
class Family:
    name: str
    kind: str = ""
    help: str = ""
    samples: dict[Labels, float] = field(default_factory=dict)


def _unescape(text: str, quotes: bool) -> str:
    pattern = r'\\\\|\\"|\\n' if quotes else r"\\\\|\\n"
    return re.sub(pattern, lambda m: _UNESCAPE[m.group()], text)


def _value(text: str) -> float:
    special = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}
    return special[text] if text in special else float(text)


def parse(text: str) -> dict[str, Family]:
    families: dict[str, Family] = {}
    current: Family | None = None
    assert text.endswith("\n"), "the exposition ends with a newline"
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            current = families.setdefault(name, Family(name))
            current.help = _unescape(help_text, quotes=False)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge"), f"line {number}: type {kind!r}"
            assert name not in families or not families[name].kind, f"{name} typed twice"
            current = families.setdefault(name, Family(name))
            current.kind = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"line {number} is not a sample: {line!r}"
            name, pairs, value = match.groups()
            assert current is not None and name == current.name, \
                f"line {number}: {name} outside its family"
            labels: list[tuple[str, str]] = []
            rest = pairs or ""
            while rest:
                pair = _PAIR.match(rest)
                assert pair, f"line {number}: bad labels {rest!r}"
                labels.append((pair[1], _unescape(pair[2], quotes=True)))
                rest = rest[pair.end():]
            key = frozenset(labels)
            assert key not in current.samples, f"line {number}: a sample twice"
            current.samples[key] = _value(value)
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """One sample's value (0 when the family has no such sample yet)."""
    return families[name].samples.get(frozenset(labels.items()), 0.0)


class _HTTPClient(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(self.data)


@dataclass
class Response:
    code: int
    headers: dict[str, str]
    body: bytes


async def http_request(port: int, path: str = "/metrics", method: str = "GET") -> Response:
    """One HTTP/1.0 request to 127.0.0.1 over a real socket, as a scraper makes it."""
    from twisted.internet import reactor

    client = _HTTPClient(f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                         "Connection: close\r\n\r\n".encode())
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    data = await client.done
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, text = line.partition(":")
        headers[name.strip().lower()] = text.strip()
    return Response(int(status.split()[1]), headers, body)
