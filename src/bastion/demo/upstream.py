"""The demo's stand-in for a hosted model: an OpenAI-compatible HTTP server on
127.0.0.1 that answers with the local extractive model.

The demo routes a model to it through the gateway's ``openai_compatible``
provider, exactly as it would route to OpenAI or vLLM, and then stops it to
show the outage path (cached answers marked ``stale-fallback``, 503 otherwise).
It is no language model and says so in every answer. For the tool-call scene
it is scripted: a user turn ``/tool NAME {json arguments}`` with ``tools``
offered makes it propose exactly that call, as a model would.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bastion.gateway.providers import LocalProvider

START_TIMEOUT = 10.0


def standin_app(api_key: str, provider: LocalProvider) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        app.state.calls += 1
        body = await request.json()
        proposal = _scripted_tool_call(body)
        if proposal is not None:
            return _completion(body, None, [proposal], "tool_calls", (10, 10))
        completion = await provider.complete(
            str(body.get("model", "")),
            body.get("messages") or [],
            max_tokens=int(body.get("max_tokens") or 512),
            temperature=float(body.get("temperature") or 0),
        )
        usage = (completion.usage.prompt_tokens, completion.usage.completion_tokens)
        return _completion(body, completion.text, [], completion.finish_reason, usage)

    return app


def _scripted_tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """``/tool NAME {arguments}`` in the last user turn, with tools offered."""
    if not body.get("tools"):
        return None
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    text = str(users[-1].get("content", "")) if users else ""
    if not text.startswith("/tool "):
        return None
    name, _, arguments = text[len("/tool ") :].partition(" ")
    return {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments or "{}"},
    }


def _completion(
    body: dict[str, Any],
    text: str | None,
    tool_calls: list[dict[str, Any]],
    finish: str,
    usage: tuple[int, int],
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }


class StandInUpstream:
    """The stand-in on a fixed loopback port, in a thread: start, stop, start again."""

    def __init__(self, port: int, api_key: str, provider: LocalProvider) -> None:
        self.port = port
        self.app = standin_app(api_key, provider)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        return int(self.app.state.calls)

    def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_config=None, access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="standin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the stand-in upstream did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = self._thread = None
