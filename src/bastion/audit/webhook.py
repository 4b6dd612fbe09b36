"""A second sink for the audit checkpoints: a POST of each exported run to a webhook.

Each checkpoint run the directory sink holds is POSTed, in order, as the same
JSON the file holds (``{"checkpoint": <global statement>, "tenants": [...]}``,
compact JWS signed with the published keys, so the receiver needs no other
proof), with ``Content-Type: application/json`` and an ``Idempotency-Key`` of
the run's number. A failed delivery (a network error or any non-2xx answer)
is retried with exponential backoff, capped; deliveries run in their own task
and read the directory sink, so a receiver that is down never holds up a
checkpoint. The last delivered number is kept in the directory sink
(``webhook-delivered``), so a restarted worker resumes where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import httpx

from bastion.audit.checkpoints import DirectorySink
from bastion.logs import get_logger

_log = get_logger("bastion.audit")
_MARK = "webhook-delivered"


class WebhookSink:
    """Delivers the directory sink's checkpoint files to ``url``, oldest first."""

    def __init__(
        self,
        url: str,
        sink: DirectorySink,
        *,
        client: httpx.AsyncClient | None = None,
        first_backoff: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        self.url = url
        self.sink = sink
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0), follow_redirects=False
        )
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff

    @property
    def _mark(self) -> Path:
        return self.sink.directory / _MARK

    def delivered(self) -> int:
        """The number of the last run delivered (0: none)."""
        try:
            text = self._mark.read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def _record(self, number: int) -> None:
        tmp = self._mark.with_name(f".{_MARK}.{os.getpid()}.tmp")
        tmp.write_text(str(number))
        tmp.replace(self._mark)

    async def deliver_pending(self) -> int:
        """POST every run after the last delivered one, in order, each retried
        until it is accepted; return how many were delivered."""
        after = await anyio.to_thread.run_sync(self.delivered)
        pending = [
            (number, path)
            for number, path in sorted(await anyio.to_thread.run_sync(self.sink.files))
            if number > after
        ]
        for number, path in pending:
            body = await anyio.to_thread.run_sync(path.read_bytes)
            await self._post(number, body)
            await anyio.to_thread.run_sync(self._record, number)
        return len(pending)

    async def _post(self, number: int, body: bytes) -> None:
        backoff = self.first_backoff
        while True:
            try:
                answer = await self._client.post(
                    self.url,
                    content=body,
                    headers={"Content-Type": "application/json", "Idempotency-Key": str(number)},
                )
                if answer.is_success:
                    return
                failure = f"status {answer.status_code}"
            except httpx.HTTPError as exc:
                failure = type(exc).__name__
            _log.warning("audit_webhook_retry", number=number, error=failure, retry_in=backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def run_forever(self, poll_seconds: float = 1.0) -> None:
        """Deliver what the checkpointer exports, every ``poll_seconds`` (the worker runs this)."""
        try:
            while True:
                try:
                    await self.deliver_pending()
                except Exception as exc:  # e.g. the sink unreadable: the next poll retries
                    _log.warning("audit_webhook_failed", error=type(exc).__name__)
                await anyio.sleep(poll_seconds)
        finally:
            await self._client.aclose()


__all__ = ["WebhookSink"]
