"""Where the bridge publishes: a session with the grid broker in this process, or a login to
a remote XMPP-Grid controller. Both give the delivery loop an `IXMPPSession`; the loop does
not know which it has.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer

from sixnet.bridge.config import BridgeSettings, RemoteConfig
from sixnet.core.errors import ConfigError
from sixnet.grid.client import connect
from sixnet.grid.client.session import IXMPPSession
from sixnet.pki.store import CertificateStore, NodeIdentity


class Target(Protocol):
    """How the delivery loop gets a session, and the pubsub service to publish to."""

    service: str
    description: str

    def connect(self) -> defer.Deferred[IXMPPSession]: ...


class LocalGrid(Protocol):
    """What the bridge needs of the grid service in this process."""

    pubsub_service: str

    def local_session(self, localpart: str) -> defer.Deferred[IXMPPSession]: ...


class LocalTarget:
    """A platform bound on this process's router, subject to the broker's roles, rate limits
    and audit like any other publisher."""

    def __init__(self, grid: LocalGrid, localpart: str) -> None:
        self.grid = grid
        self.localpart = localpart
        self.service = grid.pubsub_service
        self.description = f"local broker {self.service} as {localpart}"

    def connect(self) -> defer.Deferred[IXMPPSession]:
        return self.grid.local_session(self.localpart)


class RemoteTarget:
    """A login as a platform to any RFC 8600 controller: SASL EXTERNAL with a certificate, or
    SCRAM with the password in a file (read at each login, so it may be changed)."""

    def __init__(self, remote: RemoteConfig, store: CertificateStore,
                 identity: NodeIdentity | None, reactor: Any) -> None:
        host, _, port = remote.server.rpartition(":")
        self.host = host.removeprefix("[").removesuffix("]")
        self.port = int(port)
        self.remote = remote
        self.store = store
        self.identity = identity
        self.reactor = reactor
        self.service = remote.service
        self.description = f"{remote.service} via {remote.server} as {remote.jid}"

    def connect(self) -> defer.Deferred[IXMPPSession]:
        password = None
        if self.remote.password_file is not None:
            password = self.remote.password_file.read_text().rstrip("\r\n")
        return connect(self.reactor, self.host, self.port, self.remote.jid, password=password,
                       identity=self.identity, store=self.store,
                       direct_tls=self.remote.tls == "direct")


def make_target(config: BridgeSettings, store: CertificateStore, grid: LocalGrid | None,
                reactor: Any) -> Target:
    bridge = config.bridge
    if bridge.target == "local":
        assert grid is not None  # BridgeConfig.problem said so
        return LocalTarget(grid, bridge.localpart)
    identity = None
    if bridge.remote.identity:
        try:
            identity = store.identity(bridge.remote.identity)
        except KeyError as e:
            raise ConfigError(str(config.path), "bridge.remote.identity",
                              str(e.args[0])) from None
    return RemoteTarget(bridge.remote, store, identity, reactor)
