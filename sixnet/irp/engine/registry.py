"""The registry's operations. No sockets here.

The protocol hands a parsed `Request` and the `Caller` (what the connection proved: a
verified person, or nobody yet) to `Registry.handle`, which checks the access table, runs
the request's operation (chosen by the request's type) through the `IRegistryStore` and the
lab CA, writes the audit log, and returns the canonical payload the protocol puts in the
signed ``<data>``. Failures are `IRPError`s. Lookup answers come from the `AnswerCache`;
`Registry.watch` hands watchers to `Watches`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from lxml import etree
from twisted.internet import task, threads
from twisted.logger import Logger

from sixnet.core.audit import AuditLog
from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.lockout import source_of
from sixnet.core.metrics import Registry as MetricsRegistry
from sixnet.core.timefmt import rfc3339
from sixnet.irp.config import IRPConfig
from sixnet.irp.engine.access import ANONYMOUS, Caller, may_see, own, refusal
from sixnet.irp.engine.answers import Answer, AnswerCache, CertificateStatus, IChangeBoard
from sixnet.irp.engine.credentials import (
    DUMMY_HASH,
    PasswordLockout,
    check_password,
    invite_hash,
)
from sixnet.irp.engine.watches import Watcher, Watches
from sixnet.irp.metrics import IRPCounters
from sixnet.irp.storage import CertificateRow, IRegistryStore, StoredRecord, TooManyDevices
from sixnet.irp.wire import (
    BackupGetRequest,
    BackupPutRequest,
    CACertificatesRequest,
    CertificatesRequest,
    EnrollRequest,
    IRPError,
    ListUsersRequest,
    LookupRequest,
    RegisterRequest,
    RemoveRequest,
    RenewRequest,
    Request,
    RevokeRequest,
    UnregisterRequest,
    UnwatchRequest,
    WatchRequest,
    b64,
    canonical_payload,
    certificate_element,
    chain_element,
    element,
    person_payload,
)
from sixnet.pki.ca import CAError, LabCA, serial_hex
from sixnet.pki.keys import certificates_pem
from sixnet.pki.store import (
    CertificateStore,
    VerificationError,
    VerifiedPeer,
    certificate_facts,
)

log = Logger(namespace="sixnet.irp")

#: What an operation returns: canonical payload bytes, the payload's elements, or (lookup,
#: watch) a person's `Answer`, which a 1.2 caller gets as the record's signed statement.
Payload = bytes | list[etree._Element] | Answer


class Registry:
    """The IRP operations over a store, a CA and the shared certificate store."""

    def __init__(self, store: IRegistryStore, certificates: CertificateStore,
                 config: IRPConfig, audit: AuditLog, ca: LabCA | None = None,
                 clock: Callable[[], float] = time.time, reactor: Any = None,
                 counters: IRPCounters | None = None, *,
                 events: IEventSink | None = None, board: IChangeBoard | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.store = store
        self.certificates = certificates
        self.config = config
        self.audit = audit
        #: Where what the registry detects goes (`_event`); a private bus by default.
        self.events = events if events is not None else EventBus()
        self.ca = ca
        self.counters = counters if counters is not None else IRPCounters(MetricsRegistry())
        self.clock = clock
        self.reactor = reactor
        self.operators = {o.lower() for o in config.operators}
        self.lockout = PasswordLockout(config.lockout_after, config.lockout_seconds,
                                       config.failure_delay)
        self.statuses = CertificateStatus(certificates, self.now_ms)
        self.answers = AnswerCache(store, self.statuses, config.answer_cache, self.now_ms,
                                   board)
        self.watches = Watches(self.answers, self.now_ms, reactor)
        self._last_registration = 0
        #: Called with a person (None: anyone) whose certificate may have been revoked, so
        #: connections authenticated by it can be checked again.
        self.revocation_listeners: list[Callable[[str | None], object]] = []
        #: The verb map: the operation each type of request runs.
        self.operations: dict[type[Request], Callable[[Caller, Any], Awaitable[Payload]]] = {
            EnrollRequest: self.op_enroll,
            CACertificatesRequest: self.op_ca_certificates,
            RenewRequest: self.op_renew,
            RevokeRequest: self.op_revoke,
            RegisterRequest: self.op_register,
            UnregisterRequest: self.op_unregister,
            LookupRequest: self.op_lookup,
            CertificatesRequest: self.op_certificates,
            WatchRequest: self.op_watch,
            UnwatchRequest: self.op_unwatch,
            BackupPutRequest: self.op_backup_put,
            BackupGetRequest: self.op_backup_get,
            ListUsersRequest: self.op_list_users,
            RemoveRequest: self.op_remove,
        }
        store.on_change(self._changed)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _event(self, kind: str, caller: Caller, subject: str | None, detail: str,
               **facts: str) -> None:
        self.events.emit(SecurityEvent(kind, subject=subject, source=caller.peer,
                                       detail=detail, facts=facts, time=self.clock()))

    # -- authentication ---------------------------------------------------------------------

    async def authenticate(self, chain: list[x509.Certificate], peer: str) -> Caller:
        """Turn a TLS peer chain into a Caller; raise VerificationError if it is refused."""
        try:
            verified: VerifiedPeer = self.certificates.verify(chain, "client")
        except VerificationError as e:
            self.counters.certificate_refused.inc()
            self.audit.record("authenticate", outcome="refused", actor=ANONYMOUS, peer=peer,
                              check=e.check, detail=e.detail)
            if chain:
                facts = certificate_facts(chain[0])
                self._event("irp.certificate-refused", Caller(peer), _named(facts),
                            f"client certificate refused: {e.detail}"[:200], check=e.check,
                            **facts)
            raise
        serial = format(verified.certificate.serial_number, "X")
        row = await self.store.certificate(serial)
        if row is not None and row.revoked is not None:
            # Revoked through another registry process whose CRL this one has not read yet.
            self.counters.certificate_refused.inc()
            self.audit.record("authenticate", outcome="refused", actor=verified.identity,
                              peer=peer, check="revoked", serial=serial)
            self._event("irp.certificate-refused", Caller(peer), verified.identity,
                        f"client certificate {serial} of {verified.identity} was revoked",
                        check="revoked", **certificate_facts(verified.certificate))
            raise VerificationError("revoked", f"certificate {serial} was revoked")
        if row is None:
            # A certificate from the CA but not through this registry: the registry learns it,
            # so lookups return it (the person's first authenticated use uploads it).
            leaf = verified.certificate
            path = [c for c in verified.chain if c not in self.certificates.anchors]
            await self.store.add_certificate(CertificateRow(
                serial, verified.identity, self.now_ms(),
                int(leaf.not_valid_after_utc.timestamp() * 1000), certificates_pem(path), None))
            self.answers.forget(verified.identity, here=True)
        return Caller(peer, verified.identity, serial, verified.identity in self.operators)

    # -- dispatch -------------------------------------------------------------------------------

    async def handle(self, caller: Caller, request: Request) -> bytes | Answer:
        """Run one request; return the canonical payload for ``<data>`` (or the person's
        `Answer`, for a lookup or a watch) or raise IRPError."""
        error = refusal(caller.role, request.op)
        if error is not None:
            self.counters.error[request.op].inc()
            self._refused(caller, request, error)
            raise error
        try:
            payload = await self.operations[type(request)](caller, request)
        except IRPError as error:
            self.counters.error[request.op].inc()
            if error.condition in ("not-authorized", "forbidden", "locked"):
                self._refused(caller, request, error)
            raise
        self.counters.ok[request.op].inc()
        return payload if isinstance(payload, bytes | Answer) else canonical_payload(payload)

    def keep_record(self, answer: Answer, record: StoredRecord) -> None:
        """Store a person's newly signed record for the other workers and restarts; the
        answer has left already, so a failure is only logged."""
        if not answer.revocations:
            return
        d = self.store.keep_record(answer.person, answer.version, answer.revocations, record)
        d.addErrback(lambda failure: log.failure("storing the signed record of {person}",
                                                 failure, person=answer.person))

    def kept_lookup(self, caller: Caller, request: LookupRequest) -> Answer | None:
        """A lookup answered at once (from memory, or a stored signed record read without
        waiting), when the caller may make it and such an answer is exact; None: run it
        through `handle` (which also reports refusals)."""
        if refusal(caller.role, request.op) is not None:
            return None
        try:
            may_see(caller, request.user, self.config.lookup_access, "look up")
        except IRPError:
            return None
        answer = self.answers.at_once(request.user)
        if answer is not None:
            self.counters.ok[request.op].inc()
        return answer

    def _refused(self, caller: Caller, request: Request, error: IRPError) -> None:
        self.audit.record(request.op, outcome="refused", actor=caller.actor, peer=caller.peer,
                          target=request.target, condition=error.condition, detail=error.text)

    # -- credentials ------------------------------------------------------------------------------

    async def _delay(self) -> None:
        """Slow down a refused credential so guessing is expensive."""
        await task.deferLater(self.reactor, self.lockout.delay, lambda: None)

    async def _check_password(self, caller: Caller, user: str, password: str, op: str) -> None:
        """Check `user`'s password, counting failures per user id and source network: the
        same reads, hash, writes and answers whether or not `user` has an account."""
        source = source_of(caller.peer)
        account = await self.store.get_account(user)
        # An attempt that would lock waits for this registry's attempts still being checked
        # (a right one clears the count), at most stall_timeout: the registry's deadline for
        # a step it waits for, as the grid waits at most its unauthenticated_timeout.
        failures, settle = await self.lockout.attempts.reserve(
            user, source, lambda lock: self.store.reserve_attempt(
                user, source, self.lockout, self.now_ms(), lock),
            self.reactor, self.config.stall_timeout)
        if settle is None:
            await self._delay()
            raise IRPError("locked", f"logins to {user} from this network are locked after "
                                     "repeated failures; try again later")
        now = self.now_ms()
        stored = account.password_hash if account is not None else DUMMY_HASH
        try:
            ok = await threads.deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), check_password, password, stored)
            if ok and account is not None:
                await self.store.clear_failures(user, source)
                return
        finally:
            settle()
        self.counters.password_refused.inc()
        self.audit.record("password", outcome="refused", actor=caller.actor, peer=caller.peer,
                          target=user, source=source, failures=failures.count)
        locked = self.lockout.refuses(failures, now)
        self._event("irp.login-failed", caller, user, f"wrong password for {user} ({op})",
                    operation=op, credential="password", network=source,
                    failures=str(failures.count))
        if locked:
            self._event("irp.locked-out", caller, user,
                        f"logins to {user} from {source} locked for "
                        f"{self.lockout.seconds} s after {failures.count} failures",
                        operation=op, network=source, failures=str(failures.count),
                        limit="lockout_after", seconds=str(self.lockout.seconds))
        await self._delay()
        if locked:
            self.counters.lockouts.inc()
            raise IRPError("locked", f"logins to {user} from this network are locked after "
                                     f"{failures.count} failures")
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
        self.answers.forget(user, here=True)
        self.audit.record(event, outcome="ok", actor=caller.identity or user, peer=caller.peer,
                          target=user, serial=serial)
        self._event("irp.certificate-issued", caller, user,
                    f"certificate {serial} issued to {user} ({event})", operation=event,
                    not_after=rfc3339(leaf.not_valid_after_utc), **certificate_facts(leaf))
        return [certificate_element(c) for c in chain]

    async def op_enroll(self, caller: Caller, request: EnrollRequest) -> list[etree._Element]:
        self._require_ca()
        _check_key(request.csr.public_key())
        if request.password is not None:
            await self._check_password(caller, request.user, request.password, "enroll")
        else:
            assert request.code is not None
            if not await self.store.consume_invite(invite_hash(request.code), request.user,
                                                   self.now_ms()):
                self.counters.password_refused.inc()
                self._event("irp.login-failed", caller, request.user,
                            f"wrong enrollment code for {request.user}", operation="enroll",
                            credential="code", network=source_of(caller.peer))
                await self._delay()  # audited by handle() with the other refusals
                raise IRPError("not-authorized", "the enrollment code is wrong, expired or "
                                                 "used already")
        return await self._issue(caller, request.user, request.csr, "enroll")

    async def op_renew(self, caller: Caller, request: RenewRequest) -> list[etree._Element]:
        self._require_ca()
        _check_key(request.csr.public_key())
        assert caller.identity is not None
        return await self._issue(caller, caller.identity, request.csr, "renew")

    async def op_ca_certificates(self, caller: Caller,
                                 request: CACertificatesRequest) -> list[etree._Element]:
        certs = list(self.certificates.anchors)
        if self.ca is not None:
            certs = [c for c in self.ca.chain if c not in certs] + certs
        return [certificate_element(c) for c in certs]

    async def op_revoke(self, caller: Caller, request: RevokeRequest) -> list[etree._Element]:
        serial = request.serial or caller.serial
        assert serial is not None
        row = await self.store.certificate(serial)
        if row is None:
            raise IRPError("item-not-found", f"the registry issued no certificate {serial}")
        if row.person != caller.identity and not caller.operator:
            raise IRPError("forbidden", f"certificate {serial} belongs to someone else")
        if row.revoked is not None:
            raise IRPError("conflict", f"certificate {serial} is revoked already")
        await self._revoke_row(caller, row, "IRP revoke")
        self.audit.record("revoke", outcome="ok", actor=caller.actor, peer=caller.peer,
                          target=row.person, serial=serial)
        return [element("revoked", {"serial": serial, "user": row.person})]

    async def _revoke_row(self, caller: Caller, row: CertificateRow, reason: str) -> None:
        if self.ca is not None:
            ca = self.ca
            try:
                await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                ca.revoke, int(row.serial, 16), reason)
            except CAError as e:  # issued by an earlier CA: the registry's record still counts
                log.warn("revoking {serial} in the CA: {error}", serial=row.serial, error=e)
        await self.store.mark_revoked(row.serial, self.now_ms())
        self.answers.forget(row.person, here=True)
        self.certificates.reload_crls()
        facts = {"serial": serial_hex(int(row.serial, 16)), "reason": reason, "by": caller.actor}
        try:
            facts["issuer"] = x509.load_pem_x509_certificate(row.chain_pem).issuer.rfc4514_string()
        except ValueError:
            pass  # a row without a readable chain: the serial says which
        self._event("irp.certificate-revoked", caller, row.person,
                    f"certificate {row.serial} of {row.person} revoked ({reason})", **facts)

    async def op_certificates(self, caller: Caller,
                              request: CertificatesRequest) -> list[etree._Element]:
        if request.serial is not None:
            row = await self.store.certificate(request.serial)
            if row is None:
                raise IRPError("item-not-found",
                               f"the registry issued no certificate {request.serial}")
            # The refusal names the certificate, not its owner: a serial must not tell who.
            may_see(caller, row.person, self.config.lookup_access, "see",
                    f"certificate {request.serial}")
            return [element("person", {"id": row.person},
                            children=[chain_element(self.statuses.status(row))])]
        user = request.user
        assert user is not None
        may_see(caller, user, self.config.lookup_access, "see the certificates of")
        view = await self.store.person_view(user, self.now_ms())
        if not view.exists:
            raise IRPError("item-not-found", f"{user} is not registered")
        return [element("person", {"id": user}, children=[
            chain_element(self.statuses.status(r)) for r in view.certificates])]

    # -- records ---------------------------------------------------------------------------------

    async def op_register(self, caller: Caller, request: RegisterRequest) -> bytes:
        person = own(caller, request.user)
        addresses = request.addresses
        # Strictly increasing, so "most recently registered first" holds within a millisecond.
        now = self._last_registration = max(self.now_ms(), self._last_registration + 1)
        try:
            view = await self.store.register(
                person, request.device, tuple((a.ip, a.port) for a in addresses), now,
                now + request.lifetime * 1000, self.config.max_devices)
        except TooManyDevices:
            raise IRPError("policy-violation", f"at most {self.config.max_devices} devices "
                                               "per person; unregister one first") from None
        self.answers.forget(person, here=True)
        self.audit.record("register", outcome="ok", actor=person, peer=caller.peer,
                          device=request.device, lifetime=request.lifetime,
                          addresses=[f"[{a.ip}]:{a.port}" for a in addresses])
        return person_payload(self.answers.record(view))

    async def op_unregister(self, caller: Caller, request: UnregisterRequest) -> bytes:
        person = own(caller, request.user)
        count = await self.store.unregister(person, request.device)
        self.answers.forget(person, here=True)
        self.audit.record("unregister", outcome="ok", actor=person, peer=caller.peer,
                          device=request.device, removed=count)
        return (await self.answers.answer(person)).payload

    async def op_lookup(self, caller: Caller, request: LookupRequest) -> Answer:
        may_see(caller, request.user, self.config.lookup_access, "look up")
        answer = await self.answers.answer(request.user)
        if not answer.exists:
            raise IRPError("item-not-found", f"{request.user} is not registered")
        return answer

    # -- watches ----------------------------------------------------------------------------------

    async def op_watch(self, caller: Caller, request: WatchRequest) -> Answer:
        """Check the policy and return the current record; the session then calls watch()."""
        may_see(caller, request.user, self.config.watch_access, "watch")
        answer = await self.answers.answer(request.user)
        if not answer.exists:
            raise IRPError("item-not-found", f"{request.user} is not registered")
        self.watches.expire_at(request.user, answer.changes_at)
        return answer

    async def op_unwatch(self, caller: Caller, request: UnwatchRequest) -> list[etree._Element]:
        return [element("unwatched", {"user": request.user})]

    def watch(self, person: str, watcher: Watcher) -> None:
        self.watches.add(person, watcher)

    def unwatch(self, person: str, watcher: Watcher) -> None:
        self.watches.remove(person, watcher)

    def _changed(self, person: str | None, kind: str, seen: bool) -> None:
        """A change in the store; `seen`: made here, and forgotten when its write returned."""
        if not seen:
            self.answers.forget(person)
        if kind in ("revoked", "gap"):
            self.certificates.reload_crls()  # another process may have revoked it
            for listener in list(self.revocation_listeners):
                listener(person)
        self.watches.changed(person)

    def stop(self) -> None:
        """Cancel the expiry timer (the service is stopping)."""
        self.watches.stop()

    # -- backups ----------------------------------------------------------------------------------

    async def op_backup_put(self, caller: Caller,
                            request: BackupPutRequest) -> list[etree._Element]:
        person = own(caller, request.user)
        size = len(request.data)
        await self.store.put_backup(person, request.data, self.now_ms())
        self.audit.record("backup-put", outcome="ok", actor=person, peer=caller.peer, size=size)
        return [element("stored", {"user": person, "size": str(size)})]

    async def op_backup_get(self, caller: Caller,
                            request: BackupGetRequest) -> list[etree._Element]:
        if request.password is not None:
            assert request.user is not None
            await self._check_password(caller, request.user, request.password, "backup-get")
            person = request.user
        elif caller.identity is None:
            raise IRPError("not-authorized", "backup-get needs a client certificate or the "
                                             "person's password")
        else:
            person = own(caller, request.user)
        data = await self.store.get_backup(person)
        if data is None:
            raise IRPError("item-not-found", f"{person} has no backup")
        self.audit.record("backup-get", outcome="ok", actor=caller.identity or person,
                          peer=caller.peer, target=person)
        return [element("backup", {"user": person}, b64(data))]

    # -- administration ----------------------------------------------------------------------------

    async def op_list_users(self, caller: Caller,
                            request: ListUsersRequest) -> list[etree._Element]:
        rows = await self.store.list_persons(request.after, request.limit + 1)
        page, more = rows[:request.limit], len(rows) > request.limit
        out = [element("user", {"id": r.person, "created": rfc3339(r.created / 1000),
                                "certificates": str(r.certificates),
                                "password": "true" if r.has_password else "false"})
               for r in page]
        if more:
            out.append(element("more", {"after": page[-1].person}))
        return out

    async def op_remove(self, caller: Caller, request: RemoveRequest) -> list[etree._Element]:
        await self.remove(caller, request.user)
        return [element("removed", {"user": request.user})]

    async def remove(self, caller: Caller, person: str) -> list[str]:
        """Revoke the person's certificates and delete their account, addresses, backup and
        codes; the serials revoked. (The ``remove`` operation, and ``sixnet irp user
        remove`` on the registry's host.)"""
        view = await self.store.person_view(person, self.now_ms())
        if not view.exists:
            raise IRPError("item-not-found", f"{person} is not registered")
        revoked = []
        for row in view.certificates:
            if row.revoked is None:
                await self._revoke_row(caller, row, "IRP user removed")
                revoked.append(row.serial)
        await self.store.remove_person(person)
        self.answers.forget(person, here=True)
        self.audit.record("remove", outcome="ok", actor=caller.actor, peer=caller.peer,
                          target=person, revoked=revoked)
        self._event("irp.user-removed", caller, person,
                    f"{person} removed by {caller.actor}; {len(revoked)} certificates revoked",
                    by=caller.actor, certificates=str(len(revoked)),
                    revoked=",".join(revoked)[:300])
        return revoked


def _check_key(public: object) -> None:
    """The key rules of `LabCA.sign_user`, checked before a one-time code is spent."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise IRPError("bad-request", "RSA keys must be at least 2048 bits")
    elif not isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise IRPError("bad-request", "only RSA, ECDSA and Ed25519 keys can be certified")


def _named(facts: dict[str, str]) -> str | None:
    """The one person a (refused) certificate names, if it names exactly one."""
    names = facts.get("names", "")
    return names if names and "," not in names else None
