"""Alerts: the one way a SixChat session ends, cleanly or not."""

from __future__ import annotations

from sixnet.pki.store import VerificationError

ALERTS = frozenset({
    "close-notify", "unexpected-message", "bad-record-mac", "record-overflow", "decode-error",
    "decrypt-error", "handshake-failure", "handshake-timeout", "insufficient-security",
    "protocol-version", "bad-certificate", "unknown-ca", "certificate-expired",
    "certificate-revoked", "identity-mismatch", "unknown-identity", "duplicate-session",
    "internal-error",
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


class Alert(Exception):
    """Ends a session; `reason` goes on the wire, `detail` only to the local log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in ALERTS:
            raise ValueError(f"unknown alert {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def certificate_alert(error: VerificationError) -> Alert:
    return Alert(_CERTIFICATE_ALERTS.get(error.check, "bad-certificate"), str(error))
