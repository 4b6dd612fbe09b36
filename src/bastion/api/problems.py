"""Errors as problem details, RFC 9457 (``application/problem+json``).

Every error answer carries a stable ``type`` URI, a ``title``, the ``status``,
the ``request_id`` and, once a route matched, its path template as
``instance``; never a stack trace, an exception's text, or the offending input
(which may hold secrets), not even the path as sent.
Status codes without a Bastion-specific meaning use ``about:blank`` with the
HTTP reason phrase as title (RFC 9457, section 4.2.1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope, Send

from bastion.errors import PROBLEM_TYPE_BASE, RESERVED_MEMBERS, BastionError, Kind
from bastion.logs import get_logger

MEDIA_TYPE = "application/problem+json"
BASE = PROBLEM_TYPE_BASE
# Members a Problem's extensions may not override.
RESERVED = RESERVED_MEMBERS
MAX_REPORTED_ERRORS = 20

_log = get_logger("bastion.api")


def problem_type(slug: str) -> str:
    """Return the stable type URI of the problem called ``slug``."""
    return BASE + slug


# Bastion's types for the HTTP errors the framework raises; others are about:blank.
_BY_STATUS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Invalid request"),
    429: ("too-many-requests", "Too many requests"),
    500: ("internal-error", "Internal error"),
    503: ("unavailable", "Service unavailable"),
}


# What each meaning of a domain error (bastion.errors.Kind) is answered with.
# The one place a domain error becomes an HTTP status.
STATUS_OF_KIND: dict[Kind, int] = {
    Kind.INVALID: 400,
    Kind.UNAUTHENTICATED: 401,
    Kind.PAYMENT_REQUIRED: 402,
    Kind.FORBIDDEN: 403,
    Kind.NOT_FOUND: 404,
    Kind.CONFLICT: 409,
    Kind.TOO_LARGE: 413,
    Kind.UNSUPPORTED_MEDIA: 415,
    Kind.UNPROCESSABLE: 422,
    Kind.RATE_LIMITED: 429,
    Kind.INTERNAL: 500,
    Kind.UPSTREAM_FAILED: 502,
    Kind.UNAVAILABLE: 503,
}


class Problem(Exception):
    """An error answered as problem+json, raised at the HTTP edge only.

    Route modules, middleware and FastAPI dependencies raise it when the answer
    needs HTTP itself (a ``WWW-Authenticate`` or ``DPoP-Nonce`` header, a status
    of the framework's); domains raise :class:`bastion.errors.BastionError`,
    which :func:`as_problem` turns into one.

    Subclasses set the class attributes ``type`` (a stable URI), ``title`` and
    ``status``; an instance adds ``detail``, extension members (keyword
    arguments, JSON-serialisable) and response ``headers``. The instance may
    also override ``type_``/``title``/``status``, which the HTTP error mapping
    uses. Raises :class:`ValueError` if an extension reuses a standard member.
    """

    type: str = problem_type("internal-error")
    title: str = "Internal error"
    status: int = 500

    def __init__(
        self,
        detail: str | None = None,
        *,
        type_: str | None = None,
        title: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        clash = RESERVED.intersection(extensions)
        if clash:
            raise ValueError(f"extension members may not be named {sorted(clash)}")
        if type_ is not None:
            self.type = type_
        if title is not None:
            self.title = title
        if status is not None:
            self.status = status
        super().__init__(detail or self.title)
        self.detail = detail
        self.extensions = extensions
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(Problem):
    type = problem_type("bad-request")
    title = "Bad request"
    status = 400


class MalformedJSON(Problem):
    type = problem_type("malformed-json")
    title = "Malformed JSON"
    status = 400


class NotFound(Problem):
    type = problem_type("not-found")
    title = "Not found"
    status = 404


class Conflict(Problem):
    type = problem_type("conflict")
    title = "Conflict"
    status = 409


class PayloadTooLarge(Problem):
    type = problem_type("payload-too-large")
    title = "Payload too large"
    status = 413


class HeadersTooLarge(Problem):
    type = problem_type("headers-too-large")
    title = "Request headers too large"
    status = 431


class ValidationFailed(Problem):
    type = problem_type("validation-error")
    title = "Invalid request"
    status = 422


class InternalError(Problem):
    type = problem_type("internal-error")
    title = "Internal error"
    status = 500


class NotReady(Problem):
    type = problem_type("not-ready")
    title = "Not ready"
    status = 503


def status_of(error: BastionError) -> int:
    """Return the HTTP status a domain error is answered with."""
    return STATUS_OF_KIND[error.kind]


def as_problem(error: BastionError) -> Problem:
    """Return the problem a domain error is answered as: its type, title, detail
    and extension members, the status of its kind, and ``Retry-After``
    (RFC 9110 section 10.2.3) when it says when to retry."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return Problem(
        error.detail,
        type_=error.type,
        title=error.title,
        status=status_of(error),
        headers=headers,
        **error.extensions,
    )


def request_id_of(scope: Scope) -> str | None:
    """Return the request id the request-id middleware bound to ``scope``, if any."""
    state = scope.get("state")
    value = state.get("request_id") if isinstance(state, Mapping) else None
    return value if isinstance(value, str) else None


def problem_body(problem: Problem, scope: Scope) -> dict[str, Any]:
    """Return the problem+json members of ``problem`` answering ``scope``."""
    body: dict[str, Any] = {**problem.extensions}
    body.update(type=problem.type, title=problem.title, status=problem.status)
    if problem.detail:
        body["detail"] = problem.detail
    # The operation, not the path as sent: a path segment is the caller's
    # input, and no answer echoes input. (The occurrence is the request id.)
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str):
        body["instance"] = template
    body["request_id"] = request_id_of(scope)
    return body


def problem_response(request: Request, problem: Problem) -> JSONResponse:
    """Return the ``application/problem+json`` response for ``problem``."""
    return JSONResponse(
        problem_body(problem, request.scope),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers or None,
    )


async def send_problem(scope: Scope, send: Send, problem: Problem, *, close: bool = False) -> None:
    """Send ``problem`` as a complete response on a raw ASGI ``send``.

    For middleware that answers before (or instead of) the application.
    ``close`` asks the server to close the connection afterwards, for when the
    request body was not read to its end.
    """
    payload = json.dumps(problem_body(problem, scope)).encode()
    headers = [
        (b"content-type", MEDIA_TYPE.encode()),
        (b"content-length", str(len(payload)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in problem.headers.items()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _http_problem(exc: StarletteHTTPException) -> Problem:
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI reports a body that is not UTF-8 as a bare 400.
        return MalformedJSON("the request body is not valid UTF-8")
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        # ... and one nested deeper than its JSON parser recurses (RFC 8259 section 9).
        return MalformedJSON("the request body is nested too deep")
    try:
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "HTTP error"
    slug, title = _BY_STATUS.get(exc.status_code, ("", phrase))
    type_ = problem_type(slug) if slug else "about:blank"
    # Starlette's default details ("Not Found") repeat the title; ours are kept.
    detail: str | None = exc.detail if isinstance(exc.detail, str) else None
    if detail and detail.casefold() in (title.casefold(), phrase.casefold()):
        detail = None
    return Problem(detail, type_=type_, title=title, status=exc.status_code, headers=exc.headers)


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return MalformedJSON("the request body is not valid JSON")
    # Where and what, never the offending ``input`` (nor ``ctx``, which can
    # quote it): the input may hold secrets or personal data.
    reported = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            "msg": _safe_message(e),
        }
        for e in errors[:MAX_REPORTED_ERRORS]
    ]
    return ValidationFailed("the request does not match the expected schema", errors=reported)


def _safe_message(error: Mapping[str, Any]) -> str:
    # Pydantic's message for a bad discriminator tag quotes the tag received.
    if error.get("type") == "union_tag_invalid":
        return "Input tag does not match any of the expected tags"
    return str(error.get("msg", ""))


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


async def _on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BastionError)
    return problem_response(request, as_problem(exc))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(request, _http_problem(exc))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response(request, _validation_problem(exc))


def internal_error() -> InternalError:
    """Return the problem answered for an unexpected exception (no details)."""
    return InternalError("an unexpected error occurred; quote the request id when reporting it")


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Reached only when the request-id middleware is not installed (it answers
    # unexpected exceptions itself, inside the request's log context).
    _log.error(
        "unhandled_exception",
        request_id=request_id_of(request.scope),
        path=request.url.path,
        exc_info=exc,
    )
    return problem_response(request, internal_error())


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` a problem+json answer.

    Handles :class:`Problem`, domain errors (:class:`BastionError`, via
    :func:`as_problem`), Starlette/FastAPI ``HTTPException`` (404, 405 with its
    ``Allow`` header, ...), ``RequestValidationError`` (422, or 400 for malformed
    JSON) and, as a last resort, any other exception (500).
    """
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(BastionError, _on_domain_error)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(Exception, _on_unexpected)
