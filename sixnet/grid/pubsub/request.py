"""A stanza to the broker, parsed once into a request that names its verb (as wokkel does).

The engine dispatches on `PubSubRequest.verb`; parse problems are raised as the XEP-0060 error
the requester gets, before any state is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lxml import etree

from sixnet.grid.pubsub.errors import PubSubError, bad_request
from sixnet.grid.pubsub.forms import DATA_NS
from sixnet.grid.pubsub.rsm import PageRequest

PUBSUB_NS = "http://jabber.org/protocol/pubsub"
OWNER_NS = PUBSUB_NS + "#owner"
EVENT_NS = PUBSUB_NS + "#event"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
_P = f"{{{PUBSUB_NS}}}"
_O = f"{{{OWNER_NS}}}"
_X = f"{{{DATA_NS}}}x"

#: (iq type, namespace, first child) -> verb. Children allowed beside it are listed below.
VERBS = {
    ("set", PUBSUB_NS, "create"): "create",
    ("set", PUBSUB_NS, "publish"): "publish",
    ("set", PUBSUB_NS, "retract"): "retract",
    ("set", PUBSUB_NS, "subscribe"): "subscribe",
    ("set", PUBSUB_NS, "unsubscribe"): "unsubscribe",
    ("get", PUBSUB_NS, "options"): "options-get",
    ("set", PUBSUB_NS, "options"): "options-set",
    ("get", PUBSUB_NS, "items"): "items",
    ("get", PUBSUB_NS, "subscriptions"): "own-subscriptions",
    ("get", PUBSUB_NS, "affiliations"): "own-affiliations",
    ("get", OWNER_NS, "configure"): "configure-get",
    ("set", OWNER_NS, "configure"): "configure-set",
    ("get", OWNER_NS, "default"): "default",
    ("set", OWNER_NS, "delete"): "delete",
    ("set", OWNER_NS, "purge"): "purge",
    ("get", OWNER_NS, "subscriptions"): "subscriptions-get",
    ("set", OWNER_NS, "subscriptions"): "subscriptions-set",
    ("get", OWNER_NS, "affiliations"): "affiliations-get",
    ("set", OWNER_NS, "affiliations"): "affiliations-set",
}
#: Elements that may accompany a verb's element in the same <pubsub/>.
COMPANIONS = {"create": {"configure"}, "publish": {"publish-options"},
              "subscribe": {"options"}, "items": {"set"}}


@dataclass
class PubSubRequest:
    """One request: who asked, which verb, and the verb's arguments."""

    verb: str
    sender: str
    node: str | None = None
    jid: str | None = None
    subid: str | None = None
    form: etree._Element | None = None
    item_ids: list[str] = field(default_factory=list)
    item: etree._Element | None = None
    max_items: int | None = None
    notify: bool = False
    page: PageRequest | None = None
    entries: list[tuple[str, str | None]] = field(default_factory=list)


def parse_iq(iq: etree._Element) -> PubSubRequest:
    """Parse an iq get/set to the broker; an unknown payload is service-unavailable."""
    kind = iq.get("type")
    sender = iq.get("from") or ""
    children = [c for c in iq if isinstance(c.tag, str)]
    if len(children) != 1:
        raise bad_request(text="an iq get or set carries exactly one child")
    (child,) = children
    namespace = etree.QName(child).namespace
    if child.tag == f"{{{DISCO_INFO_NS}}}query" and kind == "get":
        return PubSubRequest("disco-info", sender, node=child.get("node"))
    if child.tag == f"{{{DISCO_ITEMS_NS}}}query" and kind == "get":
        return PubSubRequest("disco-items", sender, node=child.get("node"),
                             page=PageRequest.parse(child))
    if child.tag not in (_P + "pubsub", _O + "pubsub"):
        raise PubSubError("service-unavailable")
    verbs = [c for c in child if isinstance(c.tag, str)]
    if not verbs:
        raise bad_request(text="the pubsub element is empty")
    main = verbs[0]
    main_name = etree.QName(main).localname
    verb = VERBS.get((kind, namespace, main_name))
    if verb is None or etree.QName(main).namespace != namespace:
        raise PubSubError("feature-not-implemented", "unsupported",
                          feature=_feature_of(main_name))
    allowed = COMPANIONS.get(verb, set())
    for extra in verbs[1:]:
        if etree.QName(extra).localname not in allowed:
            raise bad_request(text=f"<{etree.QName(extra).localname}/> cannot accompany "
                                   f"<{main_name}/>")
    request = PubSubRequest(verb, sender, node=main.get("node"), jid=main.get("jid"),
                            subid=main.get("subid"))
    return _ARGUMENTS.get(verb, _nothing_more)(request, main, child)


def _feature_of(name: str) -> str:
    return {"configure": "config-node", "default": "retrieve-default",
            "subscriptions": "manage-subscriptions", "affiliations": "modify-affiliations",
            }.get(name, name)


def _nothing_more(request: PubSubRequest, main: etree._Element,
                  pubsub: etree._Element) -> PubSubRequest:
    return request


def _form_in(element: etree._Element | None) -> etree._Element | None:
    return None if element is None else element.find(_X)


def _create(request: PubSubRequest, main: etree._Element,
            pubsub: etree._Element) -> PubSubRequest:
    configure = pubsub.find(_P + "configure")
    request.form = _form_in(configure)
    return request


def _publish(request: PubSubRequest, main: etree._Element,
             pubsub: etree._Element) -> PubSubRequest:
    items = list(main.iterchildren(_P + "item"))
    if len(items) != 1 or len([c for c in main if isinstance(c.tag, str)]) != 1:
        raise bad_request("item-required", "publish exactly one <item/>")
    request.item = items[0]
    options = pubsub.find(_P + "publish-options")
    if options is not None:
        request.form = options.find(_X)
        if request.form is None:
            raise bad_request(text="publish-options without a form")
    return request


def _item_ids(main: etree._Element) -> list[str]:
    ids = []
    for item in main.iterchildren(_P + "item"):
        item_id = item.get("id")
        if not item_id:
            raise bad_request("item-required", "an <item/> has no id")
        ids.append(item_id)
    return ids


def _retract(request: PubSubRequest, main: etree._Element,
             pubsub: etree._Element) -> PubSubRequest:
    request.item_ids = _item_ids(main)
    if not request.item_ids:
        raise bad_request("item-required")
    request.notify = main.get("notify") in ("1", "true")
    return request


def _subscribe(request: PubSubRequest, main: etree._Element,
               pubsub: etree._Element) -> PubSubRequest:
    if not request.jid:
        raise bad_request("invalid-jid", "subscribe needs a jid")
    request.form = _form_in(pubsub.find(_P + "options"))
    return request


def _options_set(request: PubSubRequest, main: etree._Element,
                 pubsub: etree._Element) -> PubSubRequest:
    request.form = main.find(_X)
    return request


def _items(request: PubSubRequest, main: etree._Element,
           pubsub: etree._Element) -> PubSubRequest:
    max_items = main.get("max_items")
    if max_items is not None:
        if not (max_items.isascii() and max_items.isdigit()) or len(max_items) > 9:
            raise bad_request(text="max_items must be a positive integer")
        request.max_items = int(max_items)
    request.item_ids = _item_ids(main)
    request.page = PageRequest.parse(pubsub)
    return request


def _configure_set(request: PubSubRequest, main: etree._Element,
                   pubsub: etree._Element) -> PubSubRequest:
    request.form = main.find(_X)
    return request


def _entries(request: PubSubRequest, main: etree._Element,
             pubsub: etree._Element) -> PubSubRequest:
    tag = _O + ("affiliation" if request.verb == "affiliations-set" else "subscription")
    attribute = "affiliation" if request.verb == "affiliations-set" else "subscription"
    for entry in main.iterchildren(tag):
        jid = entry.get("jid")
        if not jid:
            raise bad_request(text=f"an <{attribute}/> has no jid")
        request.entries.append((jid, entry.get(attribute)))
    return request


_ARGUMENTS = {
    "create": _create,
    "publish": _publish,
    "retract": _retract,
    "subscribe": _subscribe,
    "options-set": _options_set,
    "items": _items,
    "configure-set": _configure_set,
    "affiliations-set": _entries,
    "subscriptions-set": _entries,
}
