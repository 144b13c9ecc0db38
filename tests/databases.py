"""Moved to tests/support/databases.py; tests that still import it from here switch later."""

from .support.databases import (
    drop_postgres_schema,
    fresh_postgres_schema,
    postgres_base,
    postgres_unavailable,
)

__all__ = ["drop_postgres_schema", "fresh_postgres_schema", "postgres_base",
           "postgres_unavailable"]
