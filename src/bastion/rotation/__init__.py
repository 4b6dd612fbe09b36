"""Rotation of every key Bastion holds, with an overlap window (CHECKLIST S2).

One rule for every kind (NIST SP 800-57 part 1, 5.3: a key has a
cryptoperiod; its successor is in place before it stops being used):

1. A new version is added to the key ring. Where other processes verify
   what it signs (JWTs, receipts, api→gateway envelopes, tool calls), it is
   *pending*: published for ``publish_ahead`` before it signs, longer than
   any verifier caches the version list, so no verifier meets a key it has
   not loaded.
2. Once newer versions sign, an older one is *verifying*: it still verifies
   what it signed until the last of that has expired (``retire_after``),
   then it is *retired* (readable by number, never used).
3. A run is idempotent: it rotates only when the newest version is due
   (older than its period) or when asked, and never while a rotation is
   still pending; retirement happens once its time has come.

Kinds: ``jwt``, ``receipt`` (Ed25519; receipts are kept for years, so
nothing retires a receipt key on a timer), ``envelope``, ``tool`` (HMAC),
``webhook`` and ``provider`` (the new value comes from the provider: the old
one keeps being accepted during the overlap; the gateway re-reads a
provider's key within seconds), ``kek`` (tenants' KEKs, in the local key
ring or, rotated inside the backend, in OpenBao transit or AWS KMS: data
keys re-wrapped, data never re-encrypted), ``db-password`` (``bastion_app``
and ``bastion_queue``: the new password is set in the same transaction that
the key ring records it, and pools read it at their next connection).

Every rotation and retirement writes one audit event (the platform's trail;
a KEK's in the tenant's own, in the transaction that re-wraps its keys).
A key past its rotation date logs ``key_rotation_overdue`` (a warning).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg import sql

from bastion.audit import log as audit
from bastion.billing.models import PLATFORM
from bastion.billing.receipts import SECRET_NAME as RECEIPT_SECRET
from bastion.db.pool import Database
from bastion.db.provision import APP_ROLE, QUEUE_ROLE
from bastion.identity.keys import SECRET_NAME as JWT_SECRET
from bastion.logs import get_logger
from bastion.safety import signing
from bastion.safety.vault import rewrap_token_key
from bastion.secrets.errors import SecretNotFound
from bastion.secrets.kms import LocalKMS
from bastion.secrets.protocols import KMS, Keystore, RotatesKEKs, SecretVersionInfo
from bastion.secrets.store import SecretRef
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.tenants.service import TenantService

_log = get_logger("bastion.rotation")

KINDS = ("jwt", "envelope", "tool", "webhook", "receipt", "kek", "db-password", "provider")
KeyState = Literal["active", "pending", "verifying", "retired"]
DAY = 86_400.0
# The keystore's ``created_at`` is rounded down to the second.
_PRECISION = 1.0


class RotationRefused(Exception):
    """A rotation that cannot run as asked (a value is missing, a name is unknown)."""


@dataclass(frozen=True)
class KeyStatus:
    """One version of one key: what ``bastion keys status`` prints."""

    kind: str
    name: str
    version: int
    fingerprint: str  # a keyed HMAC of the value (see the keystore), never the value
    created_at: datetime
    age_days: float
    state: KeyState
    next_rotation: datetime | None  # set on the version in use only
    overdue: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "created_at": self.created_at.isoformat(),
            "age_days": round(self.age_days, 3),
            "state": self.state,
            "next_rotation": self.next_rotation.isoformat() if self.next_rotation else None,
            "overdue": self.overdue,
        }


@dataclass
class RotationResult:
    """What one run did to one key."""

    kind: str
    name: str
    rotated: int | None = None  # the new version
    retired: list[int] = field(default_factory=list)
    rewrapped: int = 0


@dataclass(frozen=True)
class SecretKey:
    """One versioned key-ring secret and its rotation rule.

    ``generate`` makes a new value (None: it comes from outside, the provider's);
    ``publish_ahead``: seconds a new version waits before it is used;
    ``retire_after``: seconds an older version keeps verifying once superseded
    (None: never retired on a timer); ``period``: seconds between rotations.
    """

    kind: str
    name: str
    period: float
    publish_ahead: float = 0.0
    retire_after: float | None = 0.0
    generate: Callable[[], bytes] | None = None

    def versions(self, keystore: Keystore) -> list[SecretVersionInfo]:
        try:
            return keystore.versions(self.name)
        except SecretNotFound:
            return []

    def in_use(self, infos: Sequence[SecretVersionInfo], now: float) -> SecretVersionInfo | None:
        """The version used now: the newest active one published for ``publish_ahead``
        (the oldest active if none is, as the signers choose)."""
        active = [v for v in infos if v.state == "active"]
        if self.publish_ahead <= 0:
            return active[-1] if active else None  # used as soon as it is stored
        ready = [v for v in active if _epoch(v.created_at) + self.publish_ahead <= now]
        return ready[-1] if ready else (active[0] if active else None)

    def status(self, keystore: Keystore, now: float) -> list[KeyStatus]:
        return self.status_of(self.versions(keystore), now)

    def status_of(self, infos: Sequence[SecretVersionInfo], now: float) -> list[KeyStatus]:
        used = self.in_use(infos, now)
        rows: list[KeyStatus] = []
        for info in infos:
            created = _epoch(info.created_at) - _PRECISION
            state: KeyState
            if info.state != "active":
                state = "retired"
            elif used is not None and info.version == used.version:
                state = "active"
            elif used is not None and info.version > used.version:
                state = "pending"
            else:
                state = "verifying"
            due = created + self.period if state == "active" else None
            rows.append(
                KeyStatus(
                    kind=self.kind,
                    name=self.name,
                    version=info.version,
                    fingerprint=info.fingerprint,
                    created_at=datetime.fromtimestamp(created, UTC),
                    age_days=max(0.0, now - created) / DAY,
                    state=state,
                    next_rotation=None if due is None else datetime.fromtimestamp(due, UTC),
                    overdue=due is not None and now > due,
                )
            )
        return rows

    def rotate(
        self, keystore: Keystore, now: float, *, force: bool, value: bytes | None = None
    ) -> int | None:
        """Add a version if due (or ``force``) and none is pending; return it, or None.

        Raises :class:`RotationRefused` if the kind's value comes from outside
        and none was given.
        """
        infos = self.versions(keystore)
        active = [v for v in infos if v.state == "active"]
        newest = active[-1] if active else None
        if value is None:
            if self.generate is None:
                if force:
                    raise RotationRefused(
                        f"{self.kind} keys come from the provider: give the new value"
                    )
                return None
            if newest is not None:
                used = self.in_use(infos, now)
                pending = used is not None and newest.version > used.version
                due = _epoch(newest.created_at) - _PRECISION + self.period <= now
                if pending or not (force or due):
                    return None  # idempotent: a rotation in progress is not restarted
            value = self.generate()
        elif any(keystore.get(self.name, v.version) == value for v in active):
            return None  # the same value again (a retried command) is no new version
        return keystore.rotate(self.name, value)

    def retire_expired(self, keystore: Keystore, now: float) -> list[int]:
        """Retire active versions superseded more than ``retire_after`` ago."""
        if self.retire_after is None:
            return []
        infos = self.versions(keystore)
        used = self.in_use(infos, now)
        if used is None:
            return []
        retired: list[int] = []
        active = [v for v in infos if v.state == "active"]
        for info in active:
            if info.version >= used.version:
                continue
            successor = min(
                _epoch(v.created_at) + self.publish_ahead
                for v in active
                if v.version > info.version
            )
            if now >= successor + self.retire_after:
                keystore.retire(self.name, info.version)
                retired.append(info.version)
        return retired


def _epoch(created_at: str) -> float:
    """When a version may first be counted as published (``created_at`` + its
    precision); an unreadable one counts as brand new."""
    try:
        return datetime.fromisoformat(created_at).timestamp() + _PRECISION
    except ValueError:
        return time.time()


@dataclass(frozen=True)
class RotationPlan:
    """Every key of a deployment, from its settings: what ``status`` and a run walk."""

    settings: Settings
    keystore: Keystore
    kms: KMS
    db: Database | None  # None: status only (it reads the key ring alone)
    # How the worker and the command line reach PostgreSQL as a role that may
    # ALTER ROLE (None: database passwords are not rotated by this plan).
    admin_conninfo: Callable[[], str] | None = None

    def _period(self, kind: str) -> float:
        return float(self.settings.key_rotation_days.get(kind, 90)) * DAY

    def secret_keys(self) -> list[SecretKey]:
        """The key-ring secrets of every kind but ``kek`` (which is per tenant)."""
        s = self.settings
        overlap = s.key_rotation_overlap_hours * 3600.0
        refresh = signing.KEY_REFRESH_SECONDS + signing.CLOCK_SKEW_SECONDS
        keys = [
            SecretKey(
                "jwt",
                JWT_SECRET,
                self._period("jwt"),
                publish_ahead=300.0,
                retire_after=s.access_token_minutes * 60.0 + 60.0,
                generate=_pem("jwt"),
            ),
            SecretKey(
                "receipt",
                RECEIPT_SECRET,
                self._period("receipt"),
                publish_ahead=300.0,
                retire_after=None,
                generate=_pem("receipt"),
            ),
            SecretKey(
                "envelope",
                signing.KEY_NAME,
                self._period("envelope"),
                publish_ahead=signing.PUBLISH_AHEAD_SECONDS,
                retire_after=signing.MAX_AGE_SECONDS + refresh,
                generate=lambda: secrets.token_bytes(32),
            ),
            SecretKey(
                "tool",
                signing.TOOL_KEY_NAME,
                self._period("tool"),
                publish_ahead=signing.PUBLISH_AHEAD_SECONDS,
                retire_after=signing.TOOL_CALL_MAX_AGE_SECONDS + refresh,
                generate=lambda: secrets.token_bytes(32),
            ),
        ]
        for ref in (s.stripe_webhook_secret_ref, s.adyen_hmac_key_ref):
            if not _local(ref):
                continue  # a reference into another store rotates there
            keys.append(SecretKey("webhook", _name(ref), self._period("webhook"), 0.0, overlap))
        for route in s.gateway_models:
            if route.api_key_ref and _local(route.api_key_ref):
                name = _name(route.api_key_ref)
                if all(k.name != name for k in keys):
                    keys.append(SecretKey("provider", name, self._period("provider"), 0.0, overlap))
        for role in (APP_ROLE, QUEUE_ROLE):
            keys.append(
                SecretKey(
                    "db-password",
                    _role_secret(role),
                    self._period("db-password"),
                    generate=lambda: secrets.token_urlsafe(32).encode(),
                )
            )
        return keys

    def kek_names(self) -> list[tuple[UUID, str]]:
        """The tenants' KEKs in the local key ring: ``(tenant id, secret name)``."""
        if not isinstance(self.kms, LocalKMS):
            return []
        found: list[tuple[UUID, str]] = []
        for name in self.keystore.list():
            prefix, _, rest = name.rpartition("/")
            if prefix == "kms/tenants":
                try:
                    found.append((UUID(rest), name))
                except ValueError:
                    continue
        return found

    # -- status ---------------------------------------------------------------------

    def status(self, now: float | None = None) -> list[KeyStatus]:
        """Every version of every key; an overdue key in use logs an alert."""
        rows = self._versions(time.time() if now is None else now)
        for row in rows:
            if row.overdue:
                _log.warning(
                    "key_rotation_overdue",
                    kind=row.kind,
                    key=row.name,
                    version=row.version,
                    age_days=round(row.age_days, 1),
                )
        return rows

    def ages(self, now: float | None = None) -> dict[str, float]:
        """Seconds since each kind's oldest key in use was created (the
        rotation-age metric, read on every scrape: it logs nothing)."""
        ages: dict[str, float] = {}
        for row in self._versions(time.time() if now is None else now):
            if row.state == "active":  # the version in use
                ages[row.kind] = max(ages.get(row.kind, 0.0), row.age_days * DAY)
        return ages

    def _versions(self, now: float) -> list[KeyStatus]:
        rows: list[KeyStatus] = []
        for key in self.secret_keys():
            rows.extend(key.status(self.keystore, now))
        period = self._period("kek")
        for _tenant, name in self.kek_names():
            rows.extend(
                SecretKey("kek", name, period, retire_after=None).status(self.keystore, now)
            )
        if isinstance(self.kms, RotatesKEKs):
            for tenant_id in self.kms.tenant_keks():
                key = SecretKey("kek", _backend_kek(tenant_id), period, retire_after=None)
                rows.extend(key.status_of(self.kms.kek_versions(tenant_id), now))
        return rows

    # -- rotation ---------------------------------------------------------------------

    async def rotate(
        self,
        kind: str,
        *,
        force: bool = True,
        name: str | None = None,
        value: bytes | None = None,
        now: float | None = None,
    ) -> list[RotationResult]:
        """Rotate (when due, or ``force``) and retire (when expired) the keys of ``kind``.

        ``name`` picks one key of a kind that has several (a webhook provider's
        or a model's secret); ``value`` is the new value of a kind whose
        values come from outside. Raises :class:`RotationRefused`.
        """
        if kind not in KINDS:
            raise RotationRefused(f"unknown key kind {kind!r}: choose {', '.join(KINDS)}")
        now = time.time() if now is None else now
        if kind == "kek":
            return await self._rotate_keks(force=force, now=now)
        if kind == "db-password" and self.admin_conninfo is None:
            raise RotationRefused("database passwords need the database's admin connection")
        keys = [k for k in self.secret_keys() if k.kind == kind]
        if name is not None:
            keys = [k for k in keys if k.name == name]
            if not keys:
                raise RotationRefused(f"no {kind} key named {name!r}")
        elif value is not None and len(keys) != 1:
            raise RotationRefused(f"several {kind} keys: name the one the value is for")
        results: list[RotationResult] = []
        for key in keys:
            result = RotationResult(kind, key.name)
            if kind == "db-password":
                result.rotated = self._rotate_password(key, now, force=force)
            else:
                result.rotated = key.rotate(self.keystore, now, force=force, value=value)
            result.retired = key.retire_expired(self.keystore, now)
            await self._audit(result)
            results.append(result)
        return results

    async def run_due(self, now: float | None = None) -> list[RotationResult]:
        """The periodic job: every kind rotated when due, expired versions retired."""
        results: list[RotationResult] = []
        for kind in KINDS:
            if kind == "db-password" and self.admin_conninfo is None:
                continue
            results.extend(await self.rotate(kind, force=False, now=now))
        self.status(now)  # logs what is still overdue (a provider's secret, say)
        return results

    def _rotate_password(self, key: SecretKey, now: float, *, force: bool) -> int | None:
        """Set a new password for the role and record it in the key ring, together.

        ``ALTER ROLE`` is transactional: it commits only after the key ring
        holds the new password, so the two never disagree for longer than the
        commit; a failure in between leaves the old password in force.
        """
        assert self.admin_conninfo is not None and key.generate is not None
        infos = key.versions(self.keystore)
        if infos and not force:
            newest = [v for v in infos if v.state == "active"][-1]
            if _epoch(newest.created_at) - _PRECISION + key.period > now:
                return None
        role = APP_ROLE if key.name == _role_secret(APP_ROLE) else QUEUE_ROLE
        password = key.generate()
        with psycopg.connect(self.admin_conninfo()) as admin:  # a transaction
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password.decode())
                )
            )
            version = self.keystore.rotate(key.name, password)
        # Older passwords no longer open anything: retire them at once.
        for info in infos:
            if info.state == "active":
                self.keystore.retire(key.name, info.version)
        return version

    async def _rotate_keks(self, *, force: bool, now: float) -> list[RotationResult]:
        """A new KEK version per tenant; the tenant's data keys (and PII token key)
        re-wrapped under it in one transaction with its audit event; then the
        old version retired (kept readable by number: a backup's blobs)."""
        period = self._period("kek")
        if isinstance(self.kms, RotatesKEKs):
            return await self._rotate_backend_keks(self.kms, period, force=force, now=now)
        results: list[RotationResult] = []
        for tenant_id, name in self.kek_names():
            if not await self._tenant_here(tenant_id):
                continue
            key = SecretKey("kek", name, period, retire_after=None, generate=_random32)
            before = [v for v in key.versions(self.keystore) if v.state == "active"]
            version = key.rotate(self.keystore, now, force=force)
            if version is None:
                continue
            result = RotationResult("kek", name, rotated=version)
            await self._rewrap_tenant(tenant_id, result)
            for info in before:
                self.keystore.retire(name, info.version)
                result.retired.append(info.version)
            results.append(result)
        return results

    async def _rotate_backend_keks(
        self, kms: RotatesKEKs, period: float, *, force: bool, now: float
    ) -> list[RotationResult]:
        """The same for KEKs held by OpenBao transit or AWS KMS: the backend adds
        the new version (older ones keep unwrapping: a backup's blobs), and the
        data keys are re-wrapped inside it (transit ``rewrap``, KMS ``ReEncrypt``)."""
        results: list[RotationResult] = []
        for tenant_id in kms.tenant_keks():
            if not await self._tenant_here(tenant_id):
                continue
            active = [v for v in kms.kek_versions(tenant_id) if v.state == "active"]
            due = not active or _epoch(active[-1].created_at) - _PRECISION + period <= now
            if not (force or due):
                continue
            version = kms.rotate_kek(tenant_id)
            result = RotationResult("kek", _backend_kek(tenant_id), rotated=version)
            await self._rewrap_tenant(tenant_id, result)
            results.append(result)
        return results

    async def _tenant_here(self, tenant_id: UUID) -> bool:
        """A key ring or KMS may hold KEKs of tenants this database does not have
        (shredded here, or a store shared by several deployments): those are left
        alone, logged, instead of failing the whole run."""
        assert self.db is not None, "rotation writes audit events"
        if await TenantService(self.db).exists(tenant_id):
            return True
        _log.warning("kek_of_unknown_tenant_skipped", tenant_id=str(tenant_id))
        return False

    async def _rewrap_tenant(self, tenant_id: UUID, result: RotationResult) -> None:
        """Re-wrap the tenant's data keys and PII token key under its new KEK
        version, with the audit event, in one transaction of the tenant."""
        assert self.db is not None, "rotation writes audit events"
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            result.rewrapped = await TenantKeys(self.kms).rewrap(tx, tenant_id)
            result.rewrapped += await rewrap_token_key(tx, self.kms, tenant_id)
            await audit.record(
                tx,
                actor="system:rotation",
                action="key.rotate",
                target=f"kek:{tenant_id}",
                details={"version": result.rotated, "rewrapped": result.rewrapped},
            )

    async def _audit(self, result: RotationResult) -> None:
        """One platform audit event per change (none for a run that changed nothing)."""
        events: list[audit.Event] = []
        if result.rotated is not None:
            events.append(
                (
                    "system:rotation",
                    "key.rotate",
                    f"{result.kind}:{result.name}",
                    {"version": result.rotated},
                    None,
                )
            )
        for version in result.retired:
            events.append(
                (
                    "system:rotation",
                    "key.retire",
                    f"{result.kind}:{result.name}",
                    {"version": version},
                    None,
                )
            )
        if not events:
            return
        assert self.db is not None, "rotation writes audit events"
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await audit.record_many(tx, events)
        _log.info(
            "key_rotated",
            kind=result.kind,
            key=result.name,
            version=result.rotated,
            retired=result.retired,
        )


def _backend_kek(tenant_id: UUID) -> str:
    """How ``bastion keys status`` names a tenant's KEK held by OpenBao or AWS KMS."""
    return f"kms-backend/tenants/{tenant_id}"


def _random32() -> bytes:
    return secrets.token_bytes(32)


def _pem(kind: str) -> Callable[[], bytes]:
    """A generator of the ring's private keys (PKCS#8 PEM) for ``jwt`` or ``receipt``."""
    from joserfc.jwk import ECKey, OKPKey

    def generate() -> bytes:
        key = ECKey.generate_key("P-256") if kind == "jwt" else OKPKey.generate_key("Ed25519")
        pem: bytes = key.as_pem(private=True)
        return pem

    return generate


def _role_secret(role: str) -> str:
    return f"db/{role.replace('_', '-')}-password"


def _local(ref: str) -> bool:
    return ref.startswith("local://")


def _name(ref: str) -> str:
    try:
        return SecretRef.parse(ref).name
    except Exception:  # an unparsable reference names nothing to rotate
        return ref


def results_json(results: Sequence[RotationResult]) -> list[dict[str, Any]]:
    return [
        {
            "kind": r.kind,
            "name": r.name,
            "rotated": r.rotated,
            "retired": r.retired,
            "rewrapped": r.rewrapped,
        }
        for r in results
    ]
