"""Alerts: the one way a SixChat session ends, cleanly or not."""

from __future__ import annotations

from sixnet.core.errors import ConditionError
from sixnet.pki.store import VerificationError

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
    local log."""

    conditions = ALERTS


def certificate_alert(error: VerificationError) -> Alert:
    return Alert(_CERTIFICATE_ALERTS.get(error.check, "bad-certificate"), str(error))
