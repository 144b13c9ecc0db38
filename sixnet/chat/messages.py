"""The handshake's XML elements: parsed once into typed messages, built from them.

Parsing is strict about what the protocol needs (docs/chat.rst, "The XML phase"): missing or
unknown children, bad base64 and oversized fields are `decode-error` alerts. Unknown
attributes are ignored.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree

from sixnet.chat.alerts import ALERTS, Alert
from sixnet.pki.signing import ALGORITHM_NAMES

NS = "urn:sixnet:sixchat:1"
VERSION = "1"
ROOT = f"{{{NS}}}sixchat"
STREAM_HEADER = f'<sixchat xmlns="{NS}" version="{VERSION}">'.encode()
STREAM_END = b"</sixchat>"
MAX_CHAIN = 8
RANDOM_LEN = 32
KEY_AGREEMENTS = ("x25519", "rsa-oaep")


def q(name: str) -> str:
    return f"{{{NS}}}{name}"


def canonical(element: etree._Element) -> bytes:
    """The element's bytes in the transcript: Exclusive XML C14N 1.0 without comments."""
    return etree.tostring(element, method="c14n", exclusive=True, with_comments=False)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None, what: str, *, size: int | None = None) -> bytes:
    try:
        data = base64.b64decode((text or "").strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Alert("decode-error", f"{what} is not base64") from None
    if not data or (size is not None and len(data) != size):
        raise Alert("decode-error", f"{what} has the wrong length")
    return data


def _children(element: etree._Element, names: tuple[str, ...], what: str) -> list:
    kids = [c for c in element if isinstance(c.tag, str)]
    if [c.tag for c in kids] != [q(n) for n in names]:
        raise Alert("decode-error", f"{what} must contain {', '.join(names)} in that order")
    return kids


def _attr(element: etree._Element, name: str, what: str) -> str:
    value = element.get(name)
    if value is None:
        raise Alert("decode-error", f"{what} lacks the {name} attribute")
    return value


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    method: str
    share: bytes | None  # the X25519 public key of an x25519 offer


@dataclass(frozen=True)
class InitiatorHello:
    to: str
    random: bytes
    offers: tuple[Offer, ...]
    ciphers: tuple[str, ...]
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class ResponderHello:
    to: str
    random: bytes
    method: str
    share: bytes | None  # x25519
    encrypted_secret: bytes | None  # rsa-oaep
    cipher: str
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class CertificateVerify:
    algorithm: str
    signature: bytes


@dataclass(frozen=True)
class Finished:
    mac: bytes


@dataclass(frozen=True)
class AlertMessage:
    reason: str


HandshakeMessage = InitiatorHello | ResponderHello | CertificateVerify | Finished | AlertMessage


# -- building ---------------------------------------------------------------------------------


def _element(tag: str, **attrs: str) -> etree._Element:
    return etree.Element(q(tag), attrs, nsmap={None: NS})


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attrs: str) -> etree._Element:
    child = etree.SubElement(parent, q(tag), attrs)
    if text is not None:
        child.text = text
    return child


def _add_chain(parent: etree._Element, chain: tuple[x509.Certificate, ...]) -> None:
    holder = _sub(parent, "certificate-chain")
    for cert in chain:
        _sub(holder, "certificate", _b64(cert.public_bytes(Encoding.DER)))


def build(message: HandshakeMessage) -> etree._Element:
    if isinstance(message, InitiatorHello):
        e = _element("hello", role="initiator", to=message.to)
        _sub(e, "random", _b64(message.random))
        ka = _sub(e, "key-agreement")
        for offer in message.offers:
            o = _sub(ka, "offer", method=offer.method)
            if offer.share is not None:
                _sub(o, "share", _b64(offer.share))
        ciphers = _sub(e, "ciphers")
        for name in message.ciphers:
            _sub(ciphers, "cipher", name=name)
        _add_chain(e, message.chain)
    elif isinstance(message, ResponderHello):
        e = _element("hello", role="responder", to=message.to)
        _sub(e, "random", _b64(message.random))
        ka = _sub(e, "key-agreement", method=message.method)
        if message.share is not None:
            _sub(ka, "share", _b64(message.share))
        if message.encrypted_secret is not None:
            _sub(ka, "encrypted-secret", _b64(message.encrypted_secret))
        _sub(e, "cipher", name=message.cipher)
        _add_chain(e, message.chain)
    elif isinstance(message, CertificateVerify):
        e = _element("certificate-verify", algorithm=message.algorithm)
        e.text = _b64(message.signature)
    elif isinstance(message, Finished):
        e = _element("finished")
        e.text = _b64(message.mac)
    else:
        e = _element("alert", reason=message.reason)
    return e


# -- parsing ----------------------------------------------------------------------------------


def _parse_chain(element: etree._Element) -> tuple[x509.Certificate, ...]:
    certs = [c for c in element if isinstance(c.tag, str)]
    if not certs or len(certs) > MAX_CHAIN:
        raise Alert("decode-error", f"a certificate chain has 1 to {MAX_CHAIN} certificates")
    chain = []
    for c in certs:
        if c.tag != q("certificate"):
            raise Alert("decode-error", "certificate-chain may hold only certificate elements")
        try:
            chain.append(x509.load_der_x509_certificate(_unb64(c.text, "a certificate")))
        except ValueError:
            raise Alert("bad-certificate", "a certificate is not valid DER") from None
    return tuple(chain)


def _share(element: etree._Element) -> bytes:
    return _unb64(element.text, "an X25519 share", size=32)


def parse(element: etree._Element) -> HandshakeMessage:
    """One handshake element as a message; raises `Alert` (decode-error, unexpected-message)."""
    tag = element.tag
    if tag == q("hello"):
        role = element.get("role")
        if role == "initiator":
            return _parse_initiator_hello(element)
        if role == "responder":
            return _parse_responder_hello(element)
        raise Alert("decode-error", "hello has no valid role")
    if tag == q("certificate-verify"):
        algorithm = _attr(element, "algorithm", "certificate-verify")
        if algorithm not in ALGORITHM_NAMES:
            raise Alert("decode-error", f"unknown signature algorithm {algorithm[:40]!r}")
        if len(element):
            raise Alert("decode-error", "certificate-verify has children")
        return CertificateVerify(algorithm, _unb64(element.text, "a signature"))
    if tag == q("finished"):
        if len(element):
            raise Alert("decode-error", "finished has children")
        return Finished(_unb64(element.text, "finished", size=32))
    if tag == q("alert"):
        reason = element.get("reason", "")
        return AlertMessage(reason if reason in ALERTS else "internal-error")
    raise Alert("unexpected-message", f"unexpected element {str(tag)[:80]}")


def _parse_initiator_hello(e: etree._Element) -> InitiatorHello:
    random, ka, ciphers, chain = _children(
        e, ("random", "key-agreement", "ciphers", "certificate-chain"), "hello")
    offers = []
    for o in ka:
        if o.tag != q("offer"):
            raise Alert("decode-error", "key-agreement may hold only offer elements")
        method = _attr(o, "method", "offer")
        kids = [c for c in o if isinstance(c.tag, str)]
        if method == "x25519":
            if [c.tag for c in kids] != [q("share")]:
                raise Alert("decode-error", "an x25519 offer holds one share")
            offers.append(Offer(method, _share(kids[0])))
        elif method == "rsa-oaep":
            if kids:
                raise Alert("decode-error", "an rsa-oaep offer has no children")
            offers.append(Offer(method, None))
        # an unknown method is skipped: a newer peer may offer more
        if len(offers) > len(KEY_AGREEMENTS):
            raise Alert("decode-error", "a method is offered twice")
    names = []
    for c in ciphers:
        if c.tag != q("cipher"):
            raise Alert("decode-error", "ciphers may hold only cipher elements")
        names.append(_attr(c, "name", "cipher"))
        if len(names) > 16:
            raise Alert("decode-error", "too many ciphers")
    return InitiatorHello(_attr(e, "to", "hello"), _unb64(random.text, "random",
                                                          size=RANDOM_LEN),
                          tuple(offers), tuple(names), _parse_chain(chain))


def _parse_responder_hello(e: etree._Element) -> ResponderHello:
    random, ka, cipher, chain = _children(
        e, ("random", "key-agreement", "cipher", "certificate-chain"), "hello")
    method = _attr(ka, "method", "key-agreement")
    kids = [c for c in ka if isinstance(c.tag, str)]
    share = secret = None
    if method == "x25519" and [c.tag for c in kids] == [q("share")]:
        share = _share(kids[0])
    elif method == "rsa-oaep" and [c.tag for c in kids] == [q("encrypted-secret")]:
        secret = _unb64(kids[0].text, "encrypted-secret")
    else:
        raise Alert("decode-error", f"bad key-agreement for method {method[:40]!r}")
    return ResponderHello(_attr(e, "to", "hello"),
                          _unb64(random.text, "random", size=RANDOM_LEN), method, share, secret,
                          _attr(cipher, "name", "cipher"), _parse_chain(chain))
