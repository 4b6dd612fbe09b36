"""Pure ASGI middleware on the hot path: request ids, access log, body-size cap."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.problems import BASE, MEDIA_TYPE

_DRAIN_BYTES = 256 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_log = structlog.get_logger("bastion.access")


class RequestIdMiddleware:
    """Accept a well-formed ``X-Request-ID`` or mint one; bind it to logs and echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"")
        text = incoming.decode("latin-1")
        request_id = text if _REQUEST_ID.fullmatch(text) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        status_sent = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, status_sent
            if message["type"] == "http.response.start":
                status_sent = True
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Answered here rather than re-raised to the server, which would
                # drop the keep-alive connection under the client's feet.
                _log.exception("unhandled_exception", path=scope["path"])
                if status_sent:
                    raise
                status = 500
                await _problem(
                    scope,
                    send_with_id,
                    500,
                    "internal-error",
                    "Internal error",
                    "an unexpected error occurred; quote the request id when reporting it",
                )
            finally:
                _log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


class RequestSizeLimitMiddleware:
    """Answer 431 when the headers exceed ``max_header_bytes`` and 413 when the
    body exceeds ``max_bytes`` (declared or streamed), as problem+json."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = 1 << 20, max_header_bytes: int = 16 * 1024
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            await _problem(
                scope,
                send,
                431,
                "headers-too-large",
                "Request headers too large",
                f"request headers are limited to {self.max_header_bytes} bytes",
            )
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _drain(receive, _DRAIN_BYTES)
            await self._reject(scope, send)
            return
        received = 0
        too_large = answered = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    if message.get("more_body", False):
                        await _drain(receive, _DRAIN_BYTES)
                    raise _TooLarge
            return message

        async def send_unless_too_large(message: Message) -> None:
            # Frameworks may turn the receive error into their own 400; the
            # client is owed the 413, so the app's answer is replaced.
            nonlocal answered
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start" and not answered:
                answered = True
                await self._reject(scope, send)

        try:
            await self.app(scope, limited_receive, send_unless_too_large)
        except _TooLarge:
            if not answered:
                await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        await _problem(
            scope,
            send,
            413,
            "payload-too-large",
            "Payload too large",
            f"request bodies are limited to {self.max_bytes} bytes",
        )


async def _problem(
    scope: Scope, send: Send, status: int, slug: str, title: str, detail: str
) -> None:
    body: dict[str, Any] = {
        "type": BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": scope["path"],
        "request_id": scope.get("state", {}).get("request_id"),
    }
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", MEDIA_TYPE.encode()),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _TooLarge(Exception):
    pass


async def _drain(receive: Receive, limit: int) -> None:
    """Read and discard up to ``limit`` body bytes, so that a client still
    sending a modest body reads our answer instead of a connection reset."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
