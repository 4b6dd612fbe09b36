"""A test double of an LLM provider: a real HTTP server speaking OpenAI's
chat-completions and embeddings protocol, which a test can tell to fail, hang,
rate-limit or answer junk, and which counts the calls it received.

Like a real upstream it refuses, whatever its mode, a request that is itself
wrong: ``max_tokens`` above the model's limit, a tool name it does not
accept, a context too long (400, with its error's ``message`` quoting
internal detail, as upstream messages may). And like an upstream with a bug,
it fails (500) on a prompt carrying :data:`CRASH`: a fault a tenant can
induce.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

API_KEY = "sk-double-upstream-key"
SECRET_ERROR = "upstream internal detail: db password hunter2 at 10.0.0.7"
ANSWER = "The refund was issued on the fifth of March."
# What a model says when max_tokens cuts it short (mode "length").
TRUNCATED_ANSWER = "The refund"
# What a model may produce from its training data: personal data of nobody in the prompt.
PII_ANSWER = "Write to jane.roe@example.org or call +44 20 7946 0958. Done."
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
TOOL_NAME = "refund_invoice"
TOOL_ARGUMENTS = '{"invoice": "INV-1042", "amount": 49}'
MODEL_MAX_TOKENS = 4096
CONTEXT_CHARS = 100_000
TOOL_NAME_SHAPE = re.compile(r"[A-Za-z0-9_-]{1,64}")
CRASH = "<<upstream-crash>>"


@dataclass
class DoubleState:
    # ok | fail | hang | junk | no-usage | tool | pii | long-line | length
    # | rate-limited | leaky-400
    mode: str = "ok"
    hang_seconds: float = 30.0  # how long "hang" holds a call
    # What the model proposes in "tool" mode: (call id, tool name, arguments).
    proposal: tuple[str, str, str] = ("call_1", TOOL_NAME, TOOL_ARGUMENTS)
    calls: int = 0
    last_body: dict[str, Any] | None = None
    last_traceparent: str | None = None
    # The keys it accepts (None: API_KEY only), and the key each call came with,
    # with its arrival (time.monotonic()): a key rotation's overlap, observed.
    accepted_keys: set[str] | None = None
    keys_seen: list[tuple[float, str]] = field(default_factory=list)


def bad_request(body: dict[str, Any]) -> JSONResponse | None:
    """The 400 a real upstream gives a request that is itself wrong, or None."""
    error: dict[str, Any] | None = None
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > MODEL_MAX_TOKENS:
        # As vLLM answers: the members at the top, the code a number.
        return JSONResponse(
            {
                "object": "error",
                "message": f"max_tokens too large. {SECRET_ERROR}",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            status_code=400,
        )
    for i, tool in enumerate(body.get("tools") or []):
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if isinstance(name, str) and not TOOL_NAME_SHAPE.fullmatch(name):
            error = {
                "message": f"Invalid 'tools[{i}].function.name': {name!r}. {SECRET_ERROR}",
                "type": "invalid_request_error",
                "param": f"tools[{i}].function.name",
                "code": "invalid_value",
            }
    messages = body.get("messages") or []
    if sum(len(str(m.get("content") or "")) for m in messages) > CONTEXT_CHARS:
        error = {
            "message": f"This model's maximum context length is exceeded. {SECRET_ERROR}",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    return None if error is None else JSONResponse({"error": error}, status_code=400)


def provider_double(state: DoubleState) -> FastAPI:
    app = FastAPI()

    async def gate(request: Request) -> JSONResponse | PlainTextResponse | None:
        state.calls += 1
        state.last_body = await request.json()
        state.last_traceparent = request.headers.get("traceparent")
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        state.keys_seen.append((time.monotonic(), key))
        if key not in (state.accepted_keys or {API_KEY}):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = state.last_body if isinstance(state.last_body, dict) else {}
        refused = bad_request(body)
        if refused is not None:
            return refused
        if state.mode == "leaky-400":  # members no vocabulary knows, carrying secrets
            leak = {"message": SECRET_ERROR, "type": "hunter2", "code": API_KEY}
            return JSONResponse({"error": {**leak, "param": "10.0.0.7"}}, status_code=400)
        if state.mode == "rate-limited":
            limited = {"message": SECRET_ERROR, "code": "rate_limit_exceeded"}
            return JSONResponse({"error": limited}, status_code=429, headers={"Retry-After": "1"})
        if state.mode == "fail" or CRASH in json.dumps(body.get("messages")):
            return JSONResponse({"error": {"message": SECRET_ERROR}}, status_code=500)
        if state.mode == "hang":
            await asyncio.sleep(state.hang_seconds)
        if state.mode == "junk":
            return PlainTextResponse("<html>not json</html>")
        return None

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        refused = await gate(request)
        if refused is not None:
            return refused
        usage = {} if state.mode == "no-usage" else {"usage": USAGE}
        answer = PII_ANSWER if state.mode == "pii" else ANSWER
        answer = TRUNCATED_ANSWER if state.mode == "length" else answer
        streaming = bool((state.last_body or {}).get("stream"))
        if state.mode == "tool" and streaming:
            return StreamingResponse(tool_call_events(), media_type="text/event-stream")
        if state.mode == "tool":
            call_id, name, arguments = state.proposal
            return {
                "id": "chatcmpl-double",
                "object": "chat.completion",
                "created": 0,
                "model": "upstream",
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [
                                {
                                    "id": call_id,
                                    "type": "function",
                                    "function": {"name": name, "arguments": arguments},
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ],
                **usage,
            }
        if not streaming:
            return {
                "id": "chatcmpl-double",
                "object": "chat.completion",
                "created": 0,
                "model": "upstream",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "length" if state.mode == "length" else "stop",
                    }
                ],
                **usage,
            }

        async def events() -> AsyncIterator[bytes]:
            if state.mode == "long-line":  # one event of 2 MiB, no line break
                yield b"data: " + b"x" * (2 << 20)
            for word in answer.split(" "):
                chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0.01)
            if usage:
                yield f"data: {json.dumps({'choices': [], **usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def tool_call_events() -> AsyncIterator[bytes]:
        # As OpenAI streams a proposed call: id and name first, the arguments in pieces.
        call_id, name, arguments = state.proposal
        deltas: list[dict[str, Any]] = [
            {"index": 0, "id": call_id, "type": "function", "function": {"name": name}},
            {"index": 0, "function": {"arguments": arguments[:12]}},
            {"index": 0, "function": {"arguments": arguments[12:]}},
        ]
        for delta in deltas:
            chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        yield f"data: {json.dumps(finish)}\n\n".encode()
        yield f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        refused = await gate(request)
        if refused is not None:
            return refused
        inputs = (state.last_body or {}).get("input", [])
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0, 0.5]}
                for i, text in enumerate(inputs)
            ],
            "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
        }

    return app
