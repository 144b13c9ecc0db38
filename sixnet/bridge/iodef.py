"""Each security event kind as an IODEF 2.0 (RFC 7970) incident report.

`MAPPING` is the one table: for every `CATALOGUE` kind, the RFC 7970 SystemImpact type
(section 3.12.2), its severity and completion, and the method (with a CAPEC reference where
one names the attack). `document` builds one ``<IODEF-Document>`` with one
``<Incident purpose="reporting">``: when (detect, start, end, generation time), what (the
catalogue's meaning, the detail, the count), who reports (the suite, role creator), about
whom (the person or platform, role user), and the flow from the source address to the
service's node. It carries the short facts of the event, never a secret or message text.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from lxml import etree

from sixnet.bridge.aggregate import Incident
from sixnet.core.events import CATALOGUE
from sixnet.core.iodef import IODEF_NS
from sixnet.core.timefmt import rfc3339

_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_CAPEC = "https://capec.mitre.org/data/definitions/{}.html"


@dataclass(frozen=True)
class Classification:
    """How one kind is reported."""

    impact: str  # systemimpact-type-type, or an ext-type when not one of RFC 7970's
    severity: str  # low, medium, high
    completion: str | None  # "failed": the attempt was stopped; None: not an attempt
    method: str  # how the attack (or the operation) works, for a person
    capec: tuple[int, str] | None = None  # CAPEC id and name, when one names the attack

    @property
    def rfc_impact(self) -> bool:
        return self.impact in _RFC_IMPACTS


#: RFC 7970 section 3.12.2's SystemImpact types this table uses.
_RFC_IMPACTS = frozenset({"takeover-account", "takeover-service", "breach-credential",
                          "monitoring-traffic", "traffic-redirection", "integrity-data",
                          "availability-data", "availability-service"})

_GUESS = (49, "Password Brute Forcing")
#: kind -> how it is reported. A test checks it covers CATALOGUE exactly.
MAPPING: dict[str, Classification] = {
    "irp.login-failed": Classification("takeover-account", "low", "failed",
                                "wrong passwords for a user id", _GUESS),
    "irp.locked-out": Classification("takeover-account", "medium", "failed",
                              "repeated wrong passwords locked a user id for one network",
                              _GUESS),
    "irp.certificate-refused": Classification("breach-credential", "medium", "failed",
                                       "a revoked, expired or foreign client certificate"),
    "irp.certificate-issued": Classification("certificate-issued", "low", None,
                                      "the registry's CA issued a certificate"),
    "irp.certificate-revoked": Classification("certificate-revoked", "low", None,
                                       "a certificate was revoked"),
    "irp.user-removed": Classification("account-removed", "low", None,
                                "an operator removed a user"),
    "chat.mitm": Classification("monitoring-traffic", "high", "failed",
                         "a certificate other than the one the directory publishes, or "
                         "one swapped in the handshake",
                         (94, "Adversary in the Middle (AiTM)")),
    "chat.identity-mismatch": Classification("traffic-redirection", "high", "failed",
                                      "the peer reached is another person than the one "
                                      "dialled", (94, "Adversary in the Middle (AiTM)")),
    "chat.certificate-revoked": Classification("breach-credential", "medium", "failed",
                                        "a peer presented a revoked certificate"),
    "chat.record-tampered": Classification("integrity-data", "medium", "failed",
                                    "a record was altered in transit"),
    "chat.record-replayed": Classification("integrity-data", "medium", "failed",
                                    "a record was sent again or out of order",
                                    (60, "Reusing Session IDs (aka Session Replay)")),
    "chat.record-dropped": Classification("availability-data", "low", None,
                                   "a record went missing in transit"),
    "chat.downgrade": Classification("monitoring-traffic", "high", "failed",
                              "the handshake offers were altered to weaken the session",
                              (620, "Drop Encryption Level")),
    "grid.platform-revoked": Classification("authorization-revoked", "low", None,
                                     "an operator revoked a platform"),
    "grid.rate-limited": Classification("availability-service", "low", "failed",
                                 "a platform sent faster than its rate limit"),
    "grid.login-failed": Classification("takeover-account", "low", "failed",
                                        "a wrong password or proof, or a refused certificate, "
                                        "at login", _GUESS),
    "grid.locked-out": Classification("takeover-account", "medium", "failed",
                               "repeated failed logins locked an account for one network",
                               _GUESS),
    "grid.hostile-input": Classification("takeover-service", "medium", "failed",
                                  "malformed or hostile XML on a client stream"),
}

#: service -> (what the target node is, RFC 7970 NodeRole category, IANA service name).
SERVICES = {
    "irp": ("the sixnet IRP registry", "credential", None),
    "chat": ("the SixChat user agent", "client", None),
    "grid": ("the sixnet XMPP-Grid controller", "messaging", "xmpp-client"),
}


def _sub(parent: etree._Element, tag: str, text: str | None = None,
         **attributes: str) -> etree._Element:
    element = etree.SubElement(parent, f"{{{IODEF_NS}}}{tag}", attributes)
    if text is not None:
        element.text = text
    return element


def _address(parent: etree._Element, source: str) -> bool:
    """A source address as an IODEF Address (IPv4-mapped IPv6 as IPv4); False if not an IP."""
    try:
        address = ipaddress.ip_address(source.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    category = "ipv4-addr" if address.version == 4 else "ipv6-addr"
    _sub(parent, "Address", str(address), category=category)
    return True


def _times(incident: Incident) -> str:
    if incident.count == 1:
        return f"once at {rfc3339(incident.first, precision='seconds')}"
    return (f"{incident.count} times from {rfc3339(incident.first, precision='seconds')} "
            f"to {rfc3339(incident.last, precision='seconds')}")


def document(incident: Incident, name: str, generated: float | None = None) -> etree._Element:
    """The IODEF document reporting `incident`; `name` is the suite's host name (the
    IncidentID namespace and the reporting contact)."""
    mapping = MAPPING[incident.kind]
    root = etree.Element(f"{{{IODEF_NS}}}IODEF-Document", {"version": "2.00", _XML_LANG: "en"},
                         nsmap={None: IODEF_NS})
    report = _sub(root, "Incident", purpose="reporting", restriction="need-to-know")
    _sub(report, "IncidentID", incident.id, name=name)
    _sub(report, "DetectTime", rfc3339(incident.first))
    _sub(report, "StartTime", rfc3339(incident.first))
    _sub(report, "EndTime", rfc3339(incident.last))
    _sub(report, "GenerationTime", rfc3339(time.time() if generated is None else generated))
    meaning = CATALOGUE[incident.kind]
    detail = f": {incident.detail}" if incident.detail else ""
    _sub(report, "Description", f"{incident.kind}: {meaning}{detail} ({_times(incident)})")
    assessment = _sub(report, "Assessment", occurrence="actual")
    _sub(assessment, "IncidentCategory", incident.kind)
    impact = {"severity": mapping.severity}
    if mapping.completion is not None:
        impact["completion"] = mapping.completion
    if mapping.rfc_impact:
        impact["type"] = mapping.impact
    else:
        impact.update({"type": "ext-value", "ext-type": mapping.impact})
    _sub(_sub(assessment, "SystemImpact", **impact), "Description", meaning)
    _sub(assessment, "Counter", str(incident.count), type="count", unit="event")
    method = _sub(report, "Method")
    if mapping.capec is not None:
        number, title = mapping.capec
        reference = _sub(method, "Reference")
        _sub(reference, "URL", _CAPEC.format(number))
        _sub(reference, "Description", f"CAPEC-{number}: {title}")
    _sub(method, "Description", mapping.method)
    service, role, iana = SERVICES[incident.service]
    creator = _sub(report, "Contact", role="creator", type="organization")
    _sub(creator, "ContactName", f"sixnet at {name}")
    if incident.subject:
        # A person (IRP user id, chat peer) or a platform (a grid account's bare JID).
        kind = {"type": "person"} if incident.service != "grid" else \
            {"type": "ext-value", "ext-type": "platform"}
        _sub(_sub(report, "Contact", role="user", **kind), "ContactName", incident.subject)
    flow = _sub(_sub(report, "EventData"), "Flow")
    if incident.source:
        source = _sub(flow, "System", category="source")
        if not _address(_sub(source, "Node"), incident.source):
            flow.remove(source)
    target = _sub(flow, "System", category="target")
    _sub(_sub(_sub(target, "Node"), "DomainData"), "Name", name)
    _sub(target, "NodeRole", category=role)
    names = _sub(_sub(target, "Service", **{"ip-protocol": "6"}), "ServiceName")
    if iana is not None:
        _sub(names, "IANAService", iana)
    _sub(names, "Description", service)
    _sub(report, "AdditionalData", incident.kind, dtype="string", name="sixnet-event",
         meaning="the sixnet security event kind (docs/bridge.rst)")
    for key, value in sorted(incident.facts.items()):
        _sub(report, "AdditionalData", value, dtype="string", name=key)
    return root
