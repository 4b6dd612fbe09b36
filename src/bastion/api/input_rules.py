"""The input rules every route shares, applied once at the edge (pure ASGI).

Text that reaches Bastion must be text: no C0 control character but tab, LF
and CR, no DEL, no C1 control (U+0080-U+009F) and no unpaired surrogate
(U+D800-U+DFFF). PostgreSQL refuses NUL in ``text`` and ``jsonb`` (the request
would fail half-way, a 500), a lone surrogate cannot be encoded as UTF-8 at
all, and the other controls only ever serve to forge log lines or terminal
output. Unicode format characters (Cf: zero-width joiners, bidi marks) are
text and pass.

:class:`InputRulesMiddleware` checks, before any route runs:

- the path (percent-decoded, as the routes see it), and its length;
- the query string (every name and value, percent-decoded), and its length;
- JSON bodies (``application/json``, ``application/*+json``, or no content
  type, which FastAPI also reads as JSON): every string and every key, at any
  depth, including the members a model would ignore;
- form bodies (``application/x-www-form-urlencoded`` and
  ``multipart/form-data``; Bastion accepts no file in a form).

A request that breaks a rule is answered 422 ``validation-error`` (the shape
of every other 422, RFC 9457) naming the part (``path``, ``query``, ``body``)
and never the offending text, and no route runs: nothing is written. A path
or query string that is too long is answered 414 ``uri-too-long``.

Raw bodies are not text and pass as they are: document uploads (bytes, their
type decides how they are read) and the payment providers' signed webhooks
(stored verbatim as ``bytea``; refusing one would lose a payment event).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.api.problems import Problem, ValidationFailed, problem_type, send_problem

# The longest path, and the longest query string, accepted (bytes as sent).
MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 8192
# Signed provider payloads: bytes, verified and stored as they came.
RAW_BODY_PREFIXES = ("/webhooks/",)

FORBIDDEN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
# What a UTF-8 JSON body must hold for a forbidden character to be inside a
# string: an escape (``\\u0000``), a raw DEL or C1 character (JSON itself
# refuses raw C0 characters in strings), or NUL bytes (a UTF-16/32 body).
# A body without any of them is clean without being parsed.
_MAYBE_FORBIDDEN_JSON = re.compile(rb"\\u|\x7f|\xc2[\x80-\x9f]|\x00")
# In a form body, after percent-decoding, the same characters as in text;
# raw bytes of a multipart body: C0 but tab/LF/CR, DEL, C1 in UTF-8.
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xc2[\x80-\x9f]")

RULE = (
    "text may not contain control characters (U+0000-U+001F but tab, LF and CR; "
    "U+007F-U+009F) or unpaired surrogates"
)


class UriTooLong(Problem):
    type = problem_type("uri-too-long")
    title = "URI too long"
    status = 414


def forbidden_text(value: str) -> bool:
    """Return whether ``value`` holds a character the input rules refuse."""
    return FORBIDDEN_TEXT.search(value) is not None


def _strings(document: Any) -> Iterator[str]:
    """Every string of a parsed JSON document, keys included (iteratively: the
    document may be as deep as the parser allows)."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def json_breaks_rules(body: bytes) -> bool:
    """Whether a JSON body holds forbidden text; a body that is not JSON is
    left to the route (which answers 400 ``malformed-json``)."""
    if _MAYBE_FORBIDDEN_JSON.search(body) is None:
        return False
    try:
        # Bytes, as FastAPI reads them: UTF-8, -16 or -32, detected.
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return any(forbidden_text(s) for s in _strings(document))


def _media_type(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"content-type":
            return bytes(value).decode("latin-1").partition(";")[0].strip().lower()
    return None


def _body_kind(scope: Scope) -> str | None:
    """How the body is checked: ``json``, ``form``, ``multipart``, or None (raw)."""
    if scope["path"].startswith(RAW_BODY_PREFIXES):
        return None
    media = _media_type(scope)
    if media is None or media == "application/json" or media.endswith("+json"):
        return "json"
    if media == "application/x-www-form-urlencoded":
        return "form"
    if media == "multipart/form-data":
        return "multipart"
    return None


def _body_breaks_rules(kind: str, body: bytes) -> bool:
    if not body:
        return False
    if kind == "json":
        return json_breaks_rules(body)
    if kind == "form":
        return forbidden_text(unquote_plus(body.decode("latin-1")))
    return _FORBIDDEN_BYTES.search(body) is not None


def _refusal(part: str) -> ValidationFailed:
    return ValidationFailed(
        "the request does not match the expected schema",
        errors=[{"loc": [part], "msg": RULE}],
    )


class InputRulesMiddleware:
    """Refuse, before routing, a request whose text breaks the input rules
    (module docstring). The body is read whole only when it is checked (JSON
    and forms; the body size cap outside this middleware bounds it) and then
    handed to the application unchanged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        if len(raw_path) > MAX_PATH_BYTES or len(query) > MAX_QUERY_BYTES:
            limits = f"paths to {MAX_PATH_BYTES} bytes, query strings to {MAX_QUERY_BYTES}"
            await send_problem(scope, send, UriTooLong(f"Bastion limits {limits}"), close=True)
            return
        # The path as the routes see it (decoded by the server), the query
        # string as they will parse it.
        for part, text in (
            ("path", scope["path"]),
            ("query", unquote_plus(query.decode("latin-1"))),
        ):
            if forbidden_text(text):
                await send_problem(scope, send, _refusal(part), close=True)
                return
        kind = _body_kind(scope)
        if kind is None or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body, closing = await _read_body(receive)
        if _body_breaks_rules(kind, body):
            await send_problem(scope, send, _refusal("body"))
            return
        await self.app(scope, _replay(body, closing, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body, and the disconnect that ended it early, if one did."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, closing: Message | None, receive: Receive) -> Receive:
    """A ``receive`` that gives the body once, then what the client sends next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if closing is not None:
        pending.append(closing)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
