"""The registry's parts without a connection: requests as typed objects, the access table,
the lockout policy, and the verb map that joins them."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from lxml import etree
from twisted.internet.task import Clock

from sixnet.core.audit import AuditLog
from sixnet.core.errors import ConditionError
from sixnet.core.lockout import Failures
from sixnet.core.storage.database import Database
from sixnet.irp.client import make_csr
from sixnet.irp.config import IRPConfig
from sixnet.irp.engine.access import ACCESS, ANONYMOUS, OPERATOR, PERSON, ROLES, Caller, refusal
from sixnet.irp.engine.credentials import PasswordLockout
from sixnet.irp.engine.registry import Registry
from sixnet.irp.storage import SQLRegistryStore
from sixnet.irp.wire import (
    CONDITIONS,
    OPERATIONS,
    Address,
    BackupGetRequest,
    BackupPutRequest,
    CACertificatesRequest,
    CertificatesRequest,
    EnrollRequest,
    IRPError,
    Limits,
    ListUsersRequest,
    LookupRequest,
    RegisterRequest,
    RemoveRequest,
    RenewRequest,
    RevokeRequest,
    UnregisterRequest,
    UnwatchRequest,
    WatchRequest,
    parse_request,
)
from sixnet.pki.keys import generate_key

NS = "urn:sixnet:irp:1"


def parse(xml: str):
    """The request of `xml` written without the IRP namespace (the stream's default)."""
    return parse_request(etree.fromstring(re.sub(r"^<([a-z-]+)", rf'<\1 xmlns="{NS}"', xml)),
                         Limits())


def csr_b64() -> str:
    csr = make_csr(generate_key("ecdsa-p256"), "alice@example.test")
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode()


# -- the role x operation table ------------------------------------------------------------

#: What docs/irp.rst says each role may attempt; "A" anonymous, "P" person, "O" operator.
EXPECTED = {
    "enroll": "APO", "ca-certificates": "APO", "backup-get": "APO",
    "renew": "PO", "revoke": "PO", "register": "PO", "unregister": "PO", "lookup": "PO",
    "certificates": "PO", "watch": "PO", "unwatch": "PO", "backup-put": "PO",
    "list-users": "O", "remove": "O",
}


def test_access_table_every_role_and_operation() -> None:
    assert set(ACCESS) == set(OPERATIONS) == set(EXPECTED)
    letter = {ANONYMOUS: "A", PERSON: "P", OPERATOR: "O"}
    for op in OPERATIONS:
        for role in ROLES:
            error = refusal(role, op)
            if letter[role] in EXPECTED[op]:
                assert error is None, (role, op)
            elif role == ANONYMOUS:
                assert error is not None and error.condition == "not-authorized", (role, op)
            else:
                assert error is not None and error.condition == "forbidden", (role, op)


def test_caller_roles_and_audit_names() -> None:
    assert (Caller("192.0.2.1").role, Caller("192.0.2.1").actor) == (ANONYMOUS, "anonymous")
    person = Caller("192.0.2.1", "alice@example.test", "1A")
    assert (person.role, person.actor) == (PERSON, "alice@example.test")
    assert Caller(None, "root@example.test", operator=True).role == OPERATOR


@pytest.fixture
def registry(tmp_path: Path, pki) -> Registry:
    db = Database(f"sqlite:{tmp_path / 'irp.sqlite3'}")
    made = Registry(SQLRegistryStore(db), pki.store(), IRPConfig(),
                    AuditLog(tmp_path / "audit.jsonl"), reactor=Clock())
    yield made
    db.close()
    made.audit.close()


def test_every_request_type_has_an_operation(registry: Registry) -> None:
    """The verb map: one operation per request type, one request type per operation."""
    assert sorted(cls.op for cls in registry.operations) == sorted(OPERATIONS)


# -- requests as typed objects -----------------------------------------------------------------


def test_each_operation_parses_to_its_request_type() -> None:
    csr = csr_b64()
    requests = [
        (f'<enroll id="1" user="Alice@Example.test"><csr>{csr}</csr>'
         "<password>pw</password></enroll>", EnrollRequest),
        ('<ca-certificates id="2"/>', CACertificatesRequest),
        (f'<renew id="3"><csr>{csr}</csr></renew>', RenewRequest),
        ('<revoke id="4" serial="0x0a"/>', RevokeRequest),
        ('<register id="5" device="phone" lifetime="60"><address ip="2001:db8::1" port="5"/>'
         '<address ip="2001:db8:0::1" port="5"/></register>', RegisterRequest),
        ('<unregister id="6"/>', UnregisterRequest),
        ('<lookup id="7" user="bob@example.test"/>', LookupRequest),
        ('<certificates id="8" serial="1F"/>', CertificatesRequest),
        ('<watch id="9" user="bob@example.test"/>', WatchRequest),
        ('<unwatch id="10" user="bob@example.test"/>', UnwatchRequest),
        ('<backup-put id="11">AAEC</backup-put>', BackupPutRequest),
        ('<backup-get id="12" user="bob@example.test"><password>pw</password></backup-get>',
         BackupGetRequest),
        ('<list-users id="13" limit="5"/>', ListUsersRequest),
        ('<remove id="14" user="bob@example.test"/>', RemoveRequest),
    ]
    assert sorted(cls.op for _, cls in requests) == sorted(OPERATIONS)
    parsed = {cls: parse(xml) for xml, cls in requests}
    for cls, request in parsed.items():
        assert type(request) is cls and request.op == cls.op
    enroll = parsed[EnrollRequest]
    assert (enroll.id, enroll.user, enroll.password, enroll.code) == \
        ("1", "alice@example.test", "pw", None)
    assert parsed[RevokeRequest] == RevokeRequest("4", "A")
    assert parsed[RegisterRequest] == RegisterRequest(
        "5", None, "phone", 60, (Address("2001:db8::1", 5),))  # the repeat is dropped
    assert parsed[UnregisterRequest] == UnregisterRequest("6", None, None)
    # RFC 5952 text; an IPv4-mapped address in its section 5 mixed form
    mapped = parse('<register id="5"><address ip="::FFFF:c000:0201" port="5"/>'
                   '<address ip="2001:DB8:0:0::1" port="5"/></register>')
    assert [a.ip for a in mapped.addresses] == ["::ffff:192.0.2.1", "2001:db8::1"]
    assert parsed[CertificatesRequest] == CertificatesRequest("8", None, "1F")
    assert parsed[BackupPutRequest] == BackupPutRequest("11", None, b"\x00\x01\x02")
    assert parsed[ListUsersRequest] == ListUsersRequest("13", None, 5)
    assert parsed[RemoveRequest].target == "bob@example.test"
    assert parsed[RevokeRequest].target == "A" and parsed[UnregisterRequest].target is None


@pytest.mark.parametrize(("xml", "condition"), [
    ('<nonsense id="1"/>', "feature-not-implemented"),
    ("<lookup user='bob@example.test'/>", "bad-request"),  # no id
    ('<lookup id="a b" user="bob@example.test"/>', "bad-request"),
    ('<lookup id="1"/>', "bad-request"),
    ('<lookup id="1" user="not a user"/>', "bad-request"),
    ('<enroll id="1" user="a@example.test"><csr>AAAA</csr></enroll>', "bad-request"),
    ('<enroll id="1" user="a@example.test"><csr>!!</csr><code>X</code></enroll>',
     "bad-request"),
    ('<enroll id="1" user="a@example.test"><password>p</password><code>X</code></enroll>',
     "bad-request"),
    ('<register id="1"/>', "bad-request"),
    ('<register id="1" device="a b"><address ip="::1" port="1"/></register>', "bad-request"),
    ('<register id="1" lifetime="0"><address ip="::1" port="1"/></register>', "bad-request"),
    ('<register id="1"><address ip="ff02::1" port="1"/></register>', "bad-request"),
    ('<register id="1"><address ip="::1" port="65536"/></register>', "bad-request"),
    ('<register id="1"><address ip="fe80::1%eth0" port="1"/></register>', "bad-request"),
    ("<register id='1'>" + "<address ip='::1' port='1'/>" * 9 + "</register>",
     "policy-violation"),
    ('<unregister id="1" device="!"/>', "bad-request"),
    ('<certificates id="1"/>', "bad-request"),
    ('<certificates id="1" user="a@example.test" serial="1"/>', "bad-request"),
    ('<revoke id="1" serial="0"/>', "bad-request"),
    ('<revoke id="1" serial="xyz"/>', "bad-request"),
    ('<backup-put id="1"/>', "bad-request"),
    ('<backup-put id="1">' + "A" * 44_000 + "</backup-put>", "policy-violation"),
    ('<backup-get id="1"><password>p</password></backup-get>', "bad-request"),
    ('<backup-get id="1" user="a@example.test"><code>c</code></backup-get>', "bad-request"),
    ('<list-users id="1" limit="1001"/>', "bad-request"),
    ('<list-users id="1" limit="-1"/>', "bad-request"),
])
def test_malformed_requests_are_irp_errors(xml: str, condition: str) -> None:
    with pytest.raises(IRPError) as raised:
        parse(xml)
    assert raised.value.condition == condition


def test_irp_errors_are_condition_errors_of_the_spec() -> None:
    assert IRPError.conditions == frozenset(CONDITIONS)
    error = IRPError("locked", "try later")
    assert isinstance(error, ConditionError) and str(error) == "locked: try later"
    with pytest.raises(ValueError, match="not a defined condition"):
        IRPError("not-well-formed", "a stream error, not a request error")


# -- what wrong passwords cost ----------------------------------------------------------------


def test_lockout_counts_failures_and_locks_for_a_while() -> None:
    lockout = PasswordLockout(after=3, seconds=60, delay=0.5)
    assert lockout.delay == 0.5
    assert not lockout.refuses(Failures(), 0)  # no record yet (any user id, account or not)
    failures = Failures()
    for now in (1000, 2000):
        failures = lockout.failed(failures, now)
        assert not lockout.refuses(failures, now)
    failures = lockout.failed(failures, 3000)
    assert failures == Failures(3, 63_000)
    assert lockout.refuses(failures, 62_999) and not lockout.refuses(failures, 63_000)
    # the count stands after the lock runs out: the next failure locks again at once
    assert lockout.refuses(lockout.failed(failures, 70_000), 70_000)
