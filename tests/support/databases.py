"""Databases for tests: SQLite in a temporary directory, and the machine's PostgreSQL.

PostgreSQL tests use ``SIXNET_TEST_POSTGRES`` (default: the CI machine's trust-auth server,
database ``test``) and a schema of their own, dropped afterwards. When no server answers they
are skipped with a reason that says so; on CI the server is there and they run.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Protocol
from urllib.parse import quote

from sixnet.core.storage.database import Database


class Cleanups(Protocol):
    """A test case: what it is given runs when the test ends, last given first."""

    def addCleanup(self, function: Any, *args: Any) -> None: ...


DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_base() -> str:
    return os.environ.get("SIXNET_TEST_POSTGRES", DEFAULT_POSTGRES)


def postgres_unavailable() -> str | None:
    """None if PostgreSQL answers, else the reason tests that need it are skipped."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    try:
        with psycopg.connect(postgres_base(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as e:
        return f"no PostgreSQL at {postgres_base()} ({type(e).__name__}: {e})".strip()
    return None


def fresh_postgres_schema() -> tuple[str, str]:
    """Create an empty schema; return (url that uses it, schema name)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_base(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in postgres_base() else "?"
    return f"{postgres_base()}{sep}options={quote(f'-csearch_path={schema}')}", schema


def drop_postgres_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(postgres_base(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def postgres_schema_url(test: Cleanups) -> str:
    """The URL of a fresh schema that `test` drops when it ends."""
    url, schema = fresh_postgres_schema()
    test.addCleanup(drop_postgres_schema, schema)
    return url


def postgres_database(test: Cleanups) -> Database:
    """A Database on a fresh schema; `test` closes it, then drops the schema."""
    db = Database(postgres_schema_url(test))
    test.addCleanup(db.close)
    return db
