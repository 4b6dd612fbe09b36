"""Workload identity: Bastion's own certificate authority and SPIFFE X.509-SVIDs.

The api, the gateway and the worker authenticate each other with short-lived
X.509-SVIDs (SPIFFE X.509-SVID specification, sections 2 and 4): a leaf
certificate whose one URI SAN is the workload's SPIFFE ID
``spiffe://<trust-domain>/bastion/<process>``, signed by an intermediate, which
is signed by the root. Both CA private keys live in the key ring
(:class:`~bastion.secrets.protocols.Keystore`), never in a file; the leaf's key
exists only in the process's memory (handed to OpenSSL through an anonymous
memory file, :func:`_load_chain`).

The intermediate rotates with overlap: each rotation is a new version of its
key-ring secret, and every version not retired keeps vouching for the leaves it
signed. Retiring a version stops that at once: :class:`PeerVerifier` accepts
a leaf only if an *active* intermediate signed it (RFC 5280 section 6 path
validation against the root is done by OpenSSL during the handshake; the
validity period, the issuing intermediate and the SPIFFE ID are checked here,
so a refusal can name the ID that was presented).

Each process renews its SVID at half-life (:meth:`WorkloadTls.renew_due`) and
loads it into its live :class:`ssl.SSLContext` objects: new handshakes get the
new certificate, open connections keep theirs.

Or a process takes its SVID from files another issuer keeps current
(:class:`SvidFiles`, ``settings.workload_svid_dir``): ``svid.pem`` (the leaf
then its chain), ``svid.key`` and ``bundle.pem`` (the trust anchors), as
cert-manager's Secret volume or SPIRE's spiffe-helper write them. It re-reads
them when they change and needs no CA key at all.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.logs import get_logger
from bastion.secrets.errors import SecretNotFound
from bastion.secrets.protocols import Keystore

_log = get_logger("bastion.workload")

ROOT_SECRET = "workload/root-ca"  # noqa: S105 - a secret's name, not a secret
INTERMEDIATE_SECRET = "workload/intermediate-ca"  # noqa: S105 - a name
WORKLOADS = ("api", "gateway", "worker")
DEFAULT_TRUST_DOMAIN = "bastion.internal"
SVID_LIFETIME = timedelta(hours=1)  # CHECKLIST I8: short-lived, at most an hour
ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=30)
SERVER_CERT_LIFETIME = timedelta(days=30)  # development HTTPS certificates
# Leaves start this long in the past: a peer whose clock is slightly behind
# must not see a certificate from the future.
BACKDATE = timedelta(seconds=30)
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake checks the chain to the
# root; the validity period is checked by PeerVerifier, which can then say
# whose certificate expired (the refusal is audited with the presented ID).
_NO_CHECK_TIME = 0x200000
# A retirement reaches the verifiers within this long.
INTERMEDIATE_REFRESH_SECONDS = 5.0
# A leaf whose issuer is not in the cached list makes the verifier read the key
# ring at once; the same issuer missing again reads it again at most this often.
MISS_REFRESH_SECONDS = 1.0
RENEW_RETRY_SECONDS = 5.0
# File mode: how often the SVID files are checked for a renewal.
SVID_FILES_POLL_SECONDS = 5.0
SVID_FILES = ("svid.pem", "svid.key", "bundle.pem")
# Beside the ASGI TLS extension's ``client_cert_chain`` (PEM, as the spec has
# it), Bastion's mTLS listener puts the same chain as DER under this key, made
# once per connection: the gate reads it on every request without decoding.
TLS_CHAIN_DER = "bastion_client_cert_chain_der"


class WorkloadError(Exception):
    """The CA is not set up, or a request to it is invalid."""


class PeerRefused(Exception):
    """A peer's certificate is not acceptable; ``reason`` is a stable slug and
    ``presented_id`` the SPIFFE ID it carried (None when it carried none)."""

    def __init__(self, reason: str, presented_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.presented_id = presented_id


def spiffe_id(trust_domain: str, workload: str) -> str:
    """The SPIFFE ID of one of Bastion's processes in ``trust_domain``."""
    if workload not in WORKLOADS and not workload.startswith("scraper"):
        raise WorkloadError(f"no such workload: {workload!r}")
    return f"spiffe://{trust_domain}/bastion/{workload}"


def presented_spiffe_id(cert: x509.Certificate) -> str | None:
    """The one ``spiffe://`` URI SAN of ``cert`` (X.509-SVID section 2), else None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    return spiffe[0] if len(uris) == 1 and len(spiffe) == 1 else None


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def encode(self) -> bytes:
        key = self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert = self.cert.public_bytes(serialization.Encoding.DER)
        return json.dumps(
            {"key": base64.b64encode(key).decode(), "cert": base64.b64encode(cert).decode()}
        ).encode()

    @classmethod
    def decode(cls, value: bytes) -> _Authority:
        data = json.loads(value)
        key = serialization.load_der_private_key(base64.b64decode(data["key"]), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise WorkloadError("the CA key in the key ring is not an EC key")
        return cls(key, x509.load_der_x509_certificate(base64.b64decode(data["cert"])))


@dataclass(frozen=True)
class Svid:
    """An X.509-SVID: the leaf, its private key (memory only) and the chain."""

    spiffe_id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate | None
    # More of the chain, after the intermediate (an SVID from files may carry it).
    more: tuple[x509.Certificate, ...] = ()

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    def chain_pem(self) -> bytes:
        """The leaf then the intermediate (RFC 8446 section 4.4.2: leaf first)."""
        chain = [self.cert, *([self.intermediate] if self.intermediate else []), *self.more]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bastion"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class WorkloadCA:
    """The root and the intermediates, in the key ring; issues SVIDs.

    ``clock`` returns the current time (tests move it)."""

    def __init__(
        self,
        keystore: Keystore,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.keystore = keystore
        self.trust_domain = trust_domain
        self.clock = clock

    # -- the authorities --------------------------------------------------------

    def init(self) -> bool:
        """Create the root and a first intermediate unless they exist; return
        True if anything was created."""
        created = False
        try:
            self.keystore.current(ROOT_SECRET)
        except SecretNotFound:
            self.keystore.set(ROOT_SECRET, self._new_root().encode())
            created = True
        try:
            self.keystore.current(INTERMEDIATE_SECRET)
        except SecretNotFound:
            self.rotate_intermediate()
            created = True
        return created

    def root(self) -> _Authority:
        try:
            return _Authority.decode(self.keystore.current(ROOT_SECRET)[1])
        except SecretNotFound:
            raise WorkloadError("no workload CA: run `bastion ca init`") from None

    def root_pem(self) -> str:
        """The trust anchor, for the peers' SSL contexts."""
        return self.root().cert.public_bytes(serialization.Encoding.PEM).decode()

    def rotate_intermediate(self) -> int:
        """Sign a new intermediate with the root and make it current; the
        previous ones keep vouching for their leaves until retired. Returns
        the new version."""
        root = self.root()
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"Bastion workload intermediate {now:%Y%m%d%H%M%S}"))
            .issuer_name(root.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + INTERMEDIATE_LIFETIME, root.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()), False
            )
            .sign(root.key, hashes.SHA256())
        )
        return self.keystore.set(INTERMEDIATE_SECRET, _Authority(key, cert).encode())

    def retire_intermediate(self, version: int) -> None:
        """Stop trusting the leaves ``version`` signed (it never signs again)."""
        self.keystore.retire(INTERMEDIATE_SECRET, version)

    def active_intermediates(self) -> list[tuple[int, x509.Certificate]]:
        """``(version, certificate)`` of every intermediate not retired, newest first."""
        active = [
            info.version
            for info in self.keystore.versions(INTERMEDIATE_SECRET)
            if info.state == "active"
        ]
        return [
            (v, _Authority.decode(self.keystore.get(INTERMEDIATE_SECRET, v)).cert)
            for v in sorted(active, reverse=True)
        ]

    def _new_root(self) -> _Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock()
        name = _name(f"Bastion workload root {self.trust_domain}")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return _Authority(key, cert)

    # -- leaves -----------------------------------------------------------------

    def issue(self, workload: str, lifetime: timedelta = SVID_LIFETIME) -> Svid:
        """An X.509-SVID for ``workload``, signed by the current intermediate.

        Raises :class:`WorkloadError` for a lifetime over an hour, an unknown
        workload, or a CA that was never initialised."""
        if not timedelta(0) < lifetime <= SVID_LIFETIME:
            raise WorkloadError("an SVID lives at most an hour")
        try:
            authority = _Authority.decode(self.keystore.current(INTERMEDIATE_SECRET)[1])
        except SecretNotFound:
            raise WorkloadError("no workload CA: run `bastion ca init`") from None
        identity = spiffe_id(self.trust_domain, workload)
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock()
        cert = (
            x509.CertificateBuilder()
            # X.509-SVID section 2: the subject carries no identity; the URI SAN does.
            .subject_name(_name(workload))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + lifetime, authority.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,  # the subject is empty of identity (RFC 5280 4.2.1.6)
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                False,
            )
            .sign(authority.key, hashes.SHA256())
        )
        return Svid(identity, cert, key, authority.cert)

    def issue_server(
        self,
        dns_names: Iterable[str],
        ip_addresses: Iterable[str] = (),
        lifetime: timedelta = SERVER_CERT_LIFETIME,
    ) -> Svid:
        """A development server certificate for the public listeners (HTTPS),
        signed by the current intermediate: DNS and IP SANs (RFC 6125 section
        6: clients match the name they dialled), server auth only, no SPIFFE
        ID (it admits nobody to an internal listener). Production takes one
        from a public or company CA (cert-manager)."""
        import ipaddress

        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if not names:
            raise WorkloadError("a server certificate names at least one host (--dns or --ip)")
        if not timedelta(0) < lifetime <= SERVER_CERT_LIFETIME:
            raise WorkloadError("a development server certificate lives at most 30 days")
        try:
            authority = _Authority.decode(self.keystore.current(INTERMEDIATE_SECRET)[1])
        except SecretNotFound:
            raise WorkloadError("no workload CA: run `bastion ca init`") from None
        key = ec.generate_private_key(ec.SECP256R1())
        now = self.clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(str(names[0].value)))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + lifetime, authority.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                False,
            )
            .sign(authority.key, hashes.SHA256())
        )
        return Svid("", cert, key, authority.cert)

    def renew_due(self, svid: Svid) -> datetime:
        """When to renew ``svid``: half-way through its life."""
        return svid.not_before + (svid.not_after - svid.not_before) / 2

    def status(self) -> dict[str, Any]:
        """What ``bastion ca status`` prints: certificates' metadata, never keys."""
        root = self.root().cert
        intermediates = []
        for info in self.keystore.versions(INTERMEDIATE_SECRET):
            cert = _Authority.decode(self.keystore.get(INTERMEDIATE_SECRET, info.version)).cert
            intermediates.append(
                {
                    "version": info.version,
                    "state": info.state,
                    "serial": f"{cert.serial_number:x}",
                    "not_after": cert.not_valid_after_utc.isoformat(),
                }
            )
        return {
            "trust_domain": self.trust_domain,
            "root": {
                "serial": f"{root.serial_number:x}",
                "not_after": root.not_valid_after_utc.isoformat(),
                "sha256": root.fingerprint(hashes.SHA256()).hex(),
            },
            "intermediates": intermediates,
        }


class SvidSource(Protocol):
    """Where a process's SVID and trust anchors come from: Bastion's own CA
    (:class:`WorkloadCA`) or files kept current by another issuer (:class:`SvidFiles`)."""

    trust_domain: str
    clock: Callable[[], datetime]

    def issue(self, workload: str) -> Svid: ...
    def root_pem(self) -> str: ...
    def active_intermediates(self) -> list[tuple[int, x509.Certificate]]: ...
    def renew_due(self, svid: Svid) -> datetime: ...


class SvidFiles:
    """An SVID from files another issuer renews in place: ``svid.pem`` (the
    leaf, then its chain), ``svid.key`` (PKCS#8 or SEC 1 PEM) and ``bundle.pem``
    (the trust domain's CA certificates) in ``directory``.

    cert-manager writes them as a Secret volume (``tls.crt``, ``tls.key``,
    ``ca.crt`` mapped to these names; the kubelet swaps the whole directory at
    once); SPIRE's spiffe-helper writes the same three from the Workload API.
    No CA key is needed: :meth:`issue` returns what the files hold (checked:
    this workload's SPIFFE ID, a key that matches the leaf, a leaf the bundle
    vouches for), and the peers are verified against the bundle. A removed
    CA stops vouching within :data:`INTERMEDIATE_REFRESH_SECONDS`
    (:class:`PeerVerifier` reads :meth:`active_intermediates` again)."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        poll_seconds: float = SVID_FILES_POLL_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._svid: Svid | None = None
        self._bundle: list[x509.Certificate] = []

    def _read(self) -> tuple[Svid, list[x509.Certificate]]:
        """The files' SVID and bundle, read again only when a file changed."""
        try:
            stats = [os.stat(self.directory / name) for name in SVID_FILES]
        except OSError as error:
            raise WorkloadError(
                f"SVID files missing in {self.directory}: {error.strerror}"
            ) from None
        stamp = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)
        if stamp == self._stamp and self._svid is not None:
            return self._svid, self._bundle
        chain_pem, key_pem, bundle_pem = (
            (self.directory / name).read_bytes() for name in SVID_FILES
        )
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
            bundle = x509.load_pem_x509_certificates(bundle_pem)
            key = serialization.load_pem_private_key(key_pem, None)
        except ValueError:
            raise WorkloadError(f"SVID files in {self.directory} are not PEM") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise WorkloadError("the SVID key is not an EC key")
        leaf, rest = chain[0], chain[1:]
        # A writer that replaces the files one by one (spiffe-helper) can be
        # caught half-way: a key of another leaf is refused, and read again.
        if leaf.public_key() != key.public_key():
            raise WorkloadError("the SVID key does not match its certificate (mid-update?)")
        identity = presented_spiffe_id(leaf)
        if identity is None:
            raise WorkloadError("the SVID file's leaf carries no SPIFFE ID")
        svid = Svid(identity, leaf, key, rest[0] if rest else None, tuple(rest[1:]))
        self._stamp, self._svid, self._bundle = stamp, svid, bundle
        return svid, bundle

    def issue(self, workload: str) -> Svid:
        """The files' SVID; it must be ``workload``'s (X.509-SVID section 2)."""
        svid, _bundle = self._read()
        expected = spiffe_id(self.trust_domain, workload)
        if svid.spiffe_id != expected:
            raise WorkloadError(f"the SVID files hold {svid.spiffe_id}, not {expected}")
        return svid

    def root_pem(self) -> str:
        """The bundle: every CA this process trusts for its peers."""
        _svid, bundle = self._read()
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in bundle)

    def active_intermediates(self) -> list[tuple[int, x509.Certificate]]:
        """The certificates a peer's leaf may be signed by: the bundle's, and
        the intermediates of this process's own chain that a bundle CA signed
        (SPIRE with an upstream authority signs leaves by such an intermediate)."""
        svid, bundle = self._read()
        issuers = list(bundle)
        for cert in (svid.intermediate, *svid.more):
            if cert is not None and any(_signed_by(cert, ca) for ca in bundle):
                issuers.append(cert)
        return list(enumerate(issuers))

    def renew_due(self, svid: Svid) -> datetime:
        """The files are checked again after :attr:`poll_seconds`."""
        return self.clock() + timedelta(seconds=self.poll_seconds)


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


# -- checking a peer --------------------------------------------------------------


class PeerVerifier:
    """Checks the leaf a peer presented (the handshake already chained it to
    the root): within its validity period, signed by an intermediate not
    retired, and carrying a SPIFFE ID of this trust domain."""

    def __init__(
        self, ca: SvidSource, *, refresh_seconds: float = INTERMEDIATE_REFRESH_SECONDS
    ) -> None:
        self.ca = ca
        self.refresh_seconds = refresh_seconds
        self._active: list[x509.Certificate] = []
        self._read_at = -float("inf")
        # Leaf DER -> (SPIFFE ID, not before, not after) of leaves that passed
        # since the intermediates were last read: a connection's later requests
        # skip the parse and the signature check (the period is still checked);
        # a re-read of the intermediates forgets them all, so a retirement
        # reaches kept connections as soon as it reaches new ones.
        self._passed: dict[bytes, tuple[str, datetime, datetime]] = {}
        # Issuer key identifier -> when a leaf of it last made us read (a miss).
        self._missed: dict[bytes | None, float] = {}

    def _intermediates(self, max_age: float | None = None) -> list[x509.Certificate]:
        if time.monotonic() - self._read_at > (
            self.refresh_seconds if max_age is None else max_age
        ):
            self._active = [cert for _v, cert in self.ca.active_intermediates()]
            self._read_at = time.monotonic()
            self._passed = {}
        return self._active

    def _issued_by_active(self, cert: x509.Certificate, chain: Sequence[bytes] = ()) -> bool:
        if self._vouched(cert, chain, self._intermediates()):
            return True
        # Not in the cached list: an intermediate rotated in since it was read
        # signs the peers' renewed leaves at once, so read again now. The
        # throttle is per issuer: a read made for any other reason before the
        # rotation must not make a valid renewed leaf wait (it would be refused).
        # Only leaves chained to the root get here, so the issuers are few: a
        # retired one costs at most one read a second.
        issuer_id = _issuer_key_id(cert)
        now = time.monotonic()
        if now - self._missed.get(issuer_id, -float("inf")) <= MISS_REFRESH_SECONDS:
            return False
        if len(self._missed) > 64:  # stale entries only; keep it bounded
            self._missed = {
                k: t for k, t in self._missed.items() if now - t <= MISS_REFRESH_SECONDS
            }
        self._missed[issuer_id] = now
        return self._vouched(cert, chain, self._intermediates(max_age=0.0))

    @staticmethod
    def _vouched(
        cert: x509.Certificate, chain: Sequence[bytes], active: list[x509.Certificate]
    ) -> bool:
        """An active issuer signed the leaf, or is on the path OpenSSL verified
        for it (``chain``, leaf first: a leaf of another intermediate under a
        bundle's root, as SPIRE's servers each sign with their own)."""
        if any(_signed_by(cert, issuer) for issuer in active):
            return True
        anchors = {c.public_bytes(serialization.Encoding.DER) for c in active}
        return any(der in anchors for der in chain[1:])

    def verify(self, der: bytes | None, chain: Sequence[bytes] = ()) -> str:
        """Return the peer's SPIFFE ID; raise :class:`PeerRefused`. ``chain``:
        the path the handshake verified, leaf first (:func:`verified_chain`)."""
        if not der:
            raise PeerRefused("no-client-certificate")
        self._intermediates()  # read again when stale (and forget what passed)
        passed = self._passed.get(der)
        if passed is not None and passed[1] <= self.ca.clock() < passed[2]:
            return passed[0]
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise PeerRefused("malformed-certificate") from None
        presented = presented_spiffe_id(cert)
        now = self.ca.clock()
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise PeerRefused("certificate-expired", presented)
        if not self._issued_by_active(cert, chain):
            raise PeerRefused("issuer-not-trusted", presented)
        if presented is None or not presented.startswith(f"spiffe://{self.ca.trust_domain}/"):
            raise PeerRefused("no-spiffe-id", presented)
        if len(self._passed) >= 1024:  # bounded: peers are few, leaves renew hourly
            self._passed = {}
        self._passed[der] = (presented, cert.not_valid_before_utc, cert.not_valid_after_utc)
        return presented


def verified_chain(ssl_object: Any) -> list[bytes]:
    """The peer's certificate path as OpenSSL verified it in the handshake,
    leaf first, DER (empty when unknown). Public in Python 3.13
    (``SSLObject.get_verified_chain``); the same method of the C object before."""
    getter = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    if getter is None:
        return []
    try:
        chain = getter() or []
    except (ValueError, ssl.SSLError):
        return []
    return [bytes(c.public_bytes(_ENCODING_DER)) for c in chain]


_ENCODING_DER = 2  # _ssl.ENCODING_DER


def _issuer_key_id(cert: x509.Certificate) -> bytes | None:
    """The key identifier of ``cert``'s issuer (RFC 5280 section 4.2.1.1), if given."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):  # not this issuer (or its key type)
        return False
    return True


# -- TLS ------------------------------------------------------------------------


def _load_chain(context: ssl.SSLContext, svid: Svid) -> None:
    """Load ``svid`` into ``context`` without writing its key to any disk: an
    anonymous memory file (memfd_create(2)) that vanishes when closed."""
    fd = os.memfd_create("bastion-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, svid.chain_pem() + svid.key_pem())
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _tls13(context: ssl.SSLContext, root_pem: str) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=root_pem)
    return context


HandshakeObserver = Callable[[str], None]


class _ObservedSSLObject(ssl.SSLObject):
    """Reports a refused handshake (no certificate, another CA) before failing it."""

    observer: HandshakeObserver | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except ssl.SSLCertVerificationError as error:
            self._report("untrusted-certificate:" + str(error.verify_message))
            raise
        except ssl.SSLError as error:
            if "CERTIFICATE" in str(error.reason or "").upper():
                self._report("no-client-certificate")
            raise

    def _report(self, reason: str) -> None:
        if self.observer is not None:
            self.observer(reason)


def _pinned_classes(
    check: Callable[[bytes | None, list[bytes]], None],
) -> tuple[type[ssl.SSLObject], type[ssl.SSLSocket]]:
    """SSL object and socket classes that run ``check`` on the server's leaf as
    soon as the handshake completes, before a byte of the request is sent
    (asyncio/anyio clients use the object, blocking ones the socket)."""

    class PinnedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check(self.getpeercert(binary_form=True), verified_chain(self))

    class PinnedSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert(binary_form=True), verified_chain(self))

    return PinnedSSLObject, PinnedSSLSocket


class WrongPeer(ssl.SSLCertVerificationError):
    """The server is a Bastion workload, but not the one this client calls."""


class WorkloadTls:
    """One process's SVID and the TLS contexts that present it.

    The server context requires a client certificate chained to the root
    (TLS 1.3 only); a client context verifies the server's chain and, when
    given ``expect``, that the server presents one of those SPIFFE IDs
    (X.509-SVID section 5: a peer is authorised by its ID, not a DNS name).
    :meth:`renew` swaps a new SVID into every live context."""

    def __init__(self, ca: SvidSource, workload: str) -> None:
        self.ca = ca
        self.workload = workload
        self.spiffe_id = spiffe_id(ca.trust_domain, workload)
        self.svid = ca.issue(workload)
        root = self._trusted = ca.root_pem()
        self._server = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), root)
        self._server.verify_flags |= _NO_CHECK_TIME  # PeerVerifier checks the period
        # No TLS 1.3 session tickets (RFC 8446 section 4.6.1): Bastion's clients
        # never resume, so the two OpenSSL seals and sends after each handshake
        # were wasted; every connection presents and proves its certificate.
        self._server.num_tickets = 0
        self._client = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), root)
        # A peer is named by its SPIFFE ID, not a DNS name: checked after the
        # handshake by whoever uses the client context (X.509-SVID section 5).
        self._client.check_hostname = False
        self._pinned: dict[frozenset[str], ssl.SSLContext] = {}
        self._verifier = PeerVerifier(ca)
        self._load(self.svid)

    def _load(self, svid: Svid) -> None:
        for context in (self._server, self._client, *self._pinned.values()):
            _load_chain(context, svid)

    def server_context(self, observer: HandshakeObserver | None = None) -> ssl.SSLContext:
        """The listener's context; ``observer`` hears of refused handshakes."""
        if observer is not None:
            observed = type(
                "ObservedSSLObject", (_ObservedSSLObject,), {"observer": staticmethod(observer)}
            )
            self._server.sslobject_class = observed
        return self._server

    def client_context(self, expect: Iterable[str] | None = None) -> ssl.SSLContext:
        """A client context presenting this SVID. With ``expect``, the handshake
        fails (:class:`WrongPeer`, before any request is sent) unless the server's
        leaf passes :class:`PeerVerifier` and carries one of those SPIFFE IDs;
        without, only its chain to the root is checked."""
        if expect is None:
            return self._client
        allowed = frozenset(expect)
        context = self._pinned.get(allowed)
        if context is None:
            context = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), self._trusted)
            context.check_hostname = False
            verifier = self._verifier

            def check(der: bytes | None, chain: list[bytes]) -> None:
                try:
                    presented = verifier.verify(der, chain)
                except PeerRefused as refused:
                    raise WrongPeer(1, f"server refused: {refused.reason}") from None
                if presented not in allowed:
                    _log.warning("workload_server_refused", presented_id=presented)
                    raise WrongPeer(1, f"server is {presented}, not {' or '.join(sorted(allowed))}")

            context.sslobject_class, context.sslsocket_class = _pinned_classes(check)
            _load_chain(context, self.svid)
            self._pinned[allowed] = context
        return context

    def renew_due(self) -> datetime:
        """When to renew: half-way through the current SVID's life (from
        files: when they are next checked)."""
        return self.ca.renew_due(self.svid)

    def renew(self) -> Svid:
        """Issue a new SVID (from files: read them if they changed) and load it
        into the live contexts: new handshakes present it, connections already
        open keep theirs. CAs new to the bundle are trusted at once."""
        svid = self.ca.issue(self.workload)
        trusted = self.ca.root_pem()
        if trusted != self._trusted:
            for context in (self._server, self._client, *self._pinned.values()):
                context.load_verify_locations(cadata=trusted)
            self._trusted = trusted
        if svid.cert != self.svid.cert:
            self._load(svid)
            self.svid = svid
        return svid


def peer_certificate(ssl_object: Any) -> bytes | None:
    """The DER of the certificate the peer of ``ssl_object`` presented, if any."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return der if isinstance(der, bytes) else None


def declared(ids: Iterable[str]) -> frozenset[str]:
    """A route's allowed SPIFFE IDs, as a set (what the gate compares with)."""
    return frozenset(ids)


@asynccontextmanager
async def renewing(tls: WorkloadTls | None) -> AsyncIterator[None]:
    """Renew ``tls``'s SVID at each half-life while the block runs (no-op for None).

    A failed renewal (the key ring unreachable) is retried every few seconds;
    the current SVID stays in use until it expires."""
    if tls is None:
        yield
        return

    async def loop() -> None:
        while True:
            wait = (tls.renew_due() - tls.ca.clock()).total_seconds()
            await anyio.sleep(max(wait, 0.0))
            try:
                await anyio.to_thread.run_sync(tls.renew)
            except Exception as exc:
                _log.error("workload_renewal_failed", error=type(exc).__name__)
                await anyio.sleep(RENEW_RETRY_SECONDS)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(loop)
        try:
            yield
        finally:
            tasks.cancel_scope.cancel()
