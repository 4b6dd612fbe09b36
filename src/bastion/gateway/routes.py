"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions`` (plain and
SSE streaming) and ``/v1/embeddings``, answering in OpenAI's wire format so the
official ``openai`` client works unchanged. Errors are problem+json."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bastion.access.guard import Guard
from bastion.gateway.auth import GatewayAuth
from bastion.gateway.providers import ProviderError, StreamItem, Usage
from bastion.gateway.service import Caller, GatewayService, RefusedToolCall, SignedToolCall
from bastion.safety.egress import Taint, TaintMark
from bastion.safety.scanning import ScanBusy, ScanUnavailable
from bastion.safety.signing import EnvelopeSigner, declared_tool

DEFAULT_MAX_TOKENS = 512


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    arguments: str = Field(max_length=200_000)


class EarlierToolCall(BaseModel):
    """A call the model proposed in an earlier turn, as the client sends the
    assistant message back (OpenAI chat completions: ``tool_calls[]``). What
    the gateway added to it (``index``, ``bastion_signature``) is accepted and
    not sent on."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: CalledFunction

    def upstream(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": self.function.model_dump()}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept for the cache key, as ChatRequest's
    # A ``tool`` message (a tool's result) is tainted: what it says is data from
    # outside, and a tool call may carry it only to an allow-listed destination.
    role: Literal["system", "user", "assistant", "tool"]
    # None only on an assistant turn that proposed tool calls (OpenAI sends null).
    content: str | None = Field(default=None, max_length=200_000)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=200)
    tool_calls: list[EarlierToolCall] | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        # The shapes of OpenAI's chat completions: a tool result answers a call by
        # its id; only an assistant turn proposes calls, and only it may then
        # leave its content out.
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message, and only one, carries a tool_call_id")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("the message has no content")
        return self

    def upstream(self) -> dict[str, Any]:
        """The message as the providers get it (content a string, for the screens)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [call.upstream() for call in self.tool_calls]
        return message


class TaintedSpan(BaseModel):
    """``messages[message].content[start:end]`` (code points) is retrieved text:
    the api marks the documents of the prompt it signs (its envelope covers
    the body); any client may mark its own. Marks only ever add taint."""

    model_config = ConfigDict(extra="forbid")
    message: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=1)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChosenFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming the one function the model must call."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: ChosenFunction


class AllowedTools(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1, max_length=128)


class AllowedToolsChoice(BaseModel):
    """``tool_choice`` restricting the model to a subset of the declared tools."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class ChatRequest(BaseModel):
    # Unknown OpenAI parameters are not sent on, as OpenAI-compatible servers
    # ignore them, but kept: the answer cache's key covers every field (deny by
    # default), so a parameter that could change the answer is never overlooked.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=500)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float = Field(default=1.0, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: (
        Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | None
    ) = None
    bastion_tainted: list[TaintedSpan] | None = Field(default=None, max_length=1_000)

    @model_validator(mode="after")
    def _choice_names_declared_tools(self) -> ChatRequest:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return self
        named = [choice] if isinstance(choice, NamedToolChoice) else choice.allowed_tools.tools
        if any(declared_tool(self.tools, n.function.name) is None for n in named):
            raise ValueError("tool_choice names a tool the request does not declare")
        return self

    def enabled_tools(self) -> list[dict[str, Any]]:
        """The declared tools this request lets the model call (``tool_choice``):
        none for ``"none"``, the named ones for a named or ``allowed_tools``
        choice, all of them otherwise. Only these are offered to the model, and
        a proposed call of any other is refused (issue 15, item 4)."""
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return [] if choice == "none" else list(self.tools or ())
        named = [choice] if isinstance(choice, NamedToolChoice) else choice.allowed_tools.tools
        names = {n.function.name for n in named}
        return [
            tool
            for tool in self.tools or ()
            if isinstance(tool.get("function"), dict) and tool["function"].get("name") in names
        ]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    input: str | list[str] = Field(min_length=1)
    # The openai client asks for base64 (little-endian float32) by default.
    encoding_format: Literal["float", "base64"] = "float"


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _tool_calls(signed: list[SignedToolCall]) -> list[dict[str, Any]]:
    # Only calls of declared tools the policies allow come back, each signed; whatever
    # executes them verifies that signature (and the declaration it binds) first.
    return [
        {
            "index": i,
            "id": s.call.id,
            "type": "function",
            "function": {"name": s.call.name, "arguments": s.call.arguments},
            "bastion_signature": s.signature,
        }
        for i, s in enumerate(signed)
    ]


def _refused_calls(refused: list[RefusedToolCall]) -> list[dict[str, str]]:
    # The caller learns that proposed calls were not passed on, and why: the
    # model's call id and the stable reason, nothing of the call itself.
    return [{"id": r.id, "reason": r.reason} for r in refused]


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def build_router(
    service: GatewayService,
    guard: Guard,
    signer: EnvelopeSigner | None = None,
    *,
    envelope_from: str | None = None,
) -> APIRouter:
    """The routes; with ``signer``, a request may carry the api's signed envelope
    instead of the user's token and DPoP proof (with ``envelope_from``, only
    over mTLS from that SPIFFE ID)."""
    router = APIRouter(prefix="/v1")
    invoke = GatewayAuth(guard, signer, envelope_from=envelope_from)

    @router.get("/models")
    async def models(_caller: Caller = Depends(invoke)) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "bastion"}
                for name in sorted(service.models)
            ],
        }

    @router.post("/chat/completions", response_model=None)
    async def chat(
        body: ChatRequest, caller: Caller = Depends(invoke)
    ) -> JSONResponse | StreamingResponse:
        messages = [m.upstream() for m in body.messages]
        # Raises InvalidTaintMark (400) before any provider is called.
        taint = Taint.of_request(
            messages, [TaintMark(s.message, s.start, s.end) for s in body.bastion_tainted or ()]
        )
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS
        enabled = body.enabled_tools()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:
            completion, cached = await service.chat(
                caller,
                body.model,
                messages,
                max_tokens=max_tokens,
                temperature=body.temperature,
                tools=enabled or None,
                request=body.model_dump(),
            )
            message: dict[str, Any] = {"role": "assistant", "content": completion.text}
            finish = completion.finish_reason
            if completion.tool_calls:
                signed, refused = await service.sign_tool_calls(
                    caller,
                    completion.tool_calls,
                    declared=body.tools,
                    enabled=enabled,
                    taint=taint,
                )
                message["tool_calls"] = _tool_calls(signed)
                if refused:
                    message["bastion_refused"] = _refused_calls(refused)
                if not signed:
                    finish = "stop"
            answer = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(completion.usage),
            }
            headers: dict[str, str] = {}
            if cached:
                headers["Bastion-Cache"] = cached
            return JSONResponse(answer, headers=headers)
        first, rest = await service.chat_stream(
            caller,
            body.model,
            messages,
            max_tokens=max_tokens,
            temperature=body.temperature,
            tools=enabled or None,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        async def items() -> AsyncIterator[StreamItem]:
            yield first
            async for item in rest:
                yield item

        async def events() -> AsyncIterator[bytes]:
            usage = None
            proposed = []
            finish = "stop"
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                try:
                    async for item in items():
                        if isinstance(item, Usage):
                            usage = item
                        elif isinstance(item, str):
                            yield _sse(chunk({"content": item}, None))
                        else:
                            proposed.append(item)
                except (ProviderError, ScanBusy, ScanUnavailable):
                    # The provider broke off mid-answer, or the rest could not be scanned.
                    finish = "error"
                if proposed and finish != "error":
                    signed, refused = await service.sign_tool_calls(
                        caller, proposed, declared=body.tools, enabled=enabled, taint=taint
                    )
                    if refused:
                        yield _sse(chunk({"bastion_refused": _refused_calls(refused)}, None))
                    if signed:
                        yield _sse(chunk({"tool_calls": _tool_calls(signed)}, None))
                        finish = "tool_calls"
                yield _sse(chunk({}, finish))
                if include_usage and usage is not None:
                    yield _sse(
                        {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": body.model,
                            "choices": [],
                            "usage": _usage(usage),
                        }
                    )
                yield _sse("[DONE]")
            finally:
                # Settles the call, also when the client hung up mid-answer.
                with anyio.CancelScope(shield=True):
                    await rest.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    @router.post("/embeddings")
    async def embeddings(
        body: EmbeddingRequest, caller: Caller = Depends(invoke)
    ) -> dict[str, Any]:
        inputs = [body.input] if isinstance(body.input, str) else body.input
        vectors, usage = await service.embed(caller, body.model, inputs)

        def encode(vector: list[float]) -> list[float] | str:
            if body.encoding_format == "float":
                return vector
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(vector)}
                for i, vector in enumerate(vectors)
            ],
            "model": body.model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
        }

    return router
