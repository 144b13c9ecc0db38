"""The XMPP-Grid controller and broker (RFC 8600)."""
