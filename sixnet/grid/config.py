"""The ``[grid]`` section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from sixnet.core.config import Settings
from sixnet.core.settings import (
    ServiceConfig,
    database_url,
    endpoints_check,
    one_of,
    positive,
    setting,
)
from sixnet.grid.pubsub.config import BrokerConfig


def host_port(value: str) -> str | None:
    """``host:port`` (``[v6-address]:port`` too), or empty."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536:
        return f"{value!r} is not host:port (e.g. xmpp.example.org:5347)"
    return None


def at_least(low: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if value >= low else f"{value} must be at least {low}"

    return check


@dataclass(frozen=True)
class GridConfig(ServiceConfig):
    """``[grid]``: the XMPP-Grid controller and broker."""

    domain: str = setting("localhost")
    listen: list[str] = setting(["tcp6:5222:interface=\\:\\:"], check=endpoints_check,
                            doc="client streams with STARTTLS")
    listen_tls: list[str] = setting(["tcp6:5223:interface=\\:\\:"], check=endpoints_check,
                                doc="direct TLS client streams (XEP-0368)")
    database: str = setting("sqlite:grid.sqlite3", check=database_url,
                            doc="accounts, failed logins, offline messages and revoked "
                                "platforms: sqlite:PATH (under state_dir) or a "
                                "postgresql:// URL")
    scram_iterations: int = setting(10000, check=at_least(4096),
                                    doc="PBKDF2 iterations for new SCRAM credentials")
    allow_plain: bool = setting(False, doc="offer SASL PLAIN (always only over TLS)")
    max_stanza_bytes: int = setting(262144, check=at_least(10000),
                                    doc="largest stanza accepted (policy-violation beyond)")
    stanzas_per_second: float = setting(500.0, check=positive,
                                        doc="sustained stanza rate allowed per stream")
    stanza_burst: int = setting(2000, check=positive, doc="stanzas allowed in a burst")
    max_connections_per_address: int = setting(1000, check=positive,
                                               doc="authenticated connections per address")
    max_unauthenticated_per_address: int = setting(20, check=positive,
                                                   doc="connections per address not yet "
                                                       "past SASL")
    max_sessions: int = setting(20000, check=positive, doc="client connections in total")
    negotiation_timeout: float = setting(30.0, check=positive,
                                         doc="seconds to reach a bound session")
    unauthenticated_timeout: float = setting(10.0, check=positive,
                                             doc="seconds from TCP connect to SASL success")
    failure_delay: float = setting(1.0, check=at_least(0.0),
                                   doc="seconds before a SASL failure is answered")
    lockout_after: int = setting(5, check=positive,
                                 doc="failed logins in a row that lock an account")
    lockout_seconds: int = setting(300, check=positive,
                                   doc="seconds an account stays locked")
    offline_max_messages: int = setting(10000, check=positive,
                                        doc="offline messages stored per account")
    idle_timeout: float = setting(300.0, check=positive,
                                  doc="seconds of silence before a session is pinged; as "
                                      "long again without an answer closes it")
    resume_timeout: float = setting(300.0, check=positive,
                                    doc="seconds a cut stream-management session waits")
    broker: BrokerConfig = setting(BrokerConfig(), doc="the [grid.broker] table")
    mode: str = setting("server", check=one_of("server", "component"),
                        doc="server: the grid's own c2s on listen/listen_tls; component: "
                            "the broker attaches to another XMPP server (XEP-0114) and "
                            "nothing listens for clients")
    component_host: str = setting("", check=host_port,
                                  doc="component mode: host:port of the XMPP server's "
                                      "component port (e.g. Prosody's component_ports)")
    component_name: str = setting("", doc="component mode: the component's domain as the "
                                          "host knows it; default <broker.subdomain>.<domain>")
    component_secret_file: Path | None = setting(None, must_exist=True,
                                                 doc="component mode: file holding the "
                                                     "shared secret (never the secret "
                                                     "inline)")

    @property
    def service_name(self) -> str:
        """The broker's JID: ``component_name`` in component mode when set, else
        ``<broker.subdomain>.<domain>``."""
        if self.mode == "component" and self.component_name:
            return self.component_name
        return f"{self.broker.subdomain}.{self.domain}"

    def problem(self) -> tuple[str, str] | None:
        """What the keys say together that no key says alone: (key, problem) or None."""
        if self.mode != "component":
            return None
        if not self.component_host:
            return ("grid.component_host", "component mode needs host:port of the XMPP "
                                           "server's component port")
        if self.component_secret_file is None:
            return ("grid.component_secret_file", "component mode needs the file holding "
                                                  "the component's secret")
        name = self.service_name
        if not name.endswith("." + self.domain) or name.startswith(".") or "@" in name \
                or "/" in name:
            return ("grid.component_name", f"{name!r} must be a subdomain of the host's "
                                           f"domain {self.domain!r} (e.g. pubsub."
                                           f"{self.domain})")
        return None

    #: Keys of earlier releases, and the key that replaced each (named in the error).
    RENAMED: ClassVar[dict[str, str]] = {"failed_login_delay": "failure_delay",
                                         "max_failed_logins": "lockout_after"}


class GridSettings(Settings, Protocol):
    """What the grid reads of the whole file (the composition root's aggregate has it)."""

    @property
    def grid(self) -> GridConfig: ...
