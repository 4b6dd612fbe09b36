"""The detector rules: pure functions of the audit events they are shown, in order.

Each rule reads the real audit actions the domains write (their names are
listed in ``watches``), keeps its windows in memory, and returns a
:class:`Finding` that says, in words and numbers, why it fired. Rules never
touch the database: :mod:`bastion.detectors.runner` feeds them committed
events and turns findings into firings, and the benchmark replays a
simulated week through the very same objects. Thresholds are integers
(counts, seconds, micro-USD) and every one can be changed per deployment
(``settings.detector_rules``, see :func:`build_rules`).

An event whose fields a rule cannot read raises :class:`Malformed`; the
runner counts it, logs it and goes on (a malformed event never stops the
stream).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from bastion.detectors.windows import Window

# The responses a finding may ask for (bastion.detectors.response carries them out).
REVOKE_SESSIONS = "revoke_sessions"  # the user's refresh families, or the tenant's
FREEZE_SPEND = "freeze_spend"  # the tenant's budget to zero (402 spend-frozen)
DISABLE_TOOLS = "disable_tools"  # the tenant's tool runs paused
RESPONSES = frozenset({REVOKE_SESSIONS, FREEZE_SPEND, DISABLE_TOOLS})

# Actors an operator runs as: their bulk work (onboarding tenants) is not fraud.
OPERATOR_ACTORS = frozenset({"operator", "demo"})


class Malformed(ValueError):
    """An event a rule cannot read (wrong type or shape of a field)."""


@dataclass(frozen=True, slots=True)
class Event:
    """One committed audit event, as the runner reads it."""

    tenant_id: UUID
    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    details: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule fired: on which tenant, about what, why, since when, and what to do."""

    rule: str
    tenant_id: UUID
    subject: str
    reason: str
    evidence: dict[str, Any]
    first_at: datetime
    first_seq: int
    actions: tuple[str, ...]
    user_id: UUID | None = None


def user_of(principal: str) -> UUID | None:
    """The user id of ``user:<uuid>`` (an actor or a target), else None."""
    if principal.startswith("user:"):
        try:
            return UUID(principal[5:])
        except ValueError:
            return None
    return None


def _revoke_if(user: UUID | None) -> tuple[str, ...]:
    """Revoke the sessions of the user who acted; nothing when no user did (the
    tenant's every session is not the price of an operator's script)."""
    return (REVOKE_SESSIONS,) if user is not None else ()


def _int(details: Mapping[str, Any], name: str) -> int:
    value = details.get(name)
    if type(value) is not int or value < 0:  # bool is not a count
        raise Malformed(f"{name} is not a non-negative integer")
    return value


def _text(details: Mapping[str, Any], name: str) -> str | None:
    value = details.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Malformed(f"{name} is not a string")
    return value[:200]


def _details(event: Event) -> Mapping[str, Any]:
    if not isinstance(event.details, Mapping):
        raise Malformed("details is not an object")
    return event.details


@dataclass
class Rule:
    """A rule: its name, the audit actions it reads, its parameters (integers)."""

    name: ClassVar[str]
    watches: ClassVar[frozenset[str]]
    defaults: ClassVar[dict[str, int]]
    params: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.params) - set(self.defaults) - {"enabled"}
        if unknown:
            raise ValueError(f"{self.name}: unknown parameters {sorted(unknown)}")
        self.params = {"enabled": 1, **self.defaults, **self.params}
        self.setup()

    def setup(self) -> None:
        """Build the rule's windows from its parameters (by default one sliding
        window of ``window_seconds``, for the rules that count in one)."""
        if "window_seconds" in self.defaults:
            self.window: Window = Window(self.p("window_seconds"))

    @property
    def enabled(self) -> bool:
        return bool(self.params["enabled"])

    def p(self, name: str) -> int:
        return self.params[name]

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        """Take one event; return what fired (nothing while ``live`` is False:
        replaying history after a restart only rebuilds the windows)."""
        raise NotImplementedError


# -- spend ------------------------------------------------------------------------------


@dataclass
class SpendAnomaly(Rule):
    """Model spend of a tenant, a user or a model over the last hour against
    its own hourly mean over the previous days, plus absolute ceilings."""

    name: ClassVar[str] = "spend.anomaly"
    watches: ClassVar[frozenset[str]] = frozenset({"model.invoke"})
    defaults: ClassVar[dict[str, int]] = {
        "window_seconds": 3600,
        "baseline_days": 7,
        "min_history_hours": 24,  # a younger key is judged by the ceilings only
        "ratio": 10,
        "floor_micro_usd": 5_000_000,  # below this, never an anomaly ($5 an hour)
        "tenant_ceiling_micro_usd": 200_000_000,  # $200 an hour, whatever the history
        "user_ceiling_micro_usd": 50_000_000,
    }

    def setup(self) -> None:
        super().setup()
        # (scope key) -> {hour number -> micro-USD}
        self.hours: dict[tuple[str, ...], dict[int, int]] = {}

    def seed_hour(self, key: tuple[str, ...], hour: int, micro_usd: int) -> None:
        """Spend already processed (the runner's restart reads it from the trail)."""
        bucket = self.hours.setdefault(key, {})
        bucket[hour] = bucket.get(hour, 0) + micro_usd

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action != "model.invoke":
            return []
        cost = _int(_details(event), "cost_micro_usd")
        tenant = str(event.tenant_id)
        user = user_of(event.actor)
        scopes: list[tuple[tuple[str, ...], str, int]] = [
            (("tenant", tenant), "tenant", self.p("tenant_ceiling_micro_usd")),
            (("model", tenant, event.target[:200]), f"model:{event.target[:200]}", 0),
        ]
        if user is not None:
            scopes.append(
                (("user", tenant, str(user)), f"user:{user}", self.p("user_ceiling_micro_usd"))
            )
        hour = int(event.at.timestamp()) // 3600
        found = []
        for key, subject, ceiling in scopes:
            span = self.window.add(key, event.at, seq=event.seq, value=cost)
            bucket = self.hours.setdefault(key, {})
            bucket[hour] = bucket.get(hour, 0) + cost
            self._forget_hours(bucket, hour)
            if not live or cost == 0:
                continue
            reason = self._judge(span.total, bucket, hour, ceiling)
            if reason is not None:
                found.append(
                    Finding(
                        self.name,
                        event.tenant_id,
                        subject,
                        f"{subject} spent {span.total} micro-USD in the last "
                        f"{self.p('window_seconds')} s: {reason}",
                        {"spent_micro_usd": span.total, "calls": span.count, "scope": key[0]},
                        span.first.at,
                        span.first.seq,
                        (FREEZE_SPEND, REVOKE_SESSIONS) if key[0] == "user" else (FREEZE_SPEND,),
                        user if key[0] == "user" else None,
                    )
                )
        return found

    def _forget_hours(self, bucket: dict[int, int], hour: int) -> None:
        oldest = hour - self.p("baseline_days") * 24 - 1
        if len(bucket) > self.p("baseline_days") * 24 + 2:
            for old in [h for h in bucket if h < oldest]:
                del bucket[old]

    def _judge(self, spent: int, bucket: dict[int, int], hour: int, ceiling: int) -> str | None:
        if ceiling and spent > ceiling:
            return f"over the absolute ceiling of {ceiling}"
        if spent < self.p("floor_micro_usd"):
            return None
        window_hours = max(1, -(-self.p("window_seconds") // 3600))
        first = min(bucket)
        if hour - first < self.p("min_history_hours"):
            return None  # too young for a baseline: the ceilings alone apply
        start = max(first, hour - self.p("baseline_days") * 24)
        end = hour - window_hours + 1  # hours before the current window
        base_hours = end - start
        if base_hours <= 0:
            return None
        base = sum(v for h, v in bucket.items() if start <= h < end)
        # spent / window_hours > ratio * base / base_hours, in integers
        if spent * base_hours > self.p("ratio") * base * window_hours:
            mean = base // base_hours
            return (
                f"more than {self.p('ratio')} times its hourly mean of {mean} "
                f"over the previous {base_hours} h"
            )
        return None


# -- role escalation ----------------------------------------------------------------------

GRANTS = frozenset({"role.grant", "role.approve"})
# Changes to what the tenant's policies allow or screen.
POLICY_CHANGES = frozenset(
    {
        "egress.configure",
        "egress.allow",
        "safety.screen.configure",
        "safety.pii_allow.add",
        "sampling.configure",
        "role.grant",
        "role.approve",
    }
)
# Reads of data out of the tenant that the trail records (one event each):
# revealing a vaulted PII value. Searches and answers are not audited one by one.
MASS_READS = frozenset({"pii.reveal"})
BILLING_CHANGES = frozenset(
    {
        "billing.checkout",
        "billing.plan.requested",
        "billing.plan.changed",
        "billing.plan.approved",
        "billing.customer.bound",
    }
)


@dataclass
class AdminBurst(Rule):
    """One actor granting or approving roles many times in a short while."""

    name: ClassVar[str] = "role.admin_burst"
    watches: ClassVar[frozenset[str]] = GRANTS
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 600, "threshold": 5}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action not in GRANTS:
            return []
        role = _text(_details(event), "role") or "?"
        span = self.window.add(
            (event.tenant_id, event.actor), event.at, seq=event.seq, tag=event.target
        )
        if not live or span.count < self.p("threshold"):
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                event.actor[:200],
                f"{event.actor[:200]} granted or approved {span.count} roles "
                f"({span.tags} people, last: {role}) within {self.p('window_seconds')} s "
                f"(threshold {self.p('threshold')})",
                {"grants": span.count, "people": span.tags},
                span.first.at,
                span.first.seq,
                _revoke_if(user_of(event.actor)),
                user_of(event.actor),
            )
        ]


@dataclass
class PolicyThenReads(Rule):
    """A policy change, then many reads of data out of the tenant by the same actor."""

    name: ClassVar[str] = "role.policy_then_reads"
    watches: ClassVar[frozenset[str]] = POLICY_CHANGES | MASS_READS
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 1800, "threshold": 20}

    def setup(self) -> None:
        super().setup()
        self.changes: dict[tuple[UUID, str], Event] = {}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        key = (event.tenant_id, event.actor)
        if event.action in POLICY_CHANGES:
            self.changes[key] = event
        if event.action not in MASS_READS:
            return []
        change = self.changes.get(key)
        if change is None or (event.at - change.at).total_seconds() > self.p("window_seconds"):
            return []
        span = self.window.add(key, event.at, seq=event.seq, tag=event.target)
        if not live or span.count < self.p("threshold"):
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                event.actor[:200],
                f"{event.actor[:200]} made {span.count} reads ({event.action}) within "
                f"{self.p('window_seconds')} s of changing policy ({change.action}) "
                f"(threshold {self.p('threshold')})",
                {"reads": span.count, "policy_change": change.action},
                change.at,
                change.seq,
                _revoke_if(user_of(event.actor)),
                user_of(event.actor),
            )
        ]


@dataclass
class NewOwnerBilling(Rule):
    """A user made owner who changes billing right away."""

    name: ClassVar[str] = "role.new_owner_billing"
    watches: ClassVar[frozenset[str]] = GRANTS | {"member.add"} | BILLING_CHANGES
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 3600}

    def setup(self) -> None:
        self.owners: dict[tuple[UUID, UUID], Event] = {}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action in GRANTS or event.action == "member.add":
            user = user_of(event.target)
            if user is not None and _text(_details(event), "role") == "owner":
                self.owners[(event.tenant_id, user)] = event
            return []
        if event.action not in BILLING_CHANGES:
            return []
        actor = user_of(event.actor)
        made = self.owners.get((event.tenant_id, actor)) if actor else None
        if made is None:
            return []
        after = int((event.at - made.at).total_seconds())
        if after > self.p("window_seconds") or not live:
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                f"user:{actor}",
                f"user:{actor} became owner ({made.action} by {made.actor[:200]}) and "
                f"changed billing ({event.action}) {after} s later "
                f"(window {self.p('window_seconds')} s)",
                {"granted_by": made.actor[:200], "billing_change": event.action, "after_s": after},
                made.at,
                made.seq,
                (FREEZE_SPEND, REVOKE_SESSIONS),
                actor,
            )
        ]


# -- payment fraud --------------------------------------------------------------------------

WEBHOOK = "billing.webhook.applied"
# Stripe's failed-payment events, and Adyen's AUTHORISATION with success=false.
FAILED_PAYMENTS = frozenset({"charge.failed", "payment_intent.payment_failed"})
DISPUTES = frozenset({"charge.dispute.created", "CHARGEBACK"})


def _failed_payment(details: Mapping[str, Any]) -> bool:
    kind = _text(details, "type")
    if kind in FAILED_PAYMENTS:
        return True
    return kind == "AUTHORISATION" and _text(details, "outcome") == "not-a-successful-payment-event"


@dataclass
class CardTesting(Rule):
    """Bursts of failed payments, or of new checkout sessions, in one tenant."""

    name: ClassVar[str] = "payment.card_testing"
    watches: ClassVar[frozenset[str]] = frozenset({WEBHOOK, "billing.checkout"})
    defaults: ClassVar[dict[str, int]] = {
        "window_seconds": 600,
        "failed_threshold": 5,
        "checkout_threshold": 10,
    }

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action == WEBHOOK and _failed_payment(_details(event)):
            kind, threshold = "failed payments", self.p("failed_threshold")
        elif event.action == "billing.checkout":
            kind, threshold = "checkout sessions", self.p("checkout_threshold")
        else:
            return []
        span = self.window.add((event.tenant_id, kind), event.at, seq=event.seq)
        if not live or span.count < threshold:
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                f"tenant:{event.tenant_id}",
                f"{span.count} {kind} within {self.p('window_seconds')} s (threshold {threshold})",
                {kind.replace(" ", "_"): span.count},
                span.first.at,
                span.first.seq,
                (FREEZE_SPEND,),
            )
        ]


@dataclass
class TenantFarm(Rule):
    """Many tenants created by one source (an operator's own bulk work excepted)."""

    name: ClassVar[str] = "payment.tenant_farm"
    watches: ClassVar[frozenset[str]] = frozenset({"tenant.create"})
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 3600, "threshold": 5}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action != "tenant.create":
            return []
        source = _text(_details(event), "source") or event.actor[:200]
        if source in OPERATOR_ACTORS or source.startswith("operator:"):
            return []
        span = self.window.add(source, event.at, seq=event.seq, tag=str(event.tenant_id))
        if not live or span.tags < self.p("threshold"):
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                f"source:{source}",
                f"{span.tags} tenants created by {source} within "
                f"{self.p('window_seconds')} s (threshold {self.p('threshold')})",
                {"tenants": span.tags},
                span.first.at,
                span.first.seq,
                (FREEZE_SPEND,),
            )
        ]


@dataclass
class Dispute(Rule):
    """A dispute or chargeback of a payment: at once."""

    name: ClassVar[str] = "payment.dispute"
    watches: ClassVar[frozenset[str]] = frozenset({WEBHOOK})
    defaults: ClassVar[dict[str, int]] = {}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action != WEBHOOK:
            return []
        kind = _text(_details(event), "type")
        if kind not in DISPUTES or not live:
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                event.target[:200],
                f"a {kind} webhook ({event.target[:200]}) reported a dispute or chargeback",
                {"type": kind},
                event.at,
                event.seq,
                (FREEZE_SPEND,),
            )
        ]


# -- credential attacks ----------------------------------------------------------------------

LOCKOUTS = frozenset({"login.locked", "mfa.locked", "password_change.locked"})


@dataclass
class CredentialSpray(Rule):
    """Lockouts of many accounts, in any tenants, from one network."""

    name: ClassVar[str] = "credential.spray"
    watches: ClassVar[frozenset[str]] = LOCKOUTS
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 900, "threshold": 5}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action not in LOCKOUTS:
            return []
        address = _text(_details(event), "address")
        if not address:
            return []
        span = self.window.add(
            address, event.at, seq=event.seq, tag=f"{event.tenant_id}/{event.target[:200]}"
        )
        if not live or span.tags < self.p("threshold"):
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                f"address:{address}",
                f"{span.tags} accounts locked out from {address} within "
                f"{self.p('window_seconds')} s (threshold {self.p('threshold')})",
                {"accounts": span.tags, "lockouts": span.count},
                span.first.at,
                span.first.seq,
                (),
            )
        ]


@dataclass
class RefreshReuse(Rule):
    """A refresh token used twice (RFC 9700 4.14.2): the family is stolen."""

    name: ClassVar[str] = "credential.refresh_reuse"
    watches: ClassVar[frozenset[str]] = frozenset({"refresh_token.reuse"})
    defaults: ClassVar[dict[str, int]] = {}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action != "refresh_token.reuse" or not live:
            return []
        user = _text(_details(event), "user")
        user_id = user_of(f"user:{user}") if user else None
        who = f"user:{user_id}" if user_id else f"tenant:{event.tenant_id}"
        return [
            Finding(
                self.name,
                event.tenant_id,
                who,
                f"a refresh token of {event.target[:200]} was used twice: every session "
                f"of {who} is revoked",
                {"family": event.target[:200]},
                event.at,
                event.seq,
                (REVOKE_SESSIONS,),
                user_id,
            )
        ]


@dataclass
class DpopReplay(Rule):
    """DPoP proofs replayed against one user's tokens (RFC 9449 section 11.1)."""

    name: ClassVar[str] = "credential.dpop_replay"
    watches: ClassVar[frozenset[str]] = frozenset({"dpop.replay"})
    defaults: ClassVar[dict[str, int]] = {"window_seconds": 600, "threshold": 3}

    def observe(self, event: Event, *, live: bool) -> list[Finding]:
        if event.action != "dpop.replay":
            return []
        span = self.window.add((event.tenant_id, event.target), event.at, seq=event.seq)
        if not live or span.count < self.p("threshold"):
            return []
        return [
            Finding(
                self.name,
                event.tenant_id,
                event.target[:200],
                f"{span.count} replayed DPoP proofs for {event.target[:200]} within "
                f"{self.p('window_seconds')} s (threshold {self.p('threshold')})",
                {"replays": span.count},
                span.first.at,
                span.first.seq,
                (REVOKE_SESSIONS,),
                user_of(event.target),
            )
        ]


RULES: tuple[type[Rule], ...] = (
    SpendAnomaly,
    AdminBurst,
    PolicyThenReads,
    NewOwnerBilling,
    CardTesting,
    TenantFarm,
    Dispute,
    CredentialSpray,
    RefreshReuse,
    DpopReplay,
)


def build_rules(overrides: Mapping[str, Mapping[str, int]] | None = None) -> list[Rule]:
    """Every enabled rule with its parameters (``overrides`` by rule name).

    Raises ValueError on an unknown rule or parameter (a typo must not leave a
    rule silently at its default)."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - {rule.name for rule in RULES}
    if unknown:
        raise ValueError(f"unknown detector rules {sorted(unknown)}")
    rules = [kind(dict(overrides.get(kind.name, {}))) for kind in RULES]
    return [rule for rule in rules if rule.enabled]
