"""The closing scenes (issue 20): during a burst of traffic and webhooks, the
operator revokes the signing keys and pauses webhooks.

Both run at once against the running processes, as ``bastion drill
revoke-keys`` and ``bastion drill webhook-storm`` run them (the same code,
:mod:`bastion.backup.live_drills`): old tokens are refused by the api and the
gateway and new ones work; a storm of duplicated, shuffled Stripe events
arrives while webhooks are paused and is applied exactly once after the
resume, nothing lost. (The cached answers, marked, while the provider is down
are the outage scene's.)
"""

from __future__ import annotations

import asyncio

from bastion.backup.live_drills import Member, revoke_keys_drill, webhook_storm_drill
from bastion.billing.wiring import build_billing
from bastion.db.pool import Database
from bastion.demo.common import DemoTenant, Report
from bastion.incident.service import IncidentService
from bastion.secrets.backends import open_key_ring
from bastion.secrets.protocols import Keystore
from bastion.secrets.store import resolve_ref
from bastion.settings import Settings

OPERATOR = "operator:demo"


async def check_closing(
    report: Report,
    settings: Settings,
    db: Database,
    tenants: list[DemoTenant],
    urls: dict[str, str],
    keystore: Keystore,
) -> None:
    """Revoke keys and pause webhooks under a burst; report what held."""
    acme = tenants[0]
    kms = open_key_ring(settings, keystore=keystore).kms
    billing = build_billing(settings, db, keystore).service
    secret = resolve_ref(keystore, settings.stripe_webhook_secret_ref).decode()
    revoke, storm = await asyncio.gather(
        revoke_keys_drill(
            api_url=urls["api"],
            gateway_url=urls["gateway"],
            issuer=settings.resolved_issuer,
            member=Member(acme.id, acme.users["contributor"]),
            keystore=keystore,
            incident=IncidentService(db, settings, keystore, kms),
            before=0.5,
            after=2.0,
            actor=OPERATOR,
        ),
        webhook_storm_drill(
            api_url=urls["api"],
            secret=secret,
            db=db,
            billing=billing,
            tenants=3,
            invoices=4,
            senders=4,
            settle_within=30.0,
            actor=OPERATOR,
        ),
    )
    r, s = revoke.figures, storm.figures
    report.check(
        "closing",
        "under load the operator revokes the signing keys: every process refuses "
        "old tokens, new ones work",
        revoke.passed,
        f"api refuses after {r.get('api_refuses_seconds')} s, gateway after "
        f"{r.get('gateway_refuses_seconds')} s (target ≤ 2 s); new tokens accepted "
        f"everywhere after {r.get('every_process_accepts_new_seconds')} s; "
        f"{r.get('failed_requests')} errors in {r.get('requests')} requests",
    )
    report.check(
        "closing",
        "webhooks paused during a storm of duplicated, shuffled events: none applied",
        s.get("applied_while_paused") == 0 and s.get("failed_deliveries") == 0,
        f"{s.get('deliveries')} deliveries of {s.get('events')} events, all acknowledged; "
        f"{s.get('held_at_resume')} held at the resume",
    )
    report.check(
        "closing",
        "resumed: every event applied exactly once, none lost",
        storm.passed,
        f"{s.get('events_lost')} lost, {s.get('applied_more_than_once')} applied twice; "
        f"settled {s.get('settled_seconds_after_resume')} s after the resume",
    )
