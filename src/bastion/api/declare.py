"""Every route declares the Cedar action it needs (deny by default).

A route declares its action with ``**action("member:list")`` in its decorator
(or ``**PUBLIC_ROUTE`` for the few that need no caller: health, discovery,
the OAuth endpoints themselves). :func:`require_declared` runs when an app is
built and refuses to start one with an undeclared route, so a new endpoint
cannot ship unguarded by forgetting.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

ACTION_KEY = "x-bastion-action"
PUBLIC = "public"


def action(name: str, openapi: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Route keyword arguments declaring that the route needs Cedar action ``name``;
    ``openapi`` adds what FastAPI cannot see to the route's operation (a raw
    ``requestBody``, form fields, response media types: OpenAPI 3.1 section 4.8.10)."""
    return {"openapi_extra": {**(openapi or {}), ACTION_KEY: name}}


def public(openapi: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`PUBLIC_ROUTE`, with ``openapi`` added to the operation (see :func:`action`)."""
    return action(PUBLIC, openapi)


PUBLIC_ROUTE: dict[str, Any] = action(PUBLIC)


def declared_action(route: APIRoute) -> str | None:
    """Return the action ``route`` declares, or None.

    A route declares it either in its decorator (``**action(...)``) or by
    depending on a guard, whose ``bastion_action`` names the action it checks.
    """
    extra = route.openapi_extra or {}
    value = extra.get(ACTION_KEY)
    if isinstance(value, str):
        return value
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        found = getattr(dependency.call, "bastion_action", None)
        if isinstance(found, str):
            return found
        pending.extend(dependency.dependencies)
    return None


class UndeclaredRoute(RuntimeError):
    """An app has a route that declares no action; it must not start."""


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[APIRoute]:
    """Yield every API route, descending into included routers."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            yield from api_routes(included.routes)


def require_declared(app: FastAPI) -> None:
    """Raise :class:`UndeclaredRoute` naming every route without an action."""
    missing = [
        f"{','.join(sorted(route.methods or ()))} {route.path}"
        for route in api_routes(app.routes)
        if declared_action(route) is None
    ]
    if missing:
        raise UndeclaredRoute("routes without a declared action: " + "; ".join(missing))
