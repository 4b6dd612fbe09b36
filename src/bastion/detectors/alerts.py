"""Alerts of firings: a log line always, and a POST to the operator's webhook.

Deliveries run in their own task, from the firings table (``alerted_at``
unset), so a receiver that is down never holds up a response and a restarted
worker still delivers what it had not. A failed POST (a network error or a
non-2xx answer) is retried with exponential backoff, capped. Each POST
carries an ``Idempotency-Key`` of the firing's id, so a receiver can drop the
duplicate a crash between its answer and our bookkeeping may cause.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import httpx

from bastion.detectors.store import DetectorStore, Firing
from bastion.logs import get_logger

_log = get_logger("bastion.detectors")


def payload(firing: Firing) -> dict[str, Any]:
    """What an alert says: the rule, where, why, since when and what was done."""
    return {
        "firing": firing.id,
        "rule": firing.rule,
        "tenant_id": str(firing.tenant_id),
        "subject": firing.subject,
        "reason": firing.reason,
        "evidence": firing.evidence,
        "first_event_at": firing.first_at.isoformat(),
        "fired_at": firing.fired_at.isoformat(),
        "actions": list(firing.actions),
    }


class WebhookAlerts:
    """POSTs each undelivered firing to ``url``, oldest first, with backoff."""

    def __init__(
        self,
        url: str,
        store: DetectorStore,
        *,
        client: httpx.AsyncClient | None = None,
        first_backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        self.url = url
        self.store = store
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0), follow_redirects=False
        )
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New firings committed: deliver now rather than at the next poll."""
        self._wake.set()

    async def deliver_pending(self) -> bool:
        """Try each undelivered firing once; True if all were delivered."""
        for firing in await self.store.unalerted():
            delivered = await self._post(firing)
            await self.store.alert_tried(firing.id, delivered=delivered)
            if not delivered:
                return False
        return True

    async def _post(self, firing: Firing) -> bool:
        try:
            answer = await self._client.post(
                self.url,
                json=payload(firing),
                headers={"Idempotency-Key": f"detector-firing-{firing.id}"},
            )
        except httpx.HTTPError as error:
            _log.warning("detector_alert_failed", firing=firing.id, error=type(error).__name__)
            return False
        if not answer.is_success:
            _log.warning("detector_alert_failed", firing=firing.id, status=answer.status_code)
            return False
        return True

    async def run_forever(self, poll_seconds: float = 5.0) -> None:
        backoff = self.first_backoff
        try:
            while True:
                try:
                    ok = await self.deliver_pending()
                except Exception as error:  # the database away: try again later
                    _log.warning("detector_alert_failed", error=type(error).__name__)
                    ok = False
                if ok:
                    backoff = self.first_backoff
                    with anyio.move_on_after(poll_seconds):
                        await self._wake.wait()
                    self._wake.clear()
                else:
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff)
        finally:
            await self._client.aclose()
