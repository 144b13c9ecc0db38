"""The spec's test vector for signed answers (docs/irp.rst, "Test vector"), made by the real
code: the document's bytes must be what the registry's signer writes, and must pass
everything a client MUST check."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from lxml import etree

from sixnet.irp.wire import (
    Address,
    DeviceRecord,
    IRPError,
    PersonRecord,
    RecordStatement,
    ResponseSigner,
    Statement,
    check_record,
    check_statement,
    person_payload,
    q,
    signed_data,
    signed_parts,
    signed_record,
    verify_signature,
)

SPEC = Path(__file__).parent.parent / "docs" / "irp.rst"
SEED = bytes(range(32))
SIGNED_AT = datetime.datetime(2026, 11, 22, 1, 2, 3, 456000, tzinfo=datetime.UTC)
STATEMENT = Statement(op="lookup", request="7", registry="irp.example.test",
                      time="2026-11-22T01:02:03.456Z", not_after="2026-11-22T01:07:03.456Z",
                      requester="alice@example.test", subject="bob@example.test")
ASKED = {"op": "lookup", "request": "7", "requester": "alice@example.test",
         "subject": "bob@example.test", "serial": None}


RECORD = RecordStatement(subject="bob@example.test", version=1795309263456,
                         registry="irp.example.test", time="2026-11-22T01:02:03.456Z",
                         not_after="2026-11-22T01:07:03.456Z")


def vector() -> tuple[str, bytes]:
    """The registry certificate (PEM) and the signed ``<result>``, from the real code."""
    pem, key, certificate, payload = _parts()
    data = signed_data(STATEMENT, payload)
    signature = ResponseSigner(key, certificate).signature(data)
    return pem, b'<result xmlns="urn:sixnet:irp:1" id="7">' + data + signature + b"</result>"


def record_vector() -> bytes:
    """The 1.2 answer to the same lookup: bob's signed record, the same for every caller."""
    _, key, certificate, payload = _parts()
    record = signed_record(RECORD, payload)
    signature = ResponseSigner(key, certificate).signature(record)
    return b'<result xmlns="urn:sixnet:irp:1" id="7">' + record + signature + b"</result>"


def _parts() -> tuple[str, ed25519.Ed25519PrivateKey, x509.Certificate, bytes]:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(SEED)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "irp.example.test")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2036, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("irp.example.test")]),
                       critical=False)
        .sign(key, None))  # Ed25519: deterministic, so the bytes are fixed
    registered = SIGNED_AT - datetime.timedelta(minutes=1)
    record = PersonRecord("bob@example.test", (DeviceRecord(
        "phone", (Address.parse("2001:db8::7", 4605),), registered,
        registered + datetime.timedelta(hours=1)),))
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    return pem, key, certificate, person_payload(record)


def spec_block(marker: str) -> str:
    """The literal block after the comment ``.. irp-vector: MARKER`` in the spec."""
    text = SPEC.read_text()
    match = re.search(rf"^\.\. irp-vector: {marker}\n\n(?:[^\n]+\n)*?[^\n]*::\n\n"
                      r"((?:  [^\n]*\n)+)", text, re.MULTILINE)
    assert match is not None, f"no test vector {marker!r} in {SPEC.name}"
    return "".join(line[2:] + "\n" for line in match.group(1).splitlines())


def test_the_spec_shows_the_vector_the_code_makes() -> None:
    pem, result = vector()
    assert spec_block("certificate") == pem
    # one element per line in the document: joined without separators they are the bytes
    assert spec_block("result").replace("\n", "") == result.decode()
    assert spec_block("result") == result.decode().replace("><", ">\n<") + "\n"


def test_the_spec_vector_passes_every_check_a_client_must_make() -> None:
    certificate = x509.load_pem_x509_certificate(spec_block("certificate").encode())
    node = etree.fromstring(spec_block("result").replace("\n", "").encode())
    data, signature = signed_parts(node)
    verify_signature(data, signature, certificate)
    now = SIGNED_AT + datetime.timedelta(seconds=1)
    check_statement(data, now=now, **ASKED)
    assert data.find(q("person")).get("id") == "bob@example.test"


@pytest.mark.parametrize(("change", "message"), [
    ({"requester": "mallory@example.test"}, "requester is 'alice@example.test'"),
    ({"requester": None}, "requester is 'alice@example.test', not None"),
    ({"subject": "carol@example.test"}, "subject is 'bob@example.test'"),
    ({"op": "watch"}, "op is 'lookup'"),
    ({"request": "8"}, "request is '7'"),
    ({"serial": "1F"}, "serial is None"),
    ({"now": SIGNED_AT + datetime.timedelta(minutes=5)}, "expired at 2026-11-22T01:07:03.456Z"),
    ({"now": SIGNED_AT - datetime.timedelta(minutes=6)}, "in the future"),
])
def test_an_answer_to_another_query_or_requester_or_too_old_is_refused(change, message) -> None:
    _, result = vector()
    data = etree.fromstring(result).find(q("data"))
    asked = {**ASKED, "now": SIGNED_AT, **change}
    with pytest.raises(IRPError, match=re.escape(message)):
        check_statement(data, **asked)


def test_an_answer_without_a_validity_window_is_refused() -> None:
    _, result = vector()
    data = etree.fromstring(result).find(q("data"))
    del data.attrib["not-after"]
    with pytest.raises(IRPError, match="no not-after"):
        check_statement(data, now=SIGNED_AT, **ASKED)


def test_the_spec_shows_the_record_vector_the_code_makes() -> None:
    result = record_vector()
    assert spec_block("record").replace("\n", "") == result.decode()
    assert spec_block("record") == result.decode().replace("><", ">\n<") + "\n"


def test_the_record_vector_passes_every_check_a_1_2_client_must_make() -> None:
    certificate = x509.load_pem_x509_certificate(spec_block("certificate").encode())
    node = etree.fromstring(spec_block("record").replace("\n", "").encode())
    record, signature = signed_parts(node)
    assert record.tag == q("record")
    verify_signature(record, signature, certificate)
    now = SIGNED_AT + datetime.timedelta(seconds=1)
    assert check_record(record, subject="bob@example.test", now=now,
                        seen=RECORD.version) == RECORD.version


@pytest.mark.parametrize(("change", "message"), [
    ({"subject": "carol@example.test"}, "subject is 'bob@example.test'"),
    ({"seen": RECORD.version + 1}, f"older than version {RECORD.version + 1}"),
    ({"now": SIGNED_AT + datetime.timedelta(minutes=5)}, "expired at 2026-11-22T01:07:03.456Z"),
    ({"now": SIGNED_AT - datetime.timedelta(minutes=6)}, "in the future"),
])
def test_a_record_of_another_person_older_or_too_old_is_refused(change, message) -> None:
    record = etree.fromstring(record_vector()).find(q("record"))
    asked = {"subject": "bob@example.test", "now": SIGNED_AT, "seen": None, **change}
    with pytest.raises(IRPError, match=re.escape(message)):
        check_record(record, **asked)
