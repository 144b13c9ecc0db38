"""The certificate store every service shares: trust anchors, this node's identities, CRLs.

`CertificateStore.verify` is the one place a peer's certificate is judged. Path building,
signatures, validity and key usage are checked by `cryptography`'s RFC 5280 verifier;
revocation (which that verifier lacks) and the identity binding are checked here. When the
verifier refuses a chain, the store works out which check failed, so the error says so.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID
from service_identity import VerificationError as HostMismatch
from service_identity.cryptography import verify_certificate_hostname

from sixnet.core.config import Settings
from sixnet.core.errors import ConditionError, ConfigError
from sixnet.pki.ca import serial_hex
from sixnet.pki.identity import IdentitySyntaxError, normalize_user_id, user_ids_in
from sixnet.pki.keys import KeyFileError, PrivateKey, read_certificates, read_private_key

Purpose = Literal["client", "server"]

#: The checks `verify` can fail, each with its own error (``VerificationError.check``).
CHECKS = (
    "malformed",          # no certificate, or not parseable
    "expired",            # a certificate's notAfter is past
    "not-yet-valid",      # a certificate's notBefore is in the future
    "untrusted-root",     # the chain ends in a self-signed certificate that is not a trust anchor
    "unknown-issuer",     # an issuer is neither in the chain nor a trust anchor
    "bad-signature",      # a certificate's signature does not verify with its issuer's key
    "not-a-ca",           # an issuing certificate lacks basicConstraints CA or keyCertSign
    "key-usage",          # the leaf's keyUsage/extendedKeyUsage does not allow the purpose
    "revoked",            # a certificate in the chain is on its issuer's CRL
    "identity-mismatch",  # the certificate does not name the expected user or host
    "no-identity",        # a client certificate names no person (or more than one)
    "invalid-chain",      # refused by the path verifier for another RFC 5280 reason
)


#: Verdicts kept for repeated verifications of the same chain (reconnecting peers).
VERIFIED_CACHE_SIZE = 4096


class VerificationError(ConditionError):
    """A peer's certificate was refused; `check` (the condition) names the check that failed."""

    conditions = frozenset(CHECKS)

    @property
    def check(self) -> str:
        return self.condition

    @property
    def detail(self) -> str:
        return self.text


def certificate_facts(cert: x509.Certificate) -> dict[str, str]:
    """What a security event says of a certificate: serial (hex, as openssl prints it),
    issuer, and the people it names (public: certificates travel in the clear)."""
    facts = {"serial": serial_hex(cert.serial_number), "issuer": cert.issuer.rfc4514_string()}
    try:
        names = user_ids_in(cert)
    except ValueError:  # a malformed extension: the certificate is refused anyway
        names = set()
    if names:
        facts["names"] = ",".join(sorted(names))[:200]
    return facts


@dataclass(frozen=True)
class VerifiedPeer:
    """What a successful verification proves: who the peer is and the path that shows it."""

    identity: str
    purpose: Purpose
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


@dataclass
class NodeIdentity:
    """One of this node's own identities: a certificate chain (leaf first) and its key."""

    name: str
    chain: list[x509.Certificate]
    key: PrivateKey = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @classmethod
    def load(cls, name: str, certificate: Path, key: Path) -> NodeIdentity:
        return cls(name, read_certificates(certificate), read_private_key(key))


def _sign_verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    public = issuer.public_key()
    if not isinstance(
        public,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return False
    try:
        return crl.is_signature_valid(public)
    except (ValueError, TypeError):
        return False


class CertificateStore:
    """Trust anchors, CRLs and this node's identities; shared by every service of a process."""

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        *,
        crls: Iterable[x509.CertificateRevocationList] = (),
        crl_files: Iterable[Path] = (),
        identities: Iterable[NodeIdentity] = (),
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        if not anchors:
            raise ValueError("a certificate store needs at least one trust anchor")
        self.anchors = list(anchors)
        self._trusted = xv.Store(self.anchors)
        #: Whether the current CRL of an issuer verifies with that issuer's key, by issuer.
        self._crl_signature_ok: dict[x509.Certificate, bool] = {}
        self._verified: OrderedDict[tuple[object, ...], tuple[
            int, datetime.datetime, datetime.datetime, VerifiedPeer]] = OrderedDict()
        self._crls: dict[bytes, x509.CertificateRevocationList] = {}
        self.identities = {i.name: i for i in identities}
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        #: Bumped whenever the CRLs change, so TLS contexts know to rebuild themselves.
        self.generation = 0
        self._revocations = (-1, "")
        self._extra_crls = list(crls)
        #: CRL files read again by `reload_crls` (after ``sixnet pki revoke``).
        self.crl_files = list(crl_files)
        self.reload_crls()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_files(
        cls,
        anchor_files: Iterable[Path],
        crl_files: Iterable[Path] = (),
        identities: Iterable[NodeIdentity] = (),
    ) -> CertificateStore:
        anchors = [c for p in anchor_files for c in read_certificates(p)]
        return cls(anchors, crl_files=crl_files, identities=identities)

    def refresh_crls(self) -> bool:
        """Read the CRL files again if any changed since the last read; say whether they did."""
        stamps = self._crl_stamps()
        if stamps == self._stamps:
            return False
        self.reload_crls()
        return True

    def _crl_stamps(self) -> list[tuple[int, int]]:
        stamps = []
        for path in self.crl_files:
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamps.append((0, 0))
        return stamps

    def reload_crls(self) -> None:
        """Read the configured CRL files again (after ``sixnet pki revoke``)."""
        self._stamps = self._crl_stamps()
        self._crls.clear()
        self._crl_signature_ok.clear()
        for crl in self._extra_crls:
            self._index_crl(crl)
        for path in self.crl_files:
            data = path.read_bytes()
            loader = (
                x509.load_pem_x509_crl if b"-----BEGIN" in data else x509.load_der_x509_crl
            )
            self._index_crl(loader(data))
        self.generation += 1

    def add_crl(self, crl: x509.CertificateRevocationList) -> None:
        """Add a CRL that is not read from a file (kept across `reload_crls`)."""
        self._extra_crls.append(crl)
        self._index_crl(crl)
        self.generation += 1

    def _index_crl(self, crl: x509.CertificateRevocationList) -> None:
        """Keep the newest CRL of each issuer: an older one would hide later revocations."""
        key = crl.issuer.public_bytes()
        current = self._crls.get(key)
        if current is None or current.last_update_utc <= crl.last_update_utc:
            self._crls[key] = crl
            self._crl_signature_ok.clear()

    def crls(self) -> list[x509.CertificateRevocationList]:
        return list(self._crls.values())

    @property
    def revocations(self) -> str:
        """The CRLs in use, as a digest: the same in every process that read the same CRLs
        (the registry's workers), so what one signed under them another may reuse."""
        if self._revocations[0] != self.generation:
            digest = hashlib.sha256()
            for fingerprint in sorted(c.fingerprint(hashes.SHA256()) for c in self._crls.values()):
                digest.update(fingerprint)
            self._revocations = (self.generation, digest.hexdigest()[:32])
        return self._revocations[1]

    def identity(self, name: str) -> NodeIdentity:
        try:
            return self.identities[name]
        except KeyError:
            raise KeyError(f"no identity named {name!r} in the certificate store") from None

    # -- verification ------------------------------------------------------------------------

    def now(self) -> datetime.datetime:
        return self._clock()

    def verify(
        self,
        chain: Sequence[x509.Certificate],
        purpose: Purpose,
        expected: str | None = None,
        *,
        at: datetime.datetime | None = None,
    ) -> VerifiedPeer:
        """Verify a peer's chain (leaf first) for `purpose`; return who it proves the peer is.

        `expected` is a user id (``alice@example.test``) for a client, a host name for a
        server; a server always needs one. Raises `VerificationError` naming the failed check.
        """
        if not chain:
            raise VerificationError("malformed", "the peer sent no certificate")
        when = at or self.now()
        key = (tuple(chain), purpose, expected)
        cached = self._verified.get(key)
        if cached is not None and cached[0] == self.generation and \
                cached[1] <= when <= cached[2]:
            self._verified.move_to_end(key)
            return cached[3]
        peer = self._verify_uncached(chain, purpose, expected, when)
        # Only the dates and the CRLs can change the verdict on the same chain: keep it for
        # repeated handshakes while the CRLs stay the same and the whole path is valid.
        self._verified[key] = (
            self.generation,
            max(c.not_valid_before_utc for c in peer.chain),
            min(c.not_valid_after_utc for c in peer.chain),
            peer,
        )
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return peer

    def _verify_uncached(self, chain: Sequence[x509.Certificate], purpose: Purpose,
                         expected: str | None, when: datetime.datetime) -> VerifiedPeer:
        leaf, intermediates = chain[0], list(chain[1:])
        builder = xv.PolicyBuilder().store(self._trusted).time(when)
        try:
            if purpose == "client":
                verified = builder.build_client_verifier().verify(leaf, intermediates)
                path = list(verified.chain)
            elif purpose == "server":
                if not expected:
                    raise ValueError("verifying a server needs the expected host name")
                verifier = builder.build_server_verifier(xv.DNSName(expected.lower()))
                path = list(verifier.verify(leaf, intermediates))
            else:
                raise ValueError(f"unknown purpose {purpose!r}")
        except xv.VerificationError as e:
            raise self._diagnose(leaf, intermediates, purpose, expected, when, str(e)) from None
        self._check_revocation(path, when)
        identity = self._check_identity(leaf, purpose, expected)
        return VerifiedPeer(identity, purpose, tuple(path))

    def revocation_status(self, cert: x509.Certificate) -> x509.RevokedCertificate | None:
        """The CRL entry for `cert` from a CRL its issuer signed, or None."""
        crl = self._crls.get(_issuer_name(cert))
        if crl is None:
            return None
        return crl.get_revoked_certificate_by_serial_number(cert.serial_number)

    def _check_revocation(self, path: list[x509.Certificate], when: datetime.datetime) -> None:
        for cert, issuer in zip(path, path[1:], strict=False):
            crl = self._crls.get(cert.issuer.public_bytes())
            if crl is not None and self._crl_trusted(crl, issuer):
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None and entry.revocation_date_utc <= when:
                    raise VerificationError(
                        "revoked",
                        f"certificate {serial_hex(cert.serial_number)} "
                        f"({cert.subject.rfc4514_string()}) was revoked on "
                        f"{entry.revocation_date_utc:%Y-%m-%d %H:%M:%SZ}",
                    )

    def _crl_trusted(self, crl: x509.CertificateRevocationList,
                     issuer: x509.Certificate) -> bool:
        """Whether `issuer` signed `crl`; checked once per CRL, not on every verification."""
        ok = self._crl_signature_ok.get(issuer)
        if ok is None:
            ok = self._crl_signature_ok[issuer] = _crl_signed_by(crl, issuer)
        return ok

    def _check_identity(self, leaf: x509.Certificate, purpose: Purpose,
                        expected: str | None) -> str:
        if purpose == "server":
            assert expected is not None
            try:
                verify_certificate_hostname(leaf, expected)
            except HostMismatch:
                raise VerificationError(
                    "identity-mismatch", f"the certificate is not for host {expected!r}"
                ) from None
            return expected.lower()
        names = user_ids_in(leaf)
        if expected is not None:
            try:
                wanted = normalize_user_id(expected)
            except IdentitySyntaxError as e:
                raise VerificationError("identity-mismatch", str(e)) from None
            if wanted not in names:
                shown = ", ".join(sorted(names)) or "no person"
                raise VerificationError(
                    "identity-mismatch",
                    f"the certificate names {shown}, not {wanted}",
                )
            return wanted
        if len(names) != 1:
            raise VerificationError(
                "no-identity",
                "the certificate names no person" if not names
                else f"the certificate names several people: {', '.join(sorted(names))}",
            )
        return names.pop()

    def _diagnose(
        self,
        leaf: x509.Certificate,
        intermediates: list[x509.Certificate],
        purpose: Purpose,
        expected: str | None,
        when: datetime.datetime,
        reason: str,
    ) -> VerificationError:
        """Work out which check made the path verifier refuse the chain."""
        # Walk up from the leaf as a path builder would, checking each link.
        cert = leaf
        seen = 0
        pool = list(intermediates)
        anchor_names = {a.subject.public_bytes(): a for a in self.anchors}
        while seen < 10:
            seen += 1
            label = cert.subject.rfc4514_string() or "(empty subject)"
            if cert.not_valid_after_utc < when:
                return VerificationError(
                    "expired",
                    f"{label} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
                )
            if cert.not_valid_before_utc > when:
                return VerificationError(
                    "not-yet-valid",
                    f"{label} is not valid before "
                    f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}",
                )
            if cert is leaf:
                problem = self._leaf_usage_problem(leaf, purpose)
                if problem:
                    return VerificationError("key-usage", problem)
            issuer_name = cert.issuer.public_bytes()
            anchor = anchor_names.get(issuer_name)
            if anchor is not None:
                if not _sign_verifies(cert, anchor):
                    return VerificationError(
                        "bad-signature",
                        f"the signature on {label} does not verify with the key of "
                        f"trust anchor {anchor.subject.rfc4514_string()}",
                    )
                break
            candidates = [c for c in pool if c.subject.public_bytes() == issuer_name]
            if not candidates:
                if cert.issuer == cert.subject and cert is not leaf:
                    return VerificationError(
                        "untrusted-root",
                        f"the chain ends at {label}, which is not a trust anchor",
                    )
                if cert.issuer == cert.subject:
                    return VerificationError(
                        "untrusted-root",
                        f"{label} is self-signed and not a trust anchor",
                    )
                return VerificationError(
                    "unknown-issuer",
                    f"the issuer of {label} ({cert.issuer.rfc4514_string()}) is neither in "
                    "the chain sent nor a trust anchor",
                )
            issuer = candidates[0]
            pool.remove(issuer)
            if not _sign_verifies(cert, issuer):
                return VerificationError(
                    "bad-signature",
                    f"the signature on {label} does not verify with the key of "
                    f"{issuer.subject.rfc4514_string()}",
                )
            if not _is_ca(issuer):
                return VerificationError(
                    "not-a-ca", f"{issuer.subject.rfc4514_string()} may not issue certificates"
                )
            cert = issuer
        if purpose == "server" and expected:
            try:
                verify_certificate_hostname(leaf, expected)
            except HostMismatch:
                return VerificationError(
                    "identity-mismatch", f"the certificate is not for host {expected!r}"
                )
        return VerificationError("invalid-chain", reason)

    @staticmethod
    def _leaf_usage_problem(leaf: x509.Certificate, purpose: Purpose) -> str | None:
        wanted = (
            ExtendedKeyUsageOID.CLIENT_AUTH if purpose == "client"
            else ExtendedKeyUsageOID.SERVER_AUTH
        )
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is not None and wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE \
                not in eku:
            return f"the certificate's extendedKeyUsage does not allow {purpose} authentication"
        try:
            ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            return None
        if not ku.digital_signature:
            return "the certificate's keyUsage lacks digitalSignature"
        return None


@functools.lru_cache(maxsize=20_000)
def _issuer_name(cert: x509.Certificate) -> bytes:
    """The DER of `cert`'s issuer name, kept per certificate: building the name costs more
    than finding the CRL entry, and a person's record asks for it on every change."""
    return cert.issuer.public_bytes()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def store_from_config(config: Settings) -> CertificateStore:
    """The certificate store described by the ``[pki]`` section."""
    identities = []
    for name, ident in config.pki.identities.items():
        try:
            identities.append(NodeIdentity.load(name, ident.certificate, ident.key))
        except KeyFileError as e:
            raise ConfigError(str(config.path), f"pki.identities.{name}", str(e)) from None
    try:
        return CertificateStore.from_files(config.pki.trust_anchors, config.pki.crls,
                                           identities)
    except (KeyFileError, ValueError) as e:
        raise ConfigError(str(config.path), "pki", str(e)) from None
