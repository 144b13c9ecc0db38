"""Lookup answers kept in memory, and the status of the certificates they show.

An answer is a person's record as a lookup returns it: the canonical ``<person>`` element
as it stands inside the signed ``<data>`` (`person_payload`). A kept answer is dropped when
the person's record changes (this process's writes and every change notification, from any
process), on a notification gap, when the CRLs are read again (a certificate's status may
change), and is not used from its first expiry on (an answer never contains an expired
address or shows an expired certificate as valid). Unknown persons are not kept: creating
an account or an invitation makes a person without a notification.

A person's signed record is also kept in the database (`IRegistryStore.keep_record`): a
read finds it instead of the rows while it is good (same version, same CRLs, before its
re-signing time), so every worker, and the registry after a restart, answers from the
signature made once. On SQLite that read runs at once on the reactor thread
(`IRegistryStore.stored_view`: one row by key, in WAL mode no wait for the writer), not
behind the writes queued for the database's thread.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from sixnet.irp.storage import CertificateRow, IRegistryStore, PersonView
from sixnet.irp.wire import (
    Address,
    CertificateInfo,
    DeviceRecord,
    PersonRecord,
    person_payload,
    record_payload,
)
from sixnet.pki.store import CertificateStore

#: Parsed certificate chains kept in memory (oldest dropped first).
CHAIN_CACHE = 20_000
#: A time after every expiry (ms): a record without addresses or expiring certificates.
NEVER = 2**62


@dataclass(frozen=True, slots=True)
class Answer:
    """A person's record as a lookup returns it."""

    exists: bool
    payload: bytes  # the canonical <person> element, as inside the signed <data>
    changes_at: int  # ms: the earliest address or certificate expiry in it (or NEVER)
    crls: int  # the certificate store's CRL generation it was computed with
    stamp: int = 0  # the workers' change counters it was read under (`IChangeBoard`)
    version: int = 0  # the record's version (`PersonView.version`)
    person: str = ""
    revocations: str = ""  # the CRLs it was computed under (`CertificateStore.revocations`)
    #: The record as signed before (read from the database), and when to sign it again.
    statement: bytes | None = None
    resign_at: int = 0


class CertificateStatus:
    """A certificate's status now: revoked (by the registry or a CRL), expired or valid.

    A chain is verified against the trust anchors when it enters the registry (issued by
    its CA, or presented and verified at authentication); afterwards only time and
    revocation can change its status, and those are checked on every call. Parsed chains
    are kept by serial.
    """

    def __init__(self, certificates: CertificateStore, now_ms: Callable[[], int]) -> None:
        self.certificates = certificates
        self.now_ms = now_ms
        self._chains: dict[str, tuple[tuple[x509.Certificate, ...], int]] = {}

    def status(self, row: CertificateRow) -> CertificateInfo:
        chain, not_after = self.chain(row)
        if row.revoked is not None:
            return CertificateInfo(row.serial, "revoked", chain, _time(row.revoked))
        if self.now_ms() >= not_after:
            return CertificateInfo(row.serial, "expired", chain)
        for cert in chain:
            entry = self.certificates.revocation_status(cert)
            if entry is not None:
                return CertificateInfo(row.serial, "revoked", chain,
                                       entry.revocation_date_utc)
        return CertificateInfo(row.serial, "valid", chain)

    def chain(self, row: CertificateRow) -> tuple[tuple[x509.Certificate, ...], int]:
        """The parsed chain and the earliest notAfter in it (ms)."""
        cached = self._chains.get(row.serial)
        if cached is None:
            chain = tuple(x509.load_pem_x509_certificates(row.chain_pem))
            cached = (chain, int(min(c.not_valid_after_utc.timestamp() for c in chain) * 1000))
            if len(self._chains) >= CHAIN_CACHE:
                self._chains.pop(next(iter(self._chains)))
            self._chains[row.serial] = cached
        return cached


class IChangeBoard(Protocol):
    """Change counters shared by the registry's workers (`sixnet.irp.workers.VersionBoard`)."""

    def stamp(self, person: str) -> int: ...

    def bump(self, person: str | None) -> None: ...


class AnswerCache:
    """The answers of up to `size` persons (oldest dropped first; 0 keeps none).

    With a `board` (workers), a kept answer is used only while the counters of its person
    are those it was read under: a change committed through another worker is seen at once,
    before its notification arrives.
    """

    def __init__(self, store: IRegistryStore, statuses: CertificateStatus, size: int,
                 now_ms: Callable[[], int], board: IChangeBoard | None = None) -> None:
        self.store = store
        self.board = board
        self.statuses = statuses
        self.size = size
        self.now_ms = now_ms
        self._answers: dict[str, Answer] = {}
        #: A token per person whose record is being read: a change while the read runs
        #: removes it, so the read's (possibly older) answer is not kept.
        self._reading: dict[str, object] = {}

    def kept(self, person: str) -> Answer | None:
        """The person's kept answer if it is still exact, without waiting (None: read it)."""
        kept = self._answers.get(person)
        if kept is not None and self.now_ms() < kept.changes_at \
                and kept.crls == self.statuses.certificates.generation \
                and kept.stamp == (self.board.stamp(person) if self.board is not None else 0):
            return kept
        return None

    def at_once(self, person: str) -> Answer | None:
        """The person's answer without waiting: kept in memory, or their stored signed
        record read at once (`IRegistryStore.stored_view`); None: `answer` reads it."""
        kept = self.kept(person)
        if kept is not None:
            return kept
        basis = self._basis(person)
        view = self.store.stored_view(person, basis[0], basis[3])
        return None if view is None else self._made(view, basis, True)

    async def answer(self, person: str) -> Answer:
        """The person's answer, from memory while that is still exact; else read (a good
        stored signed record included) through the store's batched reads, where a lookup
        comes after `at_once` found nothing."""
        kept = self.kept(person)
        if kept is not None:
            return kept
        basis = self._basis(person)
        token = self._reading[person] = object()
        try:
            view = await self.store.person_view(person, basis[0], basis[3])
        finally:
            mine = self._reading.get(person) is token
            if mine:
                del self._reading[person]
        return self._made(view, basis, mine)

    def _basis(self, person: str) -> tuple[int, int, int, str]:
        """What a read of `person` is made under, taken before it: the time, the CRL
        generation, the workers' change counters and the CRLs' digest."""
        return (self.now_ms(), self.statuses.certificates.generation,
                self.board.stamp(person) if self.board is not None else 0,
                self.statuses.certificates.revocations)

    def _made(self, view: PersonView, basis: tuple[int, int, int, str], keep: bool) -> Answer:
        """The answer of a read `view`; kept if `keep` (no change came while it ran)."""
        now, crls, stamp, revocations = basis
        person, stored = view.person, view.record
        if stored is not None:
            answer = Answer(True, record_payload(stored.statement), stored.changes_at, crls,
                            stamp, view.version, person, revocations, stored.statement,
                            stored.resign_at)
        else:
            # Devices read are unexpired; certificates that expired already stay expired.
            changes_at = min([d.expires for d in view.devices] +
                             [t for r in view.certificates if r.revoked is None
                              and (t := self.statuses.chain(r)[1]) > now], default=NEVER)
            answer = Answer(view.exists, person_payload(self.record(view)), changes_at, crls,
                            stamp, view.version, person, revocations)
        if keep and view.exists and self.size > 0:
            self._answers.pop(person, None)
            if len(self._answers) >= self.size:
                self._answers.pop(next(iter(self._answers)))
            self._answers[person] = answer
        return answer

    def record(self, view: PersonView) -> PersonRecord:
        """What a lookup says about the person of `view`, certificates with their status."""
        devices = tuple(
            DeviceRecord(d.device, tuple(Address(ip, port) for ip, port in d.addresses),
                         _time(d.registered), _time(d.expires)) for d in view.devices)
        infos = [self.statuses.status(r) for r in view.certificates]
        current = next((i for i in infos if i.status == "valid"), infos[0] if infos else None)
        return PersonRecord(view.person, devices, current, removed=not view.exists)

    def forget(self, person: str | None, *, here: bool = False) -> None:
        """The record of `person` (None: of anyone) changed or may have changed; `here`:
        by a write of this process, which has committed (the other workers are told)."""
        if here and self.board is not None:
            self.board.bump(person)
        if person is None:
            self._answers.clear()
            self._reading.clear()
        else:
            self._answers.pop(person, None)
            self._reading.pop(person, None)


def _time(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
