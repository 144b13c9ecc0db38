"""Helpers the tests share: harnesses, runners, waits."""
