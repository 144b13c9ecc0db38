"""Who may do what: the role x operation table, and the rules on whose records.

The table (`ACCESS`) decides by role alone, before an operation runs; ownership (a person
changes only their own record) and the lookup/watch policy (``[irp] lookup_access`` and
``watch_access``) need the target, so each operation applies `own` or `may_see` to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.irp.wire import IRPError

ANONYMOUS, PERSON, OPERATOR = "anonymous", "person", "operator"
ROLES = (ANONYMOUS, PERSON, OPERATOR)
_ALL = frozenset(ROLES)
_ENROLLED = frozenset({PERSON, OPERATOR})

#: Which role may attempt which operation.
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


@dataclass(frozen=True)
class Caller:
    """What a connection has proved: a verified person (and which certificate), or nothing.

    `peer` is the client's address; None for an operator's command on the registry's host.
    """

    peer: str | None
    identity: str | None = None
    serial: str | None = None
    operator: bool = False

    @property
    def role(self) -> str:
        if self.identity is None:
            return ANONYMOUS
        return OPERATOR if self.operator else PERSON

    @property
    def actor(self) -> str:
        """Who the audit log names."""
        return self.identity or ANONYMOUS


def refusal(role: str, op: str) -> IRPError | None:
    """The error for `role` attempting `op`, or None if the table allows it."""
    if role in ACCESS[op]:
        return None
    if role == ANONYMOUS:
        return IRPError("not-authorized", f"{op} needs a verified client certificate")
    return IRPError("forbidden", f"{op} is for operators only")


def own(caller: Caller, user: str | None) -> str:
    """The person whose record the caller changes: their own (`user` may only name it)."""
    assert caller.identity is not None
    if user is not None and user != caller.identity:
        raise IRPError("forbidden", f"{caller.identity} may not change the record of {user}")
    return caller.identity


def may_see(caller: Caller, target: str, policy: str, doing: str,
            named: str | None = None) -> None:
    """Raise `forbidden` unless `policy` (``enrolled``, ``same-domain`` or ``operators``)
    lets the caller see `target`'s record; `doing` says what for (``look up``, ...). The
    error names `named` instead of `target` when given (a certificate asked for by serial:
    who owns it is what the caller may not learn)."""
    if caller.operator or caller.identity == target:
        return
    if policy == "enrolled" and caller.identity is not None:
        return
    if policy == "same-domain" and caller.identity is not None and \
            caller.identity.rsplit("@", 1)[1] == target.rsplit("@", 1)[1]:
        return
    raise IRPError("forbidden", f"the registry's policy does not let {caller.identity} "
                                f"{doing} {named or target}")
