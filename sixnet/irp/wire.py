"""IRP on the wire: the namespace, request parsing, result building and response signatures.

Both the registry and the client use this module, so the two agree on every element by
construction. `docs/irp.rst` is the specification; this module follows it.

A request element is parsed once, by `parse_request`, into one frozen `Request` subclass
per operation (its id and its checked, typed arguments); a malformed one raises `IRPError`
with the protocol's error condition.
Results are `<result id><data .../><signature/></result>`: the ``<data>`` element is signed
by the registry's host key over its exclusive XML canonical form (`canonical_bytes`).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from lxml import etree

from sixnet.core.errors import ConditionError
from sixnet.core.stream.protocol import StreamFormat, attribute_error
from sixnet.core.timefmt import parse_rfc3339, rfc3339
from sixnet.pki import signing
from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id

NS = "urn:sixnet:irp:1"
#: The protocol version this module speaks (``major.minor``; a different major is refused).
VERSION = "1.2"
#: The first version whose lookup and watch answers are signed records (docs/irp.rst).
RECORDS_VERSION = (1, 2)
#: The operations whose answers (and notifications) are signed records from 1.2 on.
RECORD_OPERATIONS = frozenset({"lookup", "watch"})
ROOT = f"{{{NS}}}irp"

#: Error conditions a request can get (docs/irp.rst, "Errors").
CONDITIONS = (
    "bad-request",            # the request is malformed or an argument is invalid
    "not-authorized",         # no verified certificate / wrong credentials
    "forbidden",              # authenticated, but the policy does not allow it
    "item-not-found",         # no such person, certificate or backup
    "conflict",               # the code was used already, the serial is already revoked
    "policy-violation",       # a limit: too many addresses or devices, too large
    "locked",                 # the account is locked after repeated failures
    "resource-constraint",    # too many requests in flight on this connection
    "feature-not-implemented",  # unknown operation, or the registry has no CA
    "internal-server-error",  # the registry failed; nothing was changed
)

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_DEVICE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SERIAL = re.compile(r"(?:0[xX])?[0-9A-Fa-f:]{1,64}")
_B64_SPACE = re.compile(r"\s+")


def q(name: str) -> str:
    """The Clark name of an IRP element."""
    return f"{{{NS}}}{name}"


class IRPError(ConditionError):
    """A request failed with one of `CONDITIONS`; the text is for people."""

    conditions = frozenset(CONDITIONS)


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """One transport address of a device: an IPv6 or IPv4 address and a TCP port."""

    ip: str
    port: int

    @classmethod
    def parse(cls, ip: str | None, port: str | int | None) -> Address:
        if ip is None or port is None:
            raise IRPError("bad-request", "an <address> needs ip and port")
        if "%" in ip or "/" in ip:
            raise IRPError("bad-request", f"{ip!r}: scoped or prefixed addresses are not allowed")
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            raise IRPError("bad-request", f"{ip!r} is not an IPv6 or IPv4 address") from None
        if parsed.is_unspecified or parsed.is_multicast:
            raise IRPError("bad-request", f"{ip}: unspecified and multicast addresses are "
                                          "not allowed")
        number = parse_int(port, "port")
        if not 1 <= number <= 65535:
            raise IRPError("bad-request", f"port {number} is out of range 1-65535")
        return cls(_address_text(parsed), number)

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.ip).version


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """RFC 5952 text: compressed, and an IPv4-mapped address in the mixed form of its
    section 5 (``::ffff:192.0.2.1``, which Python writes ``::ffff:c000:201``)."""
    mapped = getattr(address, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else address.compressed


@dataclass(frozen=True)
class DeviceRecord:
    """The addresses one device of a person registered, with when and until when."""

    device: str
    addresses: tuple[Address, ...]
    registered: datetime.datetime
    expires: datetime.datetime


@dataclass(frozen=True)
class CertificateInfo:
    """A certificate the registry issued or knows, with its status now."""

    serial: str  # upper-case hex
    status: str  # "valid", "revoked" or "expired"
    chain: tuple[x509.Certificate, ...]  # leaf first
    revoked_at: datetime.datetime | None = None

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class PersonRecord:
    """What a lookup (or a watch notification) says about a person, most recent device first.

    `addresses` flattens the devices in that order: the first address is the best guess.
    `removed` is true in a notification saying the person no longer exists.
    """

    person: str
    devices: tuple[DeviceRecord, ...] = ()
    certificate: CertificateInfo | None = None
    removed: bool = False

    @property
    def addresses(self) -> list[tuple[str, int, str]]:
        return [(a.ip, a.port, d.device) for d in self.devices for a in d.addresses]


# -- small parsers ---------------------------------------------------------------------------


def parse_int(value: str | int, what: str) -> int:
    if isinstance(value, int):
        return value
    if not re.fullmatch(r"[0-9]{1,10}", value):
        raise IRPError("bad-request", f"{what} {value!r} is not a non-negative integer")
    return int(value)


def parse_user(value: str | None, what: str = "user") -> str:
    if value is None:
        raise IRPError("bad-request", f"the {what} attribute is missing")
    try:
        return _normalized(value) if len(value) <= 256 else normalize_user_id(value)
    except IdentitySyntaxError as e:
        raise IRPError("bad-request", str(e)) from None


#: Lookups name the same persons again and again; normalizing (NFC, IDNA) is not free.
#: At most 4096 ids of at most 256 characters are kept (about 2 MB at worst).
_normalized = functools.lru_cache(maxsize=4096)(normalize_user_id)


def parse_serial(value: str) -> str:
    """A certificate serial in canonical form: upper-case hex, no separators."""
    if not _SERIAL.fullmatch(value):
        raise IRPError("bad-request", f"{value!r} is not a certificate serial (hexadecimal)")
    cleaned = value.lower().removeprefix("0x").replace(":", "")
    number = int(cleaned, 16) if cleaned else 0
    if number <= 0:
        raise IRPError("bad-request", f"{value!r} is not a positive serial")
    return format(number, "X")


def b64decode(text: str | None, what: str) -> bytes:
    if not text:
        raise IRPError("bad-request", f"<{what}> is empty")
    try:
        return base64.b64decode(_B64_SPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise IRPError("bad-request", f"<{what}> is not base64") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_timestamp(text: str | None) -> datetime.datetime:
    """A time attribute (RFC 3339, as `rfc3339` writes them on the wire)."""
    if not text:
        raise IRPError("bad-request", "a time attribute is missing")
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise IRPError("bad-request", f"{text[:40]!r} is not an RFC 3339 time") from None


# -- requests ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A parsed request: the id its client chose. Each operation is a subclass that names
    the operation (its element name) in `op` and holds its arguments, checked and typed."""

    op: ClassVar[str]
    id: str

    @property
    def target(self) -> str | None:
        """The person or certificate the request names, if any (for the audit log)."""
        return getattr(self, "user", None) or getattr(self, "serial", None)


@dataclass(frozen=True)
class EnrollRequest(Request):
    """A certificate for `csr`'s key, by the person's password or a one-time code (one)."""

    op = "enroll"
    user: str
    csr: x509.CertificateSigningRequest
    password: str | None
    code: str | None


@dataclass(frozen=True)
class CACertificatesRequest(Request):
    op = "ca-certificates"


@dataclass(frozen=True)
class RenewRequest(Request):
    op = "renew"
    csr: x509.CertificateSigningRequest


@dataclass(frozen=True)
class RevokeRequest(Request):
    op = "revoke"
    serial: str | None  # None: the certificate this connection authenticated with


@dataclass(frozen=True)
class RegisterRequest(Request):
    op = "register"
    user: str | None  # None: the caller
    device: str
    lifetime: int  # seconds
    addresses: tuple[Address, ...]  # without repeats, in the order given


@dataclass(frozen=True)
class UnregisterRequest(Request):
    op = "unregister"
    user: str | None
    device: str | None  # None: every device


@dataclass(frozen=True)
class LookupRequest(Request):
    op = "lookup"
    user: str


@dataclass(frozen=True)
class CertificatesRequest(Request):
    """A person's certificates, or one certificate by serial (exactly one is given)."""

    op = "certificates"
    user: str | None
    serial: str | None


@dataclass(frozen=True)
class WatchRequest(Request):
    op = "watch"
    user: str


@dataclass(frozen=True)
class UnwatchRequest(Request):
    op = "unwatch"
    user: str


@dataclass(frozen=True)
class BackupPutRequest(Request):
    op = "backup-put"
    user: str | None
    data: bytes


@dataclass(frozen=True)
class BackupGetRequest(Request):
    """The caller's backup, or (anonymously, with `password`) the backup of `user`."""

    op = "backup-get"
    user: str | None
    password: str | None


@dataclass(frozen=True)
class ListUsersRequest(Request):
    op = "list-users"
    after: str | None
    limit: int


@dataclass(frozen=True)
class RemoveRequest(Request):
    op = "remove"
    user: str


def _text_child(element: etree._Element, name: str) -> str | None:
    child = element.find(q(name))
    return child.text if child is not None else None


def _csr(element: etree._Element) -> x509.CertificateSigningRequest:
    raw = b64decode(_text_child(element, "csr"), "csr")
    try:
        csr = x509.load_der_x509_csr(raw)
    except ValueError:
        raise IRPError("bad-request", "<csr> is not a DER certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise IRPError("bad-request", "the CSR's self-signature does not verify")
    return csr


def _credentials(element: etree._Element) -> tuple[str | None, str | None]:
    """The ``<password>`` and the ``<code>`` (at most one of them)."""
    password = _text_child(element, "password")
    code = _text_child(element, "code")
    if password is not None and code is not None:
        raise IRPError("bad-request", "give <password> or <code>, not both")
    if password is not None and not 1 <= len(password) <= 1024:
        raise IRPError("bad-request", "the password must be 1-1024 characters")
    if code is not None and not 1 <= len(code) <= 128:
        raise IRPError("bad-request", "the code must be 1-128 characters")
    return password, code


def _optional_user(element: etree._Element) -> str | None:
    value = element.get("user")
    return parse_user(value) if value is not None else None


def _enroll(element: etree._Element, rid: str, limits: Limits) -> EnrollRequest:
    password, code = _credentials(element)
    if password is None and code is None:
        raise IRPError("bad-request", "enroll needs <password> or <code>")
    return EnrollRequest(rid, parse_user(element.get("user")), _csr(element), password, code)


def _ca_certificates(element: etree._Element, rid: str,
                     limits: Limits) -> CACertificatesRequest:
    return CACertificatesRequest(rid)


def _renew(element: etree._Element, rid: str, limits: Limits) -> RenewRequest:
    return RenewRequest(rid, _csr(element))


def _revoke(element: etree._Element, rid: str, limits: Limits) -> RevokeRequest:
    serial = element.get("serial")
    return RevokeRequest(rid, parse_serial(serial) if serial is not None else None)


def _register(element: etree._Element, rid: str, limits: Limits) -> RegisterRequest:
    device = element.get("device", "default")
    if not _DEVICE.fullmatch(device):
        raise IRPError("bad-request", f"device label {device[:80]!r} must be 1-64 of "
                                      "A-Z a-z 0-9 . _ -")
    lifetime = parse_int(element.get("lifetime", str(limits.default_lifetime)), "lifetime")
    if not 1 <= lifetime <= limits.max_lifetime:
        raise IRPError("bad-request", f"lifetime {lifetime} is out of range "
                                      f"1-{limits.max_lifetime} seconds")
    children = element.findall(q("address"))
    if len(children) > limits.max_addresses:
        raise IRPError("policy-violation", f"{len(children)} addresses; at most "
                                           f"{limits.max_addresses} per registration")
    if not children:
        raise IRPError("bad-request", "register needs at least one <address>")
    addresses: list[Address] = []
    for child in children:
        address = Address.parse(child.get("ip"), child.get("port"))
        if address not in addresses:
            addresses.append(address)
    return RegisterRequest(rid, _optional_user(element), device, lifetime, tuple(addresses))


def _unregister(element: etree._Element, rid: str, limits: Limits) -> UnregisterRequest:
    device = element.get("device")
    if device is not None and not _DEVICE.fullmatch(device):
        raise IRPError("bad-request", f"device label {device[:80]!r} is invalid")
    return UnregisterRequest(rid, _optional_user(element), device)


def _lookup(element: etree._Element, rid: str, limits: Limits) -> LookupRequest:
    return LookupRequest(rid, parse_user(element.get("user")))


def _certificates(element: etree._Element, rid: str, limits: Limits) -> CertificatesRequest:
    user, serial = element.get("user"), element.get("serial")
    if (user is None) == (serial is None):
        raise IRPError("bad-request", "certificates needs exactly one of user and serial")
    return CertificatesRequest(rid, parse_user(user) if user is not None else None,
                               parse_serial(serial) if serial is not None else None)


def _watch(element: etree._Element, rid: str, limits: Limits) -> WatchRequest:
    return WatchRequest(rid, parse_user(element.get("user")))


def _unwatch(element: etree._Element, rid: str, limits: Limits) -> UnwatchRequest:
    return UnwatchRequest(rid, parse_user(element.get("user")))


def _backup_put(element: etree._Element, rid: str, limits: Limits) -> BackupPutRequest:
    data = b64decode(element.text, "backup-put")
    if len(data) > limits.max_backup_bytes:
        raise IRPError("policy-violation", f"the backup is {len(data)} bytes; at most "
                                           f"{limits.max_backup_bytes}")
    return BackupPutRequest(rid, _optional_user(element), data)


def _backup_get(element: etree._Element, rid: str, limits: Limits) -> BackupGetRequest:
    password, code = _credentials(element)
    if code is not None:
        raise IRPError("bad-request", "backup-get takes a <password>, not a <code>")
    user = _optional_user(element)
    if password is not None and user is None:
        raise IRPError("bad-request", "backup-get with a password needs the user attribute")
    return BackupGetRequest(rid, user, password)


def _list_users(element: etree._Element, rid: str, limits: Limits) -> ListUsersRequest:
    after = element.get("after")
    limit = parse_int(element.get("limit", "100"), "limit")
    if not 1 <= limit <= 1000:
        raise IRPError("bad-request", f"limit {limit} is out of range 1-1000")
    if after is not None and not 1 <= len(after) <= 2048:
        raise IRPError("bad-request", "after must be 1-2048 characters")
    return ListUsersRequest(rid, after, limit)


def _remove(element: etree._Element, rid: str, limits: Limits) -> RemoveRequest:
    return RemoveRequest(rid, parse_user(element.get("user")))


#: The verb map: each operation's element name and the function that reads its arguments.
_PARSERS: dict[str, Callable[[etree._Element, str, Limits], Request]] = {
    EnrollRequest.op: _enroll,
    CACertificatesRequest.op: _ca_certificates,
    RenewRequest.op: _renew,
    RevokeRequest.op: _revoke,
    RegisterRequest.op: _register,
    UnregisterRequest.op: _unregister,
    LookupRequest.op: _lookup,
    CertificatesRequest.op: _certificates,
    WatchRequest.op: _watch,
    UnwatchRequest.op: _unwatch,
    BackupPutRequest.op: _backup_put,
    BackupGetRequest.op: _backup_get,
    ListUsersRequest.op: _list_users,
    RemoveRequest.op: _remove,
}
OPERATIONS = tuple(_PARSERS)


@dataclass(frozen=True)
class Limits:
    """The request limits the parser enforces (from the ``[irp]`` section)."""

    max_addresses: int = 8
    max_lifetime: int = 86400
    default_lifetime: int = 3600
    max_backup_bytes: int = 32768


def request_id(element: etree._Element) -> str | None:
    """The request's id if it has a valid one (so even a bad request gets a matching error)."""
    value = element.get("id")
    return value if value is not None and _ID.fullmatch(value) else None


def parse_request(element: etree._Element, limits: Limits) -> Request:
    """The request a top-level element makes; IRPError for anything wrong with it."""
    tag = element.tag
    if not isinstance(tag, str) or not tag.startswith(f"{{{NS}}}"):
        raise IRPError("feature-not-implemented", f"unknown element {tag!s:.100}")
    op = tag[len(NS) + 2:]
    parser = _PARSERS.get(op)
    if parser is None:
        raise IRPError("feature-not-implemented", f"unknown operation <{op:.64}>")
    rid = request_id(element)
    if rid is None:
        raise IRPError("bad-request", "the id attribute is missing or invalid "
                                      "(1-64 of A-Z a-z 0-9 . _ : -)")
    return parser(element, rid, limits)


# -- building elements --------------------------------------------------------------------------


def element(name: str, attrib: dict[str, str] | None = None, text: str | None = None,
            children: Sequence[etree._Element] = ()) -> etree._Element:
    node = etree.Element(q(name), nsmap={None: NS})
    for key, value in (attrib or {}).items():
        node.set(key, value)
    if text is not None:
        node.text = text
    for child in children:
        node.append(child)
    return node


def serialize(node: etree._Element) -> bytes:
    """A top-level element as sent (it repeats the stream's default namespace declaration)."""
    return etree.tostring(node, encoding="utf-8", xml_declaration=False)


#: How an IRP stream is written: header, ``<stream-error condition=...>``, ``</irp>``.
STREAM = StreamFormat('<?xml version="1.0" encoding="UTF-8"?>', "irp",
                      (("xmlns", NS), ("version", VERSION)),
                      attribute_error(NS, "stream-error"))


def error_element(rid: str | None, error: IRPError) -> etree._Element:
    attrib = {"condition": error.condition}
    if rid is not None:
        attrib = {"id": rid, **attrib}
    return element("error", attrib, error.text)


def certificate_element(cert: x509.Certificate) -> etree._Element:
    return element("certificate", {"serial": format(cert.serial_number, "X")},
                   b64(cert.public_bytes(serialization.Encoding.DER)))


def chain_element(info: CertificateInfo) -> etree._Element:
    attrib = {"serial": info.serial, "status": info.status,
              "not-after": rfc3339(info.certificate.not_valid_after_utc)}
    if info.revoked_at is not None:
        attrib["revoked"] = rfc3339(info.revoked_at)
    return element("chain", attrib, children=[certificate_element(c) for c in info.chain])


@functools.lru_cache(maxsize=20_000)
def _certificate_text(cert: x509.Certificate) -> str:
    """A ``<certificate>`` in canonical form. Kept per certificate: a person's record is
    built again on every change, and a certificate is the bulk of it."""
    return (f'<certificate serial="{cert.serial_number:X}">'
            f'{b64(cert.public_bytes(serialization.Encoding.DER))}</certificate>')


def person_payload(record: PersonRecord) -> bytes:
    """The ``<person>`` element of `record` in canonical form as it stands inside ``<data>``
    (what `canonical_payload` gives for it; built directly, lookups being the hot path):
    attributes in alphabetical order, empty elements as start/end tag pairs."""
    removed = ' removed="true"' if record.removed else ""
    out = [f'<person id="{_c14n_attr(record.person)}"{removed}>']
    for device in record.devices:
        common = (f'<address device="{_c14n_attr(device.device)}" '
                  f'expires="{rfc3339(device.expires)}"')
        registered = rfc3339(device.registered)
        out.extend(f'{common} ip="{a.ip}" port="{a.port}" registered="{registered}"></address>'
                   for a in device.addresses)
    info = record.certificate
    if info is not None:
        revoked = f' revoked="{rfc3339(info.revoked_at)}"' if info.revoked_at else ""
        out.append(f'<chain not-after="{rfc3339(info.certificate.not_valid_after_utc)}"'
                   f'{revoked} serial="{info.serial}" status="{info.status}">')
        out.extend(_certificate_text(c) for c in info.chain)
        out.append("</chain>")
    out.append("</person>")
    return "".join(out).encode()


# -- reading elements (client side) -----------------------------------------------------------


def read_certificate(node: etree._Element) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(b64decode(node.text, "certificate"))
    except ValueError:
        raise IRPError("bad-request", "<certificate> is not a DER certificate") from None


def read_chain(node: etree._Element) -> CertificateInfo:
    revoked = node.get("revoked")
    status = node.get("status", "")
    if status not in ("valid", "revoked", "expired"):
        raise IRPError("bad-request", f"unknown certificate status {status[:40]!r}")
    return CertificateInfo(
        serial=parse_serial(node.get("serial", "")),
        status=status,
        chain=tuple(read_certificate(c) for c in node.findall(q("certificate"))),
        revoked_at=parse_timestamp(revoked) if revoked else None,
    )


def read_person(node: etree._Element) -> PersonRecord:
    devices: dict[str, list[Any]] = {}
    for child in node.findall(q("address")):
        name = child.get("device", "default")
        entry = devices.setdefault(name, [[], child.get("registered"), child.get("expires")])
        entry[0].append(Address.parse(child.get("ip"), child.get("port")))
    chain = node.find(q("chain"))
    return PersonRecord(
        person=parse_user(node.get("id"), "id"),
        devices=tuple(DeviceRecord(name, tuple(addrs), parse_timestamp(reg),
                                   parse_timestamp(exp))
                      for name, (addrs, reg, exp) in devices.items()),
        certificate=read_chain(chain) if chain is not None else None,
        removed=node.get("removed") == "true",
    )


# -- signatures ---------------------------------------------------------------------------------


def canonical_bytes(data: etree._Element) -> bytes:
    """Exclusive XML Canonicalization 1.0, without comments, of the ``<data>`` element."""
    return etree.tostring(data, method="c14n", exclusive=True, with_comments=False)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def signature_algorithm(key: Any) -> str:
    """The ``alg`` name for a registry key (public or private): `sixnet.pki.signing`'s table.

    Raises ValueError for a key that has none."""
    return signing.algorithm_name(key)


_DATA_OPEN = f'<data xmlns="{NS}">'.encode()
_DATA_CLOSE = b"</data>"


def canonical_payload(children: Sequence[etree._Element]) -> bytes:
    """The canonical form of payload elements as they stand inside a canonical ``<data>``
    (in its default namespace, so without a namespace declaration of their own)."""
    return canonical_bytes(element("data", children=children))[len(_DATA_OPEN):-len(_DATA_CLOSE)]


def _c14n_attr(value: str) -> str:
    """An attribute value escaped as Canonical XML writes it."""
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            .replace("\t", "&#x9;").replace("\n", "&#xA;").replace("\r", "&#xD;"))


#: Operations on the requester's own record: their answer's subject is the requester.
OWN_RECORD_OPERATIONS = frozenset({"register", "unregister", "renew", "backup-put",
                                   "backup-get"})


def answer_subject(op: str, user: str | None, requester: str | None) -> str | None:
    """The person a signed answer is about (docs/irp.rst, "Signed data"): the request's
    ``user``, else the requester for an operation on their own record, else none."""
    return user if user is not None else requester if op in OWN_RECORD_OPERATIONS else None


@dataclass(frozen=True)
class Statement:
    """What a signed ``<data>`` says besides its payload: which query it answers, for whom,
    from when and until when (docs/irp.rst, "Signed data")."""

    op: str
    request: str
    registry: str
    time: str
    not_after: str
    requester: str | None = None  # None: an anonymous requester
    subject: str | None = None
    serial: str | None = None

    def attributes(self) -> dict[str, str]:
        """The ``<data>`` attributes, in canonical (alphabetical) order."""
        attrib = {"not-after": self.not_after, "op": self.op, "registry": self.registry,
                  "request": self.request, "requester": self.requester,
                  "serial": self.serial, "subject": self.subject, "time": self.time}
        return {k: v for k, v in attrib.items() if v is not None}


def signed_data(statement: Statement, payload: bytes) -> bytes:
    """The canonical ``<data>`` element around a canonical payload (`canonical_payload`):
    the exact bytes the registry signs and sends, so a client's canonicalization of what it
    received gives them back."""
    attrs = "".join(f' {k}="{_c14n_attr(v)}"' for k, v in statement.attributes().items())
    return f'<data xmlns="{NS}"{attrs}>'.encode() + payload + _DATA_CLOSE


def check_statement(data: etree._Element, *, op: str, request: str, requester: str | None,
                    subject: str | None, serial: str | None, now: datetime.datetime,
                    skew: float = 300.0) -> None:
    """What a client MUST check of a verified ``<data>`` (docs/irp.rst, "Signed data"):
    it answers this query (`op`, `request`, `subject`, `serial`) of this `requester` (None:
    anonymous; each absent when None), and it is fresh: ``time`` at most `skew` seconds
    after `now`, `now` before ``not-after``. IRPError ("bad-request") naming what is wrong.
    """
    for name, want in (("op", op), ("request", request), ("requester", requester),
                       ("subject", subject), ("serial", serial)):
        got = data.get(name)
        if got != want:
            raise IRPError("bad-request", f"the signed answer is not for this request: its "
                                          f"{name} is {got!r}, not {want!r}")
    if data.get("not-after") is None:
        raise IRPError("bad-request", "the signed answer has no not-after")
    signed = parse_timestamp(data.get("time"))
    not_after = parse_timestamp(data.get("not-after"))
    if signed > now + datetime.timedelta(seconds=skew):
        raise IRPError("bad-request", f"the signed answer is dated {rfc3339(signed)}, "
                                      "in the future")
    if now >= not_after:
        raise IRPError("bad-request", f"the signed answer expired at {rfc3339(not_after)}")


def version_of(text: str | None) -> tuple[int, int]:
    """``MAJOR.MINOR`` of a stream header as numbers; (0, 0) when it is not one."""
    major, _, minor = (text or "").partition(".")
    if not (major.isdigit() and minor.isdigit()):
        return (0, 0)
    return (int(major), int(minor))


@dataclass(frozen=True)
class RecordStatement:
    """What a signed ``<record>`` (1.2) says besides its payload: whose record, which
    version of it, signed by which registry, when and until when (docs/irp.rst, "Signed
    records"). It names no request and no requester: one signature serves every caller."""

    subject: str
    version: int
    registry: str
    time: str
    not_after: str

    def attributes(self) -> dict[str, str]:
        """The ``<record>`` attributes, in canonical (alphabetical) order."""
        return {"not-after": self.not_after, "registry": self.registry,
                "subject": self.subject, "time": self.time, "version": str(self.version)}


def signed_record(statement: RecordStatement, payload: bytes) -> bytes:
    """The canonical ``<record>`` element around a person's canonical payload (as
    `signed_data`): the bytes the registry signs once and sends to every caller."""
    attrs = "".join(f' {k}="{_c14n_attr(v)}"' for k, v in statement.attributes().items())
    return f'<record xmlns="{NS}"{attrs}>'.encode() + payload + b"</record>"


def record_payload(statement: bytes) -> bytes:
    """The canonical ``<person>`` inside a signed record made by `signed_record` (followed
    by its signature): from the first ``<`` after the start tag's own (a ``<`` in an
    attribute value is escaped) to the one ``</record>``."""
    return statement[statement.index(b"<", 1):statement.rindex(b"</record>")]


def check_record(record: etree._Element, *, subject: str, now: datetime.datetime,
                 seen: int | None = None, skew: float = 300.0) -> int:
    """What a client MUST check of a verified ``<record>`` (docs/irp.rst, "Signed records"):
    it is the record of `subject` (its ``subject`` and its ``<person id>``), fresh (``time``
    at most `skew` seconds after `now`, `now` before ``not-after``) and not older than the
    version `seen` it accepted before. Its version; IRPError ("bad-request") if not."""
    got = record.get("subject")
    if got != subject:
        raise IRPError("bad-request", f"the signed record is not the one asked for: its "
                                      f"subject is {got!r}, not {subject!r}")
    person = record.find(q("person"))
    if person is None or person.get("id") != subject:
        raise IRPError("bad-request", f"the signed record does not hold {subject}'s <person>")
    version_text = record.get("version", "")
    if not version_text.isdigit():
        raise IRPError("bad-request", f"the signed record's version {version_text!r} is not "
                                      "a number")
    version = int(version_text)
    if seen is not None and version < seen:
        raise IRPError("bad-request", f"the signed record of {subject} is version {version}, "
                                      f"older than version {seen} seen already")
    if record.get("not-after") is None:
        raise IRPError("bad-request", "the signed record has no not-after")
    signed = parse_timestamp(record.get("time"))
    not_after = parse_timestamp(record.get("not-after"))
    if signed > now + datetime.timedelta(seconds=skew):
        raise IRPError("bad-request", f"the signed record is dated {rfc3339(signed)}, "
                                      "in the future")
    if now >= not_after:
        raise IRPError("bad-request", f"the signed record expired at {rfc3339(not_after)}")
    return version


class ResponseSigner:
    """Signs canonical ``<data>`` bytes with the registry's host key."""

    def __init__(self, key: Any, certificate: x509.Certificate) -> None:
        self.key = key
        self.alg = signature_algorithm(key)
        self.key_id = fingerprint(certificate)
        self._sign = signing.signer(key)

    def signature(self, message: bytes) -> bytes:
        """The ``<signature>`` element (serialized, in the default namespace) for `message`."""
        raw = self._sign(message)
        return f'<signature alg="{self.alg}" key="{self.key_id}">{b64(raw)}</signature>'.encode()


def verify_signature(data: etree._Element, signature: etree._Element,
                     certificate: x509.Certificate) -> None:
    """Check that `certificate`'s key signed `data`; raise IRPError("bad-request") if not.

    `data` and `signature` are the children of a ``<result>`` or ``<notify>`` as received.
    """
    alg = signature.get("alg")
    public: Any = certificate.public_key()
    try:
        expected = signature_algorithm(public)
    except ValueError as e:
        raise IRPError("bad-request", str(e)) from None
    if alg != expected:
        raise IRPError("bad-request", f"signature algorithm {alg!r} does not fit the "
                                      f"registry's key ({expected})")
    if signature.get("key") != fingerprint(certificate):
        raise IRPError("bad-request", "the response was signed by another registry key")
    raw = b64decode(signature.text, "signature")
    message = canonical_bytes(data)
    try:
        signing.verify(public, raw, message)
    except InvalidSignature:
        raise IRPError("bad-request", "the registry's signature does not verify") from None


def signed_parts(node: etree._Element) -> tuple[etree._Element, etree._Element]:
    """The signed ``<data>`` (or, 1.2, ``<record>``) and the ``<signature>`` children of a
    result or notification."""
    data = node.find(q("data"))
    if data is None:
        data = node.find(q("record"))
    signature = node.find(q("signature"))
    if data is None or signature is None:
        raise IRPError("bad-request", f"<{etree.QName(node).localname}> is not signed")
    return data, signature
