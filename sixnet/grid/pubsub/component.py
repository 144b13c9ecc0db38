"""The RFC 8600 Broker as a component of the XMPP server: stanzas in, engine, stanzas out.

Usage by the grid service::

    broker = PubSubBroker(config.grid.broker, config.grid.domain,
                          Database(config.grid.broker.database, base=state_dir),
                          state_dir / config.grid.broker.audit_log,
                          RevocationStore(grid_database))
    server.attach_component(broker)      # calls broker.attach(router)
    broker.revoke(jid) / broker.restore(jid)   # as the grid's RevocationWatch sees changes
    ...
    await broker.stop()                  # on service stop; the caller closes the Database

`attach` starts loading the stored state, and the revoked platforms from the grid's one
revocation table; stanzas that arrive meanwhile wait for it. A request
is answered only after its changes are committed, so an acknowledged publish, subscription or
configuration survives a crash. Item notifications go out as soon as the engine has accepted
the publish, while the commit runs (a disk flush must not add to delivery latency), and the
publish's result only once they are written as well as committed; every other message
(subscription states, deletions, approvals) only once it is durable.

Several instances may share one PostgreSQL database (several grid processes, or several
components behind one XMPP server): each holds the whole state in memory, and each applies
the change lists the others commit as they are announced (`IPubSubStore.watch`), so any
instance can answer any request. Notifications are sent by the instance that handled the
request; see docs/pubsub.rst for how they reach subscribers connected elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from lxml import etree
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from sixnet.core.audit import AuditLog
from sixnet.core.errors import ConfigError
from sixnet.core.events import IEventSink
from sixnet.core.storage.database import Database
from sixnet.grid.component import IComponent, IRouter
from sixnet.grid.pubsub import changes as ch
from sixnet.grid.pubsub.config import BrokerConfig
from sixnet.grid.pubsub.engine import Outcome, PubSubEngine
from sixnet.grid.pubsub.errors import PubSubError
from sixnet.grid.pubsub.fanout import Delivery
from sixnet.grid.pubsub.forms import DATA_NS
from sixnet.grid.pubsub.policy import bare
from sixnet.grid.pubsub.request import PubSubRequest, parse_iq
from sixnet.grid.pubsub.store import IPubSubStore, SQLPubSubStore
from sixnet.grid.storage.revocations import RevocationStore

log = Logger(namespace="sixnet.grid.pubsub")
_C = "{jabber:client}"
#: Verbs that change something: a refusal of one of these is audited.
_AUDITED_REFUSALS = {"create", "configure-set", "delete", "purge", "publish", "retract",
                     "subscribe", "affiliations-set", "subscriptions-set"}


@implementer(IComponent)
class PubSubBroker:
    """The publish-subscribe service at ``<subdomain>.<domain>``.

    `config` is the ``[grid.broker]`` table, `domain` the server's XMPP domain, `database` the
    broker's database (its schema is created on first use), `audit_log` the JSON-lines file,
    `revocations` the grid's table of revoked platforms (read at start).
    """

    def __init__(self, config: BrokerConfig, domain: str, database: Database,
                 audit_log: Path, revocations: RevocationStore, *,
                 clock: Callable[[], float] = time.time,
                 events: IEventSink | None = None) -> None:
        if config.default_access_model == "open" and not config.open_access:
            raise ConfigError("[grid.broker]", "default_access_model",
                              "'open' needs open_access = true")
        self.domain = f"{config.subdomain}.{domain}"
        self.engine = PubSubEngine(self.domain, config, clock=clock, events=events,
                                   origin=self._origin)
        self.database = database
        self.revocations = revocations
        self.store: IPubSubStore = SQLPubSubStore(database, revocations)
        self.audit = AuditLog(audit_log, clock)
        self.delivery = Delivery(self.domain)
        self.router: IRouter | None = None
        self._ready: defer.Deferred[None] | None = None
        #: Change lists heard from other instances while the snapshot is being read.
        self._early: list[list[ch.Change]] | None = None
        self._in_flight: set[defer.Deferred[None]] = set()
        self._sweeper = task.LoopingCall(self.engine.rate_limits.forget_idle)

    def _origin(self, jid: str) -> tuple[str | None, str]:
        """A requester's address for a security event, from the router it came through."""
        if self.router is None:
            return None, "not attached"
        return self.router.origin_of(jid)

    # -- IComponent --------------------------------------------------------------------------

    def attach(self, router: IRouter) -> None:
        self.router = router
        self.delivery.router = router
        self._ready = defer.Deferred.fromCoroutine(self._load())
        self._sweeper.start(60, now=False)

    async def _load(self) -> None:
        await self.store.open()
        # Listening starts before the snapshot is read, so nothing committed by another
        # instance in between is missed; what is heard meanwhile is applied after it.
        self._early = []
        await self.store.watch(self._heard, self._resync)
        self.engine.load(await self.store.load())
        early, self._early = self._early, None
        for changes in early:
            self._heard(changes)
        for jid in sorted(await self.revocations.jids()):
            outcome = self.engine.revoke(jid)
            if outcome.changes:  # revoked while the broker was down: carried out now
                await self._commit(outcome)
        log.info("broker {domain}: {nodes} topics loaded", domain=self.domain,
                 nodes=len(self.engine.nodes))

    def _heard(self, changes: list[ch.Change]) -> None:
        """Another broker instance on this database committed `changes`."""
        if self._early is not None:
            self._early.append(changes)
            return
        for notification in self.engine.apply(changes):
            self.delivery.enqueue(notification)

    def _resync(self) -> None:
        """Other instances' changes may have been missed: read the whole state again."""
        async def reload() -> None:
            assert self._ready is not None
            await self._ready
            self.engine.reload(await self.store.load())
            log.info("broker {domain}: state read again after a notification gap",
                     domain=self.domain)

        self._track(defer.Deferred.fromCoroutine(reload()))

    def receive(self, stanza: etree._Element) -> None:
        self._track(defer.Deferred.fromCoroutine(self._receive(stanza)))

    def session_available(self, full_jid: str) -> None:
        """Send an owner who has just come online the approval requests still pending."""
        self._track(defer.Deferred.fromCoroutine(self._resend_pending(full_jid)))

    def session_unavailable(self, full_jid: str) -> None:
        """Nothing to do: notifications to an offline subscriber are stored by the core."""

    # -- operations for the grid service (`sixnet grid revoke`, seen by its RevocationWatch) --

    def revoke(self, jid: str) -> defer.Deferred[None]:
        """Carry out a revocation recorded in the revocation table: subscriptions and
        affiliations removed, every later request refused. Nothing happens if it is revoked
        already."""
        return self._track(defer.Deferred.fromCoroutine(self._revoke(jid)))

    def restore(self, jid: str) -> defer.Deferred[None]:
        """Undo a revocation: the platform's requests are accepted again."""
        return self._track(defer.Deferred.fromCoroutine(self._restore(jid)))

    def idle(self) -> defer.Deferred[None]:
        """Fires when every request received so far is answered and its messages are sent."""
        return defer.Deferred.fromCoroutine(self._idle())

    async def stop(self) -> None:
        """Finish in-flight work and close the audit log (the caller closes the Database)."""
        await self._idle()
        if self._sweeper.running:
            self._sweeper.stop()
        self.audit.close()

    # -- internals ---------------------------------------------------------------------------

    def _track(self, d: defer.Deferred[None]) -> defer.Deferred[None]:
        self._in_flight.add(d)
        d.addErrback(lambda f: log.failure("broker failure", f))
        d.addBoth(lambda r: (self._in_flight.discard(d), r)[1])
        return d

    async def _idle(self) -> None:
        if self._ready is not None:
            await self._ready
        while self._in_flight:
            await defer.DeferredList(list(self._in_flight))
        await self.delivery.idle()

    async def _receive(self, stanza: etree._Element) -> None:
        assert self._ready is not None, "attach() must come first"
        await self._ready
        if stanza.get("type") == "error":
            return
        if stanza.tag == _C + "iq" and stanza.get("type") in ("get", "set"):
            await self._iq(stanza)
        elif stanza.tag == _C + "message":
            await self._message(stanza)

    async def _iq(self, iq: etree._Element) -> None:
        request: PubSubRequest | None = None
        try:
            request = parse_iq(iq)
            outcome = self.engine.handle(request)
        except PubSubError as error:
            if request is not None and request.verb in _AUDITED_REFUSALS:
                self.audit.record(request.verb, node=request.node,
                                  actor=bare(request.sender), refused=str(error))
            self._send(self._iq_error(iq, error))
            return
        except Exception:
            log.failure("broker failed on a request from {sender}", sender=iq.get("from"))
            self._send(self._iq_error(iq, PubSubError("internal-server-error")))
            return
        sent = self._deliver(outcome, after_commit=False)
        if not await self._commit(outcome):
            self._send(self._iq_error(iq, PubSubError("internal-server-error")))
            return
        # The result goes out after the item's notifications were written (to the host link
        # in component mode), so a publish it prompts, handled by another instance, cannot
        # reach a subscriber first.
        await self.delivery.written(sent)
        reply = self._reply(iq, "result")
        if outcome.payload is not None:
            reply.append(outcome.payload)
        self._send(reply)
        self._deliver(outcome, after_commit=True)

    async def _message(self, message: etree._Element) -> None:
        """An owner's answer to an approval request (XEP-0060 section 8.6)."""
        form = message.find(f"{{{DATA_NS}}}x")
        if form is None or form.get("type") != "submit":
            return
        try:
            outcome = self.engine.decide(message.get("from") or "", form)
        except PubSubError as error:
            reply = self._reply(message, "error", tag="message")
            reply.append(error.element())
            self._send(reply)
            return
        if await self._commit(outcome):
            self._deliver(outcome, after_commit=True)

    async def _resend_pending(self, full_jid: str) -> None:
        assert self._ready is not None, "attach() must come first"
        await self._ready
        for notification in self.engine.pending_for(full_jid):
            self.delivery.enqueue(notification)

    async def _revoke(self, jid: str) -> None:
        assert self._ready is not None, "attach() must come first"
        await self._ready
        if bare(jid) in self.engine.revoked:
            return
        outcome = self.engine.revoke(jid)
        if not await self._commit(outcome):
            raise RuntimeError(f"revocation of {jid} could not be stored")
        log.warn("platform {jid} revoked", jid=bare(jid))

    async def _restore(self, jid: str) -> None:
        assert self._ready is not None, "attach() must come first"
        await self._ready
        if bare(jid) not in self.engine.revoked:
            return
        if not await self._commit(self.engine.restore(jid)):
            raise RuntimeError(f"lifting the revocation of {jid} could not be stored")
        log.warn("platform {jid} no longer revoked", jid=bare(jid))

    async def _commit(self, outcome: Outcome) -> bool:
        """Store the outcome's changes, then audit it; False if storage failed."""
        try:
            await self.store.apply(outcome.changes)
        except Exception:
            log.failure("storing broker changes failed")
            return False
        for entry in outcome.audit:
            self.audit.record(**entry)
        return True

    def _deliver(self, outcome: Outcome, *, after_commit: bool) -> int:
        """Enqueue the outcome's messages of one kind; the last one's `Delivery` ticket."""
        ticket = 0
        for notification in outcome.messages:
            if notification.after_commit == after_commit:
                ticket = max(ticket, self.delivery.enqueue(notification))
        return ticket

    def _reply(self, stanza: etree._Element, kind: str, tag: str = "iq") -> etree._Element:
        attributes = {"type": kind, "from": self.domain, "to": stanza.get("from") or ""}
        if stanza.get("id") is not None:
            attributes["id"] = stanza.get("id") or ""
        return etree.Element(_C + tag, attributes, nsmap={None: "jabber:client"})

    def _iq_error(self, iq: etree._Element, error: PubSubError) -> etree._Element:
        reply = self._reply(iq, "error")
        reply.append(error.element())
        return reply

    def _send(self, stanza: etree._Element) -> None:
        assert self.router is not None
        self.router.route(stanza)
