"""The grid client: an XMPP client session on the project's own stream code, and XEP-0060
publish-subscribe on top (`sixnet.grid.client.pubsub`). See `session` for the API."""

from sixnet.grid.client.errors import AuthenticationError, ClientError, IQError, IQTimeout
from sixnet.grid.client.pubsub import Notification, PubSubClient
from sixnet.grid.client.session import IXMPPSession, XMPPClientSession, connect

__all__ = ["AuthenticationError", "ClientError", "IQError", "IQTimeout", "IXMPPSession",
           "Notification", "PubSubClient", "XMPPClientSession", "connect"]
