"""Properties of JID parsing (sixnet/grid/jid.py): any string a stanza can carry in 'to' or
'from' gives a JID or `JIDError`, quickly, and a parsed JID is a fixed point of parsing."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from sixnet.grid.jid import JID, JIDError, parse_jid
from tests.support.properties import bounded, xml_characters, xml_text

#: Pieces that matter to the parser, mixed into arbitrary text.
separators = st.sampled_from(["@", "/", ".", "[", "]", ":", " ", "\u0130", "\u00df", "\ufb01"])
jid_like = st.lists(st.one_of(xml_text, separators), max_size=8).map("".join)
part = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn", "Zs"),
                             exclude_characters="\"&'/:<>@[]"), min_size=1, max_size=20)


def parse(text: str) -> JID | BaseException:
    parse_jid.cache_clear()
    return bounded(lambda: parse_jid(text), len(text.encode("utf-8", "surrogatepass")),
                   errors=(JIDError,))


@given(st.one_of(st.text(max_size=200), jid_like))
def test_any_string_is_a_jid_or_jid_error(text: str) -> None:
    outcome = parse(text)
    assert isinstance(outcome, JID | JIDError)


@given(jid_like)
def test_a_parsed_jid_is_a_fixed_point(text: str) -> None:
    """Its canonical form parses to the same JID: comparisons and routing agree."""
    jid = parse(text)
    if isinstance(jid, JID):
        assert parse(str(jid)) == jid
        assert parse(str(jid.bare)) == jid.bare


@given(st.one_of(st.none(), part), part.map(str.lower), st.one_of(st.none(), part))
def test_parts_come_back(local: str | None, domain: str, resource: str | None) -> None:
    text = (f"{local}@" if local else "") + domain + (f"/{resource}" if resource else "")
    jid = parse(text)
    if isinstance(jid, JID):
        assert (jid.local is None) == (local is None)
        assert (jid.resource is None) == (resource is None)


@given(st.integers(1020, 1030), st.sampled_from(["local", "domain", "resource"]),
       xml_characters.filter(lambda c: c not in "@/"))
def test_parts_longer_than_1023_bytes_are_refused(size: int, which: str, ch: str) -> None:
    long = ch * (size // len(ch.encode()) + 1)
    text = {"local": f"{long}@example.org", "domain": f"a@{long}",
            "resource": f"a@example.org/{long}"}[which]
    outcome = parse(text)
    # the limit is on the normalised part (NFC may shorten it, case folding lengthen it)
    normalised = unicodedata.normalize("NFC", long)
    if which != "resource":
        normalised = unicodedata.normalize("NFC", normalised.casefold())
    if len(normalised.encode()) > 1023:
        assert isinstance(outcome, JIDError)
