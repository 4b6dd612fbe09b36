"""The internal listeners' gate: which workload (SPIFFE ID) may call which route.

Served behind a TLS 1.3 listener that requires a client certificate chained to
Bastion's root (:class:`bastion.identity.workload.WorkloadTls`). The server
puts the peer's certificate in the request scope as the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first); this
gate checks it (:class:`~bastion.identity.workload.PeerVerifier`: validity
period, an intermediate not retired, a SPIFFE ID) and that the ID is one the
matched route declares. A route that declares none — or a path that matches
no route — is refused: deny by default, as for the public routes' Cedar
actions. Every refusal is logged and recorded with the ID that was presented,
and answered as problem+json (403 ``workload-refused``).

The accepted ID is left in ``scope["state"]["workload_id"]`` for the routes
(the gateway accepts a signed envelope only from the api's ID).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import BaseRoute, Match, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from bastion.api.problems import Problem, problem_type, send_problem
from bastion.identity.workload import TLS_CHAIN_DER, PeerRefused, PeerVerifier
from bastion.logs import get_logger

_log = get_logger("bastion.workload")

WORKLOAD_ID = "workload_id"
_MEMO_SIZE = 1024
# Route classes whose match reads only the scope's type, root path, path and
# method (FastAPI's read a context only its own router sets, after the gate).
_PATH_ONLY_MATCHES = frozenset(
    {Route.matches, WebSocketRoute.matches, APIRoute.matches, APIWebSocketRoute.matches}
)


class WorkloadRefused(Problem):
    type = problem_type("workload-refused")
    title = "This workload may not call this route"
    status = 403


@dataclass(frozen=True)
class Refusal:
    """One refused call, for the log and the record (never a certificate or key)."""

    listener: str
    route: str
    reason: str
    presented_id: str | None
    peer: str | None


RefusalSink = Callable[[Refusal], Awaitable[None]]


def flat_routes(routes: Iterable[BaseRoute]) -> list[BaseRoute]:
    """Every route an app answers, included routers' routes in their place."""
    flat: list[BaseRoute] = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            flat.extend(flat_routes(included.routes))
        else:
            flat.append(route)
    return flat


def peer_der(scope: Scope) -> bytes | None:
    """The leaf the TLS extension of ``scope`` carries, as DER, if any."""
    chain = peer_chain(scope)
    return chain[0] if chain else None


def peer_chain(scope: Scope) -> list[bytes]:
    """The peer's verified path the TLS extension of ``scope`` carries, leaf first, DER."""
    tls = scope.get("extensions", {}).get("tls")
    if not isinstance(tls, Mapping):
        return []
    der = tls.get(TLS_CHAIN_DER)  # Bastion's listener: decoded once per connection
    if der is not None:
        return list(der)
    return [ssl.PEM_cert_to_DER_cert(pem) for pem in tls.get("client_cert_chain") or []]


class WorkloadGate:
    """ASGI middleware: the peer's SPIFFE ID must be one the route declares.

    ``callers`` maps a route's path template to the SPIFFE IDs that may call
    it; ``routes`` are the app's routes (matched as the router would).
    ``record`` stores a refusal (the platform's trail); a failure to store it
    is logged and the call is still refused."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        listener: str,
        routes: list[BaseRoute],
        callers: Mapping[str, frozenset[str]],
        verifier: PeerVerifier,
        record: RefusalSink | None = None,
    ) -> None:
        self.app = app
        self.listener = listener
        self.routes = flat_routes(routes)
        self.callers = dict(callers)
        self.verifier = verifier
        self.record = record
        # Which route a path matches, kept: the app's router matches it again,
        # and a keep-alive caller sends the same few paths. Only plain routes,
        # whose match depends on the scope's type and path alone (a Host or a
        # Mount's children could depend on more); bounded, as paths are the
        # caller's choice.
        self._memo: dict[tuple[str, str, str], str | None] | None = (
            {} if all(type(r).matches in _PATH_ONLY_MATCHES for r in self.routes) else None
        )

    def route_of(self, scope: Scope) -> str | None:
        """The path template of the route ``scope`` matches, or None."""
        if self._memo is None:
            return self._match(scope)
        key = (scope["type"], scope.get("root_path", ""), scope["path"])
        try:
            return self._memo[key]
        except KeyError:
            pass
        route = self._match(scope)
        if len(self._memo) >= _MEMO_SIZE:
            self._memo.clear()
        self._memo[key] = route
        return route

    def _match(self, scope: Scope) -> str | None:
        for route in self.routes:
            match, _child = route.matches(scope)
            if match is not Match.NONE:
                path = getattr(route, "path", None)
                return path if isinstance(path, str) else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        route = self.route_of(scope)
        try:
            chain = peer_chain(scope)
            presented = self.verifier.verify(chain[0] if chain else None, chain)
        except PeerRefused as refused:
            await self._refuse(scope, send, route, refused.reason, refused.presented_id)
            return
        allowed = self.callers.get(route) if route is not None else None
        if allowed is None:
            await self._refuse(scope, send, route, "route-not-declared", presented)
            return
        if presented not in allowed:
            await self._refuse(scope, send, route, "spiffe-id-not-allowed", presented)
            return
        scope.setdefault("state", {})[WORKLOAD_ID] = presented
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, send: Send, route: str | None, reason: str, presented: str | None
    ) -> None:
        client = scope.get("client")
        refusal = Refusal(
            self.listener,
            route or "",
            reason,
            presented,
            f"{client[0]}:{client[1]}" if client else None,
        )
        _log.warning(
            "workload_refused",
            listener=refusal.listener,
            route=refusal.route,
            reason=reason,
            presented_id=presented,
            peer=refusal.peer,
        )
        if self.record is not None:
            try:
                await self.record(refusal)
            except Exception as exc:
                _log.error("workload_refusal_not_recorded", error=type(exc).__name__)
        problem = WorkloadRefused(
            "the calling workload's certificate does not admit it to this route", reason=reason
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_problem(scope, send, problem, close=True)


def handshake_observer(listener: str, record: RefusalSink | None) -> Callable[[str], None]:
    """What hears of handshakes the TLS layer refused (no certificate, another
    CA): logged, and recorded with no presented ID (none was readable)."""
    tasks: set[asyncio.Task[Any]] = set()

    def observe(reason: str) -> None:
        slug, _sep, detail = reason.partition(":")
        _log.warning(
            "workload_handshake_refused", listener=listener, reason=slug, detail=detail[:200]
        )
        if record is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(_quietly(record(Refusal(listener, "", slug, None, None))))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return observe


async def _quietly(write: Awaitable[None]) -> None:
    try:
        await write
    except Exception as exc:
        _log.error("workload_refusal_not_recorded", error=type(exc).__name__)
