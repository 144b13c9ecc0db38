"""The SASL server of a client stream (RFC 6120 6): which mechanisms are offered, each
exchange, the account lockout, the delay before a failure, and the audit trail.

Mechanisms: SCRAM-SHA-256-PLUS and SCRAM-SHA-1-PLUS (channel binding ``tls-exporter`` on TLS
1.3, ``tls-server-end-point`` always; advertised per XEP-0440), SCRAM-SHA-256, SCRAM-SHA-1,
EXTERNAL (XEP-0178: the person named by a client certificate the shared store verifies),
and PLAIN when configured (the stream is always TLS by the time SASL is offered).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from cryptography import x509
from twisted.internet import task, threads
from twisted.internet.interfaces import IReactorTime

from sixnet.core.audit import AuditLog
from sixnet.core.events import EventBus, IEventSink, SecurityEvent
from sixnet.core.lockout import PendingAttempts, source_of
from sixnet.core.metrics import Registry
from sixnet.grid.jid import JID, JIDError, parse_jid
from sixnet.grid.metrics import GridCounters
from sixnet.grid.scram import SaslFailure, ScramExchange
from sixnet.grid.storage.accounts import (
    AccountError,
    AccountStore,
    LockoutStore,
    normalize_username,
    prepare_password,
)
from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id
from sixnet.pki.store import CertificateStore, VerificationError, certificate_facts

SCRAM_MECHANISMS = {
    "SCRAM-SHA-256-PLUS": ("SHA-256", True),
    "SCRAM-SHA-1-PLUS": ("SHA-1", True),
    "SCRAM-SHA-256": ("SHA-256", False),
    "SCRAM-SHA-1": ("SHA-1", False),
}
#: A stream may fail this many times; the next failure closes it (RFC 6120 6.4.5).
MAX_FAILURES_PER_STREAM = 3


@dataclass(frozen=True)
class TLSFacts:
    """What the TLS layer of a stream tells SASL."""

    version: str
    channel_bindings: dict[str, bytes]
    peer_chain: Sequence[x509.Certificate]


@dataclass(frozen=True)
class Challenge:
    data: bytes


@dataclass(frozen=True)
class Success:
    jid: JID
    data: bytes
    #: For EXTERNAL: the verified client certificate chain, checked again when CRLs change.
    certificate_chain: tuple[x509.Certificate, ...] = ()


class SaslPolicy:
    """Shared by every stream: the stores, the lockout records, the audit log, the settings."""

    def __init__(self, domain: str, accounts: AccountStore, store: CertificateStore,
                 lockout: LockoutStore, audit: AuditLog, clock: IReactorTime, secret: bytes,
                 iterations: int, failure_delay: float, allow_plain: bool,
                 revoked: Collection[str] = frozenset(),
                 counters: GridCounters | None = None, *,
                 events: IEventSink | None = None, pending_timeout: float = 10.0) -> None:
        self.domain = domain
        self.events = events if events is not None else EventBus()
        #: Bare JIDs refused whatever their credentials (`sixnet grid revoke`).
        self.revoked = revoked
        self.accounts = accounts
        self.store = store
        self.lockout = lockout
        #: This server's attempts still being checked, waited for at most `pending_timeout`
        #: (the unauthenticated-stream deadline: a stream gone silent is closed by then).
        self.attempts = PendingAttempts()
        self.pending_timeout = pending_timeout
        self.audit = audit
        self.clock = clock
        self.secret = secret
        self.iterations = iterations
        self.failure_delay = failure_delay
        self.allow_plain = allow_plain
        self.counters = counters if counters is not None else GridCounters(Registry())

    def mechanisms(self, tls: TLSFacts) -> list[str]:
        offered = []
        if tls.channel_bindings:
            offered += ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]
        offered += ["SCRAM-SHA-256", "SCRAM-SHA-1"]
        if tls.peer_chain:
            offered.append("EXTERNAL")
        if self.allow_plain:
            offered.append("PLAIN")
        return offered


class SaslExchange:
    """One stream's SASL negotiation; the stream feeds it `auth` and `response` payloads."""

    def __init__(self, policy: SaslPolicy, tls: TLSFacts, address: str) -> None:
        self.policy = policy
        self.tls = tls
        self.address = address
        self.failures = 0
        self._scram: ScramExchange | None = None
        self._mechanism: str | None = None
        self._user: str | None = None
        #: Whether this exchange's attempt, counted as a failure before its password was
        #: checked (`_reserve`), locked the account: reported when the attempt fails or is
        #: aborted, forgotten when the password proves right.
        self._locks = False
        #: Ends this exchange's attempt as pending (`PendingAttempts`) once its outcome is known.
        self._settle: Callable[[], None] = lambda: None

    # -- entry points --------------------------------------------------------------------

    async def auth(self, mechanism: str, payload: bytes | None) -> Challenge | Success:
        self._scram = None
        self._mechanism = mechanism
        self._user = None
        self._settle()  # an exchange left for a new one stays counted
        self._locks = False
        try:
            if mechanism not in self.policy.mechanisms(self.tls):
                raise SaslFailure("invalid-mechanism", f"{mechanism!r} is not offered")
            if mechanism in SCRAM_MECHANISMS:
                hash_name, plus = SCRAM_MECHANISMS[mechanism]
                bindings = self.tls.channel_bindings if plus else {}
                if not plus and self.tls.channel_bindings:
                    # We offer -PLUS; a client sending "y" believes we do not (a downgrade).
                    bindings = self.tls.channel_bindings
                self._scram = ScramExchange(hash_name, plus, bindings, self.policy.secret,
                                            self.policy.iterations)
                if payload is None:
                    return Challenge(b"")
                return await self._scram_first(payload)
            if mechanism == "EXTERNAL":
                return await self._external(payload or b"")
            if payload is None:
                return Challenge(b"")
            return await self._plain(payload)
        except SaslFailure as failure:
            await self._failed(failure)
            raise

    async def response(self, payload: bytes) -> Challenge | Success:
        try:
            scram = self._scram
            if self._mechanism == "PLAIN" and scram is None and self._user is None:
                return await self._plain(payload)
            if scram is None:
                raise SaslFailure("malformed-request", "no exchange in progress")
            if scram.username is None:
                return await self._scram_first(payload)
            server_final = scram.client_final(payload)
            await self._password_right(scram.username)
            jid = self._jid_for(scram.username, scram.authzid)
            self._scram = None
            return await self._succeeded(jid, server_final, scram.channel_binding)
        except SaslFailure as failure:
            self._scram = None
            await self._failed(failure)
            raise

    def abort(self) -> None:
        self._scram = None
        self._settle()
        self.policy.audit.record("auth-aborted", mechanism=self._mechanism, user=self._user,
                                 address=self.address)
        if self._locks:  # the attempt stays counted: an abort is no proof of the password
            self._locks = False
            self._locked_out("aborted")

    # -- mechanisms ----------------------------------------------------------------------

    async def _scram_first(self, payload: bytes) -> Challenge:
        assert self._scram is not None
        name = self._scram.client_first(payload)
        username = self._username(name)
        self._user = username
        await self._reserve(username)
        credentials = await self.policy.accounts.credentials(username, self._scram.hash_name)
        return Challenge(self._scram.server_first(credentials))

    async def _external(self, payload: bytes) -> Success:
        if not self.tls.peer_chain:
            raise SaslFailure("not-authorized", "no client certificate")
        try:
            verified = self.policy.store.verify(list(self.tls.peer_chain), "client")
        except VerificationError as e:
            raise SaslFailure("not-authorized", f"client certificate refused: {e}") from None
        identity = verified.identity
        local, _, domain = identity.partition("@")
        self._user = identity
        if domain != self.policy.domain:
            raise SaslFailure("not-authorized", f"the certificate names {identity}, "
                                                f"not an account at {self.policy.domain}")
        authzid = payload.decode("utf-8", "replace") if payload else None
        if authzid:
            try:
                if normalize_user_id(authzid) != identity:
                    raise SaslFailure("invalid-authzid", "the certificate names someone else")
            except IdentitySyntaxError:
                raise SaslFailure("invalid-authzid", "not a bare JID") from None
        username = self._username(local)
        jid = self._jid_for(username, None)
        # No lockout check: a certificate cannot be guessed, and password guesses against a
        # platform's name must not lock the platform out. A success resets the count.
        await self.policy.accounts.record_certificate_login(username)
        await self.policy.lockout.succeeded(username, self.address)
        success = await self._succeeded(jid, b"", None)
        return Success(success.jid, success.data, tuple(self.tls.peer_chain))

    async def _plain(self, payload: bytes) -> Success:
        parts = payload.split(b"\x00")
        if len(parts) != 3:
            raise SaslFailure("malformed-request", "PLAIN needs authzid, authcid and password")
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            raise SaslFailure("malformed-request", "not UTF-8") from None
        username = self._username(authcid)
        self._user = username
        await self._reserve(username)
        credentials = await self.policy.accounts.credentials(username, "SHA-256")
        try:
            prepared = prepare_password(password)
        except AccountError:
            raise SaslFailure("not-authorized") from None  # can never be right: stays counted
        ok = credentials is not None and await threads.deferToThread(
            credentials.check_password, "SHA-256", prepared)
        if not ok:
            raise SaslFailure("not-authorized")
        await self._password_right(username)
        return await self._succeeded(self._jid_for(username, authzid or None), b"", None)

    # -- outcomes ------------------------------------------------------------------------

    async def _reserve(self, username: str) -> None:
        """Count this attempt as a failure before its password is checked, or refuse it when
        the account is locked: in one step, so guesses sent at once on several streams count
        one each and the ones past ``lockout_after`` are refused without a check. An exchange
        that never proves its password right (abandoned, malformed, wrong) stays counted."""
        policy, address = self.policy, self.address
        failures, settle = await policy.attempts.reserve(
            username, source_of(address), lambda lock: policy.lockout.reserve(
                username, address, lock), policy.clock, policy.pending_timeout)
        if settle is None:
            raise SaslFailure("account-disabled", "too many failed logins; try again later")
        self._settle = settle
        self._locks = self.policy.lockout.locked(failures)

    async def _password_right(self, username: str) -> None:
        """The password proved right: a success resets the count (even if the login is then
        refused for another reason, such as a revoked platform: that was no guess)."""
        await self.policy.lockout.succeeded(username, self.address)
        self._settle()
        self._locks = False

    def _username(self, name: str) -> str:
        """A SASL user name is the localpart, or the bare JID at our domain."""
        local, at, domain = name.rpartition("@")
        if at:
            try:
                if parse_jid(domain).domain != self.policy.domain:
                    raise SaslFailure("not-authorized", "not an account of this server")
            except JIDError:
                raise SaslFailure("not-authorized", "bad user name") from None
            name = local
        try:
            return normalize_username(name)
        except AccountError:
            raise SaslFailure("not-authorized", "bad user name") from None

    def _jid_for(self, username: str, authzid: str | None) -> JID:
        jid = JID(username, self.policy.domain)
        if str(jid) in self.policy.revoked:
            raise SaslFailure("not-authorized", "this platform's access has been revoked")
        if authzid:
            try:
                wanted = parse_jid(authzid)
            except JIDError:
                raise SaslFailure("invalid-authzid", "not a JID") from None
            if wanted != jid:
                raise SaslFailure("invalid-authzid", "may only act as the authenticated account")
        return jid

    async def _succeeded(self, jid: JID, data: bytes, binding: str | None) -> Success:
        self.policy.counters.login(self._mechanism, True)
        self.policy.audit.record("auth-success", user=str(jid), mechanism=self._mechanism,
                                 channel_binding=binding, tls=self.tls.version,
                                 address=self.address)
        return Success(jid, data)

    async def _failed(self, failure: SaslFailure) -> None:
        """Audit (the lockout count was taken by `_reserve`), report a lock this attempt made,
        and wait before the client hears of it."""
        self.failures += 1
        self._settle()
        locked, self._locks = self._locks, False
        self.policy.counters.login(self._mechanism, False)
        self.policy.audit.record("auth-failure", user=self._user, mechanism=self._mechanism,
                                 condition=failure.condition, reason=failure.text,
                                 address=self.address)
        self._report(failure)
        if locked:
            self._locked_out(failure.condition)
        if self.policy.failure_delay > 0:
            await task.deferLater(self.policy.clock, self.policy.failure_delay, lambda: None)

    def _subject(self) -> str | None:
        user = self._user
        if user is None:
            return None
        return (user if "@" in user else f"{user}@{self.policy.domain}")[:128]

    def _facts(self, condition: str) -> dict[str, str]:
        return {"mechanism": (self._mechanism or "")[:40], "condition": condition,
                "network": source_of(self.address)}

    def _report(self, failure: SaslFailure) -> None:
        """One grid.login-failed event per failure."""
        policy = self.policy
        subject = self._subject()
        facts = self._facts(failure.condition)
        why = ""
        if self._mechanism == "EXTERNAL" and self.tls.peer_chain:
            facts.update(certificate_facts(self.tls.peer_chain[0]))
            why = f" ({failure.text[:160]})"  # about the certificate, which is public
            named = facts.get("names", "")
            if subject is None and named and "," not in named:
                subject = named  # refused before it became the account: who it claims
        # Never a password exchange's text: a malformed SCRAM message may quote a proof.
        policy.events.emit(SecurityEvent(
            "grid.login-failed", subject=subject, source=self.address,
            detail=f"SASL {facts['mechanism']} login failed: {failure.condition}{why}",
            facts=facts, time=policy.clock.seconds()))

    def _locked_out(self, condition: str) -> None:
        """Count, audit and report a lock this exchange's attempt made (grid.locked-out)."""
        policy = self.policy
        seconds = policy.lockout.policy.seconds
        policy.counters.lockouts.inc()
        policy.audit.record("account-locked", user=self._user, address=self.address,
                            seconds=seconds)
        subject, facts = self._subject(), self._facts(condition)
        policy.events.emit(SecurityEvent(
            "grid.locked-out", subject=subject, source=self.address,
            detail=f"logins to {subject} from {facts['network']} locked for {seconds} s",
            facts={**facts, "limit": "lockout_after", "seconds": str(seconds)},
            time=policy.clock.seconds()))


def decode_payload(text: str | None) -> bytes | None:
    """The base64 content of auth/response: None if absent, b"" for '='."""
    if text is None or text == "":
        return None
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslFailure("incorrect-encoding", "bad base64") from None

