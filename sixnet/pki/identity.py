"""How a person's identity is carried in a certificate, and how it is compared.

A user certificate names its person (``alice@example.test``) in subjectAltName, twice:

* an ``rfc822Name`` (what mail and chat software reads), and
* an ``otherName`` of type ``id-on-xmppAddr`` (1.3.6.1.5.5.7.8.5) holding a UTF8String,
  as RFC 6120 section 13.7.1.4 defines, so the same certificate serves SASL EXTERNAL
  (XEP-0178) on the XMPP-Grid controller.

Either alone is accepted; when both are present they must name the same person.
The subject common name is informational only and never used for matching.
A user id is ``localpart@domain``; both parts are compared after Unicode NFC
normalisation and case folding (the domain is also IDNA-decoded), so
``Alice@Example.TEST`` and ``alice@example.test`` are one person.
"""

from __future__ import annotations

import re
import unicodedata

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")


class IdentitySyntaxError(ValueError):
    """A string is not a valid user id."""


#: Characters no user id may contain.
_FORBIDDEN = frozenset(' "&\'/:<>@\\') | {chr(c) for c in range(0x20)} | {"\x7f"}


#: An id already in canonical form as most are written: ASCII without upper case or any
#: character `_checked` refuses (the domain still needs its dot and no trailing one).
_CANONICAL_ASCII = re.compile(r"[!#-%(-.0-9;=?\[\]-~]{1,1023}@[!#-%(-.0-9;=?\[\]-~]{1,1023}")


def normalize_user_id(user_id: str) -> str:
    """Return the canonical form of ``localpart@domain`` or raise IdentitySyntaxError."""
    if isinstance(user_id, str) and _CANONICAL_ASCII.fullmatch(user_id) is not None and \
            user_id[-1] != "." and user_id.rfind(".") > user_id.find("@") and \
            "xn--" not in user_id:
        return user_id  # what the steps below would make of it, for less
    if not isinstance(user_id, str) or user_id.count("@") != 1:
        raise IdentitySyntaxError(f"{user_id!r} is not a user id of the form name@domain")
    local, domain = user_id.split("@")
    if user_id.isascii() and "xn--" not in domain:
        # What `_folded` gives for ASCII, for less: NFC changes no ASCII, casefold is
        # lower, and IDNA decoding leaves a domain without an ACE label as it is.
        return _checked(user_id, local.lower(), domain.lower().rstrip("."))
    return _checked(user_id, *_folded(user_id, local, domain))


def _folded(user_id: str, local: str, domain: str) -> tuple[str, str]:
    """The parts of a user id in canonical form: NFC, case-folded, IDNA labels decoded."""
    local = unicodedata.normalize("NFC", local).casefold()
    try:
        domain = domain.encode("ascii").decode("idna") if domain.isascii() else domain
    except UnicodeError:
        raise IdentitySyntaxError(f"{user_id!r} has an invalid domain") from None
    return local, unicodedata.normalize("NFC", domain).casefold().rstrip(".")


def _checked(user_id: str, local: str, domain: str) -> str:
    """The user id of the canonical parts, if they make a valid one."""
    if not local or not domain or len(local) > 1023 or len(domain) > 1023:
        raise IdentitySyntaxError(f"{user_id!r} is not a user id of the form name@domain")
    if not _FORBIDDEN.isdisjoint(local) or not _FORBIDDEN.isdisjoint(domain):
        raise IdentitySyntaxError(f"{user_id!r} contains a character not allowed in a user id")
    if "." not in domain and domain != "localhost":
        raise IdentitySyntaxError(f"{user_id!r}: the domain must be a fully qualified name")
    return f"{local}@{domain}"


def _decode_utf8_string(der: bytes) -> str | None:
    """Decode a DER UTF8String (tag 12), as an otherName value wraps it in [0] EXPLICIT."""
    # The value of an otherName arrives as the DER of the [0] EXPLICIT wrapper or its content,
    # depending on the library version; accept both.
    data = der
    if data[:1] == b"\xa0":
        data = _der_content(data)
        if data is None:
            return None
    if data[:1] != b"\x0c":
        return None
    content = _der_content(data)
    if content is None:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _der_content(der: bytes) -> bytes | None:
    if len(der) < 2:
        return None
    length = der[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return None
        length = int.from_bytes(der[2 : 2 + count], "big")
        offset = 2 + count
    if len(der) != offset + length:
        return None
    return der[offset:]


def encode_xmpp_addr(user_id: str) -> bytes:
    """DER of a UTF8String holding `user_id`, the value of an id-on-xmppAddr otherName."""
    raw = user_id.encode("utf-8")
    if len(raw) < 0x80:
        header = bytes([0x0C, len(raw)])
    else:
        size = len(raw).to_bytes((len(raw).bit_length() + 7) // 8, "big")
        header = bytes([0x0C, 0x80 | len(size)]) + size
    return header + raw


def user_ids_in(cert: x509.Certificate) -> set[str]:
    """Every user id the certificate names (normalized); empty if it names no person."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    found: set[str] = set()
    for name in san.get_values_for_type(x509.RFC822Name):
        try:
            found.add(normalize_user_id(name))
        except IdentitySyntaxError:
            continue
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id != ID_ON_XMPPADDR:
            continue
        text = _decode_utf8_string(other.value)
        if text is None:
            continue
        try:
            found.add(normalize_user_id(text))
        except IdentitySyntaxError:
            continue
    return found


def user_san(user_id: str) -> x509.SubjectAlternativeName:
    """The subjectAltName the lab CA and the registry put in a user certificate."""
    canonical = normalize_user_id(user_id)
    names: list[x509.GeneralName] = []
    if canonical.isascii():  # rfc822Name is IA5String: a non-ASCII person is named by xmppAddr only
        names.append(x509.RFC822Name(canonical))
    names.append(x509.OtherName(ID_ON_XMPPADDR, encode_xmpp_addr(canonical)))
    return x509.SubjectAlternativeName(names)
