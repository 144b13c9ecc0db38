"""The seam between the XMPP server core and the in-process services on its subdomains.

The core routes every stanza addressed to a component's domain (or a JID at it) to that
component's `receive`; a component sends stanzas back through the `IRouter` it was attached to
(`sixnet.grid.router.Router` implements it). A stanza to a subdomain with no component gets
the remote-server-not-found error (the server has no server-to-server links).
The pubsub broker at ``broker.<domain>`` is one such component; the grid service builds it
from ``sixnet.grid.pubsub.component.PubSubBroker``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree
from zope.interface import Attribute, Interface


class IRouter(Interface):
    """What the server core offers a component."""

    domain = Attribute("The server's own domain, e.g. 'example.test'.")

    def route(stanza: etree._Element) -> None:
        """Deliver a stanza whose 'from' is at the component's domain.

        Local delivery follows RFC 6120 section 10 and RFC 6121 section 8: a message of type
        normal or chat to a bare JID with no available resource is stored offline (XEP-0160)
        and delivered with a XEP-0203 delay stamp at the next login; iq to an unavailable
        entity is answered with service-unavailable to the component.
        """

    def route_fanout(stanza: etree._Element, recipients: Sequence[str]) -> None:
        """Deliver one stanza to many recipients, serialising it once.

        `stanza` is the template (its own 'to', if any, is ignored); each recipient receives it
        with 'to' set to that recipient, under the same local delivery rules as `route`
        (offline storage included). The router serialises the template once and splices
        each recipient's 'to' into the bytes, so a notification to 10,000 subscribers costs
        one serialisation, not 10,000. Errors for recipients that cannot be reached are
        routed back to the template's 'from', as for `route`.
        """

    def is_available(jid: str) -> bool:
        """Whether a bare or full JID has an available session right now."""

    def origin_of(jid: str) -> tuple[str | None, str]:
        """Where the session of full JID `jid` comes from, for a security event: the IP
        address of its client connection (None when it has none) and, for a session without
        one, what it is instead (the bridge's session inside this process, a platform of the
        host server)."""


class IComponent(Interface):
    """An in-process service that owns a subdomain of the server."""

    domain = Attribute("The component's domain, e.g. 'broker.example.test'.")

    def attach(router: IRouter) -> None:
        """Called once when the server starts, before any stanza is received."""

    def receive(stanza: etree._Element) -> None:
        """Handle a stanza to the component; 'from' is the sender's full JID, as the server
        authenticated it (never what the client claimed)."""

    def session_available(full_jid: str) -> None:
        """A local session became available (initial presence); e.g. resend pending work."""

    def session_unavailable(full_jid: str) -> None:
        """A local session ended or sent unavailable presence."""
