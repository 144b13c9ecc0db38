"""Helpers the tests and benchmarks share: the lab PKI, config files, harnesses, runners, waits."""
