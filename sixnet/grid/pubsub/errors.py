"""XEP-0060 errors as exceptions: raised where a request fails, turned into a reply in one place.

Each error names its RFC 6120 stanza condition, the error type that condition has in XEP-0060's
examples, and optionally a pubsub-specific condition (``pubsub#errors``) and its feature.
"""

from __future__ import annotations

from lxml import etree

from sixnet.core.errors import ConditionError

STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PUBSUB_ERRORS_NS = "http://jabber.org/protocol/pubsub#errors"

#: The error type each stanza condition is sent with (RFC 6120 section 8.3.3, XEP-0060 examples).
ERROR_TYPES = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "internal-server-error": "wait",
    "item-not-found": "cancel",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "unexpected-request": "cancel",
}


class PubSubError(ConditionError):
    """A request failed; the requester gets this stanza error and nothing changes."""

    conditions = frozenset(ERROR_TYPES)

    def __init__(self, condition: str, pubsub_condition: str | None = None, *,
                 feature: str | None = None, text: str | None = None) -> None:
        super().__init__(condition, text or "")
        self.pubsub_condition = pubsub_condition
        self.feature = feature

    def __str__(self) -> str:
        """``condition`` or ``condition/pubsub-condition`` (the audit log's ``refused``)."""
        if self.pubsub_condition is None:
            return self.condition
        return f"{self.condition}/{self.pubsub_condition}"

    @property
    def type(self) -> str:
        return ERROR_TYPES[self.condition]

    def element(self) -> etree._Element:
        """The ``<error/>`` child of the reply."""
        error = etree.Element("{jabber:client}error", type=self.type)
        etree.SubElement(error, f"{{{STANZAS_NS}}}{self.condition}", nsmap={None: STANZAS_NS})
        if self.text:
            text = etree.SubElement(error, f"{{{STANZAS_NS}}}text", nsmap={None: STANZAS_NS})
            text.text = self.text
        if self.pubsub_condition:
            specific = etree.SubElement(error, f"{{{PUBSUB_ERRORS_NS}}}{self.pubsub_condition}",
                                        nsmap={None: PUBSUB_ERRORS_NS})
            if self.feature:
                specific.set("feature", self.feature)
        return error


def unsupported(feature: str) -> PubSubError:
    return PubSubError("feature-not-implemented", "unsupported", feature=feature)


def bad_request(pubsub_condition: str | None = None, text: str | None = None) -> PubSubError:
    return PubSubError("bad-request", pubsub_condition, text=text)


def not_acceptable(pubsub_condition: str | None = None, text: str | None = None) -> PubSubError:
    return PubSubError("not-acceptable", pubsub_condition, text=text)


def node_not_found() -> PubSubError:
    return PubSubError("item-not-found")


def forbidden(text: str | None = None) -> PubSubError:
    return PubSubError("forbidden", text=text)
