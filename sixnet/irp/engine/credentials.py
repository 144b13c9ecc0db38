"""Passwords, one-time enrollment codes, and what a wrong password costs.

Hashing runs off the reactor thread (the registry's job); nothing here does I/O or keeps
time: `PasswordLockout` is arithmetic on a `Failures` record and the time it is given, and
holds the registry's attempts still being checked (`PendingAttempts`, timed by the caller).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from sixnet.core.lockout import Failures, LockoutPolicy, PendingAttempts

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


#: Checked when there is no account, so an unknown user id costs as much time as a known one.
DUMMY_HASH = hash_password(secrets.token_hex(8))


def new_invite_code() -> str:
    """A one-time enrollment code: 80 random bits as four groups of base32 letters."""
    raw = secrets.token_bytes(10)
    letters = base64.b32encode(raw).decode("ascii")
    return "-".join(letters[i:i + 4] for i in range(0, 16, 4))


def invite_hash(code: str) -> str:
    """Codes are stored hashed (they carry 80 random bits, so a fast hash is enough)."""
    normalized = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normalized.encode("ascii", "replace")).hexdigest()


class PasswordLockout(LockoutPolicy):
    """What wrong passwords cost (docs/irp.rst, "Wrong passwords"): the shared
    `LockoutPolicy` (``lockout_after`` failures in a row lock a user id for ``lockout_seconds``)
    and `delay` seconds before any refused credential is answered.

    A record belongs to a user id and the network a login comes from (`source_of`), and is
    kept for any user id tried, account or not: a stranger's guesses lock out the stranger's
    network only, and an unknown user id is answered exactly like a real one, ``locked``
    included. The registry counts an attempt before checking its password, in the same
    transaction that asks whether the record is locked (``reserve_attempt``), so guesses sent
    at once on several connections count one each; a right password clears the count.
    An attempt that would lock the record while others of this registry are being checked
    waits for them (`attempts`), so right passwords sent at once do not lock each other out.
    """

    def __init__(self, after: int, seconds: int, delay: float) -> None:
        super().__init__(after, seconds)
        self.delay = delay
        #: This registry's password attempts counted and still being checked.
        self.attempts = PendingAttempts()

    def refuses(self, failures: Failures, now_ms: int) -> bool:
        """Whether `failures` locks logins at `now_ms`."""
        return self.locked(failures, now_ms)
