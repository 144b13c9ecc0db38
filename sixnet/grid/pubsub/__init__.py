"""The XEP-0060 publish-subscribe broker of RFC 8600, a component of the XMPP server."""
