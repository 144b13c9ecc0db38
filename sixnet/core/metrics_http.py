"""The metrics endpoint: ``GET /metrics`` renders the process's `Registry` for Prometheus.

It has no authentication (a scrape reads counts, never secrets, but they tell a stranger how
busy the grid is and how many logins fail): ``[metrics] listen`` is loopback by default, and a
port on any other interface is logged as a warning when the service starts.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from sixnet.core.metrics import Registry
from sixnet.core.runtime import ListeningService

log = Logger(namespace="sixnet")

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PATH = b"/metrics"


class MetricsResource(Resource):
    """Every path: ``/metrics`` answers GET (and HEAD), anything else is 404 or 405."""

    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> bytes:
        if request.path != PATH:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: the metrics are at /metrics\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"method not allowed: GET /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return self.registry.render()


class MetricsSite(Site):
    """No access log: a scrape every 15 seconds is not worth a log line each."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(MetricsResource(registry))

    def log(self, request: Request) -> None:
        pass


def is_loopback(description: str) -> bool:
    """Whether a server endpoint string listens on loopback only (or a UNIX socket)."""
    from twisted.internet import reactor

    endpoint = endpoints.serverFromString(reactor, description)
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(interface, str) or not interface:
        return False  # every interface
    try:
        return ipaddress.ip_address(interface.split("%")[0]).is_loopback
    except ValueError:
        return False


def metrics_service(listen: str, registry: Registry) -> ListeningService:
    """The listening service of ``[metrics]``, for the composition root."""
    if not is_loopback(listen):
        log.warn("metrics: {endpoint} is not loopback-only, and the endpoint has no "
                 "authentication: anyone who reaches it can read the metrics",
                 endpoint=listen)
    return ListeningService("metrics", [listen], MetricsSite(registry))
