"""The HTTP side of the metrics (issue 19 item 3): counting requests, and
``/metrics`` on the internal listener only.

:class:`RequestMetrics` wraps a process's app (outermost, so every answer is
counted, refusals of the outer middleware included) and labels each request
with the route template the router matched (``scope["route"]``), never the
path. :class:`InternalListener` is what a process's internal mTLS listener
serves: ``GET /metrics`` (the Prometheus text format, from
:meth:`bastion.telemetry.metrics.Metrics.scrape`) in front of the process's
own app. The public listener serves the app alone, so it has no ``/metrics``;
the :class:`~bastion.api.mtls.WorkloadGate` in front of the internal listener
admits to ``/metrics`` only the scraper's SPIFFE ID.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.problems import Problem, problem_type, send_problem
from bastion.telemetry.metrics import CONTENT_TYPE, UNMATCHED, Metrics

METRICS_PATH = "/metrics"


class RequestMetrics:
    """ASGI middleware: each HTTP request counted and timed by route template,
    method and status class (a request that raised before answering: 500)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router leaves the matched route in the (shared) scope.
            path = getattr(scope.get("route"), "path", None)
            self.metrics.observe_request(
                path if isinstance(path, str) else UNMATCHED,
                scope["method"],
                status,
                time.perf_counter() - started,
            )


class MethodNotAllowed(Problem):
    type = problem_type("method-not-allowed")
    status = 405
    title = "Method not allowed"


class InternalListener:
    """``GET /metrics`` in front of ``app``: what an internal listener serves.

    ``routes`` are the app's and ``/metrics``, for the gate to match."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.metrics_route = Route(METRICS_PATH, self._scrape, methods=["GET"])
        self.routes: list[BaseRoute] = [self.metrics_route, *routes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == METRICS_PATH:
            if scope["method"] not in ("GET", "HEAD"):
                problem = MethodNotAllowed("metrics are read with GET", headers={"Allow": "GET"})
                await send_problem(scope, send, problem)
                return
            await self.metrics_route.handle(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _scrape(self, _request: Request) -> Response:
        body = await self.metrics.scrape()
        return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
