"""Structured logs: one JSON object per line on stderr, with secrets masked.

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``event``,
``logger``, the context variables bound for the current request (such as
``request_id``) and, inside a trace, its ``trace_id`` and ``span_id``
(OpenTelemetry's current span). Records from the standard library (uvicorn's among them) go
through the same formatter, so the process writes a single format.

Redaction runs on every record, after exceptions are formatted and before
rendering, so a secret handed to a log call never reaches the output:

* values under secret-looking keys (``password``, ``api_key``, ``Authorization``,
  ``cookie``, ``*_token``, key material, ...) are replaced by ``***`` at any
  nesting depth;
* inside any text (the event, other values, tracebacks) the password of a
  connection URL (``postgresql://user:***@host``), ``name=value`` pairs with a
  secret-looking name, ``Bearer`` credentials, cookie and authorization headers
  and PEM private keys are masked.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

MASK = "***"

# Words that make a key secret wherever they appear in it (``db_password``).
_SECRET_WORDS = frozenset(
    {
        "apikey",
        "auth",
        "authorization",
        "bearer",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "csrf",
        "jwt",
        "otp",
        "passphrase",
        "passwd",
        "password",
        "privkey",
        "pwd",
        "secret",
        "secrets",
        "sig",
        "signature",
        "token",
        "xsrf",
    }
)
# Fragments that make a key secret even when run together (``clientsecret``).
_SECRET_FRAGMENTS = ("password", "passwd", "secret", "apikey", "privatekey", "accesstoken")
# A last word that makes a key *describe* a secret rather than hold it:
# ``secret_ref`` and ``key_id`` are safe to log, ``master_key_file`` is a path.
_METADATA_WORDS = frozenset(
    {
        "alg",
        "algorithm",
        "count",
        "created",
        "error",
        "errors",
        "exception",
        "expires",
        "expiry",
        "file",
        "fingerprint",
        "id",
        "ids",
        "kind",
        "len",
        "length",
        "name",
        "names",
        "path",
        "prefix",
        "ref",
        "refs",
        "rotated",
        "size",
        "source",
        "type",
        "uri",
        "url",
        "version",
        "warning",
    }
)
# Last words that keep ``key`` material secret: ``signing_key_bytes``.
_KEY_MATERIAL_WORDS = frozenset({"b64", "bytes", "data", "hex", "material", "pem", "value"})
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")

# ``scheme://user:password@host``: the password may contain ``@`` (the last
# ``@`` before the host ends it) but not ``/``, so ``http://h:80/p?to=a@b``
# is left alone.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s'\"]*:)[^\s'\"/]*@"
    r"(?=[^@/?#\s'\"]*(?:[/?#\s'\"]|$))"
)
_BEARER = re.compile(r"\b(?P<scheme>Bearer|Basic|Digest|Token)\s+[A-Za-z0-9._~+/=-]+")
# Header-like pairs whose whole value is a credential, up to the end of the line.
_HEADER = re.compile(
    r"(?P<head>\b(?:set-cookie|cookie|proxy-authorization|authorization)[\"']?\s*[:=]\s*)"
    r"(?:\"[^\"]*\"|'[^']*'|[^\r\n\"']+)",
    re.IGNORECASE,
)
# ``name=value`` / ``name: value`` pairs (libpq conninfo, query strings, reprs).
_PAIR = re.compile(
    r"(?P<name>\b[A-Za-z_][\w.-]*)(?P<sep>[\"']?\s*[=:]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,\"'}\])?=]+)"
)
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)
_MAX_DEPTH = 12
# Keys structlog adds or uses internally: left as they are.
_PASSTHROUGH = frozenset({"timestamp", "level", "logger", "_record", "_from_structlog"})


@functools.lru_cache(maxsize=2048)
def is_secret_key(key: str) -> bool:
    """Return whether values logged under ``key`` must be masked.

    Errs on the side of masking: ``api_key``, ``apiKey``, ``X-Api-Key``,
    ``db_password``, ``access_token``, ``Authorization`` and ``signing_key``
    are secret; ``prompt_tokens``, ``key_id``, ``secret_ref`` are not.
    """
    words = [w.lower() for w in _WORD.findall(key)]
    if not words:
        return False
    if words[-1] in _METADATA_WORDS and len(words) > 1:
        return False
    joined = "".join(words)
    if any(word in _SECRET_WORDS for word in words):
        return True
    if any(fragment in joined for fragment in _SECRET_FRAGMENTS):
        return True
    # Key material: ``key``, ``api_key``, ``signing_key``, ``key_material``;
    # not ``KeyError`` (the last word decides).
    if words[-1] in ("key", "keys") or joined.endswith("key"):
        return True
    return "key" in words and words[-1] in _KEY_MATERIAL_WORDS


def _mask_pair(match: re.Match[str]) -> str:
    if not is_secret_key(match["name"]):
        return match[0]
    return f"{match['name']}{match['sep']}{MASK}"


def scrub_text(text: str) -> str:
    """Return ``text`` with the credentials it contains replaced by ``***``."""
    # Cheap guards first: most log text contains none of these characters.
    if "-----BEGIN" in text:
        text = _PEM_PRIVATE_KEY.sub(MASK, text)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m['scheme']} {MASK}", text)
    text = _HEADER.sub(lambda m: f"{m['head']}{MASK}", text)
    if "=" in text or ":" in text:
        text = _PAIR.sub(_mask_pair, text)
    return text


def scrub(value: Any, key: str = "", _depth: int = 0) -> Any:
    """Return a copy of ``value`` safe to log.

    Mappings and sequences are walked (up to a fixed depth, so cycles end);
    values under secret keys become ``***``; strings go through
    :func:`scrub_text`; bytes are replaced by their length; other objects by
    their scrubbed ``repr`` (what the renderer would print).
    """
    if key and is_secret_key(key):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if _depth >= _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, Mapping):
        return {str(k): scrub(v, str(k), _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        # A (name, value) pair, as in header lists: the name decides.
        if len(items) == 2 and isinstance(items[0], str) and is_secret_key(items[0]):
            return [items[0], MASK]
        return [scrub(v, "", _depth + 1) for v in items]
    return scrub_text(repr(value))


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets in every value of ``event_dict``."""
    for key, value in event_dict.items():
        if key not in _PASSTHROUGH:
            event_dict[key] = scrub(value, key)
    return event_dict


def add_trace_ids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current OpenTelemetry span's ``trace_id`` and
    ``span_id`` (hex, as trace backends show them), when there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", f"{context.trace_id:032x}")
        event_dict.setdefault("span_id", f"{context.span_id:016x}")
    return event_dict


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Write to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(
    level: str = "info", json: bool = True, *, stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging (uvicorn's too) to ``stream`` (stderr).

    ``json=False`` renders human-readable lines instead (redacted all the same).
    Replaces the root logger's handlers; safe to call again.
    Raises :class:`ValueError` for an unknown ``level``.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level: {level!r}")
    # Shared by structlog's records and foreign (stdlib) ones. Redaction comes
    # after format_exc_info so tracebacks are scrubbed too.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached, so that module-level loggers follow a later reconfiguration.
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # uvicorn may have attached its own handlers; everything goes through root.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    # Never uvicorn's access log, whenever this runs: it writes whole URLs
    # (query strings may carry what must not be logged), and the request-id
    # middleware logs each request already. uvicorn decides per connection
    # from whether the logger has handlers, so the logger must reach none.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    # httpx logs every outgoing URL at info (a provider's, with any key in
    # its query string); its warnings still come through.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """Return the structlog logger called ``name`` (bound lazily to the config)."""
    return structlog.stdlib.get_logger(name)
