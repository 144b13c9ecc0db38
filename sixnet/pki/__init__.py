"""The shared certificate store, TLS contexts and the lab certificate authority."""
