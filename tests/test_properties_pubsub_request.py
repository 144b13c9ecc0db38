"""Properties of pubsub request parsing (sixnet/grid/pubsub/request.py, with its result set
management part, rsm.py): any iq a platform sends the broker is parsed into a request or
refused with a `PubSubError` (the stanza error it gets back), never anything else, quickly;
and a parsed request is one of the verbs the engine dispatches on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from sixnet.grid.pubsub.errors import PubSubError
from sixnet.grid.pubsub.request import (
    DISCO_INFO_NS,
    DISCO_ITEMS_NS,
    OWNER_NS,
    PUBSUB_NS,
    VERBS,
    PubSubRequest,
    parse_iq,
)
from sixnet.grid.pubsub.rsm import RSM_NS
from tests.support.properties import bounded, xml_text

VERB_NAMES = sorted({name for _, _, name in VERBS} | {"publish-options", "set", "bogus"})
NAMESPACES = [PUBSUB_NS, OWNER_NS, PUBSUB_NS + "#event", "urn:other"]
numerals = st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=3)
attribute_values = st.one_of(xml_text, numerals, st.sampled_from(
    ["", "1", "true", "0", "10", "1" * 12, "1" * 5000, "node", "a@b/c"]))


def attributes(element: etree._Element, draw: st.DrawFn) -> None:
    for name in draw(st.lists(st.sampled_from(["node", "jid", "subid", "id", "max_items",
                                               "notify", "affiliation", "subscription"]),
                              max_size=4, unique=True)):
        element.set(name, draw(attribute_values))


@st.composite
def rsm_sets(draw: st.DrawFn) -> etree._Element:
    result = etree.Element(f"{{{RSM_NS}}}set")
    for name in draw(st.lists(st.sampled_from(["max", "after", "before", "index", "x"]),
                              max_size=4)):
        etree.SubElement(result, f"{{{RSM_NS}}}{name}").text = draw(
            st.one_of(st.none(), attribute_values))
    return result


@st.composite
def verb_elements(draw: st.DrawFn, namespace: str) -> etree._Element:
    verb = etree.Element(f"{{{draw(st.sampled_from([namespace, *NAMESPACES]))}}}"
                         f"{draw(st.sampled_from(VERB_NAMES))}")
    attributes(verb, draw)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["item", "affiliation", "subscription", "x", "other"]))
        if kind == "x":
            child = etree.SubElement(verb, "{jabber:x:data}x", type="submit")
        else:
            child = etree.SubElement(verb, f"{{{draw(st.sampled_from(NAMESPACES))}}}{kind}")
            attributes(child, draw)
        if kind == "item" and draw(st.booleans()):
            etree.SubElement(child, "{urn:example}payload").text = draw(xml_text)
    return verb


@st.composite
def iqs(draw: st.DrawFn) -> etree._Element:
    iq = etree.Element("{jabber:client}iq")
    iq.set("type", draw(st.sampled_from(["get", "set", "result", "error", "", "GET"])))
    if draw(st.booleans()):
        iq.set("from", draw(st.sampled_from(["a@b/c", "", "x"])))
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        namespace = draw(st.sampled_from([PUBSUB_NS, OWNER_NS, DISCO_INFO_NS, DISCO_ITEMS_NS,
                                          "urn:other"]))
        container = etree.SubElement(iq, f"{{{namespace}}}"
                                     f"{'query' if 'disco' in namespace else 'pubsub'}")
        attributes(container, draw)
        for verb in draw(st.lists(verb_elements(namespace), max_size=3)):
            container.append(verb)
        if draw(st.booleans()):
            container.append(draw(rsm_sets()))
    return iq


@given(iqs())
def test_any_iq_is_a_request_or_a_stanza_error(iq: etree._Element) -> None:
    outcome = bounded(lambda: parse_iq(iq), len(etree.tostring(iq)), errors=(PubSubError,))
    assert isinstance(outcome, PubSubRequest | PubSubError)
    if isinstance(outcome, PubSubRequest):
        assert outcome.verb in {*VERBS.values(), "disco-info", "disco-items"}
        if outcome.max_items is not None:
            assert 0 <= outcome.max_items < 10 ** 9
        if outcome.page is not None:
            for number in (outcome.page.max, outcome.page.index):
                assert number is None or 0 <= number < 10 ** 9
