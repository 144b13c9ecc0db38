"""The bridge's pure parts: aggregation on a fake clock, the IODEF mapping of every kind."""

from __future__ import annotations

from lxml import etree
from twisted.internet import task

from sixnet.bridge.aggregate import Aggregator, Incident
from sixnet.bridge.iodef import MAPPING, document
from sixnet.core.events import CATALOGUE, SecurityEvent
from sixnet.core.iodef import IODEF_NS, IODEFValidator

X = f"{{{IODEF_NS}}}"
VALIDATOR = IODEFValidator()


def aggregator(window: float = 60.0, immediate: tuple[str, ...] = ("chat.mitm",),
               max_groups: int = 100) -> tuple[Aggregator, task.Clock, list[Incident]]:
    clock = task.Clock()
    clock.advance(1_000_000)
    seen: list[Incident] = []
    return Aggregator(window, immediate, seen.append, clock, max_groups), clock, seen


def event(clock: task.Clock, kind: str = "irp.login-failed", source: str = "192.0.2.7",
          subject: str = "alice@example.test", detail: str = "wrong password") -> SecurityEvent:
    return SecurityEvent(kind, subject=subject, source=source, detail=detail,
                         time=clock.seconds())


# -- aggregation ------------------------------------------------------------------------------


def test_a_burst_is_one_incident_at_the_end_of_its_window() -> None:
    agg, clock, seen = aggregator()
    start = clock.seconds()
    for _ in range(50):
        agg.receive(event(clock))
        clock.advance(1)
    assert seen == []  # the window (60 s from the first) is still open
    clock.advance(10)
    (incident,) = seen
    assert (incident.kind, incident.count) == ("irp.login-failed", 50)
    assert (incident.first, incident.last) == (start, start + 49)
    assert agg.open_groups == 0


def test_groups_are_per_kind_source_and_subject() -> None:
    agg, clock, seen = aggregator()
    agg.receive(event(clock))
    agg.receive(event(clock, source="2001:db8::1"))
    agg.receive(event(clock, subject="bob@example.test"))
    agg.receive(event(clock, kind="irp.locked-out"))
    agg.receive(event(clock))
    clock.advance(60)
    assert sorted((i.kind, i.source, i.subject, i.count) for i in seen) == [
        ("irp.locked-out", "192.0.2.7", "alice@example.test", 1),
        ("irp.login-failed", "192.0.2.7", "alice@example.test", 2),
        ("irp.login-failed", "192.0.2.7", "bob@example.test", 1),
        ("irp.login-failed", "2001:db8::1", "alice@example.test", 1),
    ]


def test_an_event_after_the_window_opens_a_new_incident() -> None:
    agg, clock, seen = aggregator(window=10)
    agg.receive(event(clock))
    clock.advance(10)
    agg.receive(event(clock))
    clock.advance(10)
    assert [i.count for i in seen] == [1, 1]
    assert seen[0].id != seen[1].id


def test_an_immediate_kind_is_reported_at_once_and_its_repeats_at_the_window_end() -> None:
    agg, clock, seen = aggregator()
    agg.receive(event(clock, kind="chat.mitm"))
    assert [(i.kind, i.count) for i in seen] == [("chat.mitm", 1)]
    clock.advance(5)
    agg.receive(event(clock, kind="chat.mitm"))
    clock.advance(5)
    agg.receive(event(clock, kind="chat.mitm"))
    clock.advance(60)
    assert [i.count for i in seen] == [1, 2]  # every event counted exactly once
    assert seen[1].first == seen[0].first + 5


def test_an_immediate_kind_seen_once_is_reported_once() -> None:
    agg, clock, seen = aggregator()
    agg.receive(event(clock, kind="chat.mitm"))
    clock.advance(120)
    assert [i.count for i in seen] == [1]


def test_flush_reports_every_open_group() -> None:
    agg, clock, seen = aggregator()
    agg.receive(event(clock))
    agg.receive(event(clock, kind="grid.rate-limited", subject="sensor@localhost"))
    agg.flush()
    assert len(seen) == 2 and agg.open_groups == 0
    clock.advance(120)  # the timers were cancelled: nothing reported twice
    assert len(seen) == 2


def test_open_groups_are_bounded() -> None:
    agg, clock, seen = aggregator(max_groups=3)
    for n in range(5):
        agg.receive(event(clock, source=f"192.0.2.{n}"))
    assert agg.open_groups == 3
    assert [i.source for i in seen] == ["192.0.2.0", "192.0.2.1"]  # oldest closed early


def test_the_first_events_facts_are_kept() -> None:
    agg, clock, seen = aggregator()
    agg.receive(SecurityEvent("irp.certificate-refused", source="192.0.2.1",
                              facts={"serial": "0a1b"}, time=clock.seconds()))
    agg.flush()
    assert dict(seen[0].facts) == {"serial": "0a1b"}


# -- IODEF ------------------------------------------------------------------------------------


def incident(kind: str, source: str | None = "192.0.2.7",
             subject: str | None = "alice@example.test", count: int = 3) -> Incident:
    return Incident(kind=kind, source=source, subject=subject, detail="what was seen",
                    count=count, first=1_800_000_000.0, last=1_800_000_042.5,
                    facts={"mechanism": "SCRAM-SHA-256"}, id="0123456789abcdef")


def test_the_mapping_covers_the_catalogue_exactly() -> None:
    assert set(MAPPING) == set(CATALOGUE)


def test_one_document_of_every_kind_is_valid_iodef() -> None:
    for kind in CATALOGUE:
        for source, subject in (("192.0.2.7", "alice@example.test"), ("2001:db8::1", None),
                                (None, None), ("not an address", "bob@example.test")):
            doc = document(incident(kind, source, subject), "grid.example.test")
            assert VALIDATOR.problem(doc) is None, (kind, source, VALIDATOR.problem(doc))


def test_the_validator_refuses_a_broken_document() -> None:
    doc = document(incident("chat.mitm"), "grid.example.test")
    doc.find(f"{X}Incident/{X}Assessment/{X}SystemImpact").set("severity", "apocalyptic")
    assert VALIDATOR.problem(doc) is not None
    doc = document(incident("chat.mitm", subject=None), "grid.example.test")
    doc.find(f"{X}Incident").remove(doc.find(f"{X}Incident/{X}Contact"))  # the only one
    assert VALIDATOR.problem(doc) is not None


def test_a_man_in_the_middle_document() -> None:
    doc = document(incident("chat.mitm", count=1), "grid.example.test", generated=1.8e9 + 60)
    report = doc.find(f"{X}Incident")
    assert report.get("purpose") == "reporting"
    assert report.findtext(f"{X}IncidentID") == "0123456789abcdef"
    assert report.find(f"{X}IncidentID").get("name") == "grid.example.test"
    assert report.findtext(f"{X}StartTime") == "2027-01-15T08:00:00.000Z"
    assert report.findtext(f"{X}EndTime") == "2027-01-15T08:00:42.500Z"
    assert report.findtext(f"{X}GenerationTime") == "2027-01-15T08:01:00.000Z"
    impact = report.find(f"{X}Assessment/{X}SystemImpact")
    assert impact.attrib == {"severity": "high", "completion": "failed",
                             "type": "monitoring-traffic"}
    assert report.findtext(f"{X}Assessment/{X}Counter") == "1"
    assert report.findtext(f"{X}Method/{X}Reference/{X}URL").endswith("/94.html")
    contacts = {c.get("role"): c.findtext(f"{X}ContactName")
                for c in report.iter(f"{X}Contact")}
    assert contacts == {"creator": "sixnet at grid.example.test", "user": "alice@example.test"}
    systems = {s.get("category"): s for s in report.iter(f"{X}System")}
    address = systems["source"].find(f"{X}Node/{X}Address")
    assert (address.text, address.get("category")) == ("192.0.2.7", "ipv4-addr")
    assert systems["target"].findtext(f"{X}Node/{X}DomainData/{X}Name") == "grid.example.test"
    assert systems["target"].find(f"{X}NodeRole").get("category") == "client"


def test_addresses_ipv4_mapped_and_ipv6() -> None:
    for source, expected in (("::ffff:192.0.2.9", ("192.0.2.9", "ipv4-addr")),
                             ("2001:db8::1", ("2001:db8::1", "ipv6-addr")),
                             ("fe80::1%eth0", ("fe80::1", "ipv6-addr"))):
        doc = document(incident("grid.hostile-input", source), "h")
        address = doc.find(f".//{X}System[@category='source']/{X}Node/{X}Address")
        assert (address.text, address.get("category")) == expected
    doc = document(incident("grid.hostile-input", "unix socket"), "h")
    assert doc.find(f".//{X}System[@category='source']") is None


def test_kinds_outside_rfc_7970_impacts_use_ext_value() -> None:
    doc = document(incident("irp.certificate-issued"), "h")
    impact = doc.find(f".//{X}SystemImpact")
    assert (impact.get("type"), impact.get("ext-type")) == ("ext-value", "certificate-issued")
    assert impact.get("completion") is None


def test_a_platform_is_not_a_person() -> None:
    doc = document(incident("grid.rate-limited", subject="sensor@example.test"), "h")
    user = doc.find(f".//{X}Contact[@role='user']")
    assert (user.get("type"), user.get("ext-type")) == ("ext-value", "platform")


def test_the_document_carries_only_the_incidents_words() -> None:
    """Everything a document says comes from the incident, the catalogue or the mapping."""
    doc = document(incident("irp.login-failed"), "h", generated=0)
    text = " ".join(t for t in doc.itertext() if t.strip())
    for piece in ("what was seen", "SCRAM-SHA-256", "alice@example.test", "192.0.2.7"):
        assert piece in text
    assert etree.tostring(doc).count(b"AdditionalData") == 4  # the kind and one fact
