"""Data forms, RSM paging and IODEF validation: the pure pieces of the broker."""

from __future__ import annotations

import pytest
from lxml import etree

from sixnet.core.iodef import IODEFValidator
from sixnet.grid.pubsub.errors import PubSubError
from sixnet.grid.pubsub.forms import (
    NODE_CONFIG,
    AuthorizationDecision,
    ConfigLimits,
    DataForm,
    NodeConfig,
    authorization_form,
)
from sixnet.grid.pubsub.rsm import PageRequest, paginate, sorted_locator

from .support.iodef import IODEF

LIMITS = ConfigLimits(("authorize", "whitelist"), 500)


def form(fields: dict[str, list[str]], form_type: str = NODE_CONFIG,
         kind: str = "submit") -> etree._Element:
    x = etree.Element("{jabber:x:data}x", type=kind)
    for var, values in {"FORM_TYPE": [form_type], **fields}.items():
        field = etree.SubElement(x, "{jabber:x:data}field", var=var)
        for value in values:
            etree.SubElement(field, "{jabber:x:data}value").text = value
    return x


def test_node_config_round_trips_through_its_own_form() -> None:
    config = NodeConfig(title="t", type="urn:x", access_model="whitelist", max_items=7,
                        send_last_published_item="on_sub", notification_type="headline")
    produced = config.form(LIMITS)
    values = {f.get("var"): [v.text or "" for v in f.findall("{jabber:x:data}value")]
              for f in produced.findall("{jabber:x:data}field")}
    del values["FORM_TYPE"]
    again = NodeConfig().updated(DataForm(
        "submit", NODE_CONFIG, values), LIMITS)
    assert again == config
    assert NodeConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(("fields", "condition"), [
    ({"pubsub#max_items": ["0"]}, "not-acceptable"),
    ({"pubsub#max_items": ["501"]}, "not-acceptable"),
    ({"pubsub#access_model": ["open"]}, "not-acceptable"),
    ({"pubsub#access_model": ["presence"]}, "not-acceptable"),
    ({"pubsub#deliver_payloads": ["maybe"]}, "not-acceptable"),
    ({"pubsub#send_last_published_item": ["on_sub_and_presence"]}, "not-acceptable"),
    ({"pubsub#type": ["has space"]}, "not-acceptable"),
    ({"pubsub#title": []}, "not-acceptable"),
    ({"pubsub#children": ["x"]}, "not-acceptable"),
])
def test_bad_configuration_values(fields: dict[str, list[str]], condition: str) -> None:
    with pytest.raises(PubSubError) as caught:
        NodeConfig().updated(DataForm.parse(form(fields), NODE_CONFIG), LIMITS)
    assert caught.value.condition == condition


def test_max_items_max_means_the_service_limit() -> None:
    parsed = DataForm.parse(form({"pubsub#max_items": ["max"]}), NODE_CONFIG)
    assert NodeConfig().updated(parsed, LIMITS).max_items == 500


@pytest.mark.parametrize("element", [
    None,
    etree.Element("{urn:other}x", type="submit"),
    form({}, kind="result"),
    form({}, form_type="urn:wrong"),
    form({"pubsub#title": ["a"], "": ["b"]}),
])
def test_malformed_forms_are_bad_requests(element: etree._Element | None) -> None:
    with pytest.raises(PubSubError) as caught:
        DataForm.parse(element, NODE_CONFIG)
    assert caught.value.condition == "bad-request"


def test_duplicate_fields_are_bad_requests() -> None:
    x = form({"pubsub#title": ["a"]})
    x.append(etree.fromstring("<field xmlns='jabber:x:data' var='pubsub#title'>"
                              "<value>b</value></field>"))
    with pytest.raises(PubSubError):
        DataForm.parse(x, NODE_CONFIG)


def test_authorization_form_answer_round_trip() -> None:
    produced = authorization_form("n", "c@example", "sub1")
    produced.set("type", "submit")
    for field in produced.iter("{jabber:x:data}field"):
        if field.get("var") == "pubsub#allow":
            field.find("{jabber:x:data}value").text = "true"
    decision = AuthorizationDecision.parse(produced)
    assert decision == AuthorizationDecision("n", "c@example", "sub1", True)


def test_error_element() -> None:
    error = PubSubError("feature-not-implemented", "unsupported", feature="publish")
    xml = etree.tostring(error.element(), encoding="unicode")
    assert 'type="cancel"' in xml and 'feature="publish"' in xml
    assert "urn:ietf:params:xml:ns:xmpp-stanzas" in xml


# -- RSM -------------------------------------------------------------------------------------

KEYS = [f"k{i:02d}" for i in range(10)]


@pytest.mark.parametrize(("request_", "cap", "keys", "first"), [
    (None, 4, KEYS[:4], 0),
    (PageRequest(max=3), 4, KEYS[:3], 0),
    (PageRequest(max=50), 4, KEYS[:4], 0),
    (PageRequest(max=3, after="k05"), 10, KEYS[6:9], 6),
    (PageRequest(max=3, before="k05"), 10, KEYS[2:5], 2),
    (PageRequest(max=3, before=""), 10, KEYS[7:], 7),
    (PageRequest(max=3, index=8), 10, KEYS[8:], 8),
    (PageRequest(max=0), 10, [], 0),
])
def test_paging(request_: PageRequest | None, cap: int, keys: list[str], first: int) -> None:
    for locate in (None, sorted_locator(KEYS)):
        page = paginate(KEYS, request_, cap, locate)
        assert (list(page.keys), page.first_index, page.count) == (keys, first, 10)


def test_paging_after_unknown_key() -> None:
    with pytest.raises(PubSubError) as caught:
        paginate(KEYS, PageRequest(after="zz"), 10)
    assert caught.value.condition == "item-not-found"


def test_rsm_request_numbers_are_checked() -> None:
    parent = etree.fromstring("<q><set xmlns='http://jabber.org/protocol/rsm'>"
                              "<max>-1</max></set></q>")
    with pytest.raises(PubSubError):
        PageRequest.parse(parent)


# -- IODEF -----------------------------------------------------------------------------------



def test_iodef_validation_inside_a_stanza() -> None:
    validator = IODEFValidator()
    item = etree.fromstring(f"<item xmlns='http://jabber.org/protocol/pubsub'>{IODEF}</item>")
    assert validator.problem(item[0]) is None
    bad = etree.fromstring(IODEF.replace("<GenerationTime>2015-07-18T09:00:00-05:00"
                                         "</GenerationTime>", ""))
    problem = validator.problem(bad)
    assert problem is not None and "GenerationTime" in problem
