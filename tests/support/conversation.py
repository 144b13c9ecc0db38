"""Conversation scripts in literal XML: this stanza is sent, those are expected.

A script is a sequence of blocks; ``>>>`` starts a stanza to send and each ``<<<`` a stanza
expected in answer. The stanzas expected after one send must all arrive, in any order, and
nothing else may. In an expected stanza an attribute value or text of ``*`` matches anything
and ``$name`` captures a value the first time and must equal it afterwards; ``$name`` in a
stanza to send is replaced by the captured value. Stanzas are in the ``jabber:client``
namespace unless they say otherwise. The runner drives anything with a send function and a
way to collect what came back: the broker with an in-memory router, or a live server socket.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

from lxml import etree
from zope.interface import implementer

from sixnet.grid.component import IRouter

_CAPTURE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


class ConversationMismatch(AssertionError):
    """What arrived is not what the script expected."""


def parse_stanza(text: str) -> etree._Element:
    wrapper = etree.fromstring(f"<wrapper xmlns='jabber:client'>{text}</wrapper>")
    children = [c for c in wrapper if isinstance(c.tag, str)]
    if len(children) != 1:
        raise ValueError(f"expected one stanza, got {len(children)}: {text[:80]!r}")
    return children[0]


@dataclass
class Step:
    send: str
    expect: list[str] = field(default_factory=list)


def parse_script(script: str) -> list[Step]:
    steps: list[Step] = []
    parts = re.split(r"^\s*(>>>|<<<)", script, flags=re.MULTILINE)
    for marker, block in zip(parts[1::2], parts[2::2], strict=True):
        if marker == ">>>":
            steps.append(Step(block.strip()))
        elif not steps:
            raise ValueError("a script starts with >>>")
        else:
            steps[-1].expect.append(block.strip())
    return steps


class Matcher:
    """Compares an expected stanza with an actual one, keeping captured values."""

    def __init__(self) -> None:
        self.captured: dict[str, str] = {}

    def fill(self, text: str) -> str:
        return _CAPTURE.sub(lambda m: self.captured[m.group(1)], text)

    def problem(self, expected: etree._Element, actual: etree._Element,
                where: str = "") -> str | None:
        """None if `actual` matches, else what differs; captures only on a full match."""
        saved = dict(self.captured)
        found = self._compare(expected, actual, where or etree.QName(expected).localname)
        if found:
            self.captured = saved
        return found

    def _value(self, expected: str, actual: str | None, where: str) -> str | None:
        if expected == "*":
            return None if actual is not None else f"{where}: missing"
        capture = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", expected)
        if capture:
            name = capture.group(1)
            if actual is None:
                return f"{where}: missing"
            if name not in self.captured:
                self.captured[name] = actual
                return None
            expected = self.captured[name]
        if expected != actual:
            return f"{where}: expected {expected!r}, got {actual!r}"
        return None

    def _compare(self, expected: etree._Element, actual: etree._Element,
                 where: str) -> str | None:
        if expected.tag != actual.tag:
            return f"{where}: expected <{expected.tag}>, got <{actual.tag}>"
        if set(expected.attrib) != set(actual.attrib):
            return (f"{where}: attributes {sorted(actual.attrib)}, expected "
                    f"{sorted(expected.attrib)}")
        for name, value in expected.attrib.items():
            problem = self._value(value, actual.get(name), f"{where}@{name}")
            if problem:
                return problem
        wanted_text = (expected.text or "").strip()
        got_text = (actual.text or "").strip()
        if wanted_text or got_text:
            problem = self._value(wanted_text, got_text, f"{where} text")
            if problem:
                return problem
        wanted = [c for c in expected if isinstance(c.tag, str)]
        got = [c for c in actual if isinstance(c.tag, str)]
        if len(wanted) != len(got):
            return (f"{where}: {len(got)} children "
                    f"({', '.join(etree.QName(c).localname for c in got)}), "
                    f"expected {len(wanted)}")
        for i, (w, g) in enumerate(zip(wanted, got, strict=True)):
            problem = self._compare(w, g, f"{where}/{etree.QName(w).localname}[{i}]")
            if problem:
                return problem
        return None


def _shown(stanzas: list[etree._Element], limit: int = 4000) -> str:
    text = "\n".join(etree.tostring(s, encoding="unicode") for s in stanzas)
    return text if len(text) <= limit else text[:limit] + "..."


async def run_conversation(script: str,
                           send: Callable[[etree._Element, int], Awaitable[None]],
                           collect: Callable[[], list[etree._Element]],
                           matcher: Matcher | None = None) -> Matcher:
    """Play a script: send each stanza, check what was collected.

    ``send(stanza, expected)`` sends and returns once `expected` stanzas may have arrived
    (and a little more time for any unexpected extra one).
    """
    matcher = matcher or Matcher()
    for step in parse_script(script):
        stanza = parse_stanza(matcher.fill(step.send))
        await send(stanza, len(step.expect))
        arrived = collect()
        remaining = list(arrived)
        for text in step.expect:
            expected = parse_stanza(text)
            problems = []
            for candidate in remaining:
                problem = matcher.problem(expected, candidate)
                if problem is None:
                    remaining.remove(candidate)
                    break
                problems.append(problem)
            else:
                raise ConversationMismatch(
                    f"after sending {step.send[:120]!r}\nno stanza matched\n{text}\n"
                    f"closest differences: {problems}\narrived:\n" +
                    _shown(arrived))
        if remaining:
            raise ConversationMismatch(
                f"after sending {step.send[:120]!r}\nunexpected stanzas:\n" +
                _shown(remaining))
    return matcher


@implementer(IRouter)
class RecordingRouter:
    """An in-memory `IRouter`: keeps what the component routes; sessions are a set of JIDs."""

    def __init__(self, domain: str, available: set[str] | None = None) -> None:
        self.domain = domain
        self.available = available if available is not None else set()
        self.routed: list[etree._Element] = []

    def route(self, stanza: etree._Element) -> None:
        self.routed.append(stanza)

    def route_fanout(self, stanza: etree._Element, recipients: Sequence[str]) -> None:
        for recipient in recipients:
            copy = deepcopy(stanza)
            copy.set("to", recipient)
            self.routed.append(copy)

    def is_available(self, jid: str) -> bool:
        return jid in self.available or any(a.split("/")[0] == jid for a in self.available)

    def origin_of(self, jid: str) -> tuple[str | None, str]:
        return None, "a conversation script (no connection)"

    def take(self) -> list[etree._Element]:
        taken, self.routed = self.routed, []
        return taken
