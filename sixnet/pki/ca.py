"""A certificate authority kept in a directory: for labs, tests and the embedded default.

Layout of the directory (``sixnet pki init`` makes it)::

    ca.pem        the CA certificate (followed by its issuers, for an intermediate)
    ca.key        its private key, mode 0600
    index.json    every certificate issued: serial, kind, name, dates, revocation
    crl.pem       the current CRL, rewritten on every revocation
    issued/NAME/  cert.pem (the chain, leaf first) and key.pem of what the CA generated keys for
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sixnet.core.timefmt import parse_rfc3339, rfc3339
from sixnet.pki.identity import normalize_user_id, user_san
from sixnet.pki.keys import (
    DEFAULT_KEY_TYPE,
    PrivateKey,
    certificates_pem,
    generate_key,
    read_certificates,
    read_private_key,
    write_private_key,
    write_public_file,
)
from sixnet.pki.signing import certificate_hash

CA_DAYS = 3650
LEAF_DAYS = 365
CRL_DAYS = 7
#: Allowance for clocks that run a little behind ours.
BACKDATE = datetime.timedelta(minutes=5)


class CAError(Exception):
    """A lab CA operation cannot be done; the message says why."""


@dataclass
class IssuedRecord:
    serial: str  # upper-case hex, no separators
    kind: str  # "ca", "user", "host"
    name: str
    not_before: str
    not_after: str
    revoked_at: str | None = None
    reason: str | None = None


def serial_hex(serial: int) -> str:
    """Upper-case hex, zero-padded to whole bytes, as openssl prints serials."""
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text


def parse_serial(text: str) -> int:
    """Parse a serial as printed by ``sixnet pki list`` or openssl: hex, optional 0x and colons."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise CAError(f"{text!r} is not a certificate serial (hexadecimal)") from None
    if value <= 0:
        raise CAError(f"{text!r} is not a certificate serial (must be positive)")
    return value


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(
    *, digital_signature: bool = False, key_encipherment: bool = False, ca: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature or ca,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class LabCA:
    """A CA whose key and records live in one directory."""

    def __init__(self, directory: Path, key: PrivateKey, chain: list[x509.Certificate]) -> None:
        self.directory = directory
        self.key = key
        self.chain = chain  # the CA certificate first, then its issuers

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    # -- making and opening -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        name: str = "sixnet lab CA",
        key_type: str = DEFAULT_KEY_TYPE,
        days: int = CA_DAYS,
        force: bool = False,
    ) -> LabCA:
        """Create a self-signed root CA in `directory`."""
        key_path = directory / "ca.key"
        if key_path.exists() and not force:
            raise CAError(f"{key_path}: a CA already exists here (use --force to replace it)")
        key = generate_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, certificate_hash(key))
        )
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        write_private_key(key_path, key, force=force)
        write_public_file(directory / "ca.pem", certificates_pem([cert]))
        ca = cls(directory, key, [cert])
        with ca._index() as index:
            index.clear()
            index.append(ca._record(cert, "ca", name))
        ca.write_crl()
        return ca

    @classmethod
    def open(cls, directory: Path) -> LabCA:
        if not (directory / "ca.pem").exists():
            raise CAError(f"{directory}: no CA here (run 'sixnet pki init' first)")
        chain = read_certificates(directory / "ca.pem")
        key = read_private_key(directory / "ca.key")
        return cls(directory, key, chain)

    def issue_intermediate(
        self, directory: Path, name: str, *, key_type: str = DEFAULT_KEY_TYPE,
        days: int = CA_DAYS, force: bool = False,
    ) -> LabCA:
        """Create a subordinate CA in `directory`, signed by this one."""
        if (directory / "ca.key").exists() and not force:
            raise CAError(f"{directory / 'ca.key'}: a CA already exists here")
        key = generate_key(key_type)
        builder = self._leaf_builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key, days
        )
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(_key_usage(ca=True), critical=True)
        cert = builder.sign(self.key, certificate_hash(self.key))
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        write_private_key(directory / "ca.key", key, force=force)
        write_public_file(directory / "ca.pem", certificates_pem([cert, *self.chain]))
        with self._index() as index:
            index.append(self._record(cert, "ca", name))
        sub = LabCA(directory, key, [cert, *self.chain])
        with sub._index() as index:
            index.clear()
        sub.write_crl()
        return sub

    # -- issuing --------------------------------------------------------------------------

    def _leaf_builder(
        self, subject: x509.Name, key_or_public: object, days: int,
        not_before: datetime.datetime | None = None,
    ) -> x509.CertificateBuilder:
        public = (
            key_or_public.public_key()  # type: ignore[attr-defined]
            if hasattr(key_or_public, "private_bytes")
            else key_or_public
        )
        start = not_before if not_before is not None else _now() - BACKDATE
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + BACKDATE + datetime.timedelta(days=days))
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public), critical=False  # type: ignore[arg-type]
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.certificate.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
        )

    def sign_user(
        self,
        user_id: str,
        public_key: object,
        *,
        days: int = LEAF_DAYS,
        not_before: datetime.datetime | None = None,
    ) -> list[x509.Certificate]:
        """Certify `public_key` as person `user_id`; return the chain, leaf first.

        This is the one place user certificates are made: the ``issue-user`` command and the
        IRP registry's enrollment (from a CSR) both come here.
        """
        canonical = normalize_user_id(user_id)
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                          | ed25519.Ed25519PublicKey):
            raise CAError("only RSA, ECDSA and Ed25519 keys can be certified")
        if rsa_key and public_key.key_size < 2048:  # type: ignore[union-attr]
            raise CAError("RSA keys must be at least 2048 bits")
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]
        cert = (
            self._leaf_builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, canonical)]),
                public_key, days, not_before,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # key transport (RSA-OAEP in the chat handshake) needs keyEncipherment on RSA keys
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=rsa_key), critical=True
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(user_san(canonical), critical=False)
            .sign(self.key, certificate_hash(self.key))
        )
        with self._index() as index:
            index.append(self._record(cert, "user", canonical))
        return [cert, *self.chain[:-1]] if len(self.chain) > 1 else [cert]

    def sign_host(
        self, hostname: str, public_key: object, *, days: int = LEAF_DAYS,
        extra_names: tuple[str, ...] = (),
    ) -> list[x509.Certificate]:
        """Certify `public_key` as server `hostname` (dNSName SAN, serverAuth)."""
        names = [hostname, *extra_names]
        for n in names:
            if not n or any(c in n for c in " /@:\\") or "." not in n and n != "localhost":
                raise CAError(f"{n!r} is not a host name")
        san = x509.SubjectAlternativeName([x509.DNSName(n.lower()) for n in names])
        cert = (
            self._leaf_builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname.lower())]),
                public_key, days,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True,
                                      key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(san, critical=False)
            .sign(self.key, certificate_hash(self.key))
        )
        with self._index() as index:
            index.append(self._record(cert, "host", hostname.lower()))
        return [cert, *self.chain[:-1]] if len(self.chain) > 1 else [cert]

    def issue(
        self, kind: str, name: str, *, key_type: str = DEFAULT_KEY_TYPE,
        days: int = LEAF_DAYS, out: Path | None = None, force: bool = False,
        cert_path: Path | None = None, key_path: Path | None = None,
    ) -> tuple[Path, Path, list[x509.Certificate]]:
        """Generate a key and certify it.

        Writes ``cert.pem`` and ``key.pem`` under `out` (default ``issued/NAME`` in the CA
        directory), or to `cert_path` and `key_path` when given.
        """
        if kind == "user":
            name = normalize_user_id(name)
        target = out if out is not None else self.directory / "issued" / name
        key_path = key_path or target / "key.pem"
        cert_path = cert_path or target / "cert.pem"
        if key_path.exists() and not force:
            raise CAError(f"{key_path}: a key already exists (use --force to replace it)")
        key = generate_key(key_type)
        if kind == "user":
            chain = self.sign_user(name, key.public_key(), days=days)
        else:
            chain = self.sign_host(name, key.public_key(), days=days)
        write_private_key(key_path, key, force=force)
        write_public_file(cert_path, certificates_pem(chain))
        return cert_path, key_path, chain

    # -- revocation -------------------------------------------------------------------------

    def revoke(self, serial: int, reason: str = "unspecified") -> IssuedRecord:
        wanted = serial_hex(serial)
        with self._index() as index:
            for record in index:
                if record.serial == wanted:
                    if record.kind == "ca" and record.serial == serial_hex(
                        self.certificate.serial_number
                    ):
                        raise CAError("a CA cannot revoke its own certificate")
                    if record.revoked_at is None:
                        record.revoked_at = rfc3339(_now(), precision="seconds")
                        record.reason = reason
                    found = record
                    break
            else:
                raise CAError(f"no certificate with serial {wanted} was issued by this CA")
        self.write_crl()
        return found

    def is_revoked(self, serial: int) -> bool:
        wanted = serial_hex(serial)
        return any(r.serial == wanted and r.revoked_at for r in self.records())

    def build_crl(self) -> x509.CertificateRevocationList:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - BACKDATE)
            .next_update(now + datetime.timedelta(days=CRL_DAYS))
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.certificate.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        )
        for record in self.records():
            if record.revoked_at is None:
                continue
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(record.serial, 16))
                .revocation_date(parse_rfc3339(record.revoked_at))
                .build()
            )
        return builder.sign(self.key, certificate_hash(self.key))

    def write_crl(self) -> Path:
        path = self.directory / "crl.pem"
        write_public_file(path, self.build_crl().public_bytes(serialization.Encoding.PEM))
        return path

    # -- the index ----------------------------------------------------------------------------

    def records(self) -> list[IssuedRecord]:
        path = self.directory / "index.json"
        if not path.exists():
            return []
        return [IssuedRecord(**r) for r in json.loads(path.read_text())]

    @contextmanager
    def _index(self) -> Iterator[list[IssuedRecord]]:
        """The index, locked against other processes, written back atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.records()
            yield records
            write_public_file(
                self.directory / "index.json",
                json.dumps([asdict(r) for r in records], indent=1).encode(),
            )

    @staticmethod
    def _record(cert: x509.Certificate, kind: str, name: str) -> IssuedRecord:
        return IssuedRecord(
            serial=serial_hex(cert.serial_number),
            kind=kind,
            name=name,
            not_before=rfc3339(cert.not_valid_before_utc, precision="seconds"),
            not_after=rfc3339(cert.not_valid_after_utc, precision="seconds"),
        )
