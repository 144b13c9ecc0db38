"""XMPP addresses (RFC 7622): parsing, comparison form, and the checks the server needs.

Localparts and domains are compared after Unicode NFC normalisation and case folding, the
same rule `sixnet.pki.identity.normalize_user_id` applies to certificate identities, so a
platform's certificate and its JID always agree; resourceparts keep their case (NFC only).
This is the subset of the PRECIS profiles (RFC 8264/8265) a grid of machine accounts needs:
characters that PRECIS forbids in a localpart (RFC 7622 3.3.1) and control characters
anywhere are refused, as are parts longer than 1023 bytes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

_LOCAL_FORBIDDEN = frozenset('"&\'/:<>@') | frozenset(" \t\r\n")
_MAX_PART = 1023


class JIDError(ValueError):
    """A string is not a valid JID (the stanza error is jid-malformed)."""


def _controls(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn") for ch in text)


def _domain(text: str) -> str:
    if text.endswith("."):
        text = text[:-1]
    if text.isascii():
        text = text.lower()
    else:
        text = unicodedata.normalize("NFC", text).casefold()
    if not text or len(text.encode()) > _MAX_PART or _controls(text) or "" in text.split("."):
        raise JIDError(f"invalid domain {text!r}")  # an empty label too: "a..b", "."
    forbidden = " @/\"&'<>" if text.startswith("[") else " @/\"&'<>:"  # [IPv6] literal
    if any(ch in forbidden for ch in text):
        raise JIDError(f"invalid domain {text!r}")
    return text


def normalize_localpart(text: str) -> str:
    text = unicodedata.normalize("NFC", text).casefold()
    if not text or len(text.encode()) > _MAX_PART or _controls(text):
        raise JIDError(f"invalid localpart {text!r}")
    if any(ch in _LOCAL_FORBIDDEN for ch in text):
        raise JIDError(f"localpart {text!r} contains a forbidden character")
    return text


def _resource(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    if not text or not text.strip() or len(text.encode()) > _MAX_PART or _controls(text):
        raise JIDError(f"invalid resourcepart {text!r}")
    return text


@dataclass(frozen=True, slots=True)
class JID:
    """A parsed, normalised JID; `str()` gives its canonical form."""

    local: str | None
    domain: str
    resource: str | None = None

    @property
    def bare(self) -> JID:
        return JID(self.local, self.domain) if self.resource is not None else self

    def with_resource(self, resource: str) -> JID:
        return JID(self.local, self.domain, _resource(resource))

    def __str__(self) -> str:
        text = f"{self.local}@{self.domain}" if self.local is not None else self.domain
        return text if self.resource is None else f"{text}/{self.resource}"


@lru_cache(maxsize=4096)
def parse_jid(text: str) -> JID:
    """Parse and normalise a JID; raise JIDError if it is not one."""
    if not isinstance(text, str) or not text:
        raise JIDError("empty JID")
    rest, slash, resource = text.partition("/")
    local, at, domain = rest.rpartition("@")
    if not at:
        local, domain = "", rest
    elif not local:
        raise JIDError(f"{text!r}: empty localpart")
    if slash and not resource:
        raise JIDError(f"{text!r}: empty resourcepart")
    return JID(normalize_localpart(local) if at else None, _domain(domain),
               _resource(resource) if slash else None)
