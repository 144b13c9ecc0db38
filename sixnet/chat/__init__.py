"""The SixChat End2End Direct user agent (TCP 4605)."""
