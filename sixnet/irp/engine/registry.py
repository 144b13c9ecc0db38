"""The registry itself: who may do what, and what each operation does. No sockets here.

The protocol hands a parsed `Request` and the `Caller` (what the connection proved: a
verified person, or nobody yet) to `Registry.handle`, which checks the access table, does
the work through the `IRegistryStore` and the lab CA, writes the audit log, and returns the
canonical payload the protocol puts in the signed ``<data>``. Failures are `IRPError`s.
Lookup answers are kept in memory until the person's record changes (`Registry._answer`).
Watches are kept here: `Registry.watch` registers a callback that gets the person's record
(canonical ``<person>``) whenever it changes, in this process or (on PostgreSQL) any other,
and when one of its addresses or certificates expires (one timer for the whole process).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import heapq
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from lxml import etree
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from sixnet.irp.config import IRPConfig
from sixnet.irp.storage import CertificateRow, IRegistryStore, PersonView, TooManyDevices
from sixnet.irp.wire import (
    Address,
    CertificateInfo,
    DeviceRecord,
    IRPError,
    PersonRecord,
    Request,
    b64,
    canonical_payload,
    certificate_element,
    chain_element,
    element,
    person_payload,
    timestamp,
)
from sixnet.pki.ca import CAError, LabCA
from sixnet.pki.keys import certificates_pem
from sixnet.pki.store import CertificateStore, VerificationError, VerifiedPeer

log = Logger(namespace="sixnet.irp")

#: Parsed certificate chains kept in memory (oldest dropped first).
CHAIN_CACHE = 20_000
#: A time after every expiry (ms): a record without addresses or expiring certificates.
NEVER = 2**62

ANONYMOUS, PERSON, OPERATOR = "anonymous", "person", "operator"
_ALL = frozenset({ANONYMOUS, PERSON, OPERATOR})
_ENROLLED = frozenset({PERSON, OPERATOR})

#: Which role may attempt which operation. Ownership and the lookup/watch policy are checked
#: by the operation itself (a person may only change their own record).
ACCESS: dict[str, frozenset[str]] = {
    "enroll": _ALL,
    "ca-certificates": _ALL,
    "backup-get": _ALL,  # anonymously only with the person's password
    "renew": _ENROLLED,
    "revoke": _ENROLLED,
    "register": _ENROLLED,
    "unregister": _ENROLLED,
    "lookup": _ENROLLED,
    "certificates": _ENROLLED,
    "watch": _ENROLLED,
    "unwatch": _ENROLLED,
    "backup-put": _ENROLLED,
    "list-users": frozenset({OPERATOR}),
    "remove": frozenset({OPERATOR}),
}

# scrypt: 16 MiB and ~50 ms a hash on this kind of machine; run off the reactor thread.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    """A salted scrypt hash, stored as ``scrypt$N$r$p$salt$hash`` (hex)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R,
                            p=_SCRYPT_P, dklen=32)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt),
                                  n=int(n), r=int(r), p=int(p), dklen=32, maxmem=64 << 20)
    except ValueError:
        return False
    return hmac.compare_digest(computed, bytes.fromhex(digest))


_DUMMY_HASH = hash_password(secrets.token_hex(8))


def new_invite_code() -> str:
    """A one-time enrollment code: 80 random bits as four groups of base32 letters."""
    raw = secrets.token_bytes(10)
    letters = base64.b32encode(raw).decode("ascii")
    return "-".join(letters[i:i + 4] for i in range(0, 16, 4))


def invite_hash(code: str) -> str:
    """Codes are stored hashed (they carry 80 random bits, so a fast hash is enough)."""
    normalized = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normalized.encode("ascii", "replace")).hexdigest()


class AuditLog:
    """Append-only JSON lines: every change and every refused attempt, one object a line."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, event: str, outcome: str, actor: str | None, **fields: Any) -> None:
        record = {"time": timestamp(datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)),
                  "event": event, "outcome": outcome, "actor": actor or "anonymous"}
        record.update({k: v for k, v in fields.items() if v is not None})
        # One write() of one line with O_APPEND: lines from several processes never interleave.
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Caller:
    """What a connection has proved: a verified person (and which certificate), or nothing."""

    peer: str
    identity: str | None = None
    serial: str | None = None
    operator: bool = False

    @property
    def role(self) -> str:
        if self.identity is None:
            return ANONYMOUS
        return OPERATOR if self.operator else PERSON


#: Gets the canonical ``<person>`` payload (`person_payload`) of a changed record.
Watcher = Callable[[bytes], object]


@dataclass(frozen=True, slots=True)
class Answer:
    """A person's record as a lookup returns it, kept in memory until it may change."""

    payload: bytes  # the canonical <person> element, as inside the signed <data>
    changes_at: int  # ms: the earliest address or certificate expiry in it (or NEVER)
    crls: int  # the certificate store's CRL generation it was computed with


class Registry:
    """The IRP operations over a store, a CA and the shared certificate store."""

    def __init__(self, store: IRegistryStore, certificates: CertificateStore,
                 config: IRPConfig, audit: AuditLog, ca: LabCA | None = None,
                 clock: Callable[[], float] = time.time, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.certificates = certificates
        self.config = config
        self.audit = audit
        self.ca = ca
        self.clock = clock
        self.reactor = reactor
        self.operators = {o.lower() for o in config.operators}
        self._watchers: dict[str, list[Watcher]] = {}
        self._chains: dict[str, tuple[tuple[x509.Certificate, ...], float]] = {}
        #: Lookup answers of persons, oldest first (dropped first beyond config.answer_cache).
        self._answers: dict[str, Answer] = {}
        #: A token per person whose record is being read: a change while the read runs
        #: removes it, so the read's (possibly older) answer is not kept.
        self._reading: dict[str, object] = {}
        #: The next expiry of each watched person's record (ms), a heap of the same (with
        #: outdated entries skipped when they come up) and the one timer for its head.
        self._expiry_at: dict[str, int] = {}
        self._expiries: list[tuple[int, str]] = []
        self._expiry_timer: Any = None
        self._last_registration = 0
        #: Called with a person (None: anyone) whose certificate may have been revoked, so
        #: connections authenticated by it can be checked again.
        self.revocation_listeners: list[Callable[[str | None], object]] = []
        store.on_change(self._changed)

    # -- authentication ---------------------------------------------------------------------

    async def authenticate(self, chain: list[x509.Certificate], peer: str) -> Caller:
        """Turn a TLS peer chain into a Caller; raise VerificationError if it is refused."""
        try:
            verified: VerifiedPeer = self.certificates.verify(chain, "client")
        except VerificationError as e:
            self.audit.write("authenticate", "refused", None, peer=peer, check=e.check,
                             detail=e.detail)
            raise
        serial = format(verified.certificate.serial_number, "X")
        row = await self.store.certificate(serial)
        if row is not None and row.revoked is not None:
            # Revoked through another registry process whose CRL this one has not read yet.
            self.audit.write("authenticate", "refused", verified.identity, peer=peer,
                             check="revoked", serial=serial)
            raise VerificationError("revoked", f"certificate {serial} was revoked")
        if row is None:
            # A certificate from the CA but not through this registry: the registry learns it,
            # so lookups return it (the person's first authenticated use uploads it).
            leaf = verified.certificate
            path = [c for c in verified.chain if c not in self.certificates.anchors]
            await self.store.add_certificate(CertificateRow(
                serial, verified.identity, self.now_ms(),
                int(leaf.not_valid_after_utc.timestamp() * 1000), certificates_pem(path), None))
            self._forget(verified.identity)
        return Caller(peer, verified.identity, serial, verified.identity in self.operators)

    # -- dispatch -------------------------------------------------------------------------------

    async def handle(self, caller: Caller, request: Request) -> bytes:
        """Run one request; return the canonical payload for ``<data>`` or raise IRPError."""
        allowed = ACCESS[request.op]
        if caller.role not in allowed:
            if caller.role == ANONYMOUS:
                error = IRPError("not-authorized", f"{request.op} needs a verified client "
                                                   "certificate")
            else:
                error = IRPError("forbidden", f"{request.op} is for operators only")
            self._refused(caller, request, error)
            raise error
        method = getattr(self, "op_" + request.op.replace("-", "_"))
        try:
            payload = await method(caller, **request.args)
        except IRPError as error:
            if error.condition in ("not-authorized", "forbidden", "locked"):
                self._refused(caller, request, error)
            raise
        return payload if isinstance(payload, bytes) else canonical_payload(payload)

    def _refused(self, caller: Caller, request: Request, error: IRPError) -> None:
        target = request.args.get("user") or request.args.get("serial")
        self.audit.write(request.op, "refused", caller.identity, peer=caller.peer,
                         target=target, condition=error.condition, detail=error.text)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _delay(self) -> None:
        """Slow down a failed credential so guessing is expensive."""
        await task.deferLater(self.reactor, self.config.failure_delay, lambda: None)

    # -- credentials ------------------------------------------------------------------------------

    async def _check_password(self, caller: Caller, user: str, password: str) -> None:
        account = await self.store.get_account(user)
        now = self.now_ms()
        if account is not None and account.locked_until > now:
            await self._delay()
            raise IRPError("locked", f"the account of {user} is locked after repeated "
                                     "failures; try again later")
        stored = account.password_hash if account is not None else _DUMMY_HASH
        ok = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), check_password, password, stored)
        if ok and account is not None:
            if account.failures:
                await self.store.clear_failures(user)
            return
        updated = await self.store.record_failure(user, now, self.config.lockout_after,
                                                  self.config.lockout_seconds * 1000)
        self.audit.write("password", "refused", caller.identity, peer=caller.peer, target=user,
                         failures=updated.failures if updated else None)
        await self._delay()
        if updated is not None and updated.locked_until > now:
            raise IRPError("locked", f"the account of {user} is locked after "
                                     f"{updated.failures} failures")
        raise IRPError("not-authorized", "wrong user id or password")

    # -- enrollment and certificates ---------------------------------------------------------------

    def _require_ca(self) -> LabCA:
        if self.ca is None:
            raise IRPError("feature-not-implemented", "this registry has no CA to issue "
                                                      "certificates ([pki] lab_ca)")
        return self.ca

    async def _issue(self, caller: Caller, user: str, csr: x509.CertificateSigningRequest,
                     event: str) -> list[etree._Element]:
        ca = self._require_ca()
        public = csr.public_key()
        chain = await threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(),
            lambda: ca.sign_user(user, public, days=self.config.certificate_days))
        leaf = chain[0]
        serial = format(leaf.serial_number, "X")
        await self.store.add_certificate(CertificateRow(
            serial, user, self.now_ms(), int(leaf.not_valid_after_utc.timestamp() * 1000),
            certificates_pem(chain), None))
        self._forget(user)
        self.audit.write(event, "ok", caller.identity or user, peer=caller.peer, target=user,
                         serial=serial)
        return [certificate_element(c) for c in chain]

    async def op_enroll(self, caller: Caller, user: str, csr: x509.CertificateSigningRequest,
                        password: str | None, code: str | None) -> list[etree._Element]:
        self._require_ca()
        _check_key(csr.public_key())
        if password is not None:
            await self._check_password(caller, user, password)
        else:
            assert code is not None
            if not await self.store.consume_invite(invite_hash(code), user, self.now_ms()):
                await self._delay()  # audited by handle() with the other refusals
                raise IRPError("not-authorized", "the enrollment code is wrong, expired or "
                                                 "used already")
        return await self._issue(caller, user, csr, "enroll")

    async def op_renew(self, caller: Caller,
                       csr: x509.CertificateSigningRequest) -> list[etree._Element]:
        self._require_ca()
        _check_key(csr.public_key())
        assert caller.identity is not None
        return await self._issue(caller, caller.identity, csr, "renew")

    async def op_ca_certificates(self, caller: Caller) -> list[etree._Element]:
        certs = list(self.certificates.anchors)
        if self.ca is not None:
            certs = [c for c in self.ca.chain if c not in certs] + certs
        return [certificate_element(c) for c in certs]

    async def op_revoke(self, caller: Caller, serial: str | None) -> list[etree._Element]:
        serial = serial or caller.serial
        assert serial is not None
        row = await self.store.certificate(serial)
        if row is None:
            raise IRPError("item-not-found", f"the registry issued no certificate {serial}")
        if row.person != caller.identity and not caller.operator:
            raise IRPError("forbidden", f"certificate {serial} belongs to someone else")
        if row.revoked is not None:
            raise IRPError("conflict", f"certificate {serial} is revoked already")
        await self._revoke_row(row)
        self.audit.write("revoke", "ok", caller.identity, peer=caller.peer, target=row.person,
                         serial=serial)
        return [element("revoked", {"serial": serial, "user": row.person})]

    async def _revoke_row(self, row: CertificateRow) -> None:
        if self.ca is not None:
            ca = self.ca
            try:
                await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                ca.revoke, int(row.serial, 16), "IRP revoke")
            except CAError as e:  # issued by an earlier CA: the registry's record still counts
                log.warn("revoking {serial} in the CA: {error}", serial=row.serial, error=e)
        await self.store.mark_revoked(row.serial, self.now_ms())
        self._forget(row.person)
        self.certificates.reload_crls()

    async def op_certificates(self, caller: Caller, user: str | None,
                              serial: str | None) -> list[etree._Element]:
        if serial is not None:
            row = await self.store.certificate(serial)
            if row is None:
                raise IRPError("item-not-found", f"the registry issued no certificate {serial}")
            self._may_see(caller, row.person, self.config.lookup_access, "certificates")
            return [element("person", {"id": row.person},
                            children=[chain_element(self._status(row))])]
        assert user is not None
        self._may_see(caller, user, self.config.lookup_access, "certificates")
        view = await self.store.person_view(user, self.now_ms())
        if not view.exists:
            raise IRPError("item-not-found", f"{user} is not registered")
        return [element("person", {"id": user},
                        children=[chain_element(self._status(r)) for r in view.certificates])]

    def _status(self, row: CertificateRow) -> CertificateInfo:
        """A certificate's status now: revoked (by the registry or a CRL), expired or valid.

        A chain is verified against the trust anchors when it enters the registry (issued
        by its CA, or presented and verified at authentication); afterwards only time and
        revocation can change its status, and those are checked here on every call.
        """
        chain, not_after = self._chain(row)
        if row.revoked is not None:
            return CertificateInfo(row.serial, "revoked", chain,
                                   datetime.datetime.fromtimestamp(row.revoked / 1000,
                                                                   datetime.UTC))
        if self.clock() >= not_after:
            return CertificateInfo(row.serial, "expired", chain)
        for cert in chain:
            entry = self.certificates.revocation_status(cert)
            if entry is not None:
                return CertificateInfo(row.serial, "revoked", chain,
                                       entry.revocation_date_utc)
        return CertificateInfo(row.serial, "valid", chain)

    def _chain(self, row: CertificateRow) -> tuple[tuple[x509.Certificate, ...], float]:
        """The parsed chain and the earliest notAfter in it (seconds), cached by serial."""
        cached = self._chains.get(row.serial)
        if cached is None:
            chain = tuple(x509.load_pem_x509_certificates(row.chain_pem))
            cached = (chain, min(c.not_valid_after_utc.timestamp() for c in chain))
            if len(self._chains) >= CHAIN_CACHE:
                self._chains.pop(next(iter(self._chains)))
            self._chains[row.serial] = cached
        return cached

    # -- records ---------------------------------------------------------------------------------

    def _own(self, caller: Caller, user: str | None, op: str) -> str:
        assert caller.identity is not None
        if user is not None and user != caller.identity:
            raise IRPError("forbidden", f"{caller.identity} may not change the record of {user}")
        return caller.identity

    async def op_register(self, caller: Caller, user: str | None, device: str, lifetime: int,
                          addresses: tuple[Address, ...]) -> bytes:
        person = self._own(caller, user, "register")
        # Strictly increasing, so "most recently registered first" holds within a millisecond.
        now = self._last_registration = max(self.now_ms(), self._last_registration + 1)
        try:
            view = await self.store.register(
                person, device, tuple((a.ip, a.port) for a in addresses), now,
                now + lifetime * 1000, self.config.max_devices)
        except TooManyDevices:
            raise IRPError("policy-violation", f"at most {self.config.max_devices} devices "
                                               "per person; unregister one first") from None
        self._forget(person)
        self.audit.write("register", "ok", person, peer=caller.peer, device=device,
                         addresses=[f"[{a.ip}]:{a.port}" for a in addresses], lifetime=lifetime)
        return person_payload(self._record(view))

    async def op_unregister(self, caller: Caller, user: str | None,
                            device: str | None) -> bytes:
        person = self._own(caller, user, "unregister")
        count = await self.store.unregister(person, device)
        self._forget(person)
        self.audit.write("unregister", "ok", person, peer=caller.peer, device=device,
                         removed=count)
        return (await self._answer(person))[1]

    def _may_see(self, caller: Caller, target: str, policy: str, op: str) -> None:
        if caller.operator or caller.identity == target:
            return
        if policy == "enrolled" and caller.identity is not None:
            return
        if policy == "same-domain" and caller.identity is not None and \
                caller.identity.rsplit("@", 1)[1] == target.rsplit("@", 1)[1]:
            return
        raise IRPError("forbidden", f"the registry's policy does not let {caller.identity} "
                                    f"{op} {target}")

    def _record(self, view: PersonView) -> PersonRecord:
        devices = tuple(
            DeviceRecord(d.device, tuple(Address(ip, port) for ip, port in d.addresses),
                         _time(d.registered), _time(d.expires)) for d in view.devices)
        infos = [self._status(r) for r in view.certificates]
        current = next((i for i in infos if i.status == "valid"), infos[0] if infos else None)
        return PersonRecord(view.person, devices, current, removed=not view.exists)

    async def op_lookup(self, caller: Caller, user: str) -> bytes:
        self._may_see(caller, user, self.config.lookup_access, "look up")
        exists, payload, _ = await self._answer(user)
        if not exists:
            raise IRPError("item-not-found", f"{user} is not registered")
        return payload

    # -- the answer cache -------------------------------------------------------------------------

    async def _answer(self, person: str) -> tuple[bool, bytes, int]:
        """Whether the person exists, their record's canonical payload and when it next
        changes by itself (an expiry, ms), from memory while that is still exact.

        A kept answer is dropped when the person's record changes (this process's writes
        and every change notification, from any process), on a notification gap, when the
        CRLs are read again (a certificate's status may change), and is not used from its
        first expiry on (an answer never contains an expired address or shows an expired
        certificate as valid). Unknown persons are not kept: creating an account or an
        invitation makes a person without a notification.
        """
        now = self.now_ms()
        kept = self._answers.get(person)
        if kept is not None and now < kept.changes_at and \
                kept.crls == self.certificates.generation:
            return True, kept.payload, kept.changes_at
        crls = self.certificates.generation
        token = self._reading[person] = object()
        try:
            view = await self.store.person_view(person, now)
        finally:
            mine = self._reading.get(person) is token
            if mine:
                del self._reading[person]
        record = self._record(view)
        payload = person_payload(record)
        # Devices read are unexpired; certificates that expired already stay expired.
        changes_at = min([d.expires for d in view.devices] +
                         [t for r in view.certificates if r.revoked is None
                          and (t := int(self._chain(r)[1] * 1000)) > now], default=NEVER)
        if mine and view.exists and self.config.answer_cache > 0:
            self._answers.pop(person, None)
            if len(self._answers) >= self.config.answer_cache:
                self._answers.pop(next(iter(self._answers)))
            self._answers[person] = Answer(payload, changes_at, crls)
        return view.exists, payload, changes_at

    def _forget(self, person: str | None) -> None:
        """The record of `person` (None: of anyone) changed or may have changed."""
        if person is None:
            self._answers.clear()
            self._reading.clear()
        else:
            self._answers.pop(person, None)
            self._reading.pop(person, None)

    # -- watches ----------------------------------------------------------------------------------

    async def op_watch(self, caller: Caller, user: str) -> bytes:
        """Check the policy and return the current record; the session then calls watch()."""
        self._may_see(caller, user, self.config.watch_access, "watch")
        exists, payload, changes_at = await self._answer(user)
        if not exists:
            raise IRPError("item-not-found", f"{user} is not registered")
        self._expire_at(user, changes_at)
        return payload

    async def op_unwatch(self, caller: Caller, user: str) -> list[etree._Element]:
        return [element("unwatched", {"user": user})]

    def watch(self, person: str, watcher: Watcher) -> None:
        self._watchers.setdefault(person, []).append(watcher)

    def unwatch(self, person: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(person, [])
        if watcher in watchers:
            watchers.remove(watcher)
        if not watchers:
            self._watchers.pop(person, None)
            self._expiry_at.pop(person, None)

    def _changed(self, person: str | None, kind: str) -> None:
        self._forget(person)
        if kind in ("revoked", "gap"):
            self.certificates.reload_crls()  # another process may have revoked it
            for listener in list(self.revocation_listeners):
                listener(person)
        for watched in [person] if person is not None else list(self._watchers):
            if watched in self._watchers:
                d = defer.Deferred.fromCoroutine(self._notify(watched))
                d.addErrback(lambda f, p=watched: log.failure(
                    "notifying watchers of {person}", f, person=p))

    async def _notify(self, person: str) -> None:
        _, payload, changes_at = await self._answer(person)
        if person in self._watchers:
            self._expire_at(person, changes_at)
        for watcher in list(self._watchers.get(person, ())):
            watcher(payload)

    # -- expiry of watched records ------------------------------------------------------------

    def _expire_at(self, person: str, at: int) -> None:
        """Notify the watchers of `person` at `at` (ms), when their record next changes by
        itself (an address or a certificate expires). One timer serves every person."""
        if at >= NEVER:
            self._expiry_at.pop(person, None)
            return
        if self._expiry_at.get(person) == at:
            return
        self._expiry_at[person] = at
        heapq.heappush(self._expiries, (at, person))
        if len(self._expiries) > 2 * len(self._expiry_at) + 64:  # outdated entries
            self._expiries = [(t, p) for p, t in self._expiry_at.items()]
            heapq.heapify(self._expiries)
        self._arm_expiry_timer()

    def _arm_expiry_timer(self) -> None:
        if not self._expiries:
            return
        delay = max(0.0, (self._expiries[0][0] - self.now_ms()) / 1000) + 0.001
        timer = self._expiry_timer
        if timer is not None and timer.active():
            if timer.getTime() <= self.reactor.seconds() + delay:
                return
            timer.cancel()
        self._expiry_timer = self.reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        now = self.now_ms()
        while self._expiries and self._expiries[0][0] <= now:
            at, person = heapq.heappop(self._expiries)
            if self._expiry_at.get(person) != at:
                continue  # outdated: the record changed since, or nobody watches it
            del self._expiry_at[person]
            if person not in self._watchers:
                continue
            d = defer.Deferred.fromCoroutine(self._notify(person))
            d.addErrback(lambda f, p=person: log.failure(
                "notifying watchers of {person} after an expiry", f, person=p))
        self._arm_expiry_timer()

    def stop(self) -> None:
        """Cancel the expiry timer (the service is stopping)."""
        if self._expiry_timer is not None and self._expiry_timer.active():
            self._expiry_timer.cancel()

    # -- backups ----------------------------------------------------------------------------------

    async def op_backup_put(self, caller: Caller, user: str | None,
                            data: bytes) -> list[etree._Element]:
        person = self._own(caller, user, "backup-put")
        await self.store.put_backup(person, data, self.now_ms())
        self.audit.write("backup-put", "ok", person, peer=caller.peer, size=len(data))
        return [element("stored", {"user": person, "size": str(len(data))})]

    async def op_backup_get(self, caller: Caller, user: str | None,
                            password: str | None) -> list[etree._Element]:
        if password is not None:
            assert user is not None
            await self._check_password(caller, user, password)
            person = user
        elif caller.identity is None:
            raise IRPError("not-authorized", "backup-get needs a client certificate or the "
                                             "person's password")
        else:
            person = self._own(caller, user, "backup-get")
        data = await self.store.get_backup(person)
        if data is None:
            raise IRPError("item-not-found", f"{person} has no backup")
        self.audit.write("backup-get", "ok", caller.identity or person, peer=caller.peer,
                         target=person)
        return [element("backup", {"user": person}, b64(data))]

    # -- administration ----------------------------------------------------------------------------

    async def op_list_users(self, caller: Caller, after: str | None,
                            limit: int) -> list[etree._Element]:
        rows = await self.store.list_persons(after, limit + 1)
        page, more = rows[:limit], len(rows) > limit
        out = [element("user", {"id": r.person, "created": timestamp(_time(r.created)),
                                "certificates": str(r.certificates),
                                "password": "true" if r.has_password else "false"})
               for r in page]
        if more:
            out.append(element("more", {"after": page[-1].person}))
        return out

    async def op_remove(self, caller: Caller, user: str) -> list[etree._Element]:
        view = await self.store.person_view(user, self.now_ms())
        if not view.exists:
            raise IRPError("item-not-found", f"{user} is not registered")
        for row in view.certificates:
            if row.revoked is None:
                await self._revoke_row(row)
        await self.store.remove_person(user)
        self._forget(user)
        self.audit.write("remove", "ok", caller.identity, peer=caller.peer, target=user)
        return [element("removed", {"user": user})]


def _time(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def _check_key(public: object) -> None:
    """The key rules of `LabCA.sign_user`, checked before a one-time code is spent."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise IRPError("bad-request", "RSA keys must be at least 2048 bits")
    elif not isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise IRPError("bad-request", "only RSA, ECDSA and Ed25519 keys can be certified")
