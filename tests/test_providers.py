"""The OpenAI-compatible provider's egress: an HTTP proxy named by the environment
(HTTP_PROXY / NO_PROXY) is used, as operators behind an egress proxy expect."""

from __future__ import annotations

import asyncio
import json

import pytest

from bastion.gateway.providers import OpenAICompatible, ProviderError

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
