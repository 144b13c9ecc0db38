"""sixnet: IRP registry, SixChat user agent and XMPP-Grid broker on one Twisted reactor."""

__version__ = "0.1.0"
