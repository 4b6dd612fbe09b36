"""The job queue: procrastinate on Bastion's own PostgreSQL.

The queue's tables live in the ``procrastinate`` schema, reached only as the
``bastion_queue`` role; jobs are enqueued by the app role through
``bastion.enqueue_ingest`` inside the transaction that creates their subject,
so a job and its document commit (or vanish) together.

A worker killed with ``kill -9`` leaves its jobs in ``doing``. Procrastinate
notices the missing heartbeats; :func:`requeue_stalled` puts those jobs back
in the queue, and the jobs themselves are idempotent, so each one takes effect
exactly once however often it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import procrastinate

from bastion.logs import get_logger

_log = get_logger("bastion.worker")

QUEUES = ("ingest", "billing", "tools")
HEARTBEAT_SECONDS = 2.0
# A worker silent this long is dead; its jobs go back to the queue.
STALLED_SECONDS = 10.0


def queue_app(conninfo: str, *, max_size: int = 4) -> procrastinate.App:
    """Return the procrastinate app on the ``bastion_queue`` role's connection."""
    connector = procrastinate.PsycopgConnector(
        conninfo=conninfo,
        min_size=1,
        max_size=max_size,
        kwargs={"options": "-c search_path=procrastinate"},
    )
    return procrastinate.App(connector=connector)


async def requeue_stalled(app: procrastinate.App, stalled_seconds: float = STALLED_SECONDS) -> int:
    """Put the jobs of workers that stopped heartbeating back in the queue."""
    jobs = list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_seconds))
    for job in jobs:
        _log.warning("job_requeued", job_id=job.id, task=job.task_name)
        await app.job_manager.retry_job(job)
    return len(jobs)


@contextlib.asynccontextmanager
async def running_worker(
    app: procrastinate.App, *, concurrency: int = 1, sweep_seconds: float = 5.0
) -> AsyncIterator[None]:
    """Run the queue's worker (and the stalled-job sweeper) while the block runs."""
    async with app.open_async():
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=list(QUEUES),
                concurrency=concurrency,
                install_signal_handlers=False,
                update_heartbeat_interval=HEARTBEAT_SECONDS,
                stalled_worker_timeout=STALLED_SECONDS,
                delete_jobs="successful",
            )
        )

        async def sweep() -> None:
            while True:
                try:
                    await requeue_stalled(app)
                except Exception:  # a database blip must not end the sweeper
                    _log.exception("requeue_failed")
                await asyncio.sleep(sweep_seconds)

        sweeper = asyncio.create_task(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            worker.cancel()
            for task in (sweeper, worker):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
