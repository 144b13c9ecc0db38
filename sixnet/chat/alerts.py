"""Alerts: the one way a SixChat session ends, cleanly or not."""

from __future__ import annotations

from collections.abc import Mapping

from sixnet.core.errors import ConditionError
from sixnet.core.events import CATALOGUE
from sixnet.pki.store import VerificationError, certificate_facts

ALERTS = frozenset({
    "close-notify", "unexpected-message", "bad-record-mac", "record-overflow", "decode-error",
    "decrypt-error", "handshake-failure", "handshake-timeout", "insufficient-security",
    "protocol-version", "bad-certificate", "unknown-ca", "certificate-expired",
    "certificate-revoked", "identity-mismatch", "unknown-identity", "access-denied",
    "duplicate-session", "internal-error",
})

#: What a refused certificate is called on the wire (`VerificationError.check` -> alert).
_CERTIFICATE_ALERTS = {
    "expired": "certificate-expired",
    "not-yet-valid": "certificate-expired",
    "untrusted-root": "unknown-ca",
    "unknown-issuer": "unknown-ca",
    "revoked": "certificate-revoked",
    "identity-mismatch": "identity-mismatch",
    "no-identity": "identity-mismatch",
}


class Alert(ConditionError):
    """Ends a session; the condition (an alert name) goes on the wire, the text only to the
    local log.

    An alert that is a detection (a man in the middle, a tampered record...) names its
    security event `event` (a `CATALOGUE` kind) and short `facts`; the agent emits it when
    the session ends, with the peer's address and person, which only the agent knows.
    """

    conditions = ALERTS

    def __init__(self, condition: str, text: str = "", *, event: str | None = None,
                 facts: Mapping[str, str] | None = None) -> None:
        super().__init__(condition, text)
        if event is not None and event not in CATALOGUE:
            raise ValueError(f"Alert: unknown security event kind {event!r}")
        self.event = event
        self.facts: Mapping[str, str] = facts or {}


#: The security event a refused certificate is, by check: a certificate for another person
#: than the one dialled, or for no one or several, is an identity mismatch. (An unknown or
#: expired certificate is refused too, but is no event of the catalogue.)
_CERTIFICATE_EVENTS = {"revoked": "chat.certificate-revoked",
                       "identity-mismatch": "chat.identity-mismatch",
                       "no-identity": "chat.identity-mismatch"}


def certificate_alert(error: VerificationError, chain: tuple = (),
                      expected: str | None = None) -> Alert:
    """The alert for a refused peer certificate; `expected` is the person dialled, if any."""
    event = _CERTIFICATE_EVENTS.get(error.check)
    facts: dict[str, str] = {"check": error.check}
    if event is not None and chain:
        facts.update(certificate_facts(chain[0]))
        if expected is not None:
            facts["dialled"] = expected
    return Alert(_CERTIFICATE_ALERTS.get(error.check, "bad-certificate"), str(error),
                 event=event, facts=facts)
