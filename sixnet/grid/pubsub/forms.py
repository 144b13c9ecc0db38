"""XEP-0004 data forms for pubsub: node configuration, meta-data, subscription authorization
and options, publish-options preconditions.

Parsing is strict: a form that is not a ``jabber:x:data`` form of the expected FORM_TYPE is a
``bad-request``; a field this service does not know, or a value it cannot accept, is
``not-acceptable`` (XEP-0060 sections 8.2.5 and 7.1.5).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lxml import etree

from sixnet.grid.pubsub.errors import bad_request, not_acceptable

DATA_NS = "jabber:x:data"
PUBSUB_NS = "http://jabber.org/protocol/pubsub"
NODE_CONFIG = PUBSUB_NS + "#node_config"
META_DATA = PUBSUB_NS + "#meta-data"
SUBSCRIBE_AUTHORIZATION = PUBSUB_NS + "#subscribe_authorization"
SUBSCRIBE_OPTIONS = PUBSUB_NS + "#subscribe_options"
PUBLISH_OPTIONS = PUBSUB_NS + "#publish-options"
_X = f"{{{DATA_NS}}}"


@dataclass
class DataForm:
    """A parsed form: its type, FORM_TYPE and the values of each field."""

    type: str
    form_type: str | None
    values: dict[str, list[str]]

    @classmethod
    def parse(cls, element: etree._Element | None, form_type: str,
              types: Iterable[str] = ("submit",)) -> DataForm:
        """Parse a form that must be of `form_type` and one of `types`; else bad-request."""
        if element is None or element.tag != _X + "x":
            raise bad_request(text="a jabber:x:data form is required")
        kind = element.get("type")
        if kind not in types:
            raise bad_request(text=f"form type must be {' or '.join(types)}")
        values: dict[str, list[str]] = {}
        for field in element.iterchildren(_X + "field"):
            var = field.get("var")
            if not var:
                raise bad_request(text="a form field has no var")
            if var in values:
                raise bad_request(text=f"field {var} appears twice")
            values[var] = [v.text or "" for v in field.iterchildren(_X + "value")]
        found = values.pop("FORM_TYPE", [None])
        if kind != "cancel" and found != [form_type]:
            raise bad_request(text=f"FORM_TYPE must be {form_type}")
        return cls(kind, form_type, values)

    def single(self, var: str) -> str:
        values = self.values.get(var, [])
        if len(values) != 1:
            raise not_acceptable(text=f"{var} needs exactly one value")
        return values[0]


@dataclass(frozen=True)
class FormField:
    """A field of a form this service produces."""

    var: str
    type: str
    label: str | None = None
    values: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def build_form(form_type: str, kind: str, fields: Iterable[FormField],
               title: str | None = None) -> etree._Element:
    form = etree.Element(_X + "x", type=kind, nsmap={None: DATA_NS})
    if title:
        etree.SubElement(form, _X + "title").text = title
    hidden = etree.SubElement(form, _X + "field", var="FORM_TYPE", type="hidden")
    etree.SubElement(hidden, _X + "value").text = form_type
    for f in fields:
        el = etree.SubElement(form, _X + "field", var=f.var, type=f.type)
        if f.label:
            el.set("label", f.label)
        for value in f.values:
            etree.SubElement(el, _X + "value").text = value
        for option in f.options:
            etree.SubElement(etree.SubElement(el, _X + "option"), _X + "value").text = option
    return form


# -- values ----------------------------------------------------------------------------------


def parse_boolean(var: str, value: str) -> bool:
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise not_acceptable(text=f"{var} must be a boolean (1, 0, true, false)")


def show_boolean(value: bool) -> str:
    return "1" if value else "0"


# -- node configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigLimits:
    """Service settings that bound what an owner may configure."""

    access_models: tuple[str, ...] = ("authorize", "whitelist")
    max_items_limit: int = 1000


@dataclass(frozen=True)
class NodeConfig:
    """One topic's configuration (``pubsub#node_config``)."""

    title: str = ""
    type: str = ""
    access_model: str = "authorize"
    persist_items: bool = True
    max_items: int = 100
    deliver_payloads: bool = True
    send_last_published_item: str = "never"
    notify_retract: bool = True
    notify_delete: bool = True
    notify_config: bool = False
    notification_type: str = "normal"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})

    def form_value(self, var: str) -> str:
        """A setting as it appears in a form."""
        spec = CONFIG_FIELDS[var]
        value = getattr(self, spec.attribute)
        return show_boolean(value) if isinstance(value, bool) else str(value)

    def form(self, limits: ConfigLimits) -> etree._Element:
        """The configuration form an owner fills in (type ``form``)."""
        return build_form(NODE_CONFIG, "form", [
            FormField(var, spec.type, spec.label, (self.form_value(var),),
                      spec.options(limits) if spec.options else ())
            for var, spec in CONFIG_FIELDS.items()])

    def updated(self, form: DataForm, limits: ConfigLimits) -> NodeConfig:
        """This configuration changed by a submitted form; unknown fields are refused."""
        if form.type == "cancel":
            return self
        changes = {}
        for var in form.values:
            spec = CONFIG_FIELDS.get(var)
            if spec is None:
                raise not_acceptable(text=f"{var} is not a configuration option here")
            changes[spec.attribute] = spec.parse(var, form.single(var), limits)
        return dataclasses.replace(self, **changes)

    def meta_data(self, owners: Iterable[str], created: str) -> etree._Element:
        """The ``pubsub#meta-data`` form of disco#info on the topic (RFC 8600 section 6)."""
        return build_form(META_DATA, "result", [
            FormField("pubsub#type", "text-single", "Payload type", (self.type,)),
            FormField("pubsub#title", "text-single", "A short name for the node",
                      (self.title,)),
            FormField("pubsub#access_model", "list-single", "Access model",
                      (self.access_model,)),
            FormField("pubsub#owner", "jid-multi", "Node owners", tuple(sorted(owners))),
            FormField("pubsub#creation_date", "text-single", "Creation date", (created,)),
        ])


@dataclass(frozen=True)
class ConfigField:
    attribute: str
    type: str
    label: str
    parse: Callable[[str, str, ConfigLimits], object]
    options: Callable[[ConfigLimits], tuple[str, ...]] | None = None


def _text(var: str, value: str, limits: ConfigLimits) -> str:
    if len(value) > 1024:
        raise not_acceptable(text=f"{var} is longer than 1024 characters")
    return value


def _boolean(var: str, value: str, limits: ConfigLimits) -> bool:
    return parse_boolean(var, value)


def _choice(*choices: str) -> Callable[[str, str, ConfigLimits], str]:
    def parse(var: str, value: str, limits: ConfigLimits) -> str:
        if value not in choices:
            raise not_acceptable(text=f"{var} must be one of {', '.join(choices)}")
        return value
    return parse


def _access_model(var: str, value: str, limits: ConfigLimits) -> str:
    if value not in limits.access_models:
        raise not_acceptable(
            text=f"{var} must be one of {', '.join(limits.access_models)} on this service")
    return value


def _max_items(var: str, value: str, limits: ConfigLimits) -> int:
    if value == "max":
        return limits.max_items_limit
    if not (value.isascii() and value.isdigit() and len(value) <= 9) \
            or not 1 <= int(value) <= limits.max_items_limit:
        raise not_acceptable(text=f"{var} must be 1-{limits.max_items_limit} or max")
    return int(value)


def _payload_type(var: str, value: str, limits: ConfigLimits) -> str:
    if value and (any(c.isspace() for c in value) or len(value) > 1024):
        raise not_acceptable(text=f"{var} must be a namespace name")
    return value


#: The configuration options this service supports, in the order its forms show them.
CONFIG_FIELDS: dict[str, ConfigField] = {
    "pubsub#title": ConfigField("title", "text-single", "A short name for the node", _text),
    "pubsub#type": ConfigField("type", "text-single", "Payload namespace", _payload_type),
    "pubsub#access_model": ConfigField("access_model", "list-single", "Access model",
                                       _access_model, lambda limits: limits.access_models),
    "pubsub#persist_items": ConfigField("persist_items", "boolean",
                                        "Persist items to storage", _boolean),
    "pubsub#max_items": ConfigField("max_items", "text-single", "Max # of items to persist",
                                    _max_items),
    "pubsub#deliver_payloads": ConfigField("deliver_payloads", "boolean",
                                           "Deliver payloads with event notifications",
                                           _boolean),
    "pubsub#send_last_published_item": ConfigField(
        "send_last_published_item", "list-single", "When to send the last published item",
        _choice("never", "on_sub"), lambda limits: ("never", "on_sub")),
    "pubsub#notify_retract": ConfigField("notify_retract", "boolean",
                                         "Notify subscribers when items are removed",
                                         _boolean),
    "pubsub#notify_delete": ConfigField("notify_delete", "boolean",
                                        "Notify subscribers when the node is deleted",
                                        _boolean),
    "pubsub#notify_config": ConfigField("notify_config", "boolean",
                                        "Notify subscribers when the configuration changes",
                                        _boolean),
    "pubsub#notification_type": ConfigField(
        "notification_type", "list-single",
        "Message type of notifications (headline: never stored for offline subscribers)",
        _choice("normal", "headline"), lambda limits: ("normal", "headline")),
}


def check_preconditions(form: DataForm, config: NodeConfig, limits: ConfigLimits) -> bool:
    """Whether publish-options preconditions hold (XEP-0060 section 7.1.5).

    An unknown or malformed precondition is refused; a mismatch returns False.
    """
    for var in form.values:
        spec = CONFIG_FIELDS.get(var)
        if spec is None:
            raise not_acceptable(text=f"{var} is not a configuration option here")
        wanted = form.single(var)
        if spec.parse is _boolean:
            if parse_boolean(var, wanted) != getattr(config, spec.attribute):
                return False
        elif wanted != config.form_value(var):
            return False
    return True


# -- subscriptions ---------------------------------------------------------------------------


def authorization_form(node: str, subscriber: str, subid: str) -> etree._Element:
    """The form an owner receives for a pending subscription (XEP-0060 section 8.6)."""
    return build_form(SUBSCRIBE_AUTHORIZATION, "form", [
        FormField("pubsub#subid", "hidden", None, (subid,)),
        FormField("pubsub#node", "text-single", "Node ID", (node,)),
        FormField("pubsub#subscriber_jid", "jid-single", "Subscriber Address", (subscriber,)),
        FormField("pubsub#allow", "boolean",
                  "Allow this JID to subscribe to this pubsub node?", ("false",)),
    ], title="PubSub subscriber request")


@dataclass(frozen=True)
class AuthorizationDecision:
    """An owner's answer to a pending subscription."""

    node: str
    subscriber: str
    subid: str | None
    allow: bool

    @classmethod
    def parse(cls, element: etree._Element) -> AuthorizationDecision:
        form = DataForm.parse(element, SUBSCRIBE_AUTHORIZATION)
        subid = form.values.get("pubsub#subid")
        return cls(form.single("pubsub#node"), form.single("pubsub#subscriber_jid"),
                   subid[0] if subid else None,
                   parse_boolean("pubsub#allow", form.single("pubsub#allow")))


def options_form(deliver: bool) -> etree._Element:
    """Subscription options (``pubsub#subscribe_options``): whether to deliver at all."""
    return build_form(SUBSCRIBE_OPTIONS, "form", [
        FormField("pubsub#deliver", "boolean", "Enable delivery?", (show_boolean(deliver),))])


def parse_options(form: DataForm) -> bool:
    """The `deliver` option from a submitted subscription options form."""
    for var in form.values:
        if var != "pubsub#deliver":
            raise not_acceptable(text=f"{var} is not a subscription option here")
    if "pubsub#deliver" not in form.values:
        return True
    return parse_boolean("pubsub#deliver", form.single("pubsub#deliver"))
