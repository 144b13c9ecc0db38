"""Security events: what a service detected, for whoever in the process listens.

Services emit `SecurityEvent`s to an `IEventSink` handed to them by the composition root; the
pubsub bridge (``sixnet.bridge``) subscribes to the `EventBus` and turns them into IODEF
incidents on the XMPP-Grid. A service never learns who listens, so no service imports the
grid. An event carries what a responder needs (when, from which address, about which person
or platform, what was seen, by which service) and never a secret or message text: `facts`
holds short identifiers only (a certificate serial, a mechanism, a condition).

Facts use these keys where they apply: ``serial`` (a certificate's serial, upper-case hex as
openssl prints it), ``issuer`` (RFC 4514), ``names`` (the people a certificate names),
``check`` (the certificate check that failed, or which check saw the attack), ``condition``
(the protocol's error condition), ``mechanism`` (SASL), ``operation``, ``network`` (the
source network a lockout counts), ``limit`` and ``value`` (a limit's setting name and value),
``failures``, ``by`` (who revoked or removed), ``origin`` (what a requester without an
address is: ``local session (in this process)``); chat events add ``alert`` (the alert sent),
``role``, ``method`` and ``cipher``. Processes without a listener (operators' commands) write
their events to an `EventSpool` that the running service delivers.

The catalogue below is closed: `SecurityEvent` refuses an unknown kind, so a typo fails where
it is written, and the bridge's IODEF mapping is checked against this one list.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger(namespace="sixnet.events")

#: Every kind of event, by the service that emits it, with what it means.
CATALOGUE: Mapping[str, str] = MappingProxyType({
    # IRP registry
    "irp.login-failed": "a wrong password or enrollment code for a user id (one per attempt)",
    "irp.locked-out": "a user id and source network reached the lockout threshold",
    "irp.certificate-refused": "a revoked, expired or foreign client certificate was presented",
    "irp.certificate-issued": "the registry's CA issued a certificate",
    "irp.certificate-revoked": "a certificate was revoked",
    "irp.user-removed": "an operator removed a user",
    # SixChat agent
    "chat.mitm": "a peer's certificate is not the one the directory publishes for that person"
                 " (or a relay swapped a certificate in the handshake)",
    "chat.identity-mismatch": "a peer authenticated as another person than the one dialled"
                              " (or its certificate names no one, or several)",
    "chat.certificate-revoked": "a peer presented a revoked certificate",
    "chat.record-tampered": "a record failed authentication (AEAD tag)",
    "chat.record-replayed": "a record arrived twice or out of sequence",
    "chat.record-dropped": "a record is missing from the sequence",
    "chat.downgrade": "the offers or choices seen by the two sides differ",
    # XMPP-Grid controller
    "grid.platform-revoked": "a platform's authorization was revoked",
    "grid.rate-limited": "a platform exceeded a rate limit",
    "grid.login-failed": "a SASL login failed (wrong password or proof, refused certificate)",
    "grid.locked-out": "an account and source network reached the lockout threshold",
    "grid.hostile-input": "a stream was closed for hostile or malformed input",
})

@dataclass(frozen=True)
class SecurityEvent:
    """One detection. `kind` is a `CATALOGUE` key; its prefix names the service."""

    kind: str
    subject: str | None = None  # the person (IRP user id) or platform (bare JID)
    source: str | None = None  # the peer's IP address, as the service saw it
    detail: str = ""  # one line for a person: what was seen (no secrets, no message text)
    facts: Mapping[str, str] = field(default_factory=dict)
    time: float = field(default_factory=time.time)  # POSIX seconds, UTC

    def __post_init__(self) -> None:
        if self.kind not in CATALOGUE:
            raise ValueError(f"unknown security event kind {self.kind!r}")
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))

    @property
    def service(self) -> str:
        return self.kind.split(".", 1)[0]


class IEventSink(Interface):
    """Where a service sends what it detected."""

    def emit(event: SecurityEvent) -> None:
        """Deliver `event`; never raises, never blocks the caller on I/O."""


@implementer(IEventSink)
class EventBus:
    """The process's one sink: hands each event to every subscriber, in order.

    A subscriber that raises is logged and the others still get the event: detection code
    must never fail because of who listens.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[SecurityEvent], None]] = []

    def subscribe(self, subscriber: Callable[[SecurityEvent], None]) -> Callable[[], None]:
        """Add `subscriber`; the returned function removes it again."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, event: SecurityEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.failure("security event subscriber failed on {kind}", kind=event.kind)


@implementer(IEventSink)
class EventSpool:
    """Events of a process nobody listens to (an operator's command, such as ``sixnet irp
    user remove``), kept in a directory until the running service hands them to its bus.

    One JSON file per event, named so that they sort in the order written, written under a
    temporary name and renamed, so `deliver` never reads half an event. `deliver` removes a
    file before it emits the event, so two services draining one directory emit it once.
    """

    #: Events delivered per call at most (the rest wait for the next call).
    BATCH = 1000

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._numbers = itertools.count()

    def emit(self, event: SecurityEvent) -> None:
        record = event_record(event)
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._numbers):06d}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary = self.directory / f".{name}.tmp"
            temporary.write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
            os.replace(temporary, self.directory / f"{name}.json")
        except OSError as e:  # the command still did its work; the audit log has it
            log.error("cannot spool security event {kind} in {directory}: {error}",
                      kind=event.kind, directory=str(self.directory), error=e)

    def deliver(self, sink: IEventSink) -> int:
        """Emit the spooled events to `sink`, oldest first; how many were emitted."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.directory)
                           if entry.name.endswith(".json") and not entry.name.startswith("."))
        except FileNotFoundError:
            return 0  # nothing was ever spooled
        except OSError as e:
            log.warn("cannot read the event spool {directory}: {error}",
                     directory=str(self.directory), error=e)
            return 0
        delivered = 0
        for name in names[:self.BATCH]:
            path = self.directory / name
            try:
                text = path.read_text(encoding="utf-8")
                path.unlink()
            except FileNotFoundError:
                continue  # another service delivered it
            except OSError as e:
                log.warn("cannot take the spooled security event {name}: {error}",
                         name=name, error=e)
                continue
            try:
                event = event_from_record(json.loads(text))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                log.warn("dropped an unreadable spooled security event {name}: {error}",
                         name=name, error=e)
                continue
            sink.emit(event)
            delivered += 1
        return delivered


def event_record(event: SecurityEvent) -> dict[str, Any]:
    """`event` as JSON-ready data, for another process (`event_from_record` reads it)."""
    return {"kind": event.kind, "subject": event.subject, "source": event.source,
            "detail": event.detail, "facts": dict(event.facts), "time": event.time}


def event_from_record(record: Any) -> SecurityEvent:
    """The event of an `event_record`; ValueError, TypeError, KeyError or AttributeError
    when it is not one."""
    return SecurityEvent(
        str(record["kind"]), subject=_text_or_none(record.get("subject")),
        source=_text_or_none(record.get("source")), detail=str(record.get("detail", "")),
        facts={str(k): str(v) for k, v in dict(record.get("facts", {})).items()},
        time=float(record["time"]))


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)
