"""The ``[bridge]`` section: which events go where, and how the bridge reaches the grid."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sixnet.core.config import IdentityConfig, Settings
from sixnet.core.events import CATALOGUE
from sixnet.core.settings import database_url, in_range, one_of, positive, setting

#: Services whose events the bridge reports (the prefixes of the event kinds).
EVENT_SERVICES = tuple(sorted({kind.split(".", 1)[0] for kind in CATALOGUE}))
#: Kinds published as soon as they are seen, not at the end of their window: an attack under
#: way on a person's conversation, which a responder wants to hear about now.
IMMEDIATE = ["chat.mitm", "chat.identity-mismatch", "chat.downgrade"]

_LOCALPART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")


def topic_check(value: str) -> str | None:
    if value == "" or _TOPIC.fullmatch(value):
        return None
    return f"{value!r} is not a topic name (1-255 of A-Z a-z 0-9 . _ - : /, no space)"


def kinds_check(values: list[str]) -> str | None:
    for value in values:
        if value not in CATALOGUE:
            return f"{value!r} is not a security event kind (see docs/bridge.rst)"
    return None


def localpart_check(value: str) -> str | None:
    if _LOCALPART.fullmatch(value):
        return None
    return f"{value!r} must be 1-64 of a-z 0-9 . _ -, starting with a letter or digit"


def server_check(value: str) -> str | None:
    if value == "":
        return None
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return f"{value!r} is not host:port (or [ipv6]:port)"
    return None


def jid_check(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[^@/\s]+@[^@/\s]+", value):
        return None
    return f"{value!r} is not a bare JID (user@domain)"


def domain_check(value: str) -> str | None:
    if value == "" or re.fullmatch(r"[^@/\s]+", value):
        return None
    return f"{value!r} is not a service JID (a domain such as pubsub.example.org)"


@dataclass(frozen=True)
class TopicsConfig:
    """``[bridge.topics]``: a service's own topic instead of ``[bridge] topic``."""

    irp: str = setting("", check=topic_check)
    chat: str = setting("", check=topic_check)
    grid: str = setting("", check=topic_check)


@dataclass(frozen=True)
class RemoteConfig:
    """``[bridge.remote]``: an XMPP-Grid controller elsewhere (any RFC 8600 server)."""

    server: str = setting("", check=server_check, doc="host:port of its client port")
    jid: str = setting("", check=jid_check, doc="the bridge's platform account, user@domain")
    service: str = setting("", check=domain_check,
                           doc="the pubsub service's JID, e.g. pubsub.example.org")
    tls: str = setting("starttls", check=one_of("starttls", "direct"),
                       doc="STARTTLS (RFC 6120) or direct TLS (XEP-0368)")
    identity: str = setting("", doc="a [pki.identities.NAME] to log in with (SASL EXTERNAL)")
    password_file: Path | None = setting(None, must_exist=True,
                                         doc="a file holding the password (SCRAM)")


@dataclass(frozen=True)
class BridgeConfig:
    """``[bridge]``: the suite's security events, as IODEF incidents, on the XMPP-Grid."""

    enabled: bool = setting(False)
    identity: str = setting("host", doc="the [pki.identities.NAME] whose subject names this "
                                        "suite in each incident (IncidentID, creator)")
    target: str = setting("local", check=one_of("local", "remote"),
                          doc="local: the grid broker in this process; remote: [bridge.remote]")
    topic: str = setting("sixnet-security", check=topic_check)
    topics: TopicsConfig = setting(TopicsConfig(), doc="the [bridge.topics] table")
    access_model: str = setting("", check=one_of("", "authorize", "whitelist", "open"),
                                doc="pubsub#access_model of a topic the bridge creates; "
                                    "empty: the server's default")
    window: float = setting(60.0, check=positive,
                            doc="seconds over which repeats of one event are counted as one "
                                "incident")
    immediate: list[str] = setting(IMMEDIATE, check=kinds_check,
                                   doc="kinds published at once (their repeats still counted)")
    localpart: str = setting("sixnet-bridge", check=localpart_check,
                             doc="local target: the platform is localpart@[grid] domain")
    database: str = setting("sqlite:bridge.sqlite3", check=database_url,
                            doc="the outgoing queue: sqlite:PATH (under state_dir) or a "
                                "postgresql:// URL")
    max_queue: int = setting(10000, check=in_range(1, 10_000_000),
                             doc="incidents kept while the target is unreachable; beyond it "
                                 "the oldest is dropped (and counted)")
    remote: RemoteConfig = setting(RemoteConfig(), doc="the [bridge.remote] table")

    def topic_for(self, service: str) -> str:
        return getattr(self.topics, service) or self.topic

    def problem(self, identities: Mapping[str, IdentityConfig],
                grid_enabled: bool) -> tuple[str, str] | None:
        """What is wrong across keys, as (key, problem); None when the section is usable."""
        if not self.enabled:
            return None
        if self.target == "local":
            if not grid_enabled:
                return "bridge.target", "'local' needs the grid here ([grid] enabled = true)"
            return None
        remote = self.remote
        for key in ("server", "jid", "service"):
            if not getattr(remote, key):
                return f"bridge.remote.{key}", "is required when target = 'remote'"
        if bool(remote.identity) == (remote.password_file is not None):
            return "bridge.remote", "set exactly one of identity (EXTERNAL) and password_file"
        if remote.identity and remote.identity not in identities:
            return ("bridge.remote.identity",
                    f"no [pki.identities.{remote.identity}] table defines it")
        return None


class BridgeSettings(Settings, Protocol):
    """What the bridge reads of the whole file."""

    @property
    def bridge(self) -> BridgeConfig: ...
