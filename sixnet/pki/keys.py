"""Private keys and PEM files: generation, and reading and writing with safe permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)

PrivateKey = CertificateIssuerPrivateKeyTypes

#: Key types the lab CA can make; ECDSA P-256 is the default (the widest client support).
KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa2048", "rsa3072", "rsa4096")
DEFAULT_KEY_TYPE = "ecdsa-p256"


class KeyFileError(Exception):
    """A key or certificate file is missing, unreadable or unsafe."""


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """Make a new private key of one of `KEY_TYPES`."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type.startswith("rsa") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise ValueError(f"unknown key type {key_type!r} (choose one of {', '.join(KEY_TYPES)})")


def write_private_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600; never replace a key unless forced."""
    if path.exists() and not force:
        raise FileExistsError(f"{path}: a key already exists (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key, refusing a file that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key file does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path}: private key file has mode {stat.S_IMODE(mode):04o}; it must be 0600"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: not a PEM private key ({e})") from None
    return key  # type: ignore[return-value]


def write_public_file(path: Path, data: bytes) -> None:
    """Write a certificate, chain or CRL atomically (mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Read every certificate in a PEM file, in file order (leaf first for a chain)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: certificate file does not exist") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise KeyFileError(f"{path}: no PEM certificate in it ({e})") from None
    return certs


def certificates_pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
