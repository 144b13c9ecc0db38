"""What can go wrong for a grid client, each with the condition the server (or we) named.

`ClientError`: the connection, TLS, the server's certificate or the stream failed (retrying
later may help). `AuthenticationError`: SASL refused us, or the server failed to prove
itself (SCRAM's signature). `IQError`: the server answered a request with a stanza error.
`IQTimeout`: no answer in time.
"""

from __future__ import annotations

from lxml import etree

NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_PUBSUB_ERRORS = "http://jabber.org/protocol/pubsub#errors"


class ClientError(Exception):
    """A session could not be set up or ended; `condition` names why (a stream or SASL
    condition, or one of ours: tls-failed, bad-certificate, connection-lost...)."""

    def __init__(self, text: str, condition: str | None = None) -> None:
        super().__init__(f"{condition}: {text}" if condition and condition != text else text)
        self.condition = condition
        self.text = text


class AuthenticationError(ClientError):
    """SASL failed: the server's condition (not-authorized, account-disabled...)."""


class IQTimeout(ClientError):
    """No answer to a request within the session's iq timeout."""


class IQError(ClientError):
    """The server answered an iq with an error (RFC 6120 8.3).

    `condition` is the stanza condition, `pubsub_condition` the XEP-0060 one if any
    (``pending-subscription``, ``invalid-payload``...), `text` the server's words, `element`
    the whole error iq.
    """

    def __init__(self, element: etree._Element) -> None:
        self.element = element
        self.error_type = None
        condition, text, specific = "undefined-condition", "", None
        error = element.find("{jabber:client}error")
        if error is not None:
            self.error_type = error.get("type")
            for child in error:
                if not isinstance(child.tag, str):
                    continue
                qname = etree.QName(child)
                if qname.namespace == NS_STANZAS:
                    if qname.localname == "text":
                        text = (child.text or "").strip()
                    elif condition == "undefined-condition":
                        condition = qname.localname
                elif qname.namespace == NS_PUBSUB_ERRORS:
                    specific = qname.localname
        self.pubsub_condition = specific
        named = f"{condition}/{specific}" if specific else condition
        super().__init__(f"{named} ({text})" if text else named, condition)
        self.text = text

    def __str__(self) -> str:
        named = f"{self.condition}/{self.pubsub_condition}" if self.pubsub_condition \
            else str(self.condition)
        return f"{named} ({self.text})" if self.text else named
