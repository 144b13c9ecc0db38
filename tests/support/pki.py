"""The lab PKI the tests share: one root CA, an intermediate and a foreign CA, made by the
real lab CA code; identities issued once and found again by kind and name."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from sixnet.pki.ca import LabCA
from sixnet.pki.store import CertificateStore, NodeIdentity


@dataclass(frozen=True)
class IdentityFiles:
    """What a ``[pki.identities.NAME]`` table names: the subject and its two PEM files."""

    subject: str
    certificate: Path
    key: Path


@dataclass
class LabPKI:
    root: LabCA
    sub: LabCA
    foreign: LabCA
    directory: Path

    @classmethod
    def create(cls, base: Path) -> LabPKI:
        root = LabCA.init(base / "root", name="sixnet test root CA")
        sub = root.issue_intermediate(base / "sub", "sixnet test intermediate CA")
        foreign = LabCA.init(base / "foreign", name="some other CA")
        return cls(root, sub, foreign, base)

    def store(self, **kwargs: object) -> CertificateStore:
        return CertificateStore.from_files(
            [self.root.directory / "ca.pem"], [self.root.directory / "crl.pem"], **kwargs
        )

    def files(self, kind: str, name: str, *, ca: LabCA | None = None,
              key_type: str = "ecdsa-p256") -> IdentityFiles:
        """Issue (once) an identity; where its files are."""
        issuer = ca or self.root
        out = self.directory / "issued" / issuer.directory.name / kind / name / key_type
        if not (out / "cert.pem").exists():
            issuer.issue(kind, name, key_type=key_type, out=out)
        return IdentityFiles(name, out / "cert.pem", out / "key.pem")

    def identity(self, kind: str, name: str, *, ca: LabCA | None = None,
                 key_type: str = "ecdsa-p256") -> NodeIdentity:
        """Issue (once) and load an identity."""
        files = self.files(kind, name, ca=ca, key_type=key_type)
        return NodeIdentity.load(name, files.certificate, files.key)

    def chain(self, kind: str, name: str, **kwargs: object) -> list[x509.Certificate]:
        return self.identity(kind, name, **kwargs).chain  # type: ignore[arg-type]


def utc(**delta: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(**delta)
