"""A function run by :func:`bastion.limited_process.run_limited` is killed at its
CPU limit, and no child process outlives the call — also when the caller is
cancelled (issue 23, A2: extraction of uploads in a separate, killable process)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest

from bastion.knowledge.extract import ExtractionError, extract_text
from bastion.limited_process import LimitExceeded, ProcessLimits, run_limited
from tests.pdf_bombs import operator_bomb
from tests.process_tree import forked_by_forkserver

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`

# 5 pages of 90,000 matrix operators: under the operator bounds, ~10 s of CPU.
BOMB = operator_bomb(5, 90_000)


async def test_result_and_refusal_come_back_from_the_child() -> None:
    limits = ProcessLimits(cpu_seconds=5, wall_seconds=20)
    assert await run_limited(extract_text, b"hello  world", "text/plain", limits=limits) == (
        "hello world"
    )
    with pytest.raises(ExtractionError) as refused:
        await run_limited(extract_text, b"\x00\x01", "text/plain", limits=limits)
    assert refused.value.reason == "binary"
    assert forked_by_forkserver() == []


async def test_a_pdf_bomb_is_killed_at_its_cpu_limit() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as over:
        await run_limited(
            extract_text, BOMB, "application/pdf", limits=ProcessLimits(cpu_seconds=1)
        )
    elapsed = time.monotonic() - started
    assert over.value.resource == "cpu"
    assert elapsed < 8.0  # 1 s of CPU, at a lower priority on a busy box; unbounded: ~10 s
    assert forked_by_forkserver() == []


async def test_past_its_wall_clock_limit_the_child_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(LimitExceeded) as over:
        await run_limited(time.sleep, 30, limits=ProcessLimits(cpu_seconds=5, wall_seconds=1))
    assert over.value.resource == "wall"
    assert time.monotonic() - started < 5.0
    assert forked_by_forkserver() == []


async def test_a_cancelled_caller_leaves_no_child_behind() -> None:
    run = asyncio.ensure_future(
        run_limited(extract_text, BOMB, "application/pdf", limits=ProcessLimits(cpu_seconds=30))
    )
    deadline = time.monotonic() + 10
    while not forked_by_forkserver():
        assert time.monotonic() < deadline, "the extraction never started"
        await asyncio.sleep(0.02)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert forked_by_forkserver() == []


def test_the_bastion_command_imports_no_more_than_its_entry_module() -> None:
    """Every extraction child imports the program's main module again (Python
    3.11's multiprocessing, for a program run by path), before its limits
    apply. The ``bastion`` console script's entry module must therefore not
    pull in the CLI: that was two seconds of CPU per uploaded document."""
    (entry,) = entry_points(group="console_scripts", name="bastion")
    module = entry.value.split(":")[0]
    probe = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('bastion')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "['bastion', 'bastion.__main__']", loaded
