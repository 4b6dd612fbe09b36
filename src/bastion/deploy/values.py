"""The values file of ``bastion deploy render``: a small typed model, refused when wrong.

Every field has a safe default except what only the operator knows (the
environment's name, the image, the database and the secret store). Secrets
are references only: a key in the secret store (External Secrets) or a
Secret that an operator such as CloudNativePG writes. Any string in the file
that looks like a secret (a provider's token format, a password in a URL, a
random-looking value under a secret-like name) is refused, so a pasted
credential never reaches a rendered manifest or a commit.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from bastion.identity.workload import DEFAULT_TRUST_DOMAIN
from bastion.secret_formats import find_secrets

# RFC 1123 DNS label: what a namespace and most object names must be.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$"
# Kubernetes resource quantities ("250m", "512Mi", "1").
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"
DURATION = r"^[0-9]+(s|m|h)$"
# A key in the secret store: a path, never a value (no spaces, no "=", no ":").
STORE_KEY = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,252}$"
# scheme://user:password@host: credentials in a URL's userinfo (RFC 3986 section 3.2.1).
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s/@:]*:[^\s/@]+@", re.IGNORECASE)

Label = Annotated[str, Field(pattern=DNS_LABEL)]
Quantity = Annotated[str, Field(pattern=QUANTITY)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ValuesError(ValueError):
    """The values file is unreadable, invalid, or holds a literal secret.

    ``problems`` are ``(where, what)`` pairs; the offending value is never
    repeated, since it may be the secret."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where}: {what}" for where, what in problems))


class Image(_Model):
    """The one image all three workloads run; pinned by digest unless a tag is allowed."""

    repository: str = Field(pattern=r"^[a-z0-9][a-z0-9._/:-]{0,254}$")
    digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

    @model_validator(mode="after")
    def _one_reference(self) -> Self:
        if (self.digest is None) == (self.tag is None):
            raise ValueError("give exactly one of digest or tag")
        if self.tag == "latest":
            raise ValueError("'latest' is not a version: pin a digest or a release tag")
        return self

    @property
    def reference(self) -> str:
        return (
            f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"
        )


class Workload(_Model):
    """Replicas (the HPA's range) and the container's requests and limits."""

    min_replicas: int = Field(default=2, ge=1, le=100)
    max_replicas: int = Field(default=6, ge=1, le=500)
    target_cpu_percent: int = Field(default=70, ge=10, le=100)
    cpu_request: Quantity = "250m"
    cpu_limit: Quantity = "1"
    memory_request: Quantity = "256Mi"
    memory_limit: Quantity = "512Mi"

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is above max_replicas")
        return self


class Peer(_Model):
    """Pods outside Bastion's namespaces, named by their namespace's and their own labels."""

    namespace_labels: dict[str, str]
    pod_labels: dict[str, str] = Field(default_factory=dict)


class ProviderEgress(_Model):
    """A model provider the gateway may reach: an address block and its ports."""

    name: Label
    cidr: str
    ports: list[Port] = Field(default_factory=lambda: [443], min_length=1)

    @model_validator(mode="after")
    def _cidr(self) -> Self:
        network = ipaddress.ip_network(self.cidr, strict=True)
        if network.prefixlen == 0:
            raise ValueError("a provider's cidr may not be the whole internet")
        return self


class Database(_Model):
    """PostgreSQL, external or a CloudNativePG Cluster; its password a secret-store key."""

    mode: Literal["external", "cloudnativepg"] = "external"
    password_key: str = Field(pattern=STORE_KEY)
    port: Port = 5432
    # external: the server's address block and a libpq URL without a password.
    cidr: str | None = None
    url: str | None = None
    # cloudnativepg: the cluster the operator runs in the environment's namespace,
    # the operator's pods, and the API server the instance manager talks to.
    instances: int = Field(default=3, ge=1, le=9)
    storage: Quantity = "20Gi"
    image: str = Field(
        default="ghcr.io/cloudnative-pg/postgresql:17", pattern=r"^[a-z0-9][a-z0-9._/:@-]{0,254}$"
    )
    operator: Peer = Peer(
        namespace_labels={"kubernetes.io/metadata.name": "cnpg-system"},
        pod_labels={"app.kubernetes.io/name": "cloudnative-pg"},
    )
    api_server_cidr: str | None = None

    @model_validator(mode="after")
    def _mode(self) -> Self:
        if self.mode == "external":
            if not (self.cidr and self.url):
                raise ValueError("an external database needs cidr and url")
            ipaddress.ip_network(self.cidr, strict=True)
            if not self.url.startswith(("postgresql://", "postgres://")):
                raise ValueError("url is a libpq URL (postgresql://user@host/db)")
        else:
            if not self.api_server_cidr:
                raise ValueError(
                    "a CloudNativePG cluster needs api_server_cidr (its operator's API)"
                )
            ipaddress.ip_network(self.api_server_cidr, strict=True)
        return self


class SecretStore(_Model):
    """Where secrets come from: an External Secrets ClusterSecretStore, or the CSI driver."""

    driver: Literal["external-secrets", "csi"] = "external-secrets"
    store: Label = "bastion"
    refresh: str = Field(default="1h", pattern=DURATION)
    # keys in the store of the values Bastion reads by reference (file:/run/secrets/...).
    master_key: str = Field(default="bastion/master-key", pattern=STORE_KEY)
    workload_ca: str = Field(default="bastion/workload-ca", pattern=STORE_KEY)


class Mtls(_Model):
    """Workload certificates (X.509-SVIDs) from cert-manager's CA issuer, or SPIRE.

    With SPIRE, each pod runs spiffe-helper beside Bastion: it takes the SVID
    from the agent's Workload API (the SPIFFE CSI driver's socket) and writes
    the files Bastion reads; its image is required then, pinned like Bastion's."""

    provider: Literal["cert-manager", "spire"] = "cert-manager"
    trust_domain: str = Field(default=DEFAULT_TRUST_DOMAIN, pattern=r"^[a-z0-9.-]{1,255}$")
    spiffe_helper: Image | None = None

    @model_validator(mode="after")
    def _helper(self) -> Self:
        if self.provider == "spire" and self.spiffe_helper is None:
            raise ValueError(
                "SPIRE needs spiffe_helper: the spiffe-helper image "
                "(ghcr.io/spiffe/spiffe-helper), pinned by digest"
            )
        return self


class Https(_Model):
    """The public listeners' (api, gateway) server certificate: a cert-manager
    Certificate per Service from this issuer (default: the workload CA's Issuer,
    which exists with ``mtls.provider: cert-manager``; with SPIRE name a
    ClusterIssuer). ``dns_names``: more names than the Service's (the ingress host)."""

    issuer: Label = "bastion-workload-ca"
    issuer_kind: Literal["Issuer", "ClusterIssuer"] = "Issuer"
    dns_names: list[str] = Field(default_factory=list)


def _public_url(url: str) -> str:
    """An absolute https URL with a host and nothing a base URL may not carry:
    no userinfo (RFC 3986 section 3.2.1), query or fragment; no trailing slash."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("an https URL with a host (https://api.example.com)")
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("no userinfo, query or fragment in a public URL")
    parts.port  # noqa: B018 - raises ValueError on a port out of range
    if _is_wildcard(parts.hostname):
        raise ValueError("a host clients can reach, not a bind address (0.0.0.0, ::)")
    return url.rstrip("/")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


PublicUrl = Annotated[str, Field(max_length=2000, pattern=r"^\S+$"), AfterValidator(_public_url)]


class Public(_Model):
    """The URLs clients use (the ingress's), which no pod can derive from its
    bind address: the api's is the token issuer (``iss``, DPoP ``htu``), the
    gateway's what DPoP proofs sent to it name (BASTION_ISSUER and
    BASTION_GATEWAY_PUBLIC_URL in every pod; bastion.settings refuses a
    wildcard bind without them). Their hosts join the listeners' certificates."""

    api_url: PublicUrl
    gateway_url: PublicUrl


class Canary(_Model):
    """The gateway's Argo Rollouts canary: 5% first, promoted only if Prometheus agrees."""

    weight: int = Field(default=5, ge=1, le=50)
    pause: str = Field(default="5m", pattern=DURATION)
    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090", pattern=r"^https?://\S+$"
    )
    # Promoted only while fewer than this share of calls fail with a 5xx ...
    max_error_ratio: float = Field(default=0.01, gt=0, lt=1)
    # ... and the 95th percentile latency stays under this many milliseconds.
    max_p95_latency_ms: int = Field(default=2000, ge=10)


class Quota(_Model):
    """The namespace's ResourceQuota; every HPA's maximum must fit inside it."""

    cpu: Quantity = "24"
    memory: Quantity = "48Gi"
    pods: int = Field(default=60, ge=1)


class Ports(_Model):
    """The ports the processes listen on (the settings' defaults)."""

    api: Port = 8700
    gateway: Port = 8701
    worker: Port = 8702
    # The internal (mTLS) listeners: the gateway's takes the api's calls;
    # each one serves /metrics to the scraper's SPIFFE ID only.
    gateway_internal: Port = 8703
    api_internal: Port = 8704
    worker_internal: Port = 8705


class Values(_Model):
    """The whole values file (``deploy/values/*.yaml`` are examples)."""

    environment: Label
    image: Image
    database: Database
    public: Public
    providers: list[ProviderEgress] = Field(default_factory=list)
    ingress: Peer = Peer(
        namespace_labels={"kubernetes.io/metadata.name": "ingress-nginx"},
        pod_labels={"app.kubernetes.io/name": "ingress-nginx"},
    )
    scraper: Peer = Peer(
        namespace_labels={"kubernetes.io/metadata.name": "monitoring"},
        pod_labels={"app.kubernetes.io/name": "prometheus"},
    )
    dns: Peer = Peer(
        namespace_labels={"kubernetes.io/metadata.name": "kube-system"},
        pod_labels={"k8s-app": "kube-dns"},
    )
    api: Workload = Workload()
    gateway: Workload = Workload()
    worker: Workload = Workload(min_replicas=1, max_replicas=4)
    ports: Ports = Ports()
    secrets: SecretStore = SecretStore()
    mtls: Mtls = Mtls()
    https: Https = Https()
    canary: Canary = Canary()
    quota: Quota = Quota()
    # Tenants on the isolated tier: their own namespace, gateway and worker.
    isolated_tenants: list[Label] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        if len(set(self.isolated_tenants)) != len(self.isolated_tenants):
            raise ValueError("isolated_tenants lists a tenant twice")
        if self.secrets.driver == "csi" and self.database.mode != "external":
            raise ValueError(
                "the CSI driver serves files; CloudNativePG needs a Secret (use external-secrets)"
            )
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("two providers have the same name")
        return self


def literal_secrets(document: object, where: str = "") -> Iterator[str]:
    """Yield where in ``document`` a string looks like a secret (never the value)."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield from literal_secrets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from literal_secrets(value, f"{where}[{index}]")
    elif isinstance(document, str):
        leaf = re.split(r"[.\[]", where)[-1] if where else "value"
        # As name=value: provider formats anywhere, and a random-looking token
        # under a secret-like name (api_key: ..., password: ...).
        if _URL_PASSWORD.search(document) or any(True for _ in find_secrets(f"{leaf}={document}")):
            yield where or "(document)"


def parse_values(document: object) -> Values:
    """Return the validated :class:`Values`; raise :class:`ValuesError`.

    A literal secret is refused before the schema is applied, so the error
    never comes back holding it."""
    secrets = list(literal_secrets(document))
    if secrets:
        raise ValuesError(
            [(where, "looks like a literal secret: give a secret-store key") for where in secrets]
        )
    if not isinstance(document, dict):
        raise ValuesError([("(document)", "the values file is a YAML mapping")])
    try:
        return Values.model_validate(document)
    except ValidationError as error:
        raise ValuesError(
            [
                (".".join(str(p) for p in e["loc"]) or "(document)", e["msg"])
                for e in error.errors(include_input=False, include_url=False)
            ]
        ) from None


def load_values(path: Path) -> Values:
    """Read and validate a YAML values file; raise :class:`ValuesError`."""
    try:
        document: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValuesError([(str(path), error.strerror or "cannot read")]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        raise ValuesError([(where, "not valid YAML")]) from None
    return parse_values(document)


def values_schema() -> dict[str, Any]:
    """The JSON Schema of the values file (for editors and reviewers)."""
    return Values.model_json_schema()
