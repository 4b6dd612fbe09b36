"""The OpenAPI 3.1 document of an app: every route it serves, as it answers.

FastAPI's generated document describes the routes' declared parameters and
JSON bodies only. :func:`install_openapi` makes ``/openapi.json`` (and
``bastion openapi``) complete it from the router itself, so it cannot drift:

- every path template parameter is declared (``{tenant_id}`` is read by the
  guard, not by the route's signature);
- security (OpenAPI 3.1 section 4.8.27): routes that declare a Cedar action
  need a DPoP-bound access token (RFC 9449: ``Authorization: DPoP <token>``
  with a ``DPoP`` proof header); a dependency may name other accepted
  schemes with an ``openapi_security`` attribute (the gateway's signed
  envelope); public routes need none;
- errors are RFC 9457 ``application/problem+json`` with one shared
  ``Problem`` schema (FastAPI's ``HTTPValidationError`` is not what is
  served), each documented status listing the problem ``type`` values the
  operation can answer with: the edge's own (authentication, tenant path,
  input rules, size caps) and the domain errors its route module reaches
  through its imports (an over-approximation: a type listed may never occur
  on that operation; a type not listed is a defect of this document);
- ``/openapi.json`` itself.

Routes document what FastAPI cannot see (raw bodies, forms, webhook
signature headers) in their own ``openapi_extra``. The document is sorted,
so it is the same bytes on every run.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts

from bastion.api.declare import PUBLIC, declared_action
from bastion.api.problems import MEDIA_TYPE, STATUS_OF_KIND, Problem, problem_type
from bastion.errors import BastionError

# Security scheme names (components.securitySchemes).
DPOP_TOKEN = "DPoP"  # noqa: S105 (a scheme's name, not a secret)
DPOP_PROOF = "DPoPProof"
ENVELOPE = "BastionEnvelope"
DPOP_REQUIREMENT: list[dict[str, list[str]]] = [{DPOP_TOKEN: [], DPOP_PROOF: []}]

SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    DPOP_TOKEN: {
        "type": "http",
        "scheme": "DPoP",
        "description": "An access token of this issuer (see /.well-known/openid-configuration), "
        "bound to the client's key (cnf.jkt), sent as `Authorization: DPoP <token>` "
        "(RFC 9449 section 7.1). Bearer use of a bound token is refused.",
    },
    DPOP_PROOF: {
        "type": "apiKey",
        "in": "header",
        "name": "DPoP",
        "description": "Exactly one fresh DPoP proof JWT (RFC 9449 section 4.2) signed by the "
        "token's key: htm, htu (the public URL of this process), iat, a single-use jti, "
        "ath (the token's hash), and the server nonce once one was sent in DPoP-Nonce.",
    },
    ENVELOPE: {
        "type": "apiKey",
        "in": "header",
        "name": "Bastion-Envelope",
        "description": "The api's signed envelope (HMAC with key id, timestamp and single-use "
        "nonce over the tenant, the user, the action and the body's hash), instead of a "
        "user's token: how the api asks the gateway on a user's behalf.",
    },
}

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details. Never echoes the request's input.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri", "description": "Stable problem type."},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "The request path."},
        "request_id": {"type": ["string", "null"]},
        "errors": {
            "type": "array",
            "description": "validation-error: where the request is wrong (never the input).",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
}

# Answered on any request by the edge (middleware), before a route runs.
_EVERY_REQUEST: dict[int, tuple[str, ...]] = {
    414: ("uri-too-long",),
    422: ("validation-error",),
    431: ("headers-too-large",),
}
_WITH_BODY: dict[int, tuple[str, ...]] = {413: ("payload-too-large",)}
_JSON_BODY: dict[int, tuple[str, ...]] = {
    400: ("malformed-json",),
    415: ("unsupported-media-type",),
}
_AUTHENTICATED: dict[int, tuple[str, ...]] = {
    401: ("unauthorized",),
    403: ("forbidden", "mfa-required"),
}
# The guard's: another tenant's id is not found, a slug is refused (access/guard.py).
_TENANT_PATH: dict[int, tuple[str, ...]] = {404: ("not-found",), 422: ("tenant-id-required",)}
# Modules whose problems the rules above already place (by the route's traits).
_EDGE_MODULES = frozenset({"bastion.identity.auth", "bastion.access.guard", "bastion.gateway.auth"})
_RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "RFC 9449 section 7.1"},
        "DPoP-Nonce": {"schema": {"type": "string"}, "description": "RFC 9449 section 9"},
    },
    **{
        status: {
            "Retry-After": {
                "schema": {"type": "integer", "minimum": 0},
                "description": "Seconds to wait (RFC 9110 section 10.2.3), when known.",
            }
        }
        for status in (402, 429, 503)
    },
}
_PATH_PARAMETER = re.compile(r"{([^}:]+)(?::[^}]*)?}")
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at ``app``'s ``/openapi.json``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    """Return ``app``'s completed OpenAPI document, keys sorted."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        description=app.description,
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Problem"] = PROBLEM_SCHEMA
    components["securitySchemes"] = SECURITY_SCHEMES
    for method, path, route in served_operations(app):
        operation = doc["paths"].get(path, {}).get(method)
        if operation is not None and route is not None:
            _complete(operation, path, route)
    if app.openapi_url:
        doc["paths"].setdefault(app.openapi_url, {})["get"] = _document_operation()
    if not components["schemas"]:
        del components["schemas"]
    # Sorted, so the served document and the committed file are the same bytes.
    return dict(json.loads(json.dumps(doc, sort_keys=True)))


def served_operations(app: FastAPI) -> Iterator[tuple[str, str, APIRoute | None]]:
    """Yield (method, path, route) for every operation ``app`` serves.

    ``head`` is left out where ``get`` is served (Starlette answers it from
    the GET route); ``route`` is None for routes that are not FastAPI's.
    """
    for context in iter_route_contexts(app.routes):
        path, methods = context.path, context.methods
        if not isinstance(path, str) or not methods:
            continue
        original = context.original_route
        route = original if isinstance(original, APIRoute) else None
        lowered = {m.lower() for m in methods}
        if "get" in lowered:
            lowered.discard("head")
        for method in sorted(lowered):
            yield method, path, route


def path_parameters(path: str) -> list[str]:
    """The names of ``path``'s template parameters, in order."""
    return _PATH_PARAMETER.findall(path)


def _complete(operation: dict[str, Any], path: str, route: APIRoute) -> None:
    _declare_path_parameters(operation, path)
    action = declared_action(route)
    public = action == PUBLIC
    operation["security"] = [] if public else _security(route)
    problems: dict[int, set[str]] = {}
    _add(problems, _EVERY_REQUEST)
    body = operation.get("requestBody")
    if body is not None:
        _add(problems, _WITH_BODY)
        if "application/json" in body.get("content", {}):
            _add(problems, _JSON_BODY)
    if not public:
        _add(problems, _AUTHENTICATED)
        if len(operation["security"]) > 1:
            problems[401].add("envelope-refused")
    if "tenant_id" in path_parameters(path):
        _add(problems, _TENANT_PATH)
    for status, slug in _reachable_problems(route.endpoint.__module__):
        if status != 500:  # a 500 is a defect, never a contract
            problems.setdefault(status, set()).add(slug)
    responses = operation.setdefault("responses", {})
    for status, slugs in problems.items():
        _problem_response(responses, status, slugs)
    for response in responses.values():
        # FastAPI's own 422 says HTTPValidationError, which is not what is served.
        for media, content in list(response.get("content", {}).items()):
            if "HTTPValidationError" in json.dumps(content):
                del response["content"][media]


def _declare_path_parameters(operation: dict[str, Any], path: str) -> None:
    parameters = operation.setdefault("parameters", [])
    declared = {p["name"] for p in parameters if p.get("in") == "path"}
    for name in path_parameters(path):
        if name in declared:
            continue
        schema: dict[str, Any] = {"type": "string"}
        if name.endswith("_id"):
            schema["format"] = "uuid"
        description = (
            "The caller's tenant (the token's tenant_id claim); any other value is 404."
            if name == "tenant_id"
            else None
        )
        parameter: dict[str, Any] = {"name": name, "in": "path", "required": True}
        parameter["schema"] = schema
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    if not parameters:
        del operation["parameters"]


def _security(route: APIRoute) -> list[dict[str, list[str]]]:
    """The route's accepted schemes: DPoP, or what a dependency names instead."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        named = getattr(dependency.call, "openapi_security", None)
        if isinstance(named, list):
            return named
        pending.extend(dependency.dependencies)
    return DPOP_REQUIREMENT


def _add(problems: dict[int, set[str]], more: dict[int, tuple[str, ...]]) -> None:
    for status, slugs in more.items():
        problems.setdefault(status, set()).update(slugs)


def _problem_response(responses: dict[str, Any], status: int, slugs: Iterable[str]) -> None:
    response = responses.setdefault(str(status), {"description": _DESCRIPTIONS.get(status, "")})
    response.setdefault("description", _DESCRIPTIONS.get(status, ""))
    known = response.get("content", {}).get(MEDIA_TYPE, {})
    enum = set(slugs) | {
        t.removeprefix(problem_type(""))
        for t in known.get("schema", {})
        .get("allOf", [{}, {}])[1]
        .get("properties", {})
        .get("type", {})
        .get("enum", [])
    }
    response.setdefault("content", {})[MEDIA_TYPE] = {
        "schema": {
            "allOf": [
                {"$ref": "#/components/schemas/Problem"},
                {
                    "properties": {
                        # Not "const": openapi-python-client cannot merge a const
                        # with Problem's integer, and drops the whole response.
                        "status": {"type": "integer", "enum": [status]},
                        "type": {"enum": sorted(problem_type(s) for s in enum)},
                    }
                },
            ]
        }
    }
    headers = _RESPONSE_HEADERS.get(status)
    if headers:
        response.setdefault("headers", {}).update(headers)


def _reachable_problems(module_name: str) -> set[tuple[int, str]]:
    """(status, slug) of every problem class defined in a Bastion module that
    ``module_name`` imports, transitively (its own included), except the edge's."""
    found: set[tuple[int, str]] = set()
    for module in _import_closure(module_name):
        for value in vars(module).values():
            if not isinstance(value, type) or value.__module__ != module.__name__:
                continue
            if module.__name__ in _EDGE_MODULES or value in (BastionError, Problem):
                continue
            if issubclass(value, BastionError):
                # ``kinds``: every kind a class raised with a per-instance kind may take.
                statuses = {STATUS_OF_KIND[kind] for kind in getattr(value, "kinds", (value.kind,))}
                found.update((status, value.slug) for status in statuses)
                # ``passes_on``: the modules whose problems it relays as they are
                # (another process's answers), at the statuses it may take.
                for relayed in getattr(value, "passes_on", ()):
                    importlib.import_module(relayed)
                    found.update(p for p in _reachable_problems(relayed) if p[0] in statuses)
            elif issubclass(value, Problem):
                found.add((value.status, value.type.removeprefix(problem_type(""))))
    return found


def _import_closure(module_name: str) -> list[types.ModuleType]:
    """The Bastion modules ``module_name`` reaches through its module-level names."""
    seen: dict[str, types.ModuleType] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in seen or not name.startswith("bastion."):
            continue
        if name.startswith("bastion.api.") and name != module_name:
            continue  # the edge's own problems are placed by the rules above
        module = sys.modules.get(name)
        if module is None:
            continue
        seen[name] = module
        for value in vars(module).values():
            if isinstance(value, types.ModuleType):
                pending.append(value.__name__)
            else:
                owner = getattr(value, "__module__", None)
                if isinstance(owner, str):
                    pending.append(owner)
    return list(seen.values())


def _document_operation() -> dict[str, Any]:
    return {
        "operationId": "openapi_document",
        "summary": "This OpenAPI document",
        "security": [],
        "responses": {
            "200": {
                "description": "The OpenAPI 3.1 document of this process.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    }


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Not authenticated",
    402: "Payment required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    414: "URI too long",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    431: "Request headers too large",
    501: "Not implemented",
    502: "Bad gateway",
    503: "Unavailable",
}
