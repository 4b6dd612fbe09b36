"""The request's span: pure ASGI middleware opening each HTTP request's root
span (OpenTelemetry semantic conventions for HTTP servers) on the process's
:class:`~bastion.telemetry.tracing.Tracing`.

The span is named after the method and the matched route's *template*
(``POST /v1/chat/completions``, ``GET /documents/{document_id}``): never the
path as sent, its query string, a header or a body. A request that matches no
route is named by its method alone. A well-formed incoming ``traceparent``
makes the span its child (a malformed one is ignored: a new trace); the
response carries the request's own ``traceparent``, so a caller can quote it.
"""

from __future__ import annotations

from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.telemetry.tracing import Tracing, format_traceparent, set_attributes

TRACEPARENT_HEADER = b"traceparent"
# RFC 9110 section 9's methods (and PATCH); any other is _OTHER (semantic conventions).
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class TracingMiddleware:
    """Open the root span of every HTTP request, and echo its ``traceparent``."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in _METHODS else "_OTHER"
        incoming = None
        for name, value in scope["headers"]:
            if name == TRACEPARENT_HEADER:
                incoming = value.decode("latin-1")
                break
        with self.tracing.entry(
            method,
            kind=SpanKind.SERVER,
            traceparent=incoming,
            attributes={"http.request.method": method},
        ) as root:
            echo = (TRACEPARENT_HEADER, format_traceparent(root.get_span_context()).encode())

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [
                        (k, v)
                        for k, v in message.get("headers", ())
                        if k.lower() != TRACEPARENT_HEADER
                    ]
                    message = {**message, "headers": [*headers, echo]}
                    set_attributes(root, {"http.response.status_code": message["status"]})
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                # Set by the router once matched: the template, not the path.
                template = getattr(scope.get("route"), "path", None)
                if isinstance(template, str):
                    root.update_name(f"{method} {template}")
                    set_attributes(root, {"http.route": template})
