"""A signed tool call runs once across real worker processes (``bastion serve
worker``), even when a worker is killed with SIGKILL while the call runs and
another one starts: the run id is in the database before the sandbox starts."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.db.pool import Database
from bastion.safety import tasks
from bastion.safety.signing import ToolCall, ToolCallSigner
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from bastion.worker.queue import queue_app
from tests.conftest import DbHandles, short_tempdir
from tests.served import serving_process
from tests.spellings import respellings

pytestmark = pytest.mark.anyio


def _outcomes(database: DbHandles, tenant: UUID, call: ToolCall) -> list[tuple[str, str | None]]:
    """``(action, refusal reason)`` of every audit event of ``call``, oldest first."""
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT action, details->>'reason' FROM bastion.audit_events "
            "WHERE tenant_id = %s AND target = %s ORDER BY seq",
            (tenant, f"tool_call:{call.id}"),
        ).fetchall()
    return [(action, reason) for action, reason in rows]


def _run_records(database: DbHandles, call: ToolCall) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.tool_call_runs WHERE call_id = %s", (call.id,)
        ).fetchone()
    return int(row[0]) if row else 0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def test_a_signed_call_runs_once_across_a_killed_and_restarted_worker(
    database: DbHandles, keystore: LocalKeystore, db: Database
) -> None:
    tenants = TenantService(db)
    tenant = (await tenants.create_tenant(f"once-{uuid4().hex[:8]}", "Once")).id
    user = await tenants.add_member(tenant, f"c-{uuid4().hex[:6]}@once.test", "contributor")
    signer = ToolCallSigner(keystore)  # as the gateway signs
    quick = ToolCall(f"call_{uuid4().hex[:12]}", "calculate", json.dumps({"expression": "6 * 7"}))
    slow = ToolCall(
        f"call_{uuid4().hex[:12]}",
        "run_python",
        json.dumps({"code": "import time; time.sleep(20)"}),
    )
    # The request's declarations of the two tools, which the signatures are bound to.
    tools = {
        name: {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("calculate", "run_python")
    }
    quick_signature = signer.sign(
        quick, tenant_id=tenant, user_id=user, declaration=tools["calculate"]
    )
    slow_signature = signer.sign(
        slow, tenant_id=tenant, user_id=user, declaration=tools["run_python"]
    )
    encoded, mac = quick_signature.split(".")
    variants = respellings(mac)
    # Other spellings first: the restarted worker has no memory of the nonce.
    resubmitted = [
        f"{encoded}.{variants[name]}"
        for name in ("one '=' appended", "two '=' appended", "a '!' inserted", "pad bits set")
    ] + [quick_signature] * 3

    home = short_tempdir("bastion-tools-")
    # Long enough a wall clock that the slow call is still running at the kill.
    slow_sandbox = {"BASTION_SANDBOX_WALL_SECONDS": "60"}
    queue = queue_app(database.queue)
    async with queue.open_async():
        with serving_process(
            "worker", database, keystore, home, slow_sandbox, wait_ready=False
        ) as (first, _):
            await tasks.defer(queue, tenant, user, quick, quick_signature, tools["calculate"])
            _wait(lambda: bool(_outcomes(database, tenant, quick)), 60, "the first run")
            assert _outcomes(database, tenant, quick) == [("tool.run", None)]
            await tasks.defer(queue, tenant, user, slow, slow_signature, tools["run_python"])
            _wait(lambda: _run_records(database, slow) == 1, 30, "the slow call to start")
            first.send_signal(signal.SIGKILL)  # while the slow call sleeps in the sandbox
            first.wait(timeout=10)
        # Recorded before it ran; it never finished.
        assert _outcomes(database, tenant, slow) == []

        with serving_process("worker", database, keystore, home, slow_sandbox, wait_ready=False):
            for signature in resubmitted:
                await tasks.defer(queue, tenant, user, quick, signature, tools["calculate"])
            # The killed worker's job is requeued once its heartbeat is missed (~15 s).
            _wait(
                lambda: (
                    len(_outcomes(database, tenant, quick)) == 1 + len(resubmitted)
                    and len(_outcomes(database, tenant, slow)) == 1
                ),
                90,
                "every resubmission and the requeued job",
            )

    quick_outcomes = _outcomes(database, tenant, quick)
    assert [action for action, _ in quick_outcomes].count("tool.run") == 1  # ran once
    assert quick_outcomes[0] == ("tool.run", None)
    assert sorted(quick_outcomes[1:], key=str) == sorted(
        [("tool.refused", "replayed")] * 3 + [("tool.refused", "malformed")] * 4, key=str
    )
    assert _outcomes(database, tenant, slow) == [("tool.refused", "replayed")]
    assert _run_records(database, quick) == _run_records(database, slow) == 1
