"""Pieces of pubsub conversation scripts (tests/support/conversation.py): the requests and
answers of RFC 8600's XEP-0060 use cases, spoken by a provider and a consumer."""

from __future__ import annotations

from .iodef import IODEF, IODEF_NS

PROVIDER = "provider@example.test/p"
CONSUMER = "consumer@example.test/c"


def create_topic(node: str = "MILEHost", access: str = "authorize", extra: str = "",
                 sender: str = PROVIDER) -> str:
    """A create-and-configure request for an IODEF topic."""
    return f"""
>>> <iq type='set' from='{sender}' to='broker.example.test' id='create-{node}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <create node='{node}'/>
        <configure><x xmlns='jabber:x:data' type='submit'>
          <field var='FORM_TYPE' type='hidden'>
            <value>http://jabber.org/protocol/pubsub#node_config</value></field>
          <field var='pubsub#access_model'><value>{access}</value></field>
          <field var='pubsub#type'><value>{IODEF_NS}</value></field>
          <field var='pubsub#title'><value>MILE Host Data</value></field>
          {extra}
        </x></configure>
      </pubsub>
    </iq>
<<< <iq type='result' from='broker.example.test' to='{sender}' id='create-{node}'/>
"""


def subscribe(node: str, sender: str, state: str, *, stanza_id: str = "sub") -> str:
    jid = sender.split("/")[0]
    return f"""
>>> <iq type='set' from='{sender}' to='broker.example.test' id='{stanza_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscribe node='{node}' jid='{jid}'/></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='{sender}' id='{stanza_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <subscription node='{node}' jid='{jid}' subid='*' subscription='{state}'/>
      </pubsub></iq>
"""


def set_affiliation(node: str, jid: str, affiliation: str, notices: str = "") -> str:
    return f"""
>>> <iq type='set' from='{PROVIDER}' to='broker.example.test' id='aff'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub#owner'>
        <affiliations node='{node}'>
          <affiliation jid='{jid}' affiliation='{affiliation}'/></affiliations></pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='{PROVIDER}' id='aff'/>
{notices}
"""


def publish(node: str, item_id: str, recipients: list[str], *, sender: str = PROVIDER,
            payload: str = IODEF, kind: str = "normal") -> str:
    notices = "".join(f"""
<<< <message from='broker.example.test' to='{r}' type='{kind}' id='*'>
      <event xmlns='http://jabber.org/protocol/pubsub#event'>
        <items node='{node}'><item id='{item_id}'>{payload}</item></items></event></message>
""" for r in recipients)
    return f"""
>>> <iq type='set' from='{sender}' to='broker.example.test' id='pub-{item_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='{node}'><item id='{item_id}'>{payload}</item></publish>
      </pubsub></iq>
<<< <iq type='result' from='broker.example.test' to='{sender}' id='pub-{item_id}'>
      <pubsub xmlns='http://jabber.org/protocol/pubsub'>
        <publish node='{node}'><item id='{item_id}'/></publish></pubsub></iq>
{notices}
"""


def error(to: str, stanza_id: str, kind: str, condition: str, specific: str = "",
          text: bool = False) -> str:
    text_element = ("<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>*</text>"
                    if text else "")
    return f"""
<<< <iq type='error' from='broker.example.test' to='{to}' id='{stanza_id}'>
      <error type='{kind}'>
        <{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>{text_element}{specific}
      </error></iq>
"""


def pubsub_error(name: str, feature: str | None = None) -> str:
    extra = f" feature='{feature}'" if feature else ""
    return f"<{name} xmlns='http://jabber.org/protocol/pubsub#errors'{extra}/>"


def approval_request(to: str = "provider@example.test", node: str = "t",
                     subscriber: str = "consumer@example.test",
                     subid: str = "$subid") -> str:
    return f"""
<<< <message from='broker.example.test' to='{to}' type='normal' id='*'>
      <x xmlns='jabber:x:data' type='form'>
        <title>PubSub subscriber request</title>
        <field var='FORM_TYPE' type='hidden'>
          <value>http://jabber.org/protocol/pubsub#subscribe_authorization</value></field>
        <field var='pubsub#subid' type='hidden'><value>{subid}</value></field>
        <field var='pubsub#node' type='text-single' label='Node ID'><value>{node}</value></field>
        <field var='pubsub#subscriber_jid' type='jid-single' label='Subscriber Address'>
          <value>{subscriber}</value></field>
        <field var='pubsub#allow' type='boolean' label='*'><value>false</value></field>
      </x></message>
"""
