"""IRP answer signatures follow sixnet.pki.signing's table (P-521 with SHA-512)."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree

from sixnet.irp.wire import IRPError, ResponseSigner, Statement, signed_data, verify_signature
from sixnet.pki import signing


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "irp.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, signing.certificate_hash(key)))


def _signed(signer: ResponseSigner) -> tuple[etree._Element, etree._Element]:
    message = signed_data(Statement("lookup", "7", "irp.example.test",
                                    "2026-12-02T12:00:00.000Z", "2026-12-02T12:05:00.000Z"), b"")
    return etree.fromstring(message), etree.fromstring(signer.signature(message))


def test_a_p521_registry_key_signs_ecdsa_sha512() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    certificate = _self_signed(key)
    data, signature = _signed(ResponseSigner(key, certificate))
    assert signature.get("alg") == "ecdsa-sha512"
    verify_signature(data, signature, certificate)
    raw = base64.b64decode(signature.text or "")
    key.public_key().verify(raw, etree.tostring(data, method="c14n", exclusive=True),
                            ec.ECDSA(hashes.SHA512()))
    signature.set("alg", "ecdsa-sha384")  # the old reading of P-521 is refused
    with pytest.raises(IRPError, match="does not fit"):
        verify_signature(data, signature, certificate)
