"""The broker's policy tables, enumerated: affiliation x action x access model, roles, rates."""

from __future__ import annotations

import pytest

from sixnet.grid.pubsub.config import RateLimitConfig, RoleConfig, platform_patterns_check
from sixnet.grid.pubsub.policy import (
    ACCESS,
    ACTIONS,
    AFFILIATIONS,
    PlatformRoles,
    RateLimits,
    bare,
    may,
)

MODELS = ("authorize", "whitelist", "open")

# Written out by hand from XEP-0060 section 4.1 and RFC 8600 section 8.3.3, one row per
# affiliation, columns in ACTIONS order: y = yes, n = no, a = after owner approval,
# s = only with an approved subscription. "none" has one row per access model.
EXPECTED = """
who     subscribe retrieve receive publish retract-own retract-any purge configure delete manage
owner               y        y       y       y        y           y        y      y       y      y
publisher           y        y       y       y        y           n        n      n       n      n
publish-only        n        n       n       y        y           n        n      n       n      n
member              y        y       y       n        n           n        n      n       n      n
none/authorize      a        s       s       n        n           n        n      n       n      n
none/whitelist      n        n       n       n        n           n        n      n       n      n
none/open           y        y       y       n        n           n        n      n       n      n
outcast             n        n       n       n        n           n        n      n       n      n
"""
LETTERS = {"y": "yes", "n": "no", "a": "approval", "s": "subscribed"}


def expected_table() -> dict[tuple[str, str, str], str]:
    lines = [line.split() for line in EXPECTED.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    assert tuple(header[1:]) == ACTIONS
    table = {}
    for row in rows:
        who, cells = row[0], row[1:]
        affiliation, _, only_model = who.partition("/")
        for model in MODELS:
            if only_model and model != only_model:
                continue
            for action, cell in zip(ACTIONS, cells, strict=True):
                table[(affiliation, action, model)] = LETTERS[cell]
    return table


def test_every_cell_of_the_access_table() -> None:
    expected = expected_table()
    assert len(expected) == len(AFFILIATIONS) * len(ACTIONS) * len(MODELS)
    for affiliation in AFFILIATIONS:
        for action in ACTIONS:
            for model in MODELS:
                got = may(affiliation, action, model).value
                assert got == expected[(affiliation, action, model)], \
                    (affiliation, action, model)


def test_table_has_exactly_the_affiliations_and_actions() -> None:
    assert set(ACCESS) == set(AFFILIATIONS)
    for row in ACCESS.values():
        assert set(row) == set(ACTIONS)


@pytest.mark.parametrize("model", MODELS)
def test_leftover_none_never_receives_on_whitelist(model: str) -> None:
    receives = may("none", "receive", model).value
    assert receives == {"whitelist": "no", "authorize": "subscribed", "open": "yes"}[model]


def test_roles_union_and_default() -> None:
    roles = PlatformRoles({
        "sensors": RoleConfig(["*@sensors.example"], ["publish"]),
        "soc": RoleConfig(["analyst@soc.example", "*@sensors.example"], ["subscribe"]),
    }, ("subscribe",))
    assert roles.operations("probe@sensors.example/1") == {"publish", "subscribe"}
    assert roles.operations("Analyst@SOC.example/x") == {"subscribe"}
    assert roles.operations("someone@else.example") == {"subscribe"}
    assert not roles.allows("someone@else.example", "create")


def test_platform_patterns_are_checked() -> None:
    assert platform_patterns_check(["a@b", "*@b", "*"]) is None
    assert "not a bare JID" in platform_patterns_check(["a@b/resource"])
    assert "not a bare JID" in platform_patterns_check(["justadomain"])


def test_bare_jid() -> None:
    assert bare("User@Example.test/Res/x") == "user@example.test"
    assert bare("example.test") == "example.test"


def test_rate_limits_refill_and_alert_once_per_burst() -> None:
    now = [0.0]
    limits = RateLimits(RateLimitConfig(publishes_per_second=2.0, publish_burst=3,
                                        subscriptions_per_second=1.0, subscription_burst=1),
                        clock=lambda: now[0])
    assert [limits.take("a@x/1", "publish") for _ in range(5)] == [
        (True, False), (True, False), (True, False), (False, True), (False, False)]
    assert limits.take("b@x", "publish") == (True, False)  # per platform
    assert limits.take("a@x/2", "subscribe") == (True, False)  # per kind
    now[0] = 0.5  # one token back
    assert limits.take("a@x/1", "publish") == (True, False)
    assert limits.take("a@x/1", "publish") == (False, True)
    now[0] = 100.0
    limits.forget_idle()
    assert limits._buckets == {}
