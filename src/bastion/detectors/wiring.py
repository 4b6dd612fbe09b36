"""The detectors built from settings (the composition root and the CLI call this)."""

from __future__ import annotations

from collections.abc import Callable

from bastion.db.pool import Database
from bastion.detectors.alerts import WebhookAlerts
from bastion.detectors.response import Controls, Responder, Sessions
from bastion.detectors.rules import build_rules
from bastion.detectors.runner import DetectorRunner
from bastion.detectors.store import DetectorStore
from bastion.settings import Settings


def build_runner(
    settings: Settings,
    db: Database,
    controls: Controls,
    sessions: Sessions,
    *,
    on_fired: Callable[[str], None] | None = None,
) -> DetectorRunner:
    """The runner with the configured rules (raises ValueError on an unknown rule or
    parameter in ``settings.detector_rules``: the worker does not start)."""
    alerts = None
    if settings.detector_alert_webhook_url is not None:
        alerts = WebhookAlerts(settings.detector_alert_webhook_url, DetectorStore(db))
    return DetectorRunner(
        db,
        build_rules(settings.detector_rules),
        Responder(controls, sessions),
        alerts=alerts,
        on_fired=on_fired,
        poll_seconds=settings.detector_poll_seconds,
    )
