"""Shared fixtures: a lab PKI made once per test session by the real lab CA code."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from sixnet.pki.ca import LabCA
from sixnet.pki.store import CertificateStore, NodeIdentity


@dataclass
class LabPKI:
    root: LabCA
    sub: LabCA
    foreign: LabCA
    directory: Path

    def store(self, **kwargs: object) -> CertificateStore:
        return CertificateStore.from_files(
            [self.root.directory / "ca.pem"], [self.root.directory / "crl.pem"], **kwargs
        )

    def identity(self, kind: str, name: str, *, ca: LabCA | None = None,
                 key_type: str = "ecdsa-p256") -> NodeIdentity:
        """Issue (once) and load an identity: files under the PKI directory."""
        issuer = ca or self.root
        out = self.directory / "issued" / issuer.directory.name / kind / name / key_type
        if not (out / "cert.pem").exists():
            issuer.issue(kind, name, key_type=key_type, out=out)
        return NodeIdentity.load(name, out / "cert.pem", out / "key.pem")

    def chain(self, kind: str, name: str, **kwargs: object) -> list[x509.Certificate]:
        return self.identity(kind, name, **kwargs).chain  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    base = tmp_path_factory.mktemp("pki")
    root = LabCA.init(base / "root", name="sixnet test root CA")
    sub = root.issue_intermediate(base / "sub", "sixnet test intermediate CA")
    foreign = LabCA.init(base / "foreign", name="some other CA")
    return LabPKI(root, sub, foreign, base)


def utc(**delta: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(**delta)


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
