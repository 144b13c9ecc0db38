"""Who this agent talks to: the ``[chat] allow`` and ``deny`` lists (docs/chat.rst, "Who may talk").

An entry is a person (``alice@example.test``) or a domain (``example.test``: every person in
it). A person's own entry decides over their domain's; where both lists name the same person
or domain, deny wins; a person no entry names is allowed only when the allow list is empty.
The default (both empty) is the behaviour before the lists existed: anyone a trusted CA
certified.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id


def normalize_entry(entry: str) -> str:
    """The canonical form of a person or a domain; ValueError when it is neither."""
    try:
        if "@" in entry:
            return normalize_user_id(entry)
        return normalize_user_id("x@" + entry).split("@", 1)[1]
    except IdentitySyntaxError:
        raise ValueError(f"{entry!r} is neither a person (name@domain) nor a domain") from None


def entries_check(values: list[str]) -> str | None:
    """The configuration check of one list."""
    for value in values:
        try:
            normalize_entry(value)
        except ValueError as e:
            return str(e)
    return None


@dataclass(frozen=True)
class PeerPolicy:
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    @classmethod
    def from_lists(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> PeerPolicy:
        return cls(frozenset(map(normalize_entry, allow)), frozenset(map(normalize_entry, deny)))

    def permits(self, user_id: str) -> bool:
        """Whether this agent may talk with `user_id` (a normalized user id)."""
        for name in (user_id, user_id.split("@", 1)[1]):
            if name in self.deny:
                return False
            if name in self.allow:
                return True
        return not self.allow


OPEN_POLICY = PeerPolicy()
