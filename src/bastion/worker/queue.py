"""The job queue: procrastinate on Bastion's own PostgreSQL.

The queue's tables live in the ``procrastinate`` schema, reached only as the
``bastion_queue`` role; jobs are enqueued by the app role through
``bastion.enqueue_ingest`` inside the transaction that creates their subject,
so a job and its document commit (or vanish) together.

A worker killed with ``kill -9`` leaves its jobs in ``doing``. Procrastinate
notices the missing heartbeats; :func:`requeue_stalled` puts those jobs back
in the queue, and the jobs themselves are idempotent, so each one takes effect
exactly once however often it runs.

Each queue has its own worker loop with its own slots (issue 23, A2): a
flood of uploads or tool calls never delays a billing event, whose loop
ingestion cannot occupy. Ingestion is fair across tenants (migration 0022,
``bastion.enqueue_ingest``): a job carries its tenant as procrastinate
``lock``, so one job of a tenant runs at a time, and a priority of minus its
tenant's backlog, so tenants take turns; a newcomer waits for at most one
job of each busy tenant. Every job runs under a wall-clock limit
(:func:`time_limit`); a job whose CPU an attacker chooses bounds it itself
(extraction: :mod:`bastion.limited_process`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import procrastinate
from procrastinate.job_context import JobContext

from bastion.logs import get_logger
from bastion.telemetry.tracing import JOB_TRACEPARENT, Tracing

_log = get_logger("bastion.worker")

QUEUES = ("ingest", "billing", "tools")
# Slots per queue (each queue its own loop; the settings override them).
# Billing has three: the periodic reconcile and sweep (one each at most, by
# their queueing locks) never take the last slot from the tenants' drains.
CONCURRENCY: Mapping[str, int] = {"billing": 3, "ingest": 2, "tools": 1}
# The longest a job of each queue may run before it is cancelled. Generous:
# the jobs bound their own work; this catches what they do not (a hung call).
# A reconcile of every subscription may take minutes; it runs every 15.
TIME_LIMITS: Mapping[str, float] = {"billing": 900.0, "ingest": 900.0, "tools": 120.0}
HEARTBEAT_SECONDS = 2.0
# A worker silent this long is dead; its jobs go back to the queue.
STALLED_SECONDS = 10.0


def queue_app(
    conninfo: str, *, password: Callable[[], str] | None = None, max_size: int = 8
) -> procrastinate.App:
    """Return the procrastinate app on the ``bastion_queue`` role's connection.

    ``password`` is read at each new connection (the pool's and the LISTEN
    connection procrastinate opens beside it), so that a rotated password
    (``bastion keys rotate db-password``) reaches a running worker.
    """
    options = {"options": "-c search_path=procrastinate"}

    def kwargs() -> dict[str, Any]:
        return options if password is None else {**options, "password": password()}

    connector = procrastinate.PsycopgConnector(
        conninfo=conninfo, min_size=1, max_size=max_size, kwargs=kwargs
    )
    return procrastinate.App(connector=connector)


# The statuses a job waits or ends in (succeeded jobs are deleted: delete_jobs).
JOB_STATUSES = ("todo", "doing", "failed", "cancelled", "aborted")


async def queue_depth(app: procrastinate.App) -> dict[tuple[str, str], int]:
    """The jobs of each of Bastion's queues by status (the queue-depth metric);
    a queue with no jobs counts zeros, so its series do not vanish."""
    depth = {(queue, status): 0 for queue in QUEUES for status in JOB_STATUSES}
    for row in await app.job_manager.list_queues_async():
        if row["name"] in QUEUES:  # another app's queue in the schema is not ours
            for status in JOB_STATUSES:
                depth[(row["name"], status)] = int(row[status])
    return depth


async def requeue_stalled(app: procrastinate.App, stalled_seconds: float = STALLED_SECONDS) -> int:
    """Put the jobs of workers that stopped heartbeating back in the queue."""
    jobs = list(await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=stalled_seconds))
    for job in jobs:
        _log.warning("job_requeued", job_id=job.id, task=job.task_name)
        await app.job_manager.retry_job(job)
    return len(jobs)


CallNext = Callable[[], Awaitable[Any]]


def time_limit(seconds: float) -> Callable[[CallNext, JobContext, Any], Awaitable[Any]]:
    """A procrastinate worker middleware: the job is cancelled past ``seconds``
    (it then fails with :class:`TimeoutError`, and its retry strategy decides)."""

    async def limit(call_next: CallNext, context: JobContext, worker: Any) -> Any:
        async with asyncio.timeout(seconds):
            return await call_next()

    return limit


def traced_job(
    tracing: Tracing | None,
) -> Callable[[CallNext, JobContext, Any], Awaitable[Any]]:
    """A procrastinate worker middleware: each job is a span (named after its
    task), child of the request that enqueued it when the job carries that
    request's ``traceparent`` (:data:`~bastion.telemetry.tracing.JOB_TRACEPARENT`,
    taken out of the arguments before the task sees them — also without
    ``tracing``, so a task never gets an argument it does not declare)."""
    from opentelemetry.trace import SpanKind

    async def traced(call_next: CallNext, context: JobContext, worker: Any) -> Any:
        job = context.job
        carried = job.task_kwargs.pop(JOB_TRACEPARENT, None)
        if tracing is None:
            return await call_next()
        with tracing.entry(
            f"job {job.task_name}",
            kind=SpanKind.CONSUMER,
            traceparent=carried if isinstance(carried, str) else None,
            attributes={"bastion.job": job.task_name},
        ):
            return await call_next()

    return traced


FETCH_POLL_SECONDS = 0.5


@contextlib.asynccontextmanager
async def running_worker(
    app: procrastinate.App,
    *,
    concurrency: Mapping[str, int] | None = None,
    sweep_seconds: float = 5.0,
    tracing: Tracing | None = None,
) -> AsyncIterator[None]:
    """Run one worker loop per queue (and the stalled-job sweeper) while the block runs.

    ``concurrency`` gives a queue's slots (default :data:`CONCURRENCY`); with
    ``tracing``, every job is a span (:func:`traced_job`).
    """
    slots = {**CONCURRENCY, **(concurrency or {})}
    async with app.open_async():
        workers = [
            asyncio.create_task(
                app.run_worker_async(
                    queues=[queue],
                    name=f"bastion-{queue}",
                    concurrency=slots[queue],
                    install_signal_handlers=False,
                    update_heartbeat_interval=HEARTBEAT_SECONDS,
                    stalled_worker_timeout=STALLED_SECONDS,
                    delete_jobs="successful",
                    worker_middleware=[traced_job(tracing), time_limit(TIME_LIMITS[queue])],
                    # LISTEN wakes a loop for a new job, but a wake-up that
                    # lands during a fetch that finds nothing (or a job that
                    # waited on another's lock) is only picked up by polling:
                    # procrastinate's 5 s default would be a billing event's delay.
                    fetch_job_polling_interval=FETCH_POLL_SECONDS,
                )
            )
            for queue in QUEUES
        ]

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
            for worker in workers:
                worker.cancel()
            for task in (sweeper, *workers):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
