"""Who may do what: policy as data, consulted by the engine, testable without a reactor.

Two tables decide every request. `ACCESS` is XEP-0060 section 4.1's affiliation x action table,
with the access model (RFC 8600 section 8.3.3) deciding what an entity with no affiliation may
do; `PlatformRoles` is the operator's per-platform grant of operations (RFC 8600 section 8.3).
`RateLimits` caps how fast one platform may publish or ask for subscriptions.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from sixnet.core.stream.limits import TokenBucket
from sixnet.grid.pubsub.config import OPERATIONS, RateLimitConfig, RoleConfig

AFFILIATIONS = ("owner", "publisher", "publish-only", "member", "none", "outcast")
#: What an affiliation can be asked to do on a node.
ACTIONS = ("subscribe", "retrieve", "receive", "publish", "retract-own", "retract-any",
           "purge", "configure", "delete", "manage")


class Verdict(Enum):
    YES = "yes"
    NO = "no"
    #: Subscribe: allowed once an owner approves (the `authorize` model).
    APPROVAL = "approval"
    #: Retrieve or receive: only with an approved subscription.
    SUBSCRIBED = "subscribed"


YES, NO, APPROVAL, SUBSCRIBED = Verdict.YES, Verdict.NO, Verdict.APPROVAL, Verdict.SUBSCRIBED

_OWNER = dict.fromkeys(ACTIONS, YES)
_NOTHING = dict.fromkeys(ACTIONS, NO)

#: affiliation -> action -> verdict, or access model -> verdict where the model decides.
ACCESS: Mapping[str, Mapping[str, Verdict | Mapping[str, Verdict]]] = {
    "owner": _OWNER,
    "publisher": {**_NOTHING, "subscribe": YES, "retrieve": YES, "receive": YES,
                  "publish": YES, "retract-own": YES},
    "publish-only": {**_NOTHING, "publish": YES, "retract-own": YES},
    "member": {**_NOTHING, "subscribe": YES, "retrieve": YES, "receive": YES},
    # No affiliation: the access model decides. A leftover `none` is never whitelisted.
    "none": {**_NOTHING,
             "subscribe": {"open": YES, "authorize": APPROVAL, "whitelist": NO},
             "retrieve": {"open": YES, "authorize": SUBSCRIBED, "whitelist": NO},
             "receive": {"open": YES, "authorize": SUBSCRIBED, "whitelist": NO}},
    "outcast": _NOTHING,
}


def may(affiliation: str, action: str, access_model: str) -> Verdict:
    """The one access decision: what `affiliation` may do on a node with `access_model`."""
    verdict = ACCESS[affiliation][action]
    if isinstance(verdict, Verdict):
        return verdict
    return verdict[access_model]


def bare(jid: str) -> str:
    """The bare JID (local@domain or domain), lower-cased for comparison.

    The core hands us authenticated, PRECIS-prepared JIDs; folding case here only makes
    JIDs typed into forms and configuration compare equal to them.
    """
    return jid.split("/", 1)[0].lower()


def matches(jid: str, patterns: list[str]) -> bool:
    """Whether a bare JID matches any of ``user@domain``, ``*@domain`` or ``*``."""
    return any(fnmatch.fnmatchcase(jid, p.lower()) for p in patterns)


@dataclass(frozen=True)
class PlatformRoles:
    """The operator's roles: which platforms may create topics, publish, subscribe."""

    roles: Mapping[str, RoleConfig]
    default_operations: tuple[str, ...] = OPERATIONS

    def operations(self, jid: str) -> set[str]:
        """The union of the operations of every role naming the platform, else the default."""
        platform = bare(jid)
        granted: set[str] = set()
        named = False
        for role in self.roles.values():
            if matches(platform, role.platforms):
                named = True
                granted.update(role.operations)
        return granted if named else set(self.default_operations)

    def allows(self, jid: str, operation: str) -> bool:
        return operation in self.operations(jid)


class RateLimits:
    """Per-platform limits on publishes and subscription requests (RFC 8600 section 8.3)."""

    def __init__(self, config: RateLimitConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = {
            "publish": (config.publishes_per_second, float(config.publish_burst)),
            "subscribe": (config.subscriptions_per_second, float(config.subscription_burst)),
        }
        self._clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        #: Buckets refused since they last allowed one (one alert per burst of refusals).
        self._refused: set[tuple[str, str]] = set()
        #: Refusals of each kind since start (the metrics read it).
        self.refusals = dict.fromkeys(self._limits, 0)

    def take(self, jid: str, kind: str) -> tuple[bool, bool]:
        """Spend one token; return (allowed, first refusal since the platform was last allowed).

        The second value lets the caller raise one alert per burst of refusals, not one per
        refused stanza.
        """
        rate, burst = self._limits[kind]
        now = self._clock()
        key = (bare(jid), kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
        if bucket.take(now):
            self._refused.discard(key)
            return True, False
        first = key not in self._refused
        self._refused.add(key)
        self.refusals[kind] += 1
        return False, first

    def limit(self, kind: str) -> tuple[float, float]:
        """The (rate per second, burst) of `kind`."""
        return self._limits[kind]

    def forget_idle(self) -> None:
        """Drop full buckets (platforms idle long enough to have their whole burst back)."""
        now = self._clock()
        for key, bucket in list(self._buckets.items()):
            if bucket.full(now):
                del self._buckets[key]
                self._refused.discard(key)
