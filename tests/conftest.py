"""Shared fixtures: the lab PKI (tests/support/pki.py) made once per test session."""

from __future__ import annotations

import pytest

from .support.pki import LabPKI


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(autouse=True)
def _no_database_left_open(monkeypatch: pytest.MonkeyPatch):
    """Fail a test that leaves a Database open: its pool thread would hang interpreter exit."""
    from sixnet.core.storage.database import Database

    opened: list[Database] = []
    original = Database.__init__

    def tracking_init(self: Database, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        opened.append(self)

    monkeypatch.setattr(Database, "__init__", tracking_init)
    yield
    leaked = [db for db in opened if not db.closed]
    for db in leaked:
        db.close()
    if leaked:
        pytest.fail("the test left Database(s) open (close them, e.g. addCleanup(db.close)): "
                    + ", ".join(db.target for db in leaked), pytrace=False)
