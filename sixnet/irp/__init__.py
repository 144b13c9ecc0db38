"""The IRP registry (Identity Registration Protocol, TCP 4604)."""
