"""Properties of IRP request parsing (sixnet/irp/wire.py `parse_request`): any element a caller
sends is one typed request of the operation it names, or an `IRPError` with one of the
conditions docs/irp.rst defines (the error the caller gets back), never anything else, quickly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from sixnet.irp.wire import CONDITIONS, NS, OPERATIONS, IRPError, Limits, Request, parse_request
from tests.support.properties import bounded, xml_text

NAMES = [*OPERATIONS, "bogus", "person"]
ATTRIBUTES = ["id", "user", "device", "lifetime", "ip", "port", "serial", "password", "code",
              "after", "limit", "reason", "kind", "x"]
numerals = st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=3)
values = st.one_of(xml_text, numerals, st.sampled_from(
    ["", "r1", "alice@example.test", "ALICE@Example.Test", "a@b..c", "1", "0", "-1", "86401",
     "9" * 5000, "2001:db8::7", "::ffff:192.0.2.1", "192.0.2.300", "4605", "65536", "0a1b",
     "bm90IGJhc2U2NA==", "===", "phone", "x" * 65]))


def attributes(element: etree._Element, draw: st.DrawFn) -> None:
    for name in draw(st.lists(st.sampled_from(ATTRIBUTES), max_size=5, unique=True)):
        element.set(name, draw(values))


@st.composite
def requests(draw: st.DrawFn) -> etree._Element:
    namespace = draw(st.sampled_from([NS, NS, NS, "urn:sixnet:irp:2", "urn:other"]))
    element = etree.Element(f"{{{namespace}}}{draw(st.sampled_from(NAMES))}")
    attributes(element, draw)
    if draw(st.booleans()):
        element.set("id", draw(st.sampled_from(["r1", "a" * 64, "a" * 65, "bad id", ""])))
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["address", "csr", "data", "password", "code", "other"]))
        child = etree.SubElement(element, f"{{{draw(st.sampled_from([NS, 'urn:other']))}}}"
                                          f"{kind}")
        attributes(child, draw)
        if draw(st.booleans()):
            child.text = draw(st.one_of(values, st.just("-----BEGIN CERTIFICATE REQUEST-----")))
    return element


@given(requests(), st.integers(1, 4))
def test_any_element_is_a_typed_request_or_an_irp_error(element: etree._Element,
                                                        max_addresses: int) -> None:
    limits = Limits(max_addresses=max_addresses)
    outcome = bounded(lambda: parse_request(element, limits), len(etree.tostring(element)),
                      errors=(IRPError,))
    if isinstance(outcome, IRPError):
        assert outcome.condition in CONDITIONS
        return
    assert isinstance(outcome, Request)
    assert type(outcome).op == etree.QName(element).localname
    assert outcome.id == element.get("id")
    addresses = getattr(outcome, "addresses", ())
    assert len(addresses) <= max_addresses
