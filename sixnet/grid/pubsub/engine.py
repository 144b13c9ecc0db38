"""The publish-subscribe engine: pure state and decisions, no I/O (as Prosody's util/pubsub).

`PubSubEngine.handle` takes a parsed `PubSubRequest`, checks it against the policy tables,
changes the in-memory state and returns an `Outcome`: the reply payload, the storage changes to
commit before replying, the messages to send after, and audit records. A refused request raises
`PubSubError` and changes nothing. Subscribers are indexed by node, and each node caches the
list of JIDs a publish is delivered to, so a publish costs the same whatever the node count.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lxml import etree
from twisted.logger import Logger

from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator
from sixnet.core.timefmt import rfc3339
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.pubsub.errors import (
    PubSubError,
    bad_request,
    forbidden,
    node_not_found,
    not_acceptable,
)
from sixnet.grid.pubsub.forms import (
    NODE_CONFIG,
    PUBLISH_OPTIONS,
    SUBSCRIBE_OPTIONS,
    AuthorizationDecision,
    ConfigLimits,
    DataForm,
    NodeConfig,
    authorization_form,
    check_preconditions,
    options_form,
    parse_options,
)
from sixnet.grid.pubsub.policy import (
    AFFILIATIONS,
    NO,
    YES,
    PlatformRoles,
    RateLimits,
    Verdict,
    bare,
    matches,
    may,
)
from sixnet.grid.pubsub.request import (
    DISCO_INFO_NS,
    DISCO_ITEMS_NS,
    EVENT_NS,
    OWNER_NS,
    PUBSUB_NS,
    PubSubRequest,
)
from sixnet.grid.pubsub.rsm import RSM_NS, paginate, sorted_locator

log = Logger(namespace="sixnet.grid.pubsub")

_P = f"{{{PUBSUB_NS}}}"
_O = f"{{{OWNER_NS}}}"
_E = f"{{{EVENT_NS}}}"
#: The longest node name or item id accepted.
MAX_ID_LENGTH = 1024

#: The service's disco#info features: exactly what `PubSubEngine.handle` implements.
FEATURES = (
    DISCO_INFO_NS, DISCO_ITEMS_NS, PUBSUB_NS, RSM_NS,
    *(f"{PUBSUB_NS}#{f}" for f in (
        "access-authorize", "access-whitelist", "config-node", "create-and-configure",
        "create-nodes", "delete-items", "delete-nodes", "instant-nodes", "item-ids",
        "last-published", "manage-subscriptions", "member-affiliation", "meta-data",
        "modify-affiliations", "outcast-affiliation", "persistent-items", "publish",
        "publish-only-affiliation", "publish-options", "publisher-affiliation", "purge-nodes",
        "retract-items", "retrieve-affiliations", "retrieve-default", "retrieve-items",
        "retrieve-subscriptions", "subscribe", "subscription-notifications",
        "subscription-options")),
)


def timestamp(seconds: float) -> str:
    """XEP-0082 DateTime in UTC, to the second (``pubsub#creation_date``, item stamps)."""
    return rfc3339(seconds, precision="seconds")


@dataclass
class Item:
    id: str
    position: int
    publisher: str
    payload: bytes
    published: str


@dataclass
class Subscription:
    subid: str
    jid: str
    state: str  # subscribed | pending
    deliver: bool
    position: int


@dataclass
class Node:
    """One topic: configuration, affiliations, subscriptions (its subscriber index), items."""

    name: str
    config: NodeConfig
    created: str
    creator: str
    affiliations: dict[str, str] = field(default_factory=dict)
    items: dict[str, Item] = field(default_factory=dict)  # oldest first
    #: Subscriptions by subid, in the order they were made, and the indexes over them: every
    #: lookup a request makes is O(1), whatever the number of subscribers.
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    by_jid: dict[str, Subscription] = field(default_factory=dict)
    by_platform: dict[str, dict[str, Subscription]] = field(default_factory=dict)
    pending: dict[str, Subscription] = field(default_factory=dict)
    #: JIDs a notification goes to: approved subscriptions with delivery on. The engine keeps
    #: every approved subscription allowed to receive (see `PubSubEngine._prune`).
    receivers: dict[str, None] = field(default_factory=dict)
    recipients_cache: tuple[str, ...] | None = None

    def add(self, sub: Subscription) -> None:
        self.subscriptions[sub.subid] = sub
        self.by_jid[sub.jid] = sub
        self.by_platform.setdefault(bare(sub.jid), {})[sub.subid] = sub
        self.refresh(sub)

    def remove(self, sub: Subscription) -> None:
        del self.subscriptions[sub.subid]
        self.by_jid.pop(sub.jid, None)
        platform = self.by_platform.get(bare(sub.jid), {})
        platform.pop(sub.subid, None)
        if not platform:
            self.by_platform.pop(bare(sub.jid), None)
        self.pending.pop(sub.subid, None)
        if self.receivers.pop(sub.jid, 0) is None:
            self.recipients_cache = None

    def refresh(self, sub: Subscription) -> None:
        """Update the indexes after a subscription's state or delivery option changed."""
        if sub.state == "pending":
            self.pending[sub.subid] = sub
        else:
            self.pending.pop(sub.subid, None)
        if sub.state == "subscribed" and sub.deliver:
            self.receivers[sub.jid] = None
        else:
            self.receivers.pop(sub.jid, None)
        self.recipients_cache = None

    def subscription_of(self, jid: str) -> Subscription | None:
        return self.by_jid.get(jid)

    def of_platform(self, jid: str) -> list[Subscription]:
        return list(self.by_platform.get(bare(jid), {}).values())

    def subscribed(self, jid: str) -> bool:
        """Whether the bare JID has an approved subscription (any resource)."""
        return any(s.state == "subscribed" for s in self.of_platform(jid))


@dataclass
class Notification:
    """A message to send: one payload element for many recipients, serialised once."""

    payload: etree._Element
    recipients: Sequence[str]
    type: str = "normal"
    #: Only to recipients with an available session now (owners' approval requests: the
    #: rest get them from `PubSubEngine.pending_for` when they come online).
    only_available: bool = False
    #: Sent only once the outcome's changes are committed. Item notifications need not wait:
    #: if the commit fails the publisher is told so and publishes again, and a subscriber
    #: sees the same item id twice; everything else (subscription states, deletions)
    #: must not be announced before it is durable.
    after_commit: bool = True


@dataclass
class Outcome:
    payload: etree._Element | None = None
    changes: list[ch.Change] = field(default_factory=list)
    messages: list[Notification] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)


def _pubsub(namespace: str = PUBSUB_NS) -> etree._Element:
    return etree.Element(f"{{{namespace}}}pubsub", nsmap={None: namespace})


def _event() -> etree._Element:
    return etree.Element(_E + "event", nsmap={None: EVENT_NS})


def _unknown_origin(jid: str) -> tuple[str | None, str]:
    """An engine without a broker (in a test) knows no addresses."""
    return None, "not known to the engine"


class PubSubEngine:
    """All topics of one broker, and every decision about them."""

    def __init__(self, service: str, config: BrokerConfig, *,
                 clock: Callable[[], float] = time.time,
                 rate_limits: RateLimits | None = None,
                 events: IEventSink | None = None,
                 origin: Callable[[str], tuple[str | None, str]] | None = None) -> None:
        self.service = service
        #: Where refusals worth a security team's attention go (a sink never blocks).
        self.events = events if events is not None else EventBus()
        #: The requester's address for an event (`IRouter.origin_of`), asked only then.
        self.origin = origin if origin is not None else _unknown_origin
        self.config = config
        self.clock = clock
        models = ("authorize", "whitelist") + (("open",) if config.open_access else ())
        self.limits = ConfigLimits(access_models=models, max_items_limit=config.max_items_limit)
        self.defaults = NodeConfig(access_model=config.default_access_model,
                                   max_items=min(config.default_max_items,
                                                 config.max_items_limit),
                                   notification_type=config.notification_type)
        self.roles = PlatformRoles(config.roles, tuple(config.default_operations))
        self.rate_limits = rate_limits or RateLimits(config.rate_limits)
        self.iodef = IODEFValidator() if config.validate_iodef else None
        self.nodes: dict[str, Node] = {}
        self.names: list[str] = []  # sorted, for paged disco#items
        self.revoked: set[str] = set()
        self.position = 0
        self.features = FEATURES + ((f"{PUBSUB_NS}#access-open",) if config.open_access
                                    else ())

    # -- loading -----------------------------------------------------------------------------

    def load(self, snapshot: ch.Snapshot) -> None:
        """Rebuild the state from storage (at start)."""
        for n in snapshot.nodes:
            self._add_node(Node(n.name, NodeConfig.from_json(n.config), n.created, n.creator))
        for a in snapshot.affiliations:
            if a.node in self.nodes:
                self.nodes[a.node].affiliations[a.jid] = a.affiliation
        for s in snapshot.subscriptions:
            if s.node in self.nodes:
                self.nodes[s.node].add(Subscription(s.subid, s.jid, s.state, s.deliver,
                                                    s.position))
            self.position = max(self.position, s.position)
        for i in snapshot.items:
            if i.node in self.nodes:
                self.nodes[i.node].items[i.item_id] = Item(
                    i.item_id, i.position, i.publisher, i.payload, i.published)
            self.position = max(self.position, i.position)

    def reload(self, snapshot: ch.Snapshot) -> None:
        """Replace the state with the store's (after notifications may have been missed)."""
        self.nodes.clear()
        self.names.clear()
        self.load(snapshot)

    def apply(self, changes: Sequence[ch.Change]) -> list[Notification]:
        """Take in a change list another broker instance on the same database committed.

        The changes are already decided and stored: they are applied as they are (each one
        is idempotent, so one also contained in a snapshot does no harm). Returned: the
        approval requests of new pending subscriptions, for owners with a session here.
        """
        requests: list[Notification] = []
        for change in changes:
            match change:
                case ch.PutNode(name, config, created, creator):
                    node = self.nodes.get(name)
                    if node is None:
                        self._add_node(Node(name, NodeConfig.from_json(config), created,
                                            creator))
                    else:
                        node.config = NodeConfig.from_json(config)
                        node.recipients_cache = None
                case ch.DeleteNode(name):
                    if self.nodes.pop(name, None) is not None:
                        self.names.pop(bisect.bisect_left(self.names, name))
                case ch.PutAffiliation(name, jid, affiliation) if name in self.nodes:
                    if affiliation == "none":
                        self.nodes[name].affiliations.pop(jid, None)
                    else:
                        self.nodes[name].affiliations[jid] = affiliation
                case ch.PutSubscription(name, subid, jid, state, deliver, position) \
                        if name in self.nodes:
                    node = self.nodes[name]
                    sub = node.subscriptions.get(subid)
                    self.position = max(self.position, position)
                    if sub is None:
                        sub = Subscription(subid, jid, state, deliver, position)
                        node.add(sub)
                        if state == "pending":
                            owners = [j for j, a in node.affiliations.items() if a == "owner"]
                            requests.append(Notification(
                                authorization_form(name, jid, subid), owners,
                                only_available=True))
                    else:
                        sub.state, sub.deliver = state, deliver
                        node.refresh(sub)
                case ch.DeleteSubscription(name, subid) if name in self.nodes:
                    sub = self.nodes[name].subscriptions.get(subid)
                    if sub is not None:
                        self.nodes[name].remove(sub)
                case ch.PutItem(name, item_id, position, publisher, payload, published) \
                        if name in self.nodes:
                    items = self.nodes[name].items
                    items.pop(item_id, None)
                    last = next(reversed(items.values()), None)
                    items[item_id] = Item(item_id, position, publisher, payload, published)
                    if last is not None and last.position > position:
                        # Heard after an item published later here: the list keeps
                        # publish order, as the stored rows do (by position).
                        ordered = sorted(items.values(), key=lambda i: i.position)
                        items.clear()
                        items.update((i.id, i) for i in ordered)
                    self.position = max(self.position, position)
                case ch.DeleteItem(name, item_id) if name in self.nodes:
                    self.nodes[name].items.pop(item_id, None)
                case ch.PurgeItems(name) if name in self.nodes:
                    self.nodes[name].items.clear()
        return requests

    def _add_node(self, node: Node) -> None:
        self.nodes[node.name] = node
        bisect.insort(self.names, node.name)

    def _next(self) -> int:
        """The next position: above every one known here and not below the clock in
        microseconds, so that of two instances on one database, the one that handles a
        request made after another instance's answer (its change maybe not heard yet) still
        gives a later position, as long as their clocks agree that closely."""
        self.position = max(self.position + 1, int(self.clock() * 1_000_000))
        return self.position

    # -- the decisions -----------------------------------------------------------------------

    def affiliation(self, node: Node, jid: str) -> str:
        platform = bare(jid)
        if platform in self.revoked:
            return "outcast"
        if matches(platform, self.config.admins):
            return "owner"
        return node.affiliations.get(platform, "none")

    def verdict(self, node: Node, jid: str, action: str) -> Verdict:
        return may(self.affiliation(node, jid), action, node.config.access_model)

    def recipients(self, node: Node) -> tuple[str, ...]:
        """Who a notification on this node goes to, cached until subscriptions change."""
        if node.recipients_cache is None:
            node.recipients_cache = tuple(node.receivers)
        return node.recipients_cache

    def _node(self, request: PubSubRequest) -> Node:
        if not request.node:
            raise bad_request("nodeid-required")
        node = self.nodes.get(request.node)
        if node is None:
            raise node_not_found()
        return node

    def _require(self, node: Node, jid: str, action: str) -> None:
        if self.verdict(node, jid, action) is not YES:
            raise forbidden()

    def _require_retrieve(self, node: Node, jid: str) -> None:
        verdict = self.verdict(node, jid, "retrieve")
        if verdict is YES:
            return
        if verdict is Verdict.SUBSCRIBED:
            if node.subscribed(jid):
                return
            raise PubSubError("not-authorized", "not-subscribed")
        if node.config.access_model == "whitelist" and self.affiliation(node, jid) == "none":
            raise PubSubError("not-allowed", "closed-node")
        raise forbidden()

    def _operation(self, request: PubSubRequest, operation: str) -> None:
        """The operator's per-platform role check, then the rate limit where there is one."""
        if not self.roles.allows(request.sender, operation):
            raise forbidden(f"this platform may not {operation}")
        if operation in ("publish", "subscribe"):
            allowed, first = self.rate_limits.take(request.sender, operation)
            if not allowed:
                if first:
                    log.warn("rate limit: platform {platform} exceeded its {kind} rate",
                             platform=bare(request.sender), kind=operation,
                             alert="rate-limit")
                rate, burst = self.rate_limits.limit(operation)
                address, instead = self.origin(request.sender)
                facts = {"limit": f"{operation}-rate", "operation": operation,
                         "value": f"{rate:g}", "burst": f"{burst:g}"}
                if address is None:
                    facts["origin"] = instead
                self.events.emit(SecurityEvent(
                    "grid.rate-limited", subject=bare(request.sender), source=address,
                    detail=f"{operation} rate limit of the broker exceeded"
                           + ("" if address else f" (no address: {instead})"),
                    facts=facts, time=self.clock()))
                raise PubSubError("policy-violation", text=f"{operation} rate limit exceeded")

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, request: PubSubRequest) -> Outcome:
        """Carry out one request, or raise the PubSubError its requester gets."""
        if bare(request.sender) in self.revoked:
            raise forbidden("this platform's access has been revoked")
        handler = getattr(self, "_do_" + request.verb.replace("-", "_"))
        return handler(request)

    # -- discovery ---------------------------------------------------------------------------

    def _do_disco_info(self, request: PubSubRequest) -> Outcome:
        query = etree.Element(f"{{{DISCO_INFO_NS}}}query", nsmap={None: DISCO_INFO_NS})
        q = f"{{{DISCO_INFO_NS}}}"
        if request.node is None:
            etree.SubElement(query, q + "identity", category="pubsub", type="service",
                             name="XMPP-Grid broker")
            for feature in self.features:
                etree.SubElement(query, q + "feature", var=feature)
            return Outcome(query)
        node = self._node(request)
        query.set("node", node.name)
        etree.SubElement(query, q + "identity", category="pubsub", type="leaf")
        for feature in (DISCO_INFO_NS, DISCO_ITEMS_NS, PUBSUB_NS):
            etree.SubElement(query, q + "feature", var=feature)
        owners = [j for j, a in node.affiliations.items() if a == "owner"]
        query.append(node.config.meta_data(owners, node.created))
        return Outcome(query)

    def _do_disco_items(self, request: PubSubRequest) -> Outcome:
        q = f"{{{DISCO_ITEMS_NS}}}"
        query = etree.Element(q + "query", nsmap={None: DISCO_ITEMS_NS})
        if request.node is None:
            page = paginate(self.names, request.page, self.config.disco_max_items,
                            sorted_locator(self.names))
            for name in page.keys:
                item = etree.SubElement(query, q + "item", jid=self.service, node=name)
                title = self.nodes[name].config.title
                if title:
                    item.set("name", title)
        else:
            node = self._node(request)
            query.set("node", node.name)
            self._require_retrieve(node, request.sender)
            page = paginate(list(node.items), request.page, self.config.items_page_max)
            for item_id in page.keys:
                etree.SubElement(query, q + "item", jid=self.service, name=item_id)
        if request.page is not None or page.count > len(page.keys):
            query.append(page.element())
        return Outcome(query)

    # -- owner: create, configure, delete, purge ---------------------------------------------

    def _do_create(self, request: PubSubRequest) -> Outcome:
        self._operation(request, "create")
        instant = request.node is None
        name = uuid.uuid4().hex if instant else request.node
        if not name or len(name) > MAX_ID_LENGTH or any(ord(c) < 32 for c in name):
            raise bad_request("nodeid-required", "a node name is 1-1024 printable characters")
        if name in self.nodes:
            raise PubSubError("conflict", text="a node of that name exists")
        config = self.defaults
        if request.form is not None:
            config = config.updated(DataForm.parse(request.form, NODE_CONFIG), self.limits)
        owner = bare(request.sender)
        node = Node(name, config, timestamp(self.clock()), owner, {owner: "owner"})
        self._add_node(node)
        outcome = Outcome(changes=[
            ch.PutNode(name, config.to_json(), node.created, owner),
            ch.PutAffiliation(name, owner, "owner")],
            audit=[{"event": "create", "node": name, "actor": owner,
                    "config": dataclasses.asdict(config)}])
        if instant:
            outcome.payload = _pubsub()
            etree.SubElement(outcome.payload, _P + "create", node=name)
        return outcome

    def _do_configure_get(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "configure")
        payload = _pubsub(OWNER_NS)
        configure = etree.SubElement(payload, _O + "configure", node=node.name)
        configure.append(node.config.form(self.limits))
        return Outcome(payload)

    def _do_default(self, request: PubSubRequest) -> Outcome:
        payload = _pubsub(OWNER_NS)
        etree.SubElement(payload, _O + "default").append(self.defaults.form(self.limits))
        return Outcome(payload)

    def _do_configure_set(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "configure")
        form = DataForm.parse(request.form, NODE_CONFIG, ("submit", "cancel"))
        config = node.config.updated(form, self.limits)
        outcome = Outcome()
        if config == node.config:
            return outcome
        node.config = config
        outcome.changes.append(ch.PutNode(node.name, config.to_json(), node.created,
                                          node.creator))
        if not config.persist_items:
            self._purge(node, outcome)
        self._trim(node, outcome)
        self._prune(node, outcome)
        outcome.audit.append({"event": "configure", "node": node.name,
                              "actor": bare(request.sender),
                              "config": dataclasses.asdict(config)})
        if config.notify_config:
            event = _event()
            etree.SubElement(event, _E + "configuration", node=node.name)
            outcome.messages.append(self._to_subscribers(node, event))
        return outcome

    def _do_delete(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "delete")
        outcome = Outcome(changes=[ch.DeleteNode(node.name)],
                          audit=[{"event": "delete", "node": node.name,
                                  "actor": bare(request.sender)}])
        if node.config.notify_delete:
            event = _event()
            etree.SubElement(event, _E + "delete", node=node.name)
            outcome.messages.append(self._to_subscribers(node, event))
        del self.nodes[node.name]
        self.names.pop(bisect.bisect_left(self.names, node.name))
        return outcome

    def _do_purge(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "purge")
        outcome = Outcome(audit=[{"event": "purge", "node": node.name,
                                  "actor": bare(request.sender)}])
        self._purge(node, outcome)
        if node.config.notify_retract:
            event = _event()
            etree.SubElement(event, _E + "purge", node=node.name)
            outcome.messages.append(self._to_subscribers(node, event))
        return outcome

    def _purge(self, node: Node, outcome: Outcome) -> None:
        if node.items:
            node.items.clear()
            outcome.changes.append(ch.PurgeItems(node.name))

    def _trim(self, node: Node, outcome: Outcome) -> None:
        """Drop the oldest items beyond max_items."""
        while len(node.items) > node.config.max_items:
            oldest = next(iter(node.items))
            del node.items[oldest]
            outcome.changes.append(ch.DeleteItem(node.name, oldest))

    def _to_subscribers(self, node: Node, event: etree._Element) -> Notification:
        return Notification(event, self.recipients(node), node.config.notification_type)

    # -- owner: affiliations and subscriptions -----------------------------------------------

    def _do_affiliations_get(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "manage")
        payload = _pubsub(OWNER_NS)
        listing = etree.SubElement(payload, _O + "affiliations", node=node.name)
        for jid, affiliation in sorted(node.affiliations.items()):
            etree.SubElement(listing, _O + "affiliation", jid=jid, affiliation=affiliation)
        return Outcome(payload)

    def _do_affiliations_set(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "manage")
        wanted = dict(node.affiliations)
        for jid, affiliation in request.entries:
            if affiliation is None:
                continue
            if affiliation not in AFFILIATIONS:
                raise not_acceptable(text=f"{affiliation!r} is not an affiliation")
            if affiliation == "none":
                wanted.pop(bare(jid), None)
            else:
                wanted[bare(jid)] = affiliation
        if "owner" not in wanted.values():
            raise not_acceptable(text="a node keeps at least one owner")
        outcome = Outcome()
        demoted, changed = set(), set()
        for jid in sorted(set(wanted) | set(node.affiliations)):
            old, new = node.affiliations.get(jid, "none"), wanted.get(jid, "none")
            if new != old:
                changed.add(jid)
                outcome.changes.append(ch.PutAffiliation(node.name, jid, new))
                outcome.audit.append({"event": "affiliation", "node": node.name,
                                      "actor": bare(request.sender), "jid": jid,
                                      "affiliation": new})
                if new == "none":
                    demoted.add(jid)
        node.affiliations = wanted
        # Demoted to `none`: whatever the access model, the subscriptions that came with the
        # old affiliation end; the platform may ask again under the node's access model.
        for jid in demoted:
            for sub in node.of_platform(jid):
                self._unsubscribe(node, sub, outcome, reason="demoted")
        self._prune(node, outcome, changed | demoted)
        return outcome

    def _prune(self, node: Node, outcome: Outcome, platforms: set[str] | None = None) -> None:
        """Make subscriptions agree with affiliations and access model after a change.

        A subscriber who may no longer receive (outcast, publish-only, or `none` on a
        whitelist node) loses the subscription and is told; a pending request the new
        policy grants outright is approved, one it forbids is dropped. Only the subscriptions
        of `platforms` are looked at when only their affiliations changed.
        """
        if platforms is None:
            subs = list(node.subscriptions.values())
        else:
            subs = [s for p in sorted(platforms) for s in node.of_platform(p)]
        for sub in subs:
            if sub.state == "subscribed":
                if self.verdict(node, sub.jid, "receive") is NO:
                    self._unsubscribe(node, sub, outcome, reason="policy")
                continue
            verdict = self.verdict(node, sub.jid, "subscribe")
            if verdict is YES:
                self._approve(node, sub, outcome)
            elif verdict is NO:
                self._unsubscribe(node, sub, outcome, reason="policy")

    def _unsubscribe(self, node: Node, sub: Subscription, outcome: Outcome, *,
                     reason: str, notify: bool = True) -> None:
        node.remove(sub)
        outcome.changes.append(ch.DeleteSubscription(node.name, sub.subid))
        outcome.audit.append({"event": "unsubscribe", "node": node.name, "jid": sub.jid,
                              "subid": sub.subid, "reason": reason})
        if notify:
            outcome.messages.append(self._subscription_event(node, sub.jid, "none"))

    def _approve(self, node: Node, sub: Subscription, outcome: Outcome) -> None:
        sub.state = "subscribed"
        node.refresh(sub)
        outcome.changes.append(self._put(node, sub))
        outcome.messages.append(self._subscription_event(node, sub.jid, "subscribed"))
        self._send_last(node, sub, outcome)

    def _put(self, node: Node, sub: Subscription) -> ch.PutSubscription:
        return ch.PutSubscription(node.name, sub.subid, sub.jid, sub.state, sub.deliver,
                                  sub.position)

    def _subscription_event(self, node: Node, jid: str, state: str) -> Notification:
        event = _event()
        etree.SubElement(event, _E + "subscription", node=node.name, jid=jid,
                         subscription=state)
        return Notification(event, (jid,), node.config.notification_type)

    def _do_subscriptions_get(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "manage")
        payload = _pubsub(OWNER_NS)
        listing = etree.SubElement(payload, _O + "subscriptions", node=node.name)
        for sub in node.subscriptions.values():
            etree.SubElement(listing, _O + "subscription", jid=sub.jid, subid=sub.subid,
                             subscription=sub.state)
        return Outcome(payload)

    def _do_subscriptions_set(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require(node, request.sender, "manage")
        for _, state in request.entries:
            if state not in ("none", "subscribed"):
                raise not_acceptable(text="an owner sets a subscription to subscribed or none")
        outcome = Outcome()
        actor = bare(request.sender)
        for jid, state in request.entries:
            sub = node.subscription_of(jid)
            if state == "none" and sub is not None:
                self._unsubscribe(node, sub, outcome, reason=f"removed by {actor}")
            elif state == "subscribed" and sub is None:
                if self.verdict(node, jid, "receive") is NO:
                    raise not_acceptable(text=f"{jid} may not receive from this node")
                sub = Subscription(uuid.uuid4().hex, jid, "pending", True, self._next())
                node.add(sub)
                self._approve(node, sub, outcome)
                outcome.audit.append({"event": "subscribe", "node": node.name, "jid": jid,
                                      "subid": sub.subid, "decision": "subscribed",
                                      "actor": actor})
            elif state == "subscribed" and sub.state == "pending":
                self._approve(node, sub, outcome)
                outcome.audit.append({"event": "approve", "node": node.name, "jid": jid,
                                      "subid": sub.subid, "actor": actor})
        return outcome

    # -- subscribers -------------------------------------------------------------------------

    def _do_subscribe(self, request: PubSubRequest) -> Outcome:
        self._operation(request, "subscribe")
        node = self._node(request)
        jid = request.jid or ""
        if bare(jid) != bare(request.sender):
            raise bad_request("invalid-jid")
        verdict = self.verdict(node, jid, "subscribe")
        if verdict is NO:
            if node.config.access_model == "whitelist" and \
                    self.affiliation(node, jid) == "none":
                raise PubSubError("not-allowed", "closed-node")
            raise forbidden()
        existing = node.subscription_of(jid)
        if existing is not None and existing.state == "pending":
            raise PubSubError("not-authorized", "pending-subscription")
        outcome = Outcome()
        if existing is None:
            deliver = True
            if request.form is not None:
                deliver = parse_options(DataForm.parse(request.form, SUBSCRIBE_OPTIONS))
            state = "subscribed" if verdict is YES else "pending"
            sub = Subscription(uuid.uuid4().hex, jid, state, deliver, self._next())
            node.add(sub)
            outcome.changes.append(self._put(node, sub))
            outcome.audit.append({"event": "subscribe", "node": node.name, "jid": jid,
                                  "subid": sub.subid, "decision": state})
            if state == "pending":
                owners = [j for j, a in node.affiliations.items() if a == "owner"]
                outcome.messages.append(Notification(
                    authorization_form(node.name, jid, sub.subid), owners,
                    only_available=True))
            else:
                self._send_last(node, sub, outcome)
        else:
            sub = existing
        outcome.payload = _pubsub()
        etree.SubElement(outcome.payload, _P + "subscription", node=node.name, jid=jid,
                         subid=sub.subid, subscription=sub.state)
        return outcome

    def _send_last(self, node: Node, sub: Subscription, outcome: Outcome) -> None:
        if node.config.send_last_published_item == "on_sub" and node.items and sub.deliver:
            last = next(reversed(node.items.values()))
            outcome.messages.append(Notification(
                self.items_event(node, last.id, self.payload_of(last)),
                (sub.jid,), node.config.notification_type))

    def _own_subscription(self, node: Node, request: PubSubRequest,
                          missing: PubSubError) -> Subscription:
        jid = request.jid or request.sender
        if bare(jid) != bare(request.sender):
            raise bad_request("invalid-jid")
        sub = node.subscription_of(jid)
        if sub is None:
            raise missing
        if request.subid is not None and request.subid != sub.subid:
            raise not_acceptable("invalid-subid")
        return sub

    def _do_unsubscribe(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        sub = self._own_subscription(node, request,
                                     PubSubError("unexpected-request", "not-subscribed"))
        outcome = Outcome()
        self._unsubscribe(node, sub, outcome, reason="unsubscribed", notify=False)
        return outcome

    def _do_options_get(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        sub = self._own_subscription(node, request,
                                     PubSubError("unexpected-request", "not-subscribed"))
        payload = _pubsub()
        options = etree.SubElement(payload, _P + "options", node=node.name, jid=sub.jid,
                                   subid=sub.subid)
        options.append(options_form(sub.deliver))
        return Outcome(payload)

    def _do_options_set(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        sub = self._own_subscription(node, request,
                                     PubSubError("unexpected-request", "not-subscribed"))
        sub.deliver = parse_options(DataForm.parse(request.form, SUBSCRIBE_OPTIONS))
        node.refresh(sub)
        return Outcome(changes=[self._put(node, sub)])

    def _do_own_subscriptions(self, request: PubSubRequest) -> Outcome:
        platform = bare(request.sender)
        payload = _pubsub()
        listing = etree.SubElement(payload, _P + "subscriptions")
        names = [request.node] if request.node else self.names
        if request.node:
            listing.set("node", request.node)
        for name in names:
            node = self.nodes.get(name)
            for sub in node.of_platform(platform) if node else ():
                etree.SubElement(listing, _P + "subscription", node=name, jid=sub.jid,
                                 subid=sub.subid, subscription=sub.state)
        return Outcome(payload)

    def _do_own_affiliations(self, request: PubSubRequest) -> Outcome:
        platform = bare(request.sender)
        payload = _pubsub()
        listing = etree.SubElement(payload, _P + "affiliations")
        names = [request.node] if request.node else self.names
        for name in names:
            node = self.nodes.get(name)
            affiliation = node.affiliations.get(platform) if node else None
            if affiliation:
                etree.SubElement(listing, _P + "affiliation", node=name,
                                 affiliation=affiliation)
        return Outcome(payload)

    # -- publishers --------------------------------------------------------------------------

    def _do_publish(self, request: PubSubRequest) -> Outcome:
        self._operation(request, "publish")
        node = self._node(request)
        self._require(node, request.sender, "publish")
        if request.form is not None:
            form = DataForm.parse(request.form, PUBLISH_OPTIONS)
            if not check_preconditions(form, node.config, self.limits):
                raise PubSubError("conflict", "precondition-not-met")
        item = request.item
        assert item is not None  # the request parser guarantees it
        payload = self._check_payload(node, item)
        item_id = item.get("id") or uuid.uuid4().hex
        if len(item_id) > MAX_ID_LENGTH:
            raise bad_request(text="item ids are at most 1024 characters")
        publisher = bare(request.sender)
        data = etree.tostring(payload)
        outcome = Outcome(audit=[{
            "event": "publish", "node": node.name, "actor": publisher, "item": item_id,
            "namespace": etree.QName(payload).namespace, "bytes": len(data),
            "recipients": len(self.recipients(node))}])
        if node.config.persist_items:
            node.items.pop(item_id, None)
            stored = Item(item_id, self._next(), publisher, data, timestamp(self.clock()))
            node.items[item_id] = stored
            outcome.changes.append(ch.PutItem(node.name, item_id, stored.position, publisher,
                                              data, stored.published))
            self._trim(node, outcome)
        event = self.items_event(node, item_id, payload)
        notification = self._to_subscribers(node, event)
        notification.after_commit = False
        outcome.messages.append(notification)
        outcome.payload = _pubsub()
        published = etree.SubElement(outcome.payload, _P + "publish", node=node.name)
        etree.SubElement(published, _P + "item", id=item_id)
        return outcome

    def _check_payload(self, node: Node, item: etree._Element) -> etree._Element:
        children = [c for c in item if isinstance(c.tag, str)]
        if not children:
            raise bad_request("payload-required")
        if len(children) > 1:
            raise bad_request("invalid-payload", "an item carries exactly one payload")
        (payload,) = children
        namespace = etree.QName(payload).namespace or ""
        if node.config.type and namespace != node.config.type:
            raise bad_request("invalid-payload",
                              f"this topic's pubsub#type is {node.config.type}")
        size = len(etree.tostring(payload))
        if size > self.config.max_item_bytes:
            raise not_acceptable("payload-too-big",
                                 f"at most {self.config.max_item_bytes} bytes")
        if self.iodef is not None and namespace == IODEF_NS:
            problem = self.iodef.problem(payload)
            if problem:
                raise bad_request("invalid-payload", f"not valid IODEF 2.0: {problem}")
        return payload

    def items_event(self, node: Node, item_id: str,
                    payload: etree._Element | None) -> etree._Element:
        """A notification of a published item; the publisher is not disclosed."""
        event = _event()
        items = etree.SubElement(event, _E + "items", node=node.name)
        item = etree.SubElement(items, _E + "item", id=item_id)
        if node.config.deliver_payloads and payload is not None:
            item.append(payload)
        return event

    def payload_of(self, item: Item) -> etree._Element:
        return etree.fromstring(item.payload, _STORED)

    def _do_retract(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        outcome = Outcome()
        any_item = self.verdict(node, request.sender, "retract-any") is YES
        own = self.verdict(node, request.sender, "retract-own") is YES
        for item_id in request.item_ids:
            item = node.items.get(item_id)
            if item is None:
                raise node_not_found()
            if not (any_item or own and item.publisher == bare(request.sender)):
                raise forbidden()
        event = _event()
        retracts = etree.SubElement(event, _E + "items", node=node.name)
        for item_id in request.item_ids:
            if node.items.pop(item_id, None) is not None:
                outcome.changes.append(ch.DeleteItem(node.name, item_id))
                etree.SubElement(retracts, _E + "retract", id=item_id)
        outcome.audit.append({"event": "retract", "node": node.name,
                              "actor": bare(request.sender), "items": request.item_ids})
        if request.notify or node.config.notify_retract:
            outcome.messages.append(self._to_subscribers(node, event))
        return outcome

    def _do_items(self, request: PubSubRequest) -> Outcome:
        node = self._node(request)
        self._require_retrieve(node, request.sender)
        if request.subid is not None and not any(
                s.subid == request.subid for s in node.of_platform(request.sender)):
            raise not_acceptable("invalid-subid")
        payload = _pubsub()
        listing = etree.SubElement(payload, _P + "items", node=node.name)
        if request.item_ids:
            chosen = [i for i in dict.fromkeys(request.item_ids) if i in node.items]
            page = None
        else:
            ids = list(node.items)
            if request.max_items is not None:
                ids = ids[-request.max_items:] if request.max_items else []
            page = paginate(ids, request.page, self.config.items_page_max)
            chosen = list(page.keys)
        for item_id in chosen:
            stored = node.items[item_id]
            element = etree.SubElement(listing, _P + "item", id=item_id)
            element.append(self.payload_of(stored))
        if page is not None and (request.page is not None or page.count > len(page.keys)):
            payload.append(page.element())
        return Outcome(payload)

    # -- the approval workflow (XEP-0060 section 8.6) ----------------------------------------

    def decide(self, sender: str, form: etree._Element) -> Outcome:
        """An owner's answer to a subscription request, sent as a submitted form message."""
        if bare(sender) in self.revoked:
            raise forbidden("this platform's access has been revoked")
        decision = AuthorizationDecision.parse(form)
        node = self.nodes.get(decision.node)
        if node is None:
            raise node_not_found()
        self._require(node, sender, "manage")
        sub = node.subscriptions.get(decision.subid or "")
        if sub is None:
            sub = node.subscription_of(decision.subscriber)
        if sub is None or sub.state != "pending" or sub.jid != decision.subscriber:
            raise PubSubError("item-not-found", text="no such pending subscription")
        outcome = Outcome(audit=[{
            "event": "approve" if decision.allow else "deny", "node": node.name,
            "jid": sub.jid, "subid": sub.subid, "actor": bare(sender)}])
        if decision.allow:
            self._approve(node, sub, outcome)
        else:
            self._unsubscribe(node, sub, outcome, reason=f"denied by {bare(sender)}")
        return outcome

    def pending_for(self, owner: str) -> list[Notification]:
        """Approval requests waiting for an owner who has just come online."""
        found = []
        for node in self.nodes.values():
            if not node.pending or self.verdict(node, owner, "manage") is not YES:
                continue
            for sub in node.pending.values():
                found.append(Notification(authorization_form(node.name, sub.jid, sub.subid),
                                          (owner,)))
        return found

    # -- revocation (RFC 8600 section 8.3) ---------------------------------------------------

    def revoke(self, jid: str) -> Outcome:
        """Cut a platform off: its subscriptions and affiliations go, and every later
        request is refused. (The revocation itself is in the grid's revocation table.)"""
        platform = bare(jid)
        self.revoked.add(platform)
        outcome = Outcome(audit=[{"event": "revoke", "jid": platform}])
        for node in self.nodes.values():
            for sub in node.of_platform(platform):
                self._unsubscribe(node, sub, outcome, reason="revoked", notify=False)
            if node.affiliations.pop(platform, None) is not None:
                outcome.changes.append(ch.PutAffiliation(node.name, platform, "none"))
        return outcome

    def restore(self, jid: str) -> Outcome:
        """Undo a revocation (`sixnet grid revoke --undo`): requests are accepted again; the
        subscriptions removed stay removed."""
        platform = bare(jid)
        self.revoked.discard(platform)
        return Outcome(audit=[{"event": "unrevoke", "jid": platform}])


#: Parser for payloads the broker serialised itself.
_STORED = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                          remove_comments=True)
