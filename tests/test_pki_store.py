"""The certificate store refuses each kind of bad chain with its own error."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from sixnet.pki.ca import LabCA
from sixnet.pki.identity import (
    ID_ON_XMPPADDR,
    IdentitySyntaxError,
    _checked,
    _folded,
    normalize_user_id,
    user_ids_in,
)
from sixnet.pki.keys import generate_key
from sixnet.pki.store import VerificationError

from .support.pki import LabPKI, utc


def refused(pki: LabPKI, chain: list[x509.Certificate], purpose: str = "client",
            expected: str | None = None, **kw: object) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        pki.store().verify(chain, purpose, expected, **kw)  # type: ignore[arg-type]
    return info.value


def test_valid_user_certificate_names_its_person(pki: LabPKI) -> None:
    peer = pki.store().verify(pki.chain("user", "alice@example.test"), "client")
    assert peer.identity == "alice@example.test"
    assert peer.chain[-1] == pki.root.certificate


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa2048"])
def test_every_key_type_verifies(pki: LabPKI, key_type: str) -> None:
    chain = pki.chain("user", "kt@example.test", key_type=key_type)
    assert pki.store().verify(chain, "client", "kt@example.test").identity == "kt@example.test"


def test_expected_identity_is_matched_case_insensitively(pki: LabPKI) -> None:
    chain = pki.chain("user", "alice@example.test")
    peer = pki.store().verify(chain, "client", "Alice@EXAMPLE.test")
    assert peer.identity == "alice@example.test"


def test_valid_chain_through_intermediate(pki: LabPKI) -> None:
    chain = pki.chain("user", "dave@example.test", ca=pki.sub)
    assert len(chain) == 2
    peer = pki.store().verify(chain, "client", "dave@example.test")
    assert [c.subject for c in peer.chain] == [
        chain[0].subject, pki.sub.certificate.subject, pki.root.certificate.subject]


def test_host_certificate_verifies_for_its_name(pki: LabPKI) -> None:
    peer = pki.store().verify(pki.chain("host", "grid.example.test"), "server",
                              "grid.example.test")
    assert peer.identity == "grid.example.test"


def test_expired(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("user", "alice@example.test"), at=utc(days=400))
    assert e.check == "expired"
    assert "expired on" in str(e)


def test_not_yet_valid(pki: LabPKI) -> None:
    key = generate_key()
    chain = pki.root.sign_user("future@example.test", key.public_key(),
                               not_before=utc(days=2))
    e = refused(pki, chain)
    assert e.check == "not-yet-valid"


def test_foreign_ca_with_its_root(pki: LabPKI) -> None:
    chain = pki.chain("user", "alice@example.test", ca=pki.foreign)
    e = refused(pki, [*chain, pki.foreign.certificate])
    assert e.check == "untrusted-root"
    assert "some other CA" in str(e)


def test_foreign_ca_leaf_only(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("user", "alice@example.test", ca=pki.foreign))
    assert e.check == "unknown-issuer"


def test_foreign_ca_with_the_same_name_as_ours(pki: LabPKI, tmp_path) -> None:
    impostor = LabCA.init(tmp_path / "impostor", name="sixnet test root CA")
    _, _, chain = impostor.issue("user", "alice@example.test", out=tmp_path / "a")
    e = refused(pki, chain)
    assert e.check == "bad-signature"


def test_revoked(pki: LabPKI, tmp_path) -> None:
    _, _, chain = pki.root.issue("user", "revoked@example.test", out=tmp_path / "r")
    store = pki.store()
    assert store.verify(chain, "client").identity == "revoked@example.test"
    pki.root.revoke(chain[0].serial_number, "keyCompromise")
    store.reload_crls()
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client")
    assert info.value.check == "revoked"


def test_revoked_intermediate_refuses_its_leaves(tmp_path) -> None:
    root = LabCA.init(tmp_path / "root", name="r")
    sub = root.issue_intermediate(tmp_path / "sub", "s")
    _, _, chain = sub.issue("user", "x@example.test", out=tmp_path / "x")
    root.revoke(sub.certificate.serial_number)
    from sixnet.pki.store import CertificateStore

    store = CertificateStore.from_files([tmp_path / "root/ca.pem"], [tmp_path / "root/crl.pem"])
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client")
    assert info.value.check == "revoked"


def test_wrong_user_identity(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("user", "mallory@example.test"), expected="bob@example.test")
    assert e.check == "identity-mismatch"
    assert "mallory@example.test" in str(e) and "bob@example.test" in str(e)


def test_wrong_host_identity(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("host", "grid.example.test"), "server", "irp.example.test")
    assert e.check == "identity-mismatch"


def test_wrong_key_usage_host_certificate_as_client(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("host", "grid.example.test"))
    assert e.check == "key-usage"


def test_wrong_key_usage_user_certificate_as_server(pki: LabPKI) -> None:
    e = refused(pki, pki.chain("user", "alice@example.test"), "server", "alice.example.test")
    assert e.check == "key-usage"


def test_broken_signature(pki: LabPKI) -> None:
    leaf = pki.chain("user", "alice@example.test")[0]
    der = bytearray(leaf.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value
    e = refused(pki, [x509.load_der_x509_certificate(bytes(der))])
    assert e.check == "bad-signature"


def test_missing_intermediate(pki: LabPKI) -> None:
    chain = pki.chain("user", "dave@example.test", ca=pki.sub)
    e = refused(pki, chain[:1])
    assert e.check == "unknown-issuer"
    assert "intermediate" in str(e)


def test_leaf_used_as_issuer_is_not_a_ca(pki: LabPKI) -> None:
    alice = pki.identity("user", "alice@example.test")
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=eve@example.test"))
        .issuer_name(alice.certificate.subject)
        .public_key(generate_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(minutes=-1))
        .not_valid_after(utc(days=1))
        .sign(alice.key, hashes.SHA256())
    )
    e = refused(pki, [forged, alice.certificate])
    assert e.check in {"not-a-ca", "key-usage"}


def test_no_certificate(pki: LabPKI) -> None:
    assert refused(pki, []).check == "malformed"


def test_user_certificate_carries_rfc822_and_xmpp_addr(pki: LabPKI) -> None:
    leaf = pki.chain("user", "alice@example.test")[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.test"]
    others = san.get_values_for_type(x509.OtherName)
    assert [o.type_id for o in others] == [ID_ON_XMPPADDR]
    assert user_ids_in(leaf) == {"alice@example.test"}


def test_user_id_syntax() -> None:
    assert normalize_user_id("Alice@Example.Test.") == "alice@example.test"
    for bad in ["alice", "a@b@c", "@example.test", "alice@", "al ice@example.test",
                "alice@nodot"]:
        with pytest.raises(ValueError):
            normalize_user_id(bad)


_ASCII_IDS = st.builds(lambda local, domain: f"{local}@{domain}",
                       st.text(st.characters(max_codepoint=127, exclude_characters="@"),
                               max_size=12),
                       st.text(st.sampled_from("aZ.-09xn\x7f :"), max_size=16))


@given(_ASCII_IDS)
@settings(max_examples=500)
def test_ascii_user_ids_fold_as_the_general_path_does(user_id: str) -> None:
    """The ASCII shortcuts of `normalize_user_id` (ids already canonical, then lower case)
    agree with `_folded` (NFC, casefold, IDNA) on every ASCII id, accepted or refused."""
    local, domain = user_id.split("@")
    try:
        expected = _checked(user_id, *_folded(user_id, local, domain))
    except IdentitySyntaxError:
        expected = None
    try:
        got = normalize_user_id(user_id)
    except IdentitySyntaxError:
        got = None
    assert got == expected


def test_clock_is_injectable(pki: LabPKI) -> None:
    from sixnet.pki.store import CertificateStore

    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=4000)
    store = CertificateStore([pki.root.certificate], clock=lambda: later)
    with pytest.raises(VerificationError) as info:
        store.verify(pki.chain("user", "alice@example.test"), "client")
    assert info.value.check == "expired"


def test_refresh_crls_reads_changed_files_only(tmp_path) -> None:
    from sixnet.pki.store import CertificateStore

    ca = LabCA.init(tmp_path / "ca", name="refresh CA")
    _, _, chain = ca.issue("user", "r@example.test", out=tmp_path / "r")
    store = CertificateStore.from_files([tmp_path / "ca/ca.pem"], [tmp_path / "ca/crl.pem"])
    generation = store.generation
    assert store.refresh_crls() is False
    assert store.generation == generation  # TLS contexts are not rebuilt for nothing
    ca.revoke(chain[0].serial_number)
    assert store.refresh_crls() is True
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client")
    assert info.value.check == "revoked"


def test_a_remembered_verdict_still_honours_dates_and_new_crls(tmp_path) -> None:
    from sixnet.pki.store import CertificateStore

    ca = LabCA.init(tmp_path / "ca", name="cache CA")
    _, _, chain = ca.issue("user", "c@example.test", out=tmp_path / "c")
    store = CertificateStore.from_files([tmp_path / "ca/ca.pem"], [tmp_path / "ca/crl.pem"])
    first = store.verify(chain, "client")
    assert store.verify(chain, "client") is first  # remembered
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client", at=utc(days=400))
    assert info.value.check == "expired"
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client", "d@example.test")
    assert info.value.check == "identity-mismatch"
    ca.revoke(chain[0].serial_number)
    assert store.refresh_crls()
    with pytest.raises(VerificationError) as info:
        store.verify(chain, "client")
    assert info.value.check == "revoked"
