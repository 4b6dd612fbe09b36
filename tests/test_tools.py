"""The worker's tool executor (CHECKLIST M1 + M2): only signed, fresh, unreplayed
calls for the right tenant and user run, and only in the sandbox; every run and
every refusal is audited; hostile programs end with a clear outcome while the
worker keeps going. On the real PostgreSQL, the real key ring and the real
sandbox (bubblewrap)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from bastion.access.authorize import Authorizer
from bastion.db.pool import Database
from bastion.safety import tasks
from bastion.safety.sandbox import Limits, Outcome, Result, RunSpec, Sandbox, SandboxConfig
from bastion.safety.sandbox.backends.firecracker import FirecrackerBackend, FirecrackerConfig
from bastion.safety.signing import ToolCall, ToolCallSigner, declaration_sha256
from bastion.safety.tools import SignedToolCall, ToolExecutor, ToolRefused, ToolResult
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from bastion.worker.jobs import JobRegistry
from bastion.worker.queue import queue_app
from tests.conftest import DbHandles
from tests.spellings import respellings

pytestmark = pytest.mark.anyio

LIMITS = Limits(cpu_seconds=2, wall_seconds=8.0, pids=16, output_bytes=64 * 1024)


class CountingSandbox(Sandbox):
    """The real sandbox, counting the runs it starts (to prove a refusal ran nothing)."""

    runs = 0

    def run(self, spec: RunSpec) -> Result:
        type(self).runs += 1
        return super().run(spec)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    probed = Sandbox.probe(SandboxConfig(limits=LIMITS))
    return CountingSandbox(probed.backend, probed.config)


@dataclass
class World:
    db: Database
    tenant: UUID
    other_tenant: UUID
    contributor: UUID
    viewer: UUID
    gateway: ToolCallSigner  # signs, as the gateway does
    executor: ToolExecutor
    keys: TenantKeys  # the worker's, keying the audit's digests


@pytest.fixture
async def world(db: Database, keystore: LocalKeystore, sandbox: Sandbox) -> AsyncIterator[World]:
    tenants = TenantService(db)
    tenant = await tenants.create_tenant(f"tools-{uuid4().hex[:8]}", "Tools")
    other = await tenants.create_tenant(f"tools-{uuid4().hex[:8]}", "Other")
    contributor = await tenants.add_member(
        tenant.id, f"c-{uuid4().hex[:6]}@t.example", "contributor"
    )
    viewer = await tenants.add_member(tenant.id, f"v-{uuid4().hex[:6]}@t.example", "viewer")
    keys = TenantKeys(LocalKMS(keystore))
    executor = ToolExecutor(db, ToolCallSigner(keystore), sandbox, keys=keys)
    yield World(
        db, tenant.id, other.id, contributor, viewer, ToolCallSigner(keystore), executor, keys
    )


def _call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(f"call_{uuid4().hex[:12]}", name, json.dumps(arguments))


def _declaration(name: str) -> dict[str, Any]:
    """The request's ``tools`` entry for ``name``, as a client declares it."""
    argument = {"calculate": "expression", "run_python": "code"}.get(name, "input")
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {argument: {"type": "string", "maxLength": 4096}},
                "required": [argument],
            },
        },
    }


def _signed(world: World, call: ToolCall, *, user: UUID | None = None) -> SignedToolCall:
    declaration = _declaration(call.name)
    signature = world.gateway.sign(
        call, tenant_id=world.tenant, user_id=user or world.contributor, declaration=declaration
    )
    return SignedToolCall(world.tenant, call, signature, declaration)


async def _confirms(world: World, digest: str, data: str) -> bool:
    """Whether a keyed digest of the audit is that of ``data`` (as the tenant's
    keys holder can tell; nobody else can)."""
    async with world.db.tenant_tx(world.tenant, None, "system") as tx:
        return digest == await world.executor.audit_digest(tx, world.tenant, data.encode())


async def _audit(world: World, tenant: UUID | None = None) -> list[dict[str, Any]]:
    async with world.db.tenant_tx(tenant or world.tenant, None, "auditor") as tx:
        cursor = await tx.execute(
            "SELECT actor, action, target, details FROM bastion.audit_events "
            "WHERE action LIKE 'tool.%%' ORDER BY seq"
        )
        return list(await cursor.fetchall())


# -- a valid call -------------------------------------------------------------------------


async def test_a_signed_calculation_runs_in_the_sandbox_and_is_audited(world: World) -> None:
    before = CountingSandbox.runs
    call = _call("calculate", expression="2 * (3 + 4) ** 2 - 7 / 2")
    result = await world.executor.run(_signed(world, call), user_id=world.contributor)
    assert result.outcome is Outcome.OK and result.output.strip() == "94.5"
    assert result.backend == "bwrap" and result.user_id == world.contributor
    assert CountingSandbox.runs == before + 1
    [event] = await _audit(world)
    assert event["action"] == "tool.run" and event["target"] == f"tool_call:{call.id}"
    assert event["actor"] == f"user:{world.contributor}"
    details = event["details"]
    assert details["outcome"] == "ok" and "result" not in details
    assert details["tool"] == "calculate" and details["backend"] == "bwrap"
    # Keyed digests: the tenant's keys confirm the arguments, the output and the
    # declaration it was proposed under (as the signature bound it).
    assert await _confirms(world, details["arguments_hmac"], call.arguments)
    assert await _confirms(world, details["stdout_hmac"], "94.5\n")
    declared = declaration_sha256(_declaration("calculate"))
    assert await _confirms(world, details["tool_hmac"], declared)


async def test_calculate_never_evaluates_code(world: World) -> None:
    # Letters never reach the sandbox; what does is parsed as arithmetic only.
    call = _call("calculate", expression="__import__('os').system('id')")
    with pytest.raises(ToolRefused) as refused:
        await world.executor.run(_signed(world, call))
    assert refused.value.reason == "bad-arguments"
    # Passes the character check, is not arithmetic: refused by the evaluator inside.
    result = await world.executor.run(_signed(world, _call("calculate", expression="()")))
    assert result.outcome is Outcome.EXIT and "only numbers" in result.error


async def test_an_impossible_calculation_has_a_clear_outcome(world: World) -> None:
    result = await world.executor.run(_signed(world, _call("calculate", expression="9 ** 99999")))
    assert result.outcome is Outcome.EXIT and "exponent too large" in result.error
    result = await world.executor.run(_signed(world, _call("calculate", expression="1 / 0")))
    assert result.outcome is Outcome.EXIT and "ZeroDivisionError" in result.error


# -- refused calls: nothing run, nothing audited as run ------------------------------------


async def _refused(world: World, signed: SignedToolCall, reason: str, **kw: Any) -> None:
    before = CountingSandbox.runs
    with pytest.raises(ToolRefused) as refused:
        await world.executor.run(signed, **kw)
    assert refused.value.reason == reason
    assert CountingSandbox.runs == before  # nothing started
    events = await _audit(world, signed.tenant_id)
    assert [e["action"] for e in events] == ["tool.refused"]
    assert events[0]["details"]["reason"] == reason


async def test_an_unsigned_call_is_refused(world: World) -> None:
    await _refused(
        world,
        SignedToolCall(
            world.tenant, _call("run_python", code="print(1)"), None, _declaration("run_python")
        ),
        "unsigned",
    )


async def test_a_call_with_altered_arguments_is_refused(world: World) -> None:
    signed = _signed(world, _call("calculate", expression="1 + 1"))
    altered = ToolCall(signed.call.id, "calculate", json.dumps({"expression": "9 ** 9"}))
    await _refused(world, dataclasses.replace(signed, call=altered), "call-altered")


async def test_a_call_renamed_to_another_tool_is_refused(world: World) -> None:
    signed = _signed(world, _call("calculate", expression="1 + 1"))
    renamed = ToolCall(signed.call.id, "run_python", signed.call.arguments)
    await _refused(
        world,
        SignedToolCall(world.tenant, renamed, signed.signature, _declaration("run_python")),
        "call-altered",
    )


async def test_a_forged_signature_is_refused(world: World) -> None:
    signed = _signed(world, _call("run_python", code="print(1)"))
    assert signed.signature is not None
    payload, _, mac = signed.signature.partition(".")
    forged = f"{payload}.{mac[:-2]}{'AA' if mac[-2:] != 'AA' else 'BB'}"
    await _refused(world, dataclasses.replace(signed, signature=forged), "bad-signature")


async def test_an_expired_call_is_refused(world: World, keystore: LocalKeystore) -> None:
    call = _call("calculate", expression="1 + 1")
    old = ToolCallSigner(keystore, clock=lambda: time.time() - 3600)
    declaration = _declaration("calculate")
    signature = old.sign(
        call, tenant_id=world.tenant, user_id=world.contributor, declaration=declaration
    )
    await _refused(world, SignedToolCall(world.tenant, call, signature, declaration), "expired")


async def test_a_replayed_call_is_refused(world: World) -> None:
    signed = _signed(world, _call("calculate", expression="6 * 7"))
    first = await world.executor.run(signed)
    assert first.output.strip() == "42"
    before = CountingSandbox.runs
    with pytest.raises(ToolRefused) as refused:
        await world.executor.run(signed)
    assert refused.value.reason == "replayed" and CountingSandbox.runs == before
    actions = [e["action"] for e in await _audit(world)]
    assert actions == ["tool.run", "tool.refused"]  # one run only


async def test_a_call_replayed_on_another_worker_process_is_refused(
    world: World, keystore: LocalKeystore, sandbox: Sandbox
) -> None:
    # A second worker has its own signer (its own memory of used nonces): the
    # database is what tells it the call already ran.
    signed = _signed(world, _call("calculate", expression="6 * 7"))
    assert (await world.executor.run(signed)).output.strip() == "42"
    other_worker = ToolExecutor(world.db, ToolCallSigner(keystore), sandbox, keys=world.keys)
    before = CountingSandbox.runs
    with pytest.raises(ToolRefused) as refused:
        await other_worker.run(signed)
    assert refused.value.reason == "replayed" and CountingSandbox.runs == before
    assert [e["action"] for e in await _audit(world)] == ["tool.run", "tool.refused"]


# -- one signed call, one run: one spelling, and single use keyed on the signed run id ---


async def _run_records(world: World, call: ToolCall) -> int:
    """The rows ``tool_call_runs`` holds for ``call`` (as the tenant sees them)."""
    async with world.db.tenant_tx(world.tenant, None, "auditor") as tx:
        cursor = await tx.execute(
            "SELECT count(*) AS n FROM bastion.tool_call_runs WHERE call_id = %s", (call.id,)
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row["n"])


@pytest.mark.parametrize("part", ["claims", "mac"])
async def test_a_signature_spelt_another_way_is_refused_and_nothing_is_recorded(
    world: World, part: str
) -> None:
    # sig + "=", sig + "==", a "!" slipped in, pad bits set...: the same bytes to a
    # lenient decoder, so each verified, and each was a new key for the run record.
    signed = _signed(world, _call("calculate", expression="6 * 7"))
    assert signed.signature is not None
    encoded, mac = signed.signature.split(".")
    variants = respellings(encoded if part == "claims" else mac)
    if part == "mac":  # 43 characters: every attack of the review applies
        assert {"one '=' appended", "two '=' appended", "a '!' inserted", "pad bits set"} <= set(
            variants
        )
    before = CountingSandbox.runs
    for name, variant in variants.items():
        respelt = f"{variant}.{mac}" if part == "claims" else f"{encoded}.{variant}"
        with pytest.raises(ToolRefused) as refused:
            await world.executor.run(dataclasses.replace(signed, signature=respelt))
        assert refused.value.reason == "malformed", name
    assert CountingSandbox.runs == before
    assert await _run_records(world, signed.call) == 0
    events = await _audit(world)
    assert [(e["action"], e["details"]["reason"]) for e in events] == [
        ("tool.refused", "malformed")
    ] * len(variants)
    # None of them used the call up: its one true spelling runs, once.
    assert (await world.executor.run(signed)).output.strip() == "42"
    assert await _run_records(world, signed.call) == 1


async def test_one_signed_call_sent_seven_times_at_once_runs_once(
    world: World, keystore: LocalKeystore, sandbox: Sandbox
) -> None:
    signed = _signed(world, _call("calculate", expression="6 * 7"))
    assert signed.signature is not None
    encoded, mac = signed.signature.split(".")
    variants = respellings(mac)
    spellings = [signed.signature] * 3 + [
        f"{encoded}.{variants[name]}"
        for name in ("one '=' appended", "two '=' appended", "a '!' inserted", "pad bits set")
    ]
    # Seven worker processes: each with its own signer, so its own memory of nonces.
    workers = [
        ToolExecutor(world.db, ToolCallSigner(keystore), sandbox, keys=world.keys)
        for _ in spellings
    ]
    before = CountingSandbox.runs
    outcomes = await asyncio.gather(
        *(
            worker.run(dataclasses.replace(signed, signature=spelling))
            for worker, spelling in zip(workers, spellings, strict=True)
        ),
        return_exceptions=True,
    )
    ran = [o for o in outcomes if isinstance(o, ToolResult)]
    refused = sorted(o.reason for o in outcomes if isinstance(o, ToolRefused))
    assert len(ran) == 1 and ran[0].output.strip() == "42"
    assert refused == ["malformed"] * 4 + ["replayed"] * 2
    assert CountingSandbox.runs == before + 1
    assert await _run_records(world, signed.call) == 1
    events = await _audit(world)
    assert sorted(e["action"] for e in events) == ["tool.refused"] * 6 + ["tool.run"]


async def test_single_use_is_keyed_on_the_signed_run_id_not_on_the_signature(
    world: World, keystore: LocalKeystore, sandbox: Sandbox
) -> None:
    # Two different valid signatures naming one run (the signer never issues
    # that; it shows what the record is keyed on): the second is a replay.
    call = _call("calculate", expression="6 * 7")
    claims = {
        "tenant_id": str(world.tenant),
        "user_id": str(world.contributor),
        "call_id": call.id,
        "run_id": str(uuid4()),
        "name": call.name,
        "arguments_sha256": hashlib.sha256(call.arguments.encode()).hexdigest(),
        "tool_sha256": declaration_sha256(_declaration("calculate")),
    }
    first, second = world.gateway.tokens.issue(claims), world.gateway.tokens.issue(claims)
    assert first != second  # another nonce, so another MAC
    declaration = _declaration("calculate")
    result = await world.executor.run(SignedToolCall(world.tenant, call, first, declaration))
    assert result.output.strip() == "42"
    other_worker = ToolExecutor(world.db, ToolCallSigner(keystore), sandbox, keys=world.keys)
    before = CountingSandbox.runs
    with pytest.raises(ToolRefused) as refused:
        await other_worker.run(SignedToolCall(world.tenant, call, second, declaration))
    assert refused.value.reason == "replayed" and CountingSandbox.runs == before
    assert await _run_records(world, call) == 1
    [ran, replayed] = await _audit(world)
    assert ran["details"]["run_id"] == replayed["details"]["run_id"] == claims["run_id"]


async def test_a_signature_without_a_run_id_is_refused(world: World) -> None:
    call = _call("calculate", expression="1 + 1")
    legacy = world.gateway.tokens.issue(  # as signed before run ids existed
        {
            "tenant_id": str(world.tenant),
            "user_id": str(world.contributor),
            "call_id": call.id,
            "name": call.name,
            "arguments_sha256": hashlib.sha256(call.arguments.encode()).hexdigest(),
        }
    )
    await _refused(
        world, SignedToolCall(world.tenant, call, legacy, _declaration("calculate")), "malformed"
    )
    assert await _run_records(world, call) == 0


class _WorkerDied(RuntimeError):
    """The worker process ending while the sandbox runs (a crash, a kill)."""


class DyingSandbox(Sandbox):
    def run(self, spec: RunSpec) -> Result:
        raise _WorkerDied


async def test_a_call_whose_worker_died_mid_run_never_runs_again(
    world: World, keystore: LocalKeystore, sandbox: Sandbox
) -> None:
    signed = _signed(world, _call("calculate", expression="6 * 7"))
    dying = ToolExecutor(
        world.db,
        ToolCallSigner(keystore),
        DyingSandbox(sandbox.backend, sandbox.config),
        keys=world.keys,
    )
    with pytest.raises(_WorkerDied):
        await dying.run(signed)
    assert await _run_records(world, signed.call) == 1  # committed before the run began
    # A restarted worker remembers nothing in memory; the database does.
    restarted = ToolExecutor(world.db, ToolCallSigner(keystore), sandbox, keys=world.keys)
    before = CountingSandbox.runs
    with pytest.raises(ToolRefused) as refused:
        await restarted.run(signed)
    assert refused.value.reason == "replayed" and CountingSandbox.runs == before
    assert [e["action"] for e in await _audit(world)] == ["tool.refused"]


async def test_a_call_signed_for_another_tenant_is_refused(world: World) -> None:
    signed = _signed(world, _call("calculate", expression="1 + 1"))
    await _refused(world, dataclasses.replace(signed, tenant_id=world.other_tenant), "call-altered")
    assert await _audit(world) == []  # and nothing in the signer's tenant either


# -- a call runs only with the declaration it was signed for --------------------------


def _loosened(declaration: Any) -> Any:
    """The same tool, another schema: the argument's length limit dropped."""
    other = json.loads(json.dumps(declaration))
    for schema in other["function"]["parameters"]["properties"].values():
        del schema["maxLength"]
    return other


PRESENTED = {
    "another schema for the tool": (_loosened, "declaration-altered"),
    "another description": (
        lambda d: {**d, "function": {**d["function"], "description": "anything"}},
        "declaration-altered",
    ),
    "no declaration": (lambda d: None, "undeclared"),
    "another tool's declaration": (lambda d: _declaration("calculate"), "undeclared"),
    "a declaration that is not JSON": (
        lambda d: {**d, "function": {**d["function"], "x": float("nan")}},
        "malformed",
    ),
}


@pytest.mark.parametrize("presented", list(PRESENTED))
async def test_a_call_presented_with_another_declaration_is_refused(
    world: World, presented: str
) -> None:
    # Signed for declaration D; run with D' (or none): the arguments were produced
    # for D, and nothing says they mean the same under D'.
    change, reason = PRESENTED[presented]
    signed = _signed(world, _call("run_python", code="print(1)"))
    await _refused(
        world, dataclasses.replace(signed, declaration=change(signed.declaration)), reason
    )
    assert await _run_records(world, signed.call) == 0
    # Refusals do not use the call up: with its own declaration it runs, once.
    assert (await world.executor.run(signed)).output.strip() == "1"


async def test_a_signature_that_binds_no_declaration_is_refused(world: World) -> None:
    call = _call("calculate", expression="1 + 1")
    unbound = world.gateway.tokens.issue(  # as signed before declarations were bound
        {
            "tenant_id": str(world.tenant),
            "user_id": str(world.contributor),
            "call_id": call.id,
            "run_id": str(uuid4()),
            "name": call.name,
            "arguments_sha256": hashlib.sha256(call.arguments.encode()).hexdigest(),
        }
    )
    signed = SignedToolCall(world.tenant, call, unbound, _declaration("calculate"))
    await _refused(world, signed, "declaration-altered")
    assert await _run_records(world, call) == 0


def test_the_gateway_refuses_to_sign_for_another_tools_declaration(
    keystore: LocalKeystore,
) -> None:
    with pytest.raises(ValueError):
        ToolCallSigner(keystore).sign(
            _call("run_python", code="print(1)"),
            tenant_id=uuid4(),
            user_id=uuid4(),
            declaration=_declaration("calculate"),
        )


async def test_a_call_signed_for_another_user_is_refused(world: World) -> None:
    signed = _signed(world, _call("calculate", expression="1 + 1"), user=world.viewer)
    await _refused(world, signed, "wrong-user", user_id=world.contributor)


async def test_an_unknown_tool_is_refused(world: World) -> None:
    await _refused(world, _signed(world, _call("shell", cmd="id")), "unknown-tool")


async def test_arguments_that_are_not_an_object_are_refused(world: World) -> None:
    call = ToolCall(f"call_{uuid4().hex[:8]}", "calculate", "[1, 2]")
    await _refused(world, _signed(world, call), "bad-arguments")


async def test_a_sandbox_that_refuses_to_start_runs_nothing(
    world: World, keystore: LocalKeystore
) -> None:
    # Firecracker here: no binary, kernel or KVM guest; it refuses rather than degrade.
    config = SandboxConfig(backend="firecracker")
    refusing = Sandbox(FirecrackerBackend(FirecrackerConfig()), config)
    executor = ToolExecutor(world.db, ToolCallSigner(keystore), refusing, keys=world.keys)
    with pytest.raises(ToolRefused) as refused:
        await executor.run(_signed(world, _call("calculate", expression="1 + 1")))
    assert refused.value.reason == "sandbox-unavailable"
    [event] = await _audit(world)
    assert event["action"] == "tool.refused"


# -- hostile programs: bounded, clear outcome, the caller keeps running -------------------


async def test_code_printing_a_gigabyte_is_cut_at_the_cap(world: World) -> None:
    code = "import sys\nfor _ in range(16384): sys.stdout.write('x' * 65536)\n"
    started = time.monotonic()
    result = await world.executor.run(_signed(world, _call("run_python", code=code)))
    assert result.outcome is Outcome.OUTPUT_LIMIT and result.truncated
    assert len(result.output) <= LIMITS.output_bytes
    assert time.monotonic() - started < 5
    [event] = await _audit(world)
    assert event["details"]["outcome"] == "output_limit" and "result" not in event["details"]


async def test_never_ending_output_on_stderr_is_cut_at_the_cap(world: World) -> None:
    code = "import sys\nwhile True: sys.stderr.write('never ending\\n')\n"
    result = await world.executor.run(_signed(world, _call("run_python", code=code)))
    assert result.outcome is Outcome.OUTPUT_LIMIT and len(result.error) <= 2048


async def test_binary_output_comes_back_as_safe_text(world: World) -> None:
    code = "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 4 + b'\\xff\\xfe\\x00')\n"
    result = await world.executor.run(_signed(world, _call("run_python", code=code)))
    assert result.outcome is Outcome.OK
    assert "\ufffd" in result.output  # invalid UTF-8 replaced, never raised
    [event] = await _audit(world)
    assert event["details"]["stdout_bytes"] == 1027


async def test_a_malicious_call_is_contained_and_the_next_one_runs(world: World) -> None:
    bomb = "import os\nwhile True: os.fork()\n"
    result = await world.executor.run(_signed(world, _call("run_python", code=bomb)))
    assert result.outcome in (Outcome.PIDS_LIMIT, Outcome.CPU_LIMIT, Outcome.WALL_TIMEOUT)
    shadow = "print(open('/etc/shadow').read())"
    result = await world.executor.run(_signed(world, _call("run_python", code=shadow)))
    assert result.outcome is Outcome.EXIT and "No such file" in result.error
    after = await world.executor.run(_signed(world, _call("calculate", expression="1 + 2")))
    assert after.output.strip() == "3"
    outcomes = [e["details"]["outcome"] for e in await _audit(world)]
    assert outcomes[1:] == ["exit", "ok"] and outcomes[0] != "ok"


async def test_cpu_burned_by_unreaped_children_is_stopped_and_audited_right(
    world: World,
) -> None:
    # Each child stays under its own RLIMIT_CPU and exits unreaped, one after the other:
    # the run's cgroup account sees them all, stops the run, and the audit says so.
    code = (
        "import os, time\n"
        "for i in range(8):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        t = time.process_time()\n"
        "        while time.process_time() - t < 0.9: pass\n"
        "        os._exit(0)\n"
        "    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)\n"
        "print('escaped')\n"
    )
    # A generous wall clock: on a loaded host the CPU limit must still be what ends it.
    limits = dataclasses.replace(LIMITS, wall_seconds=30.0)
    executor = ToolExecutor(
        world.db, world.executor.signer, world.executor.sandbox, keys=world.keys, limits=limits
    )
    result = await executor.run(_signed(world, _call("run_python", code=code)))
    assert result.outcome is Outcome.CPU_LIMIT and "escaped" not in result.output
    [event] = await _audit(world)
    details = event["details"]
    assert details["outcome"] == "cpu_limit"
    assert limits.cpu_seconds * 1000 <= details["cpu_ms"] <= (limits.cpu_seconds + 1.5) * 1000


DEEP_TREE = (
    "import os\n"
    "d = os.open('.', os.O_RDONLY)\n"
    "for i in range(2500):\n"
    "    os.mkdir('d', dir_fd=d)\n"
    "    n = os.open('d', os.O_RDONLY, dir_fd=d); os.close(d); d = n\n"
    "fd = os.open('f', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=d)\n"
    "os.write(fd, b'x' * (4 << 20))\n"
    "print('made')\n"
)


@pytest.mark.parametrize("mount", [True, False], ids=["own-tmpfs", "directory-fallback"])
async def test_a_tree_too_deep_for_a_recursive_cleanup_still_ends_in_a_result_and_an_audit(
    world: World,
    keystore: LocalKeystore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mount: bool,
) -> None:
    from bastion.safety.sandbox import workdir
    from bastion.safety.sandbox.backends.landlock import LandlockBackend

    if not mount:  # a container without CAP_SYS_ADMIN: a directory, emptied by remove_tree

        def refused(path: Path, options: str) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(workdir, "_mount_tmpfs", refused)
    work_root = Path("/dev/shm") / f"bastion-tools-test-{uuid4().hex[:8]}"
    sandbox = Sandbox(LandlockBackend(work_root), SandboxConfig(limits=LIMITS))
    executor = ToolExecutor(world.db, ToolCallSigner(keystore), sandbox, keys=world.keys)
    try:
        result = await executor.run(_signed(world, _call("run_python", code=DEEP_TREE)))
        assert result.outcome is Outcome.OK and result.output.strip() == "made"
        [event] = await _audit(world)
        assert event["action"] == "tool.run" and event["details"]["outcome"] == "ok"
        assert list(work_root.iterdir()) == []  # no byte of the run is left on the host
        assert str(work_root) not in Path("/proc/self/mountinfo").read_text()
    finally:
        workdir.remove_tree(work_root)  # shutil.rmtree cannot, were the test to fail


# -- the worker job -------------------------------------------------------------------------


async def _run_queue(
    database: DbHandles,
    db: Database,
    executor: ToolExecutor | None,
    jobs: list[tuple[UUID, UUID, ToolCall, str | None, dict[str, Any] | None]],
    *,
    keystore: LocalKeystore | None = None,
) -> None:
    queue = queue_app(database.queue)
    registry = JobRegistry(Authorizer())
    if keystore is not None:  # as the worker process wires it
        keys = TenantKeys(LocalKMS(keystore))
        tasks.register_from_settings(queue, registry, Settings(), db, keystore, keys)
    else:
        tasks.register(queue, registry, db, executor)
    async with queue.open_async():
        for tenant, user, call, signature, declaration in jobs:
            if signature is not None and declaration is not None:
                await tasks.defer(queue, tenant, user, call, signature, declaration)
                continue
            # A job without a signature or a declaration, as a compromised enqueuer
            # could write it.
            await queue.configure_task(name=tasks.RUN, queue=tasks.QUEUE).defer_async(
                tenant_id=str(tenant), user_id=str(user), call_id=call.id, name=call.name,
                arguments=call.arguments, signature=signature,
            )  # fmt: skip
        await queue.run_worker_async(
            queues=[tasks.QUEUE], wait=False, install_signal_handlers=False
        )


async def test_the_worker_wiring_probes_the_sandbox_and_runs_a_signed_call(
    world: World, database: DbHandles, keystore: LocalKeystore
) -> None:
    call = _call("calculate", expression="6 * 7")
    signed = _signed(world, call)
    job = (world.tenant, world.contributor, call, signed.signature, signed.declaration)
    await _run_queue(database, world.db, None, [job], keystore=keystore)
    [event] = await _audit(world)
    assert await _confirms(world, event["details"]["stdout_hmac"], "42\n")
    assert event["details"]["backend"] == "bwrap"


async def test_the_worker_job_runs_a_signed_call(world: World, database: DbHandles) -> None:
    call = _call("calculate", expression="21 * 2")
    signed = _signed(world, call)
    await _run_queue(
        database,
        world.db,
        world.executor,
        [(world.tenant, world.contributor, call, signed.signature, _declaration(call.name))],
    )
    [event] = await _audit(world)
    assert event["action"] == "tool.run"
    assert await _confirms(world, event["details"]["stdout_hmac"], "42\n")


async def test_the_worker_job_refuses_a_user_who_may_not_run_tools(
    world: World, database: DbHandles
) -> None:
    call = _call("calculate", expression="21 * 2")
    signed = _signed(world, call, user=world.viewer)
    before = CountingSandbox.runs
    await _run_queue(
        database,
        world.db,
        world.executor,
        [(world.tenant, world.viewer, call, signed.signature, _declaration(call.name))],
    )
    assert CountingSandbox.runs == before
    [event] = await _audit(world)
    assert event["action"] == "tool.refused" and event["details"]["reason"] == "not-authorized"


async def test_the_worker_job_refuses_an_unsigned_call(world: World, database: DbHandles) -> None:
    call = _call("run_python", code="print('pwned')")
    before = CountingSandbox.runs
    await _run_queue(
        database,
        world.db,
        world.executor,
        [(world.tenant, world.contributor, call, None, _declaration(call.name))],
    )
    assert CountingSandbox.runs == before
    [event] = await _audit(world)
    assert event["action"] == "tool.refused" and event["details"]["reason"] == "unsigned"


async def test_the_worker_job_refuses_a_call_without_its_declaration(
    world: World, database: DbHandles
) -> None:
    # The enqueuer swaps the declaration, or drops it: nothing runs.
    swapped, dropped = (_call("run_python", code="print('pwned')") for _ in range(2))
    first, second = _signed(world, swapped), _signed(world, dropped)
    before = CountingSandbox.runs
    await _run_queue(
        database,
        world.db,
        world.executor,
        [
            (
                world.tenant,
                world.contributor,
                swapped,
                first.signature,
                _loosened(first.declaration),
            ),
            (world.tenant, world.contributor, dropped, second.signature, None),
        ],
    )
    assert CountingSandbox.runs == before
    events = await _audit(world)
    assert sorted((e["action"], e["details"]["reason"]) for e in events) == [
        ("tool.refused", "declaration-altered"),
        ("tool.refused", "undeclared"),
    ]
    assert await _run_records(world, swapped) == await _run_records(world, dropped) == 0


async def test_without_a_sandbox_the_worker_job_refuses_every_call(
    world: World, database: DbHandles
) -> None:
    call = _call("calculate", expression="21 * 2")
    signed = _signed(world, call)
    job = (world.tenant, world.contributor, call, signed.signature, _declaration(call.name))
    await _run_queue(database, world.db, None, [job])
    [event] = await _audit(world)
    assert event["action"] == "tool.refused"
    assert event["details"]["reason"] == "sandbox-unavailable"
