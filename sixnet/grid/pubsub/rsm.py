"""XEP-0059 result set management: paging of topic lists and item lists.

The service always caps a page (RFC 8600 section 8.3.4: a platform must not make the broker
build an enormous result); when it caps an unpaged request it says so with a ``<set/>``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lxml import etree

from sixnet.grid.pubsub.errors import PubSubError, bad_request

RSM_NS = "http://jabber.org/protocol/rsm"
_R = f"{{{RSM_NS}}}"


@dataclass(frozen=True)
class PageRequest:
    """What a requester asked for in ``<set/>``."""

    max: int | None = None
    after: str | None = None
    before: str | None = None
    index: int | None = None

    @classmethod
    def parse(cls, parent: etree._Element) -> PageRequest | None:
        """The ``<set/>`` child of `parent`, or None when there is none."""
        element = parent.find(_R + "set")
        if element is None:
            return None

        def number(name: str) -> int | None:
            text = element.findtext(_R + name)
            if text is None:
                return None
            text = text.strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 9:
                raise bad_request(text=f"RSM {name} must be a non-negative integer")
            return int(text)

        before = element.find(_R + "before")
        return cls(max=number("max"), after=element.findtext(_R + "after"),
                   before=None if before is None else (before.text or ""),
                   index=number("index"))


@dataclass(frozen=True)
class Page:
    """One page of a result: its keys, the index of the first, and the total count."""

    keys: Sequence[str]
    first_index: int
    count: int

    def element(self) -> etree._Element:
        result = etree.Element(_R + "set", nsmap={None: RSM_NS})
        if self.keys:
            first = etree.SubElement(result, _R + "first", index=str(self.first_index))
            first.text = self.keys[0]
            etree.SubElement(result, _R + "last").text = self.keys[-1]
        etree.SubElement(result, _R + "count").text = str(self.count)
        return result


def sorted_locator(keys: Sequence[str]) -> Callable[[str], int | None]:
    """Find a key's position in a sorted sequence in O(log n)."""
    def locate(key: str) -> int | None:
        i = bisect.bisect_left(keys, key)
        return i if i < len(keys) and keys[i] == key else None
    return locate


def scan_locator(keys: Sequence[str]) -> Callable[[str], int | None]:
    def locate(key: str) -> int | None:
        try:
            return keys.index(key)
        except ValueError:
            return None
    return locate


def paginate(keys: Sequence[str], request: PageRequest | None, cap: int,
             locate: Callable[[str], int | None] | None = None) -> Page:
    """Select one page of `keys` (already in result order), never more than `cap`."""
    locate = locate or scan_locator(keys)
    total = len(keys)
    size = cap if request is None or request.max is None else min(request.max, cap)
    if request is None:
        start = 0
    elif request.after is not None:
        at = locate(request.after)
        if at is None:
            raise PubSubError("item-not-found", text="RSM after: no such key")
        start = at + 1
    elif request.before is not None:
        if request.before == "":
            end = total
        else:
            at = locate(request.before)
            if at is None:
                raise PubSubError("item-not-found", text="RSM before: no such key")
            end = at
        start = max(0, end - size)
        return Page(keys[start:end], start, total)
    elif request.index is not None:
        start = request.index
    else:
        start = 0
    return Page(keys[start:start + size], start, total)
