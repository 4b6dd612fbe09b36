"""A proposed tool call is signed, and run, only with arguments valid against the
JSON Schema its request declared (issue 23, B6).

On real parts: the real gateway over HTTP (uvicorn on 127.0.0.1) with the
official ``openai`` client, a real upstream double, real signatures, the real
PostgreSQL, the real sandbox and the real process pool that bounds each check.
The declaration and the arguments are both hostile here: the requester writes
the schema, the model (steered by a prompt injection) writes the arguments.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tests.test_gateway as gateway_tests
import tests.test_tools as tools_tests
from bastion.safety import tool_schema
from bastion.safety.signing import ToolCall
from bastion.safety.tools import SignedToolCall
from tests.conftest import Captured, DbHandles
from tests.http_server import running_server
from tests.test_gateway import CALCULATE_TOOL, REFUND_TOOL, Gateway, _budget, _client, _dpop_http
from tests.test_tools import CountingSandbox, World, _audit, _run_records

# The fixtures of those modules, used here by name: the gateway on real parts as its
# own tests build it, the budgets it spends, and the worker's world and sandbox.
gateway = gateway_tests.gateway
budgets = gateway_tests.budgets
_upstream_ok = gateway_tests._upstream_ok
world = tools_tests.world
sandbox = tools_tests.sandbox

pytestmark = pytest.mark.anyio

LOOKUP_TOOL = {  # a declaration with a catastrophic pattern: (a+)+ backtracks for ever
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^(a+)+$"}},
            "required": ["sku"],
        },
    },
}
CATASTROPHIC_SKU = "a" * 64 + "b"  # 2**64 ways to split the a's before failing on b


async def _gateway_events(database: DbHandles, *call_ids: str) -> list[tuple[str, dict[str, Any]]]:
    """Every audit event about the calls (action, details), once the gateway's
    ledger wrote one (it writes in batches), or after 5 s."""
    deadline = time.monotonic() + 5
    targets = [f"tool_call:{call_id}" for call_id in call_ids]
    with psycopg.connect(database.superuser, autocommit=True) as admin:  # RLS-scoped rows
        while True:
            rows = admin.execute(
                "SELECT action, details FROM bastion.audit_events "
                "WHERE target = ANY(%s) ORDER BY seq",
                (targets,),
            ).fetchall()
            if rows or time.monotonic() > deadline:
                return [(action, details) for action, details in rows]
            await asyncio.sleep(0.05)


async def _ask(gateway: Gateway, tools: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
    """One question through the official client; what came back: the tool calls
    (with their signatures), the finish reason and the raw text of the answer."""
    client = _client(gateway)
    messages: Any = [{"role": "user", "content": f"look it up {uuid4()}"}]
    if not stream:
        answer = await client.chat.completions.create(
            model="upstream", messages=messages, tools=tools,  # type: ignore[arg-type]
        )  # fmt: skip
        choice = answer.choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return {"calls": calls, "finish": choice.finish_reason, "text": answer.model_dump_json()}
    chunks = await client.chat.completions.create(
        model="upstream", messages=messages, tools=tools, stream=True,  # type: ignore[arg-type]
    )  # fmt: skip
    calls, finish, text = [], None, []
    async for chunk in chunks:
        text.append(chunk.model_dump_json())
        for delta in chunk.choices:
            calls.extend(c.model_dump() for c in delta.delta.tool_calls or [])
            finish = delta.finish_reason or finish
    return {"calls": calls, "finish": finish, "text": "".join(text)}


def _assert_refused_unsigned(
    answer: dict[str, Any], events: list[tuple[str, dict[str, Any]]], reason: str, check: str
) -> None:
    """No call passed on, no signature anywhere, one ``tool.refused`` and nothing else."""
    assert answer["calls"] == [] and answer["finish"] == "stop"
    assert "bastion_signature" not in answer["text"]
    assert [action for action, _ in events] == ["tool.refused"]
    details = events[0][1]
    assert (details["reason"], details["check"], details["by"]) == (reason, check, "gateway")


# What the model proposes, against the request's declaration; the refusal's check.
BROKEN: dict[str, tuple[dict[str, Any], str, str]] = {
    "a string where the schema says integer": (
        REFUND_TOOL, '{"invoice": "INV-SECRET-77", "amount": "49"}', "schema-mismatch"
    ),
    "longer than maxLength": (
        CALCULATE_TOOL, json.dumps({"expression": "1+" * 150 + "1"}), "schema-mismatch"
    ),
    "a required member missing": (CALCULATE_TOOL, '{"expr": "6 * 7"}', "schema-mismatch"),
    # Which one counts depends on the parser: the validator and the tool could differ.
    "a member twice": (
        CALCULATE_TOOL, '{"expression": "6 * 7", "expression": "9 ** 9 ** 9"}', "not-i-json"
    ),
    "NaN": (REFUND_TOOL, '{"invoice": "INV-SECRET-77", "amount": NaN}', "not-i-json"),
    "an array, not an object": (CALCULATE_TOOL, '["6 * 7"]', "not-an-object"),
}  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("broken", list(BROKEN))
async def test_a_tool_call_whose_arguments_break_the_declared_schema_is_never_signed(
    gateway: Gateway, budgets: Any, database: DbHandles, stream: bool, broken: str
) -> None:
    await _budget(budgets, gateway, calls=10)
    tool, arguments, check = BROKEN[broken]
    call_id = f"call_{uuid4().hex[:12]}"
    gateway.double.mode = "tool"
    gateway.double.proposal = (call_id, tool["function"]["name"], arguments)
    answer = await _ask(gateway, [REFUND_TOOL, CALCULATE_TOOL], stream=stream)
    assert gateway.double.last_body is not None  # the model was asked, and proposed it
    events = await _gateway_events(database, call_id)
    _assert_refused_unsigned(answer, events, "bad-arguments", check)
    # The refusal says which check failed, never what the arguments held.
    assert "SECRET" not in json.dumps(events) and "9 ** 9" not in json.dumps(events)


async def test_the_refusal_is_logged_without_the_arguments(
    gateway: Gateway, budgets: Any, database: DbHandles, logs: Captured
) -> None:
    await _budget(budgets, gateway, calls=10)
    call_id = f"call_{uuid4().hex[:12]}"
    gateway.double.mode = "tool"
    gateway.double.proposal = (call_id, "refund_invoice", '{"invoice": 1042, "amount": "SECRET"}')
    answer = await _ask(gateway, [REFUND_TOOL], stream=False)
    _assert_refused_unsigned(
        answer, await _gateway_events(database, call_id), "bad-arguments", "schema-mismatch"
    )
    line = logs.wait_for(lambda r: r.get("event") == "tool_call_refused")
    assert line["reason"] == "bad-arguments" and "SECRET" not in logs.text


async def test_a_catastrophic_pattern_in_a_declaration_cannot_freeze_the_gateway(
    gateway: Gateway, budgets: Any, database: DbHandles
) -> None:
    # Python's re backtracks through every split of the a's: unbounded, this check
    # alone would hold the gateway's event loop (every tenant's requests) for ages.
    await _budget(budgets, gateway, calls=10)
    call_id = f"call_{uuid4().hex[:12]}"
    gateway.double.mode = "tool"
    gateway.double.proposal = (call_id, "lookup", json.dumps({"sku": CATASTROPHIC_SKU}))
    asked = asyncio.create_task(_ask(gateway, [LOOKUP_TOOL], stream=False))
    started, slowest = time.monotonic(), 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        while not asked.done():  # meanwhile, the gateway keeps answering everyone
            sent = time.monotonic()
            assert (await http.get(f"{gateway.url}/healthz")).status_code == 200
            slowest = max(slowest, time.monotonic() - sent)
            await asyncio.sleep(0.05)
    answer = await asked
    elapsed = time.monotonic() - started
    events = await _gateway_events(database, call_id)
    # Refused once the check ran out of time, its process killed: fail closed.
    _assert_refused_unsigned(answer, events, "arguments-unchecked", "timed-out")
    assert elapsed < tool_schema.CHECK_SECONDS + 5
    assert slowest < 0.5, f"the gateway stalled {slowest:.2f} s"
    # The same declaration with arguments that match is signed, at once.
    gateway.double.proposal = (call_id, "lookup", json.dumps({"sku": "aaaa"}))
    signed = await _ask(gateway, [LOOKUP_TOOL], stream=False)
    assert [c["function"]["arguments"] for c in signed["calls"]] == ['{"sku": "aaaa"}']
    assert signed["calls"][0]["bastion_signature"]


# -- declarations that point outside themselves ------------------------------------------


class Recorder:
    """A real HTTP server on 127.0.0.1 that serves a schema and records every hit."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._serve)])

    async def _serve(self, request: Request) -> JSONResponse:
        self.hits.append(request.url.path)
        return JSONResponse({"type": "string"})


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    served = Recorder()
    with running_server(served.app) as url:
        yield served, url


def _remote_declarations(url: str) -> dict[str, dict[str, Any]]:
    """Parameters that would make a validator fetch ``url`` (or read a file)."""
    return {
        "an absolute $ref": {"properties": {"sku": {"$ref": f"{url}/sku.json"}}},
        "a relative $ref under $id": {
            "$id": f"{url}/base/",
            "properties": {"sku": {"$ref": "sku.json"}},
        },
        "a $ref to a file": {"properties": {"sku": {"$ref": "file:///etc/passwd"}}},
        "a $schema of its own": {"$schema": f"{url}/meta.json", "type": "object"},
        "a $dynamicRef": {"properties": {"sku": {"$dynamicRef": f"{url}/sku.json#node"}}},
    }


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


async def test_a_remote_ref_in_a_declaration_is_never_fetched(
    gateway: Gateway,
    budgets: Any,
    database: DbHandles,
    world: World,
    recorder: tuple[Recorder, str],
) -> None:
    served, url = recorder
    await _budget(budgets, gateway, calls=10)
    gateway.double.mode = "tool"
    call_ids = []
    for name, parameters in _remote_declarations(url).items():
        gateway.double.last_body = None
        call_id = f"call_{uuid4().hex[:12]}"
        call_ids.append(call_id)
        gateway.double.proposal = (call_id, "lookup", '{"sku": "A-1"}')
        body = {
            "model": "upstream",
            "messages": [{"role": "user", "content": f"look it up {uuid4()}"}],
            "tools": [CALCULATE_TOOL, _tool("lookup", parameters)],
        }
        async with _dpop_http(gateway) as http:
            answer = await http.post(f"{gateway.url}/v1/chat/completions", json=body)
        # Bad input, refused before any provider is asked: a stable type, no echo.
        assert answer.status_code == 400, name
        assert answer.headers["content-type"].startswith("application/problem+json")
        problem = answer.json()
        assert problem["type"] == "https://bastion.dev/problems/invalid-tool-declaration"
        assert problem["tool_index"] == 1, name
        assert url not in answer.text and "passwd" not in answer.text
        assert gateway.double.last_body is None, name  # the model was never asked
    assert await _gateway_events(database, *call_ids) == []  # nothing proposed or signed
    # The worker, handed such a declaration with a valid signature (a gateway of an
    # older version, or a forged queue entry signed with a stolen key), runs nothing.
    for parameters in _remote_declarations(url).values():
        call = ToolCall(f"call_{uuid4().hex[:12]}", "calculate", '{"sku": "A-1"}')
        declaration = _tool("calculate", parameters)
        signature = world.gateway.sign(
            call, tenant_id=world.tenant, user_id=world.contributor, declaration=declaration
        )
        await _refused_by_worker(
            world, SignedToolCall(world.tenant, call, signature, declaration), "bad-declaration"
        )
    assert served.hits == [], "a declaration made the gateway or the worker fetch a URL"
    # The recorder does record (this check could fail): one hit of our own.
    async with httpx.AsyncClient() as http:
        await http.get(f"{url}/sku.json")
    assert served.hits == ["/sku.json"]


# -- the worker checks again ------------------------------------------------------------


async def _refused_by_worker(world: World, signed: SignedToolCall, reason: str) -> None:
    """The executor refuses ``signed``: nothing started in the sandbox, no run recorded,
    one ``tool.refused`` event (without the arguments) and nothing else."""
    before = CountingSandbox.runs
    events_before = len(await _audit(world))
    refused = None
    try:
        await world.executor.run(signed, user_id=world.contributor)
    except Exception as exc:  # ToolRefused, checked below
        refused = exc
    assert refused is not None and getattr(refused, "reason", None) == reason, refused
    assert CountingSandbox.runs == before  # nothing started
    assert await _run_records(world, signed.call) == 0
    events = (await _audit(world))[events_before:]
    assert [e["action"] for e in events] == ["tool.refused"]
    assert events[0]["details"]["reason"] == reason
    assert signed.call.arguments not in json.dumps(events[0]["details"])


NARROW_CALCULATE = {  # stricter than the calculate tool itself: the declaration rules
    "type": "function",
    "function": {
        "name": "calculate",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "maxLength": 10}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
}
# Arguments the calculate tool itself accepts, which break the declaration.
SIGNED_BROKEN: dict[str, tuple[dict[str, Any], str, str]] = {
    "longer than maxLength": (NARROW_CALCULATE, '{"expression": "1 + 2 + 3 + 4"}', "bad-arguments"),
    "a member the schema forbids": (
        NARROW_CALCULATE, '{"expression": "6 * 7", "note": "x"}', "bad-arguments"
    ),
    "a member twice": (
        NARROW_CALCULATE, '{"expression": "6 * 7", "expression": "2 ** 64"}', "bad-arguments"
    ),
    "a catastrophic pattern": (
        _tool("calculate", {"properties": {"expression": {"pattern": "^(1+)+$"}}}),
        json.dumps({"expression": "1" * 64 + "2"}),
        "arguments-unchecked",
    ),
}  # fmt: skip


@pytest.mark.parametrize("broken", list(SIGNED_BROKEN))
async def test_the_worker_refuses_signed_arguments_that_break_the_declaration(
    world: World, broken: str
) -> None:
    # Signed for exactly this declaration (by a gateway without the check, or one
    # whose key leaked): the worker's own check is what keeps it from running.
    declaration, arguments, reason = SIGNED_BROKEN[broken]
    call = ToolCall(f"call_{uuid4().hex[:12]}", "calculate", arguments)
    signature = world.gateway.sign(
        call, tenant_id=world.tenant, user_id=world.contributor, declaration=declaration
    )
    started = time.monotonic()
    signed = SignedToolCall(world.tenant, call, signature, declaration)
    await _refused_by_worker(world, signed, reason)
    assert time.monotonic() - started < tool_schema.CHECK_SECONDS + 5
    # With arguments that match, the same declaration's call runs (once).
    good = ToolCall(f"call_{uuid4().hex[:12]}", "calculate", '{"expression": "111"}')
    signature = world.gateway.sign(
        good, tenant_id=world.tenant, user_id=world.contributor, declaration=declaration
    )
    result = await world.executor.run(SignedToolCall(world.tenant, good, signature, declaration))
    assert result.output.strip() == "111"
