"""Properties of SixChat handshake message parsing (sixnet/chat/messages.py `parse`): any
element a peer sends during the XML phase is one handshake message, or an `Alert` with one of
the alert names docs/chat.rst defines (what the peer is sent back), never anything else,
quickly. Inputs are valid messages with random damage, so every branch of the parser is met."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from sixnet.chat import messages as m
from sixnet.chat.alerts import ALERTS, Alert
from tests.support.properties import bounded, xml_text


def _certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "property test")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))


CHAIN = (_certificate(),)
VALID = [
    m.InitiatorHello("bob@example.test", b"r" * 32, (m.Offer("x25519", b"s" * 32),
                     m.Offer("rsa-oaep", None)), ("aes-256-gcm", "chacha20-poly1305"), CHAIN),
    m.ResponderHello("alice@example.test", b"r" * 32, "x25519", b"s" * 32, None,
                     "aes-256-gcm", CHAIN),
    m.ResponderHello("alice@example.test", b"r" * 32, "rsa-oaep", None, b"e" * 256,
                     "chacha20-poly1305", CHAIN),
    m.CertificateVerify("ed25519", b"v" * 64),
    m.Finished(b"f" * 32),
    m.AlertMessage("decode-error"),
]
texts = st.one_of(xml_text, st.sampled_from(
    ["", "AAAA", "====", "c" * 43 + "=", "x25519", "rsa-oaep", "initiator", "responder",
     "ecdsa-sha512", "aes-256-gcm", "MIIB"]))


@st.composite
def damaged(draw: st.DrawFn) -> etree._Element:
    element = m.build(draw(st.sampled_from(VALID)))
    nodes = list(element.iter())
    for _ in range(draw(st.integers(0, 4))):
        node = draw(st.sampled_from(nodes))
        action = draw(st.sampled_from(["text", "attribute", "drop-attribute", "child",
                                       "remove", "duplicate", "rename"]))
        if action == "text":
            node.text = draw(texts)
        elif action == "attribute":
            node.set(draw(st.sampled_from(["role", "to", "method", "name", "algorithm",
                                           "reason", "x"])), draw(texts))
        elif action == "drop-attribute" and node.attrib:
            del node.attrib[draw(st.sampled_from(sorted(node.attrib)))]
        elif action == "child":
            etree.SubElement(node, m.q(draw(st.sampled_from(
                ["offer", "share", "cipher", "certificate", "random", "other"])))).text = \
                draw(texts)
        elif action == "remove" and node is not element and node.getparent() is not None:
            node.getparent().remove(node)
        elif action == "duplicate" and node is not element and node.getparent() is not None:
            node.getparent().append(etree.fromstring(etree.tostring(node)))
        elif action == "rename":
            node.tag = m.q(draw(st.sampled_from(["hello", "finished", "alert", "other"])))
        nodes = list(element.iter())
    return element


@given(damaged())
def test_any_handshake_element_is_a_message_or_an_alert(element: etree._Element) -> None:
    outcome = bounded(lambda: m.parse(element), len(etree.tostring(element)), errors=(Alert,))
    if isinstance(outcome, Alert):
        assert outcome.condition in ALERTS
        return
    assert isinstance(outcome, m.InitiatorHello | m.ResponderHello | m.CertificateVerify
                      | m.Finished | m.AlertMessage)
    if isinstance(outcome, m.AlertMessage):
        assert outcome.reason in ALERTS


def test_the_undamaged_messages_parse_back() -> None:
    for message in VALID:
        assert m.parse(m.build(message)) == message
