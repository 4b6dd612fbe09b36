"""The OpenAI-compatible provider's egress: an HTTP proxy named by the environment
(HTTP_PROXY / NO_PROXY) is used, as operators behind an egress proxy expect. And
whose fault an upstream's error is: a request it refuses (400, 413, 422) is
:class:`UpstreamRejected` with only vetted members of its error; 429, 5xx and a
refused key stay the provider's faults."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bastion.gateway.providers import (
    OpenAICompatible,
    ProviderError,
    UpstreamRejected,
    rejection,
)
from tests.http_server import running_server
from tests.provider_double import (
    API_KEY,
    CONTEXT_CHARS,
    MODEL_MAX_TOKENS,
    SECRET_ERROR,
    DoubleState,
    provider_double,
)

pytestmark = pytest.mark.anyio

ANSWER = {
    "choices": [{"message": {"role": "assistant", "content": "via the proxy"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 3},
}


async def _proxy(seen: list[str]) -> asyncio.Server:
    """A forward proxy on 127.0.0.1 that answers every request itself (HTTP/1.1)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        seen.append(lines[0])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        await reader.readexactly(length)
        body = json.dumps(ANSWER).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _ask(provider: OpenAICompatible) -> str:
    try:
        completion = await provider.complete(
            "m", [{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
        )
        return completion.text
    finally:
        await provider.aclose()


async def test_the_environment_s_proxy_carries_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    server = await _proxy(seen)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with server:
        text = await _ask(OpenAICompatible("http://upstream.invalid/v1", "sk-test", timeout=5))
    assert text == "via the proxy"
    assert seen == ["POST http://upstream.invalid/v1/chat/completions HTTP/1.1"]


async def test_no_proxy_sends_the_call_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    server = await _proxy(seen)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "upstream.invalid")
    async with server:
        with pytest.raises(ProviderError) as failed:  # .invalid never resolves
            await _ask(OpenAICompatible("http://upstream.invalid/v1", "sk-test", timeout=5))
    assert failed.value.kind == "unavailable"
    assert seen == []


# -- whose fault an upstream error is (issue 23, A1) -------------------------------------


async def _call(
    url: str,
    key: str = API_KEY,
    *,
    stream: bool = False,
    prompt: str = "hi",
    max_tokens: int = 16,
    tools: list[dict[str, Any]] | None = None,
) -> None:
    """Ask the double at ``url`` once (plain or streamed); raise what the provider raises."""
    provider = OpenAICompatible(f"{url}/v1", key, timeout=5)
    messages = [{"role": "user", "content": prompt}]
    try:
        if stream:
            async for _item in provider.stream(
                "m", messages, max_tokens=max_tokens, temperature=0, tools=tools
            ):
                pass
        else:
            await provider.complete(
                "m", messages, max_tokens=max_tokens, temperature=0, tools=tools
            )
    finally:
        await provider.aclose()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_upstream_refuses_is_rejected_with_vetted_members_only(
    stream: bool,
) -> None:
    state = DoubleState()
    bad_tool = [{"type": "function", "function": {"name": "run python!", "parameters": {}}}]
    with running_server(provider_double(state)) as url:
        with pytest.raises(UpstreamRejected) as tool:
            await _call(url, stream=stream, tools=bad_tool)
        with pytest.raises(UpstreamRejected) as long:
            await _call(url, stream=stream, prompt="word " * (CONTEXT_CHARS // 5 + 1))
        with pytest.raises(UpstreamRejected) as vllm:
            await _call(url, stream=stream, max_tokens=MODEL_MAX_TOKENS + 1)
        state.mode = "leaky-400"
        with pytest.raises(UpstreamRejected) as leaky:
            await _call(url, stream=stream)

    def members(error: UpstreamRejected) -> tuple[object, ...]:
        return error.status, error.error_type, error.code, error.param

    assert members(tool.value) == (
        400,
        "invalid_request_error",
        "invalid_value",
        "tools[0].function.name",
    )
    assert members(long.value) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert members(vllm.value) == (400, "BadRequestError", None, None)
    assert members(leaky.value) == (400, None, None, None)
    for error in (tool.value, long.value, vllm.value, leaky.value):
        assert SECRET_ERROR not in str(vars(error)) and API_KEY not in str(vars(error))


@pytest.mark.parametrize(
    ("mode", "key", "kind"),
    [
        ("rate-limited", API_KEY, "rate-limited"),
        ("fail", API_KEY, "unavailable"),
        # A key the upstream refuses is the gateway's configuration, not the request.
        ("ok", "sk-wrong", "unavailable"),
    ],
)
async def test_provider_faults_stay_provider_errors(mode: str, key: str, kind: str) -> None:
    state = DoubleState(mode=mode)
    with running_server(provider_double(state)) as url:
        for stream in (False, True):
            with pytest.raises(ProviderError) as failed:
                await _call(url, key, stream=stream)
            assert failed.value.kind == kind


def test_only_known_words_and_request_paths_pass_from_an_upstream_error() -> None:
    shaped = json.dumps(
        {"error": {"type": "invalid_request_error", "code": "invalid_type", "param": "input[3]"}}
    ).encode()
    assert vars(rejection(422, shaped)) == {
        "status": 422,
        "error_type": "invalid_request_error",
        "code": "invalid_type",
        "param": "input[3]",
    }
    for junk in (
        b"<html>413 Request Entity Too Large</html>",
        b"[1, 2]",
        json.dumps({"error": {"type": {"x": 1}, "code": ["context_length_exceeded"]}}).encode(),
        json.dumps({"error": {"param": "messages[0].content.password=hunter2"}}).encode(),
        json.dumps({"error": {"param": "https://10.0.0.7/internal"}}).encode(),
        json.dumps({"error": {"param": "messages[0].secret"}}).encode(),
    ):
        error = rejection(413, junk)
        assert (error.status, error.error_type, error.code, error.param) == (413, None, None, None)
