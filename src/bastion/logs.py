"""Structured JSON logs (structlog), with secrets masked before they are written.

One JSON object per line on stderr, carrying the request id bound by the
request middleware. Values under secret-looking keys are masked at any depth,
and credentials inside connection URLs are masked wherever they appear.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

MASK = "***"
_SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token|authorization|cookie|api[_-]?key|private[_-]?key|"
    r"master[_-]?key|credential|signature|^sig$|^dsn$",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@", re.IGNORECASE
)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def scrub_text(text: str) -> str:
    """Return ``text`` with URL and ``password=`` credentials masked."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _KEYWORD_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)


def scrub(value: Any, key: str = "") -> Any:
    """Return ``value`` with secrets masked, recursing into mappings and sequences."""
    if key and _SECRET_KEY.search(key):
        return MASK
    if isinstance(value, Mapping):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {k: scrub(v, k) if k != "event" else scrub(v) for k, v in event.items()}


def configure_logging(
    level: str = "info", *, json: bool = True, stream: TextIO | None = None
) -> None:
    """Send structlog and stdlib logging (uvicorn's too) as JSON lines to ``stream``."""
    stream = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def get_logger(name: str) -> Any:
    """Return a structlog logger named ``name``."""
    return structlog.get_logger(name)
