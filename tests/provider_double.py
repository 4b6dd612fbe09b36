"""A test double of an LLM provider: a real HTTP server speaking OpenAI's
chat-completions and embeddings protocol, which a test can tell to fail, hang
or answer junk, and which counts the calls it received."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

API_KEY = "sk-double-upstream-key"
SECRET_ERROR = "upstream internal detail: db password hunter2 at 10.0.0.7"
ANSWER = "The refund was issued on the fifth of March."
# What a model may produce from its training data: personal data of nobody in the prompt.
PII_ANSWER = "Write to jane.roe@example.org or call +44 20 7946 0958. Done."
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
TOOL_NAME = "refund_invoice"
TOOL_ARGUMENTS = '{"invoice": "INV-1042", "amount": 49}'


@dataclass
class DoubleState:
    mode: str = "ok"  # ok | fail | hang | junk | no-usage | tool | pii | long-line
    calls: int = 0
    last_body: dict[str, Any] | None = None
    last_traceparent: str | None = None


def provider_double(state: DoubleState) -> FastAPI:
    app = FastAPI()

    async def gate(request: Request) -> JSONResponse | PlainTextResponse | None:
        state.calls += 1
        state.last_body = await request.json()
        state.last_traceparent = request.headers.get("traceparent")
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if state.mode == "fail":
            return JSONResponse({"error": {"message": SECRET_ERROR}}, status_code=500)
        if state.mode == "hang":
            await asyncio.sleep(30)
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
        streaming = bool((state.last_body or {}).get("stream"))
        if state.mode == "tool" and streaming:
            return StreamingResponse(tool_call_events(), media_type="text/event-stream")
        if state.mode == "tool":
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
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {
                                        "name": TOOL_NAME,
                                        "arguments": TOOL_ARGUMENTS,
                                    },
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
                        "finish_reason": "stop",
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
        arguments = TOOL_ARGUMENTS
        deltas: list[dict[str, Any]] = [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": TOOL_NAME}},
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
