"""XMPP vocabulary shared by the stream, the router and components: namespaces, how a client
stream is written, stanza errors (RFC 6120 8.3) and serialisation of stanzas onto a client
stream. Stream errors are the shared stream layer's `sixnet.core.stream.protocol.StreamError`."""

from __future__ import annotations

import re
from xml.sax.saxutils import quoteattr

from lxml import etree

from sixnet.core.errors import ConditionError
from sixnet.core.stream.protocol import StreamFormat, child_error

_TAG_NAME = re.compile(rb"<[^\s/>]+")
_NEEDS_QUOTING = re.compile(r'[&<>"\n\r\t]')

NS_CLIENT = "jabber:client"
NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_SM = "urn:xmpp:sm:3"
NS_SASL_CB = "urn:xmpp:sasl-cb:0"
NS_LIMITS = "urn:xmpp:stream-limits:0"
NS_PING = "urn:xmpp:ping"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_DELAY = "urn:xmpp:delay"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

STANZA_TAGS = frozenset({f"{{{NS_CLIENT}}}message", f"{{{NS_CLIENT}}}presence",
                         f"{{{NS_CLIENT}}}iq"})

#: RFC 6120 8.3.3: each stanza error condition and its default error type.
STANZA_ERROR_TYPES = {
    "bad-request": "modify", "conflict": "cancel", "feature-not-implemented": "cancel",
    "forbidden": "auth", "internal-server-error": "cancel", "item-not-found": "cancel",
    "jid-malformed": "modify", "not-acceptable": "modify", "not-allowed": "cancel",
    "not-authorized": "auth", "policy-violation": "modify", "recipient-unavailable": "wait",
    "remote-server-not-found": "cancel", "resource-constraint": "wait",
    "service-unavailable": "cancel", "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StanzaError(ConditionError):
    """A stanza is answered with an error of this condition (RFC 6120 8.3)."""

    conditions = frozenset(STANZA_ERROR_TYPES)


#: How a client stream is written (RFC 6120 4.7 header, 4.9.2 stream error).
STREAM = StreamFormat("<?xml version='1.0'?>", "stream:stream",
                      (("xmlns", NS_CLIENT), ("xmlns:stream", NS_STREAMS)),
                      child_error("stream:error", NS_STREAM_ERRORS))


def element(tag: str, attrib: dict[str, str] | None = None, ns: str = NS_CLIENT,
            children: list[etree._Element] | None = None) -> etree._Element:
    e = etree.Element(f"{{{ns}}}{tag}", nsmap={None: ns})
    for k, v in (attrib or {}).items():
        e.set(k, v)
    for child in children or []:
        e.append(child)
    return e


def error_reply(stanza: etree._Element, condition: str, text: str = "",
                error_type: str | None = None) -> etree._Element:
    """The error response to `stanza` (RFC 6120 8.3.1): same kind and id, to/from swapped."""
    kind = etree.QName(stanza).localname
    reply = element(kind, {"type": "error"})
    if stanza.get("id") is not None:
        reply.set("id", stanza.get("id", ""))
    if stanza.get("from"):
        reply.set("to", stanza.get("from", ""))
    if stanza.get("to"):
        reply.set("from", stanza.get("to", ""))
    if kind == "message":
        for child in stanza:
            if etree.QName(child).localname in ("body", "subject", "thread"):
                reply.append(etree.fromstring(etree.tostring(child)))
    err = etree.SubElement(reply, f"{{{NS_CLIENT}}}error",
                           type=error_type or STANZA_ERROR_TYPES.get(condition, "cancel"))
    etree.SubElement(err, f"{{{NS_STANZAS}}}{condition}", nsmap={None: NS_STANZAS})
    if text:
        t = etree.SubElement(err, f"{{{NS_STANZAS}}}text", nsmap={None: NS_STANZAS})
        t.set(XML_LANG, "en")
        t.text = text
    return reply


def result_reply(iq: etree._Element) -> etree._Element:
    reply = element("iq", {"type": "result", "id": iq.get("id", "")})
    if iq.get("from"):
        reply.set("to", iq.get("from", ""))
    if iq.get("to"):
        reply.set("from", iq.get("to", ""))
    return reply


def serialize(stanza: etree._Element) -> bytes:
    """A stanza as it goes on a client stream (whose default namespace is jabber:client)."""
    return etree.tostring(stanza)


def splice_to(serialized_without_to: bytes, to: str) -> bytes:
    """Insert a 'to' attribute into a serialised stanza that has none.

    Lets one serialisation of a notification be reused for many recipients.
    """
    head, tail = split_for_to(serialized_without_to)
    return head + to_attribute(to) + tail


def split_for_to(serialized_without_to: bytes) -> tuple[bytes, bytes]:
    """The bytes before and after the place `splice_to` puts the 'to' attribute in: a
    fan-out splits its template once and joins the parts around each recipient's address."""
    match = _TAG_NAME.match(serialized_without_to)
    if match is None:
        raise ValueError("not a serialised element")
    end = match.end()
    return serialized_without_to[:end], serialized_without_to[end:]


def to_attribute(to: str) -> bytes:
    """`` to="..."`` for a serialised start tag (quoteattr only for the rare JID that needs
    escaping: it is most of the cost of a copy otherwise)."""
    if _NEEDS_QUOTING.search(to) is None:
        return b' to="' + to.encode() + b'"'
    return b" to=" + quoteattr(to).encode()
