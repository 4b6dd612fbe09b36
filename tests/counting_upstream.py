"""An OpenAI-compatible upstream in a process of its own that counts the chat
completions it answered (``GET /calls``): what reached the provider, for tests
whose load would starve a server thread in the test process.

Run: python -m tests.counting_upstream PORT
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

ANSWER = json.dumps(
    {
        "id": "chatcmpl-counting",
        "object": "chat.completion",
        "created": 0,
        "model": "upstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The refund was issued."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
).encode()

calls = 0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global calls
    if scope["type"] != "http":
        return
    more = True
    while more:  # the whole request first: a call counts once it was received
        message = await receive()
        more = message.get("more_body", False)
    if scope["method"] == "GET" and scope["path"] == "/calls":
        body = json.dumps({"calls": calls}).encode()
    else:
        calls += 1
        body = ANSWER
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextmanager
def counting_upstream() -> Iterator[str]:
    """Run the upstream; yield its base URL; stop it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.counting_upstream", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the upstream exited while starting"
            try:
                httpx.get(f"{url}/calls", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the upstream did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def upstream_calls(http: httpx.AsyncClient, url: str) -> int:
    """How many chat completions the upstream at ``url`` has answered."""
    response = await http.get(f"{url}/calls")
    return int(response.json()["calls"])


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
        backlog=4096,
    )
