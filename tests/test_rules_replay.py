"""Every detector rule against a synthetic attack replay and a benign one (issue 19 item 4).

The rules are the very objects the worker's runner feeds (bastion.detectors.rules);
here they see events with simulated times, so a spend baseline of two days or
a burst's spacing costs nothing to replay. tests/test_detectors.py runs them
through the real trail, cursors and responses.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from bastion.detectors.rules import (
    FREEZE_SPEND,
    REVOKE_SESSIONS,
    Event,
    Finding,
    Malformed,
    Rule,
    build_rules,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
TENANT = UUID(int=7)
USER = UUID(int=8)
OTHER = UUID(int=9)


def ev(
    minute: float,
    action: str,
    *,
    actor: str = f"user:{USER}",
    target: str = "",
    tenant: UUID = TENANT,
    **details: Any,
) -> Event:
    ev.seq += 1  # type: ignore[attr-defined]
    return Event(
        tenant,
        ev.seq,  # type: ignore[attr-defined]
        T0 + timedelta(minutes=minute),
        actor,
        action,
        target,
        details,
    )


ev.seq = 0  # type: ignore[attr-defined]


def rule(name: str, **params: int) -> Rule:
    (found,) = [r for r in build_rules({name: params}) if r.name == name]
    return found


def replay(r: Rule, events: Iterable[Event]) -> list[Finding]:
    found: list[Finding] = []
    for event in events:
        found.extend(r.observe(event, live=True))
    return found


def calls(start_min: float, count: int, every_min: float, cost: int, **kw: Any) -> list[Event]:
    return [
        ev(start_min + i * every_min, "model.invoke", target="gpt-x", cost_micro_usd=cost, **kw)
        for i in range(count)
    ]


HISTORY = calls(0, 48, 60, 100_000)  # two days at $0.10 an hour: the baseline


def test_spend_spike_over_the_baseline_fires_and_says_why() -> None:
    spike = calls(48 * 60 + 1, 20, 1.5, 1_000_000)  # $20 within half an hour
    found = replay(rule("spend.anomaly"), HISTORY + spike)
    mine = [f for f in found if f.subject == f"user:{USER}"]
    assert mine, found
    assert "more than 10 times its hourly mean of 100000" in mine[0].reason
    assert mine[0].actions == (FREEZE_SPEND, REVOKE_SESSIONS) and mine[0].user_id == USER
    assert mine[0].first_at == spike[0].at  # the first event of the burst: latency starts there


def test_a_busy_hour_within_the_baseline_does_not_fire() -> None:
    busy = calls(48 * 60 + 1, 6, 10, 500_000)  # $3 in an hour: below the floor, 30x nothing
    assert replay(rule("spend.anomaly"), HISTORY + busy) == []
    normal = calls(48 * 60 + 1, 3, 20, 300_000, actor=f"user:{OTHER}")
    assert replay(rule("spend.anomaly", floor_micro_usd=100_000), HISTORY + normal) == []


def test_spend_over_the_ceiling_fires_without_any_history() -> None:
    burst = calls(0, 60, 0.5, 1_000_000)  # $60 in half an hour, a user of no history
    found = replay(rule("spend.anomaly"), burst)
    assert any("over the absolute ceiling of 50000000" in f.reason for f in found), found
    assert replay(rule("spend.anomaly"), calls(0, 4, 10, 1_000_000)) == []


ATTACKS_AND_BENIGN: dict[str, tuple[list[Event], list[Event], str]] = {
    "role.admin_burst": (
        [ev(i, "role.grant", target=f"user:{uuid4()}", role="contributor") for i in range(5)],
        [ev(i * 15, "role.grant", target=f"user:{uuid4()}", role="contributor") for i in range(5)],
        "granted or approved 5 roles",
    ),
    "role.policy_then_reads": (
        [ev(0, "egress.configure")] + [ev(1 + i / 10, "pii.reveal") for i in range(20)],
        [ev(1 + i / 10, "pii.reveal") for i in range(20)],
        "made 20 reads (pii.reveal) within 1800 s of changing policy (egress.configure)",
    ),
    "role.new_owner_billing": (
        [
            ev(0, "member.add", actor="operator", target=f"user:{OTHER}", role="owner"),
            ev(5, "billing.checkout", actor=f"user:{OTHER}", target="cs_1"),
        ],
        [
            ev(0, "member.add", actor="operator", target=f"user:{OTHER}", role="owner"),
            ev(120, "billing.checkout", actor=f"user:{OTHER}", target="cs_1"),
        ],
        "became owner (member.add by operator) and changed billing (billing.checkout) 300 s",
    ),
    "payment.card_testing": (
        [
            ev(
                i,
                "billing.webhook.applied",
                actor="adyen:webhook",
                type="AUTHORISATION",
                status="ignored",
                outcome="not-a-successful-payment-event",
            )
            for i in range(5)
        ],
        [
            ev(
                i * 30,
                "billing.webhook.applied",
                actor="adyen:webhook",
                type="AUTHORISATION",
                status="ignored",
                outcome="not-a-successful-payment-event",
            )
            for i in range(5)
        ]
        + [ev(i, "billing.checkout", target=f"cs_{i}") for i in range(9)],
        "5 failed payments within 600 s",
    ),
    "payment.tenant_farm": (
        [
            ev(i, "tenant.create", actor="signup", tenant=uuid4(), source="203.0.113.7")
            for i in range(5)
        ],
        [ev(i, "tenant.create", actor="operator", tenant=uuid4()) for i in range(8)],
        "5 tenants created by 203.0.113.7",
    ),
    "payment.dispute": (
        [
            ev(
                0,
                "billing.webhook.applied",
                actor="stripe:webhook",
                target="stripe:evt_1",
                type="charge.dispute.created",
                status="applied",
                outcome="dispute-recorded",
            )
        ],
        [
            ev(
                0,
                "billing.webhook.applied",
                actor="stripe:webhook",
                target="stripe:evt_2",
                type="charge.refunded",
                status="applied",
                outcome="refund-of-an-earlier-period",
            )
        ],
        "a charge.dispute.created webhook",
    ),
    "credential.spray": (
        [
            ev(
                i,
                "login.locked",
                actor="identity",
                target=f"user:{uuid4()}",
                tenant=uuid4(),
                address="198.51.100.0/24",
            )
            for i in range(5)
        ],
        [
            ev(
                i,
                "login.locked",
                actor="identity",
                target=f"user:{uuid4()}",
                address=f"198.51.{i}.0/24",
            )
            for i in range(5)
        ],
        "5 accounts locked out from 198.51.100.0/24",
    ),
    "credential.refresh_reuse": (
        [
            ev(
                0,
                "refresh_token.reuse",
                actor="identity",
                target=f"family:{uuid4()}",
                user=str(USER),
            )
        ],
        [
            ev(
                0,
                "refresh_token.revoke",
                actor="identity",
                target=f"family:{uuid4()}",
                user=str(USER),
            )
        ],
        "was used twice",
    ),
    "credential.dpop_replay": (
        [ev(i, "dpop.replay", actor="identity", target=f"user:{USER}") for i in range(3)],
        [ev(i * 20, "dpop.replay", actor="identity", target=f"user:{USER}") for i in range(3)],
        "3 replayed DPoP proofs",
    ),
}


@pytest.mark.parametrize("name", sorted(ATTACKS_AND_BENIGN))
def test_each_rule_fires_on_its_attack_and_not_on_benign_traffic(name: str) -> None:
    attack, benign, why = ATTACKS_AND_BENIGN[name]
    fired = replay(rule(name), attack)
    assert [f.rule for f in fired][:1] == [name]
    assert why in fired[0].reason, fired[0].reason
    assert replay(rule(name), benign) == []


def test_every_rule_has_an_attack_and_a_benign_replay() -> None:
    names = {r.name for r in build_rules()} - {"spend.anomaly"}  # tested above
    assert names == set(ATTACKS_AND_BENIGN)


def test_history_rebuilds_windows_without_firing() -> None:
    """A restarted runner replays processed events with live=False: no finding,
    but the burst they began fires on the next live event."""
    r = rule("payment.card_testing")
    failed = [
        ev(
            i,
            "billing.webhook.applied",
            actor="adyen:webhook",
            type="AUTHORISATION",
            outcome="not-a-successful-payment-event",
        )
        for i in range(5)
    ]
    assert [f for e in failed[:4] for f in r.observe(e, live=False)] == []
    assert [f.rule for f in r.observe(failed[4], live=True)] == ["payment.card_testing"]


@pytest.mark.parametrize(
    "details",
    [{"cost_micro_usd": "lots"}, {"cost_micro_usd": -1}, {"cost_micro_usd": True}, {}],
)
def test_a_malformed_event_raises_malformed(details: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        rule("spend.anomaly").observe(ev(0, "model.invoke", **details), live=True)


def test_unknown_rules_and_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown detector rules"):
        build_rules({"spend.anomally": {}})
    with pytest.raises(ValueError, match="unknown parameters"):
        build_rules({"spend.anomaly": {"ratoi": 3}})
    assert "payment.dispute" not in {
        r.name for r in build_rules({"payment.dispute": {"enabled": 0}})
    }
