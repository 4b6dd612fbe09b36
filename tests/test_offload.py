"""The parser pool (bastion.offload): real worker processes, real kills.

Issue 23 A3: CPU-heavy steps run off the event loop in a bounded pool with
per-tenant limits. These tests pin the bounds: a tenant's share and queue,
turn-taking between tenants, the time limit (the process is killed), the
memory cap and a crash (the job fails, the pool goes on), and cancellation
(bounds count work actually running).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from bastion.knowledge.extract import ExtractionError, extracted_length
from bastion.offload import FairProcessPool, JobFailed, JobTimedOut, PoolBusy
from tests.offload_jobs import allocate, die, pid, raise_unpicklable, wait_for_file

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pool() -> AsyncIterator[FairProcessPool]:
    pool = FairProcessPool(
        workers=2, per_tenant=1, queue_per_tenant=2, time_limit=20, memory_limit=512 << 20
    )
    yield pool
    pool.close()


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _start(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    return asyncio.get_running_loop().create_task(coro)


async def test_a_tenant_holds_its_share_and_others_are_served_in_turn(
    pool: FairProcessPool, tmp_path: Path
) -> None:
    """A and C each queue three long jobs; B, arriving last with one, runs as
    soon as a worker frees: before A's and C's later jobs, however many."""
    release = {name: tmp_path / name for name in ("a", "b", "c")}
    order: list[str] = []

    async def job(tenant: str, n: int) -> None:
        await pool.run(tenant, wait_for_file, str(release[tenant]), 20.0)
        order.append(f"{tenant}{n}")

    tasks = [_start(job("a", n)) for n in range(3)]
    await _until(lambda: pool.load("a") == (1, 2))
    tasks += [_start(job("c", n)) for n in range(3)]
    await _until(lambda: pool.load("c") == (1, 2))
    # Both workers are taken, one per tenant; the queues are full.
    with pytest.raises(PoolBusy) as busy:
        await pool.run("a", pid)
    assert busy.value.retry_after >= 1
    tasks.append(_start(job("b", 0)))
    await _until(lambda: pool.load("b") == (0, 1))
    release["b"].touch()
    release["a"].touch()  # a0 ends; a1 is next in A's line but B has not had a turn
    await _until(lambda: "b0" in order)
    assert order[:2] == ["a0", "b0"], order
    release["c"].touch()
    await asyncio.gather(*tasks)
    assert sorted(order) == ["a0", "a1", "a2", "b0", "c0", "c1", "c2"]
    assert pool.load("a") == pool.load("b") == pool.load("c") == (0, 0)


async def test_a_job_past_its_time_limit_is_killed_and_replaced(
    pool: FairProcessPool, tmp_path: Path
) -> None:
    first = await pool.run("a", pid)
    started = time.monotonic()
    with pytest.raises(JobTimedOut):
        await pool.run("a", wait_for_file, str(tmp_path / "never"), 30.0, time_limit=0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # the worker that overran is gone (it was the only one started)
    assert await pool.run("a", pid) != first  # a fresh worker took its place
    assert pool.load("a") == (0, 0)


async def test_a_memory_bomb_or_a_crash_fails_its_own_job_only(pool: FairProcessPool) -> None:
    with pytest.raises((MemoryError, JobFailed)):
        await pool.run("a", allocate, 1024)  # 1 GiB against a 512 MiB cap
    with pytest.raises(JobFailed):
        await pool.run("a", die)
    with pytest.raises(JobFailed):
        await pool.run("a", raise_unpicklable)
    assert await pool.run("a", allocate, 16) == 16 << 20


async def test_errors_cross_the_process_boundary_intact(pool: FairProcessPool) -> None:
    with pytest.raises(ExtractionError) as refused:
        await pool.run("a", extracted_length, b"text\x00" * 20_000, "text/plain")
    assert refused.value.reason == "binary" and "NUL" in str(refused.value)
    assert await pool.run("a", extracted_length, b"<p>Hello</p>", "text/html") == 5


async def test_cancelled_callers_keep_the_bounds(pool: FairProcessPool, tmp_path: Path) -> None:
    """A cancelled waiter leaves the queue at once; a cancelled running job keeps
    its slot until it really ends (the process still works on it)."""
    release = tmp_path / "release"
    running = _start(pool.run("a", wait_for_file, str(release), 20.0))
    waiting = _start(pool.run("a", wait_for_file, str(release), 20.0))
    await _until(lambda: pool.load("a") == (1, 1))
    waiting.cancel()
    await _until(lambda: pool.load("a") == (1, 0))
    running.cancel()
    await asyncio.sleep(0.2)
    assert pool.load("a") == (1, 0)  # still running in its worker
    release.touch()
    await _until(lambda: pool.load("a") == (0, 0))
    with pytest.raises(asyncio.CancelledError):
        await running
