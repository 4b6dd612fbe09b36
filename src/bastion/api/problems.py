"""Errors as RFC 9457 problem details (``application/problem+json``).

Every error answer carries a stable ``type`` URI, a ``title``, the ``status``,
the request path as ``instance`` and the ``request_id``; never a stack trace,
an exception's text, or the offending input.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"
BASE = "https://bastion.dev/problems/"


_BY_STATUS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    429: ("too-many-requests", "Too many requests"),
    503: ("unavailable", "Service unavailable"),
}


class Problem(Exception):
    """An error answered as problem+json. Subclasses set ``type``, ``title``, ``status``."""

    type: ClassVar[str] = BASE + "internal-error"
    title: ClassVar[str] = "Internal error"
    status: ClassVar[int] = 500

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.extensions = extensions
        self.headers: dict[str, str] = {}


class NotReady(Problem):
    type = BASE + "not-ready"
    title = "Not ready"
    status = 503


class MalformedJSON(Problem):
    type = BASE + "malformed-json"
    title = "Malformed JSON"
    status = 400


def problem_response(
    request: Request,
    *,
    type_: str,
    title: str,
    status: int,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """Return a problem+json response for ``request``."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body["instance"] = request.url.path
    body["request_id"] = request.scope.get("state", {}).get("request_id")
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(
        request,
        type_=exc.type,
        title=exc.title,
        status=exc.status,
        detail=exc.detail,
        headers=exc.headers or None,
        **exc.extensions,
    )


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    slug, title = _BY_STATUS.get(exc.status_code, ("http-error", "HTTP error"))
    # Starlette's default details ("Not Found") add nothing; only ours are kept.
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    return problem_response(
        request,
        type_=BASE + slug,
        title=title,
        status=exc.status_code,
        detail=detail,
        headers=getattr(exc, "headers", None),
    )


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") in ("json_invalid", "unicode_decode_error") for e in errors):
        return problem_response(
            request,
            type_=MalformedJSON.type,
            title=MalformedJSON.title,
            status=400,
            detail="the request body is not valid UTF-8 JSON",
        )
    # Only where and what: the offending input is never echoed back.
    return problem_response(
        request,
        type_=BASE + "validation-error",
        title="Invalid request",
        status=422,
        errors=[
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in errors[:20]
        ],
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of ``app`` a problem+json answer.

    Unexpected exceptions are answered by :class:`RequestIdMiddleware`.
    """
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
