"""XEP-0060 publish-subscribe from the client side, over any `IXMPPSession`.

Written against what sixnet's broker speaks (docs/pubsub.rst) and kept to plain XEP-0060,
so that it also works with other servers' pubsub services::

    pubsub = PubSubClient(session, "broker.example.org")
    page = await pubsub.topics(max=50)                # XEP-0059 paging: page.last, page.count
    info = await pubsub.info("MILEHost")              # info.type is pubsub#type
    await pubsub.create("MILEHost", access_model="authorize",
                        options={"pubsub#type": IODEF_NS})
    item_id = await pubsub.publish("MILEHost", payload, item_id=None)
    page = await pubsub.items("MILEHost", max=20, after=page.last)
    sub = await pubsub.subscribe("MILEHost")          # sub.state: subscribed or pending
    for request in await pubsub.pending("MILEHost"):  # owners
        await pubsub.approve("MILEHost", request.jid)
    session.add_message_handler(lambda m: [print(n) for n in Notification.parse(m)])

Pending requests are read from the owner's subscription list (XEP-0060 8.8.1; sixnet has no
XEP-0050 get-pending command) and approved or denied by setting the subscription (8.8.2),
which is an iq: the owner learns whether it worked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lxml import etree

from sixnet.grid.client.errors import ClientError
from sixnet.grid.client.session import IXMPPSession
from sixnet.grid.xmpp import NS_CLIENT, NS_DELAY, NS_DISCO_INFO, NS_DISCO_ITEMS

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_OWNER = NS_PUBSUB + "#owner"
NS_EVENT = NS_PUBSUB + "#event"
NS_DATA = "jabber:x:data"
NS_RSM = "http://jabber.org/protocol/rsm"
NODE_CONFIG = NS_PUBSUB + "#node_config"
META_DATA = NS_PUBSUB + "#meta-data"

_P, _O, _E = f"{{{NS_PUBSUB}}}", f"{{{NS_OWNER}}}", f"{{{NS_EVENT}}}"
_X, _R = f"{{{NS_DATA}}}", f"{{{NS_RSM}}}"

#: A data form's values: each field's list of values.
Form = dict[str, list[str]]


class PubSubClientError(ClientError):
    """A request this client refuses to send, or an answer it cannot read."""


@dataclass(frozen=True)
class Page:
    """One page of a paged result (XEP-0059): `first`/`last` are the keys to go on from,
    `count` the total the service reports (None when it does not page), `index` the
    position of the first in the whole result."""

    first: str | None = None
    last: str | None = None
    count: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Topic:
    node: str
    name: str | None = None


@dataclass(frozen=True)
class TopicPage:
    topics: list[Topic]
    page: Page


@dataclass(frozen=True)
class TopicInfo:
    """disco#info of a topic: identities, features and the ``pubsub#meta-data`` form."""

    node: str
    identities: list[tuple[str, str]]
    features: list[str]
    meta: Form

    def value(self, var: str) -> str | None:
        values = self.meta.get(var)
        return values[0] if values else None

    @property
    def type(self) -> str | None:
        """``pubsub#type``: the payload namespace of the topic."""
        return self.value("pubsub#type")


@dataclass(frozen=True)
class Item:
    id: str
    payload: etree._Element | None


@dataclass(frozen=True)
class ItemPage:
    items: list[Item]
    page: Page


@dataclass(frozen=True)
class Subscription:
    node: str
    jid: str
    state: str  # subscribed, pending, unconfigured, none
    subid: str | None = None


@dataclass(frozen=True)
class Notification:
    """One published item as it reached us (``<event><items><item>``), with the XEP-0203
    delay stamp when the server kept it while we were offline."""

    node: str
    item_id: str | None
    payload: etree._Element | None
    delay: str | None = None
    sender: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, message: etree._Element) -> list[Notification]:
        """The item notifications in a message (none if it is not a pubsub event)."""
        event = message.find(_E + "event")
        if event is None or message.get("type") == "error":
            return []
        delay = message.find(f"{{{NS_DELAY}}}delay")
        stamp = delay.get("stamp") if delay is not None else None
        found = []
        for items in event.iterchildren(_E + "items"):
            for item in items.iterchildren(_E + "item"):
                payload = next((c for c in item if isinstance(c.tag, str)), None)
                found.append(cls(items.get("node", ""), item.get("id"), payload, stamp,
                                 message.get("from")))
        return found


def _iq(kind: str, to: str, child: etree._Element) -> etree._Element:
    iq = etree.Element(f"{{{NS_CLIENT}}}iq", type=kind, to=to, nsmap={None: NS_CLIENT})
    iq.append(child)
    return iq


def _el(tag: str, namespace: str, **attributes: str | None) -> etree._Element:
    node = etree.Element(f"{{{namespace}}}{tag}", nsmap={None: namespace})
    for name, value in attributes.items():
        if value is not None:
            node.set(name, value)
    return node


def rsm_set(max: int | None = None, after: str | None = None,
            before: str | None = None) -> etree._Element | None:
    """A XEP-0059 ``<set/>`` asking for one page (None when nothing is asked)."""
    if max is None and after is None and before is None:
        return None
    request = _el("set", NS_RSM)
    if max is not None:
        etree.SubElement(request, _R + "max").text = str(max)
    if after is not None:
        etree.SubElement(request, _R + "after").text = after
    if before is not None:
        etree.SubElement(request, _R + "before").text = before
    return request


def read_page(parent: etree._Element | None) -> Page:
    found = parent.find(_R + "set") if parent is not None else None
    if found is None:
        return Page()
    def number(text: str | None) -> int | None:
        return int(text) if text and text.strip().isdigit() else None

    first = found.find(_R + "first")
    return Page(found.findtext(_R + "first"), found.findtext(_R + "last"),
                number(found.findtext(_R + "count")),
                number(first.get("index")) if first is not None else None)


def read_form(form: etree._Element | None) -> Form:
    """A data form's fields and values (FORM_TYPE included)."""
    values: Form = {}
    if form is None:
        return values
    for f in form.iterchildren(_X + "field"):
        var = f.get("var")
        if var:
            values[var] = [v.text or "" for v in f.iterchildren(_X + "value")]
    return values


def submit_form(form_type: str, values: Mapping[str, str | Sequence[str]]) -> etree._Element:
    """A submitted data form (XEP-0004) of `form_type` with these values."""
    form = _el("x", NS_DATA, type="submit")
    hidden = etree.SubElement(form, _X + "field", var="FORM_TYPE", type="hidden")
    etree.SubElement(hidden, _X + "value").text = form_type
    for var, value in values.items():
        f = etree.SubElement(form, _X + "field", var=var)
        for v in [value] if isinstance(value, str) else value:
            etree.SubElement(f, _X + "value").text = v
    return form


class PubSubClient:
    """Requests to one publish-subscribe service (its JID is `service`)."""

    def __init__(self, session: IXMPPSession, service: str) -> None:
        self.session = session
        self.service = service

    async def _ask(self, kind: str, child: etree._Element) -> etree._Element:
        return await self.session.iq(_iq(kind, self.service, child))

    async def _pubsub(self, kind: str, namespace: str, *verbs: etree._Element | None
                      ) -> etree._Element:
        pubsub = _el("pubsub", namespace)
        for verb in verbs:
            if verb is not None:
                pubsub.append(verb)
        return await self._ask(kind, pubsub)

    # -- discovery -------------------------------------------------------------------------

    async def topics(self, *, max: int | None = None, after: str | None = None,
                     before: str | None = None) -> TopicPage:
        """One page of the service's topics (disco#items, XEP-0059 paging)."""
        query = _el("query", NS_DISCO_ITEMS)
        paging = rsm_set(max, after, before)
        if paging is not None:
            query.append(paging)
        result = await self._ask("get", query)
        found = result.find(f"{{{NS_DISCO_ITEMS}}}query")
        topics = [Topic(i.get("node", ""), i.get("name"))
                  for i in (found.iterchildren(f"{{{NS_DISCO_ITEMS}}}item")
                            if found is not None else ()) if i.get("node")]
        return TopicPage(topics, read_page(found))

    async def info(self, node: str) -> TopicInfo:
        """disco#info of a topic, with its ``pubsub#meta-data`` form (``pubsub#type``...)."""
        result = await self._ask("get", _el("query", NS_DISCO_INFO, node=node))
        query = result.find(f"{{{NS_DISCO_INFO}}}query")
        if query is None:
            raise PubSubClientError("disco#info answered without a <query/>", "bad-answer")
        q = f"{{{NS_DISCO_INFO}}}"
        meta: Form = {}
        for form in query.iterchildren(_X + "x"):
            values = read_form(form)
            if values.get("FORM_TYPE") == [META_DATA]:
                meta = values
        return TopicInfo(node,
                         [(i.get("category", ""), i.get("type", ""))
                          for i in query.iterchildren(q + "identity")],
                         [f.get("var", "") for f in query.iterchildren(q + "feature")],
                         meta)

    # -- owners ----------------------------------------------------------------------------

    async def create(self, node: str | None, *, access_model: str | None = None,
                     options: Mapping[str, str | Sequence[str]] | None = None) -> str:
        """Create a topic (an instant one when `node` is None); returns its name."""
        values = dict(options or {})
        if access_model is not None:
            values["pubsub#access_model"] = access_model
        configure = None
        if values:
            configure = _el("configure", NS_PUBSUB)
            configure.append(submit_form(NODE_CONFIG, values))
        result = await self._pubsub("set", NS_PUBSUB, _el("create", NS_PUBSUB, node=node),
                                    configure)
        created = result.find(f"{_P}pubsub/{_P}create")
        name = created.get("node") if created is not None else None
        if name:
            return name
        if node is None:
            raise PubSubClientError("the service created an instant topic without naming it",
                                    "bad-answer")
        return node

    async def configuration(self, node: str) -> Form:
        """The topic's configuration form, as values."""
        result = await self._pubsub("get", NS_OWNER, _el("configure", NS_OWNER, node=node))
        return read_form(result.find(f"{_O}pubsub/{_O}configure/{_X}x"))

    async def configure(self, node: str, options: Mapping[str, str | Sequence[str]]) -> Form:
        """Read the configuration, submit the changed options; returns the new values.

        An option the form does not have is refused here, naming those it has.
        """
        current = await self.configuration(node)
        unknown = sorted(set(options) - set(current))
        if unknown:
            raise PubSubClientError(
                f"{', '.join(unknown)}: not an option of this topic (it has: "
                f"{', '.join(v for v in current if v != 'FORM_TYPE')})", "not-acceptable")
        changes = {var: value for var, value in options.items()
                   if current.get(var) != ([value] if isinstance(value, str) else list(value))}
        configure = _el("configure", NS_OWNER, node=node)
        configure.append(submit_form(NODE_CONFIG, changes))
        await self._pubsub("set", NS_OWNER, configure)
        updated = dict(current)
        updated.update({var: [v] if isinstance(v, str) else list(v)
                        for var, v in options.items()})
        return updated

    async def delete(self, node: str) -> None:
        await self._pubsub("set", NS_OWNER, _el("delete", NS_OWNER, node=node))

    async def affiliations(self, node: str) -> list[tuple[str, str]]:
        """The topic's affiliations (owners only): (JID, affiliation) pairs."""
        result = await self._pubsub("get", NS_OWNER, _el("affiliations", NS_OWNER, node=node))
        listing = result.find(f"{_O}pubsub/{_O}affiliations")
        return [(a.get("jid", ""), a.get("affiliation", ""))
                for a in (listing.iterchildren(_O + "affiliation")
                          if listing is not None else ())]

    async def subscriptions(self, node: str) -> list[Subscription]:
        """Every subscription to the topic, pending ones included (owners only)."""
        result = await self._pubsub("get", NS_OWNER, _el("subscriptions", NS_OWNER, node=node))
        listing = result.find(f"{_O}pubsub/{_O}subscriptions")
        return [Subscription(node, s.get("jid", ""), s.get("subscription", ""), s.get("subid"))
                for s in (listing.iterchildren(_O + "subscription")
                          if listing is not None else ())]

    async def pending(self, node: str) -> list[Subscription]:
        """Subscription requests waiting for an owner's approval."""
        return [s for s in await self.subscriptions(node) if s.state == "pending"]

    async def approve(self, node: str, jid: str) -> list[Subscription]:
        """Approve the pending requests of `jid` (a full JID, or a bare one for all its
        resources); returns those approved."""
        return await self._decide(node, jid, "subscribed")

    async def deny(self, node: str, jid: str) -> list[Subscription]:
        """Refuse the pending requests of `jid`; returns those refused."""
        return await self._decide(node, jid, "none")

    async def _decide(self, node: str, jid: str, state: str) -> list[Subscription]:
        wanted = jid.lower()
        chosen = [s for s in await self.pending(node)
                  if s.jid.lower() == wanted or s.jid.split("/")[0].lower() == wanted]
        if not chosen:
            raise PubSubClientError(f"{jid} has no pending subscription to {node}",
                                    "item-not-found")
        listing = _el("subscriptions", NS_OWNER, node=node)
        for sub in chosen:
            entry = etree.SubElement(listing, _O + "subscription", jid=sub.jid,
                                     subscription=state)
            if sub.subid:
                entry.set("subid", sub.subid)
        await self._pubsub("set", NS_OWNER, listing)
        return chosen

    # -- publishers ------------------------------------------------------------------------

    async def publish(self, node: str, payload: etree._Element,
                      item_id: str | None = None) -> str:
        """Publish one payload element; returns the item id (the service's, if it chose)."""
        publish = _el("publish", NS_PUBSUB, node=node)
        item = etree.SubElement(publish, _P + "item")
        if item_id is not None:
            item.set("id", item_id)
        item.append(etree.fromstring(etree.tostring(payload)))
        result = await self._pubsub("set", NS_PUBSUB, publish)
        answered = result.find(f"{_P}pubsub/{_P}publish/{_P}item")
        got = answered.get("id") if answered is not None else None
        if got:
            return got
        if item_id is None:
            raise PubSubClientError("the service did not say which id it gave the item",
                                    "bad-answer")
        return item_id

    # -- subscribers -----------------------------------------------------------------------

    async def items(self, node: str, *, max: int | None = None, after: str | None = None,
                    before: str | None = None, max_items: int | None = None,
                    item_ids: Iterable[str] = ()) -> ItemPage:
        """Stored items of a topic, oldest first: one XEP-0059 page where the service pages
        (sixnet does), `max_items` the newest N (XEP-0060 6.5.7), or the given ids."""
        items = _el("items", NS_PUBSUB, node=node,
                    max_items=str(max_items) if max_items is not None else None)
        for item_id in item_ids:
            etree.SubElement(items, _P + "item", id=item_id)
        result = await self._pubsub("get", NS_PUBSUB, items, rsm_set(max, after, before))
        pubsub = result.find(_P + "pubsub")
        listing = pubsub.find(_P + "items") if pubsub is not None else None
        found = [Item(i.get("id", ""), next((c for c in i if isinstance(c.tag, str)), None))
                 for i in (listing.iterchildren(_P + "item") if listing is not None else ())]
        return ItemPage(found, read_page(pubsub))

    async def subscribe(self, node: str, jid: str | None = None) -> Subscription:
        """Subscribe `jid` (default: our bare JID, so notifications reach any resource and
        wait offline); the state is ``pending`` until an owner approves."""
        jid = jid or self.session.jid.split("/")[0]
        result = await self._pubsub("set", NS_PUBSUB, _el("subscribe", NS_PUBSUB, node=node,
                                                          jid=jid))
        sub = result.find(f"{_P}pubsub/{_P}subscription")
        if sub is None:
            return Subscription(node, jid, "subscribed")
        return Subscription(sub.get("node") or node, sub.get("jid") or jid,
                            sub.get("subscription") or "subscribed", sub.get("subid"))

    async def unsubscribe(self, node: str, jid: str | None = None,
                          subid: str | None = None) -> None:
        jid = jid or self.session.jid.split("/")[0]
        await self._pubsub("set", NS_PUBSUB, _el("unsubscribe", NS_PUBSUB, node=node,
                                                 jid=jid, subid=subid))
