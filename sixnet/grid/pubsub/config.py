"""The ``[grid.broker]`` table: the publish-subscribe service."""

from __future__ import annotations

from dataclasses import dataclass

from sixnet.core.settings import database_url, one_of, positive, setting

#: Operations a platform role may grant (RFC 8600 section 8.3: per-platform authorization).
OPERATIONS = ("create", "publish", "subscribe")
ACCESS_MODELS = ("authorize", "whitelist", "open")


def operations_check(values: list[str]) -> str | None:
    for value in values:
        if value not in OPERATIONS:
            return f"{value!r} is not one of {', '.join(OPERATIONS)}"
    return None


def platform_patterns_check(values: list[str]) -> str | None:
    for value in values:
        if value != "*" and ("/" in value or "@" not in value and not value.startswith("*")):
            return (f"{value!r} is not a bare JID (user@domain), a '*@domain' pattern "
                    f"or '*'")
    return None


@dataclass(frozen=True)
class RoleConfig:
    """``[grid.broker.roles.NAME]``: what a group of platforms may do."""

    platforms: list[str] = setting([], check=platform_patterns_check,
                                   doc="bare JIDs, '*@domain' patterns, or '*' for everyone")
    operations: list[str] = setting([], check=operations_check,
                                    doc="create, publish, subscribe")


@dataclass(frozen=True)
class RateLimitConfig:
    """``[grid.broker.rate_limits]``: token buckets per platform (bare JID)."""

    publishes_per_second: float = setting(100.0, check=positive)
    publish_burst: int = setting(500, check=positive)
    subscriptions_per_second: float = setting(2.0, check=positive)
    subscription_burst: int = setting(50, check=positive)


@dataclass(frozen=True)
class BrokerConfig:
    """``[grid.broker]``: the pubsub service at ``<subdomain>.<domain>``."""

    subdomain: str = setting("broker", doc="the service's JID is subdomain.domain")
    database: str = setting("sqlite:grid-broker.sqlite3", check=database_url,
                            doc="sqlite:PATH (relative to state_dir) or a postgresql:// URL")
    audit_log: str = setting("grid-broker-audit.jsonl",
                             doc="JSON-lines audit log, relative to state_dir")
    default_access_model: str = setting("authorize", check=one_of(*ACCESS_MODELS))
    open_access: bool = setting(False, doc="allow the 'open' access model (labs only)")
    default_max_items: int = setting(100, check=positive)
    max_items_limit: int = setting(1000, check=positive)
    max_item_bytes: int = setting(262144, check=positive, doc="largest payload accepted")
    disco_max_items: int = setting(100, check=positive,
                                   doc="most topics in one disco#items page")
    items_page_max: int = setting(100, check=positive,
                                  doc="most items in one items-retrieval page")
    notification_type: str = setting("normal", check=one_of("normal", "headline"),
                                     doc="default pubsub#notification_type of new topics")
    validate_iodef: bool = setting(False, doc="check IODEF 2.0 payloads against the schema")
    admins: list[str] = setting([], check=platform_patterns_check,
                                doc="platforms that act as owner of every topic")
    default_operations: list[str] = setting(list(OPERATIONS), check=operations_check,
                                            doc="what a platform in no role may do")
    roles: dict[str, RoleConfig] = setting({})
    rate_limits: RateLimitConfig = setting(RateLimitConfig())
