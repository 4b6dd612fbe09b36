"""Pure ASGI middleware for the hot path: request ids, access log, size caps,
the client address behind trusted proxies.

Pure ASGI rather than ``BaseHTTPMiddleware``: no extra task per request, no
buffering, and context variables bound here are visible to the endpoint.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Iterable, Sequence

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.problems import (
    HeadersTooLarge,
    PayloadTooLarge,
    internal_error,
    send_problem,
)
from bastion.logs import get_logger

REQUEST_ID_HEADER = b"x-request-id"
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
# How much of an oversized body is read and discarded before answering 413:
# closing with unread data makes the client's TCP stack reset the connection,
# often before it has read our answer (with 256 KiB, a 2 MiB upload sometimes
# got a reset instead of the 413). Beyond this, the reset is accepted: reading
# more would let one request hold the server longer.
DRAIN_LIMIT_BYTES = 8 << 20

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_access_log = get_logger("bastion.access")
_error_log = get_logger("bastion.api")


def valid_request_id(value: str) -> bool:
    """Return whether a client-supplied request id may be trusted and echoed.

    Only 8-64 characters of ``[A-Za-z0-9._-]``: nothing that could forge log
    lines, inject headers or markup.
    """
    # fullmatch: ``$`` alone would accept a trailing newline.
    return _REQUEST_ID.fullmatch(value) is not None


class RequestIdMiddleware:
    """Give each request an id, bind it to the logs, echo it, log the request.

    A well-formed incoming ``X-Request-ID`` is kept, anything else replaced by
    a fresh uuid4 hex. The id is stored in ``scope["state"]["request_id"]``,
    bound as the ``request_id`` structlog context variable while the request
    runs and added to the response headers. One ``request`` line is logged per
    request (method, path, status, duration_ms).

    Also the last line of defence: an exception escaping the application is
    logged here, with the request id, and answered with a generic 500
    problem; it is not re-raised, so the server neither logs it again nor
    drops the keep-alive connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, REQUEST_ID_HEADER)
        text = incoming.decode("latin-1") if incoming is not None else ""
        request_id = text if valid_request_id(text) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        started = time.perf_counter()
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER
                ]
                message = {**message, "headers": [*headers, id_header]}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                _error_log.exception("unhandled_exception", method=scope["method"])
                if status is None:
                    await send_problem(scope, send_with_id, internal_error())
                # Else the response is cut short: the server closes the connection.
            finally:
                _access_log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                )


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
FORWARDED_FOR_HEADER = b"x-forwarded-for"


def forwarded_client(
    peer: str, forwarded_for: Iterable[str], trusted_proxies: Sequence[IPNetwork]
) -> str:
    """Return the client address of a request from socket peer ``peer``.

    ``forwarded_for`` are the request's ``X-Forwarded-For`` values in order.
    They are believed only as far as trusted proxies vouch for them: unless
    ``peer`` is in ``trusted_proxies`` the answer is ``peer``. Otherwise the
    hops are read right to left (each proxy appends the address it received
    from, as RFC 7239 section 4 has it for ``Forwarded``), trusted proxies
    are skipped, and the first other address is the client. Whatever a client
    wrote to the left of that is never reached. A hop that is not an address
    (``unknown``, garbage) stops the walk at the last trusted proxy; when every
    hop is trusted, the leftmost is the client.
    """
    current = _address(peer)
    if current is None or not _within(current, trusted_proxies):
        return peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        current = address
        if not _within(address, trusted_proxies):
            break
    return str(current)


def _address(text: str) -> IPAddress | None:
    """Parse ``1.2.3.4``, ``1.2.3.4:port``, ``::1`` or ``[::1]:port``; None if none of them."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in networks)


class ClientAddressMiddleware:
    """Replace ``scope["client"]`` by the real client's address behind trusted proxies.

    See :func:`forwarded_client`. With no trusted proxy configured, nothing is
    read and the socket peer stays the client: a client naming any address it
    likes in ``X-Forwarded-For`` changes nothing. (The ASGI server must not
    rewrite the peer itself: Bastion runs uvicorn with ``proxy_headers`` off.)
    """

    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[IPNetwork] = ()) -> None:
        self.app = app
        self.trusted_proxies = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if self.trusted_proxies and scope["type"] in ("http", "websocket") and client:
            values = [
                value.decode("latin-1")
                for key, value in scope["headers"]
                if key == FORWARDED_FOR_HEADER
            ]
            resolved = forwarded_client(client[0], values, self.trusted_proxies)
            if resolved != client[0]:
                scope = {**scope, "client": (resolved, 0)}
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once the body has passed the cap."""


class BodySizeLimitMiddleware:
    """Answer 413 problem+json to bodies over ``max_bytes``.

    Checked twice: a declared ``Content-Length`` over the cap is refused before
    the application runs; a streamed (chunked) body is counted as it is
    received, and once over the cap the application's ``receive`` raises and
    whatever it answers is replaced by the 413. Also answers 431 when the
    request headers exceed ``max_header_bytes``.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if max_bytes < 0 or max_header_bytes < 0:
            raise ValueError("size limits must not be negative")
        self.app = app
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.max_header_bytes:
            problem = HeadersTooLarge(
                f"request headers are limited to {self.max_header_bytes} bytes"
            )
            await _drain_unless_waiting(scope, receive)
            await send_problem(scope, send, problem, close=True)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _drain_unless_waiting(scope, receive)
            await send_problem(scope, send, self._too_large(), close=True)
            return

        received = 0
        exceeded = response_started = False

        async def capped_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Frameworks turn a failing receive into their own answer (FastAPI:
            # 400 "error parsing the body"); the client is owed the 413 instead.
            if exceeded:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await send_problem(scope, send, self._too_large(), close=True)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request bodies are limited to {self.max_bytes} bytes")


def _header(scope: Scope, name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case) in ``scope``."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def _drain_unless_waiting(scope: Scope, receive: Receive) -> None:
    """Drain the body, unless the client waits for ``100 Continue`` before sending it."""
    # The server sends "100 Continue" on the first receive(): reading would
    # invite the very body being refused.
    expect = _header(scope, b"expect")
    if expect is None or expect.lower() != b"100-continue":
        await _drain(receive)


async def _drain(receive: Receive, limit: int = DRAIN_LIMIT_BYTES) -> None:
    """Read and discard up to ``limit`` more body bytes (see DRAIN_LIMIT_BYTES)."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
