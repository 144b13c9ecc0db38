"""Properties of the pubsub data forms (sixnet/grid/pubsub/forms.py): any element a request can
carry where a form belongs gives a parsed form or a `PubSubError` (the requester's stanza
error), never anything else, quickly; so does applying a parsed form to a topic's
configuration, to publish-options preconditions, to subscription options and to an owner's
authorization decision. The configuration form this service hands out, submitted back,
changes nothing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from sixnet.grid.pubsub.errors import PubSubError
from sixnet.grid.pubsub.forms import (
    CONFIG_FIELDS,
    DATA_NS,
    NODE_CONFIG,
    PUBLISH_OPTIONS,
    SUBSCRIBE_AUTHORIZATION,
    SUBSCRIBE_OPTIONS,
    AuthorizationDecision,
    ConfigLimits,
    DataForm,
    NodeConfig,
    check_preconditions,
    parse_options,
)
from tests.support.properties import bounded, xml_text

LIMITS = ConfigLimits(max_items_limit=1000)
FORM_TYPES = [NODE_CONFIG, PUBLISH_OPTIONS, SUBSCRIBE_AUTHORIZATION, SUBSCRIBE_OPTIONS]
X = f"{{{DATA_NS}}}"

#: Numbers in any script: str.isdigit() is true for some that int() cannot read.
numerals = st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=3)
#: Values that matter to the field parsers, beside arbitrary text.
values = st.one_of(xml_text, numerals, st.sampled_from([
    "1", "0", "true", "false", "max", "100", "0100", "1001", "-1", "\u00b2", "\u0663",
    "1e3", " 5", "authorize", "whitelist", "open", "never", "on_sub", "normal", "headline",
    "urn:ietf:params:xml:ns:iodef-2.0", "a b", "x" * 1100, "1" * 5000]))
variables = st.one_of(st.sampled_from(["FORM_TYPE", "pubsub#deliver", "pubsub#node",
                                       "pubsub#subscriber_jid", "pubsub#allow",
                                       "pubsub#subid", "", *CONFIG_FIELDS]), xml_text)


@st.composite
def fields(draw: st.DrawFn) -> etree._Element:
    field = etree.Element(X + "field")
    var = draw(st.one_of(st.none(), variables))
    if var is not None:
        field.set("var", var)
    if var == "FORM_TYPE" and draw(st.booleans()):
        etree.SubElement(field, X + "value").text = draw(st.sampled_from(FORM_TYPES))
    for value in draw(st.lists(st.one_of(st.none(), values), max_size=3)):
        etree.SubElement(field, X + "value").text = value
    if draw(st.booleans()):
        etree.SubElement(field, draw(st.sampled_from([X + "option", "{urn:other}value"])))
    return field


@st.composite
def forms(draw: st.DrawFn) -> etree._Element:
    tag = draw(st.sampled_from([X + "x", X + "x", X + "x", "{urn:other}x", X + "form"]))
    form = etree.Element(tag)
    kind = draw(st.one_of(st.none(), st.sampled_from(["submit", "cancel", "form", "result"]),
                          xml_text))
    if kind is not None:
        form.set("type", kind)
    if draw(st.booleans()):
        hidden = etree.SubElement(form, X + "field", var="FORM_TYPE")
        etree.SubElement(hidden, X + "value").text = draw(st.sampled_from(FORM_TYPES))
    for field in draw(st.lists(fields(), max_size=5)):
        form.append(field)
    return form


@st.composite
def plausible_forms(draw: st.DrawFn) -> etree._Element:
    """A submitted form of the right FORM_TYPE whose fields are known, values anything."""
    form_type = draw(st.sampled_from(FORM_TYPES))
    form = etree.Element(X + "x", type="submit")
    hidden = etree.SubElement(form, X + "field", var="FORM_TYPE")
    etree.SubElement(hidden, X + "value").text = form_type
    known = [*CONFIG_FIELDS, "pubsub#deliver", "pubsub#node", "pubsub#subscriber_jid",
             "pubsub#allow", "pubsub#subid"]
    for var in draw(st.lists(st.sampled_from(known), max_size=4, unique=True)):
        field = etree.SubElement(form, X + "field", var=var)
        for value in draw(st.lists(values, min_size=1, max_size=2)):
            etree.SubElement(field, X + "value").text = value
    return form


any_forms = st.one_of(forms(), plausible_forms())


def size(element: etree._Element | None) -> int:
    return 0 if element is None else len(etree.tostring(element))


@pytest.mark.parametrize("var", sorted(CONFIG_FIELDS))
@given(value=values)
def test_each_configuration_value_parses_or_is_a_stanza_error(var: str, value: str) -> None:
    outcome = bounded(lambda: CONFIG_FIELDS[var].parse(var, value, LIMITS),
                      len(value.encode()), errors=(PubSubError,))
    assert not isinstance(outcome, PubSubError) or outcome.condition == "not-acceptable"


@given(st.one_of(st.none(), any_forms), st.sampled_from(FORM_TYPES),
       st.sampled_from([("submit",), ("submit", "cancel"), ("result",)]))
def test_a_form_parses_or_is_a_stanza_error(element: etree._Element | None, form_type: str,
                                            types: tuple[str, ...]) -> None:
    outcome = bounded(lambda: DataForm.parse(element, form_type, types), size(element),
                      errors=(PubSubError,))
    assert isinstance(outcome, DataForm | PubSubError)


@given(any_forms, st.sampled_from(FORM_TYPES))
def test_using_a_parsed_form_gives_a_result_or_a_stanza_error(element: etree._Element,
                                                              form_type: str) -> None:
    element.set("type", "submit")
    declared = element.findtext(f"{X}field[@var='FORM_TYPE']/{X}value")
    form_type = declared if declared in FORM_TYPES else form_type
    form = bounded(lambda: DataForm.parse(element, form_type, ("submit", "cancel")),
                   size(element), errors=(PubSubError,))
    if isinstance(form, PubSubError):
        return
    uses = {
        NODE_CONFIG: lambda: NodeConfig().updated(form, LIMITS),
        PUBLISH_OPTIONS: lambda: check_preconditions(form, NodeConfig(), LIMITS),
        SUBSCRIBE_OPTIONS: lambda: parse_options(form),
        SUBSCRIBE_AUTHORIZATION: lambda: AuthorizationDecision.parse(element),
    }
    outcome = bounded(uses[form_type], size(element), errors=(PubSubError,))
    assert isinstance(outcome, NodeConfig | bool | AuthorizationDecision | PubSubError)
    if isinstance(outcome, NodeConfig):
        assert 1 <= outcome.max_items <= LIMITS.max_items_limit
        assert outcome.access_model in LIMITS.access_models
        assert NodeConfig.from_json(outcome.to_json()) == outcome


@st.composite
def configurations(draw: st.DrawFn) -> NodeConfig:
    return NodeConfig(
        title=draw(xml_text), type=draw(st.sampled_from(["", "urn:example:x"])),
        access_model=draw(st.sampled_from(LIMITS.access_models)),
        persist_items=draw(st.booleans()), max_items=draw(st.integers(1, 1000)),
        deliver_payloads=draw(st.booleans()),
        send_last_published_item=draw(st.sampled_from(["never", "on_sub"])),
        notify_retract=draw(st.booleans()), notify_delete=draw(st.booleans()),
        notify_config=draw(st.booleans()),
        notification_type=draw(st.sampled_from(["normal", "headline"])))


@given(configurations())
def test_the_configuration_form_submitted_back_changes_nothing(config: NodeConfig) -> None:
    element = config.form(LIMITS)
    element.set("type", "submit")
    for field in element.iterchildren(X + "field"):
        for option in field.findall(X + "option"):
            field.remove(option)
    form = DataForm.parse(etree.fromstring(etree.tostring(element)), NODE_CONFIG)
    assert config.updated(form, LIMITS) == config
    assert check_preconditions(form, config, LIMITS)
