"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` header.

The gateway continues the caller's trace (the api's, or the client's) or
starts one, and sends the provider a ``traceparent`` with the same trace id
and a span id of its own, so one id follows a request api → gateway → provider.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass

# version 00: trace-id (32 hex, not all zero), parent-id (16 hex, not all zero), flags.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """The context of a call this span makes (same trace, new span id)."""
        return TraceContext(self.trace_id, secrets.token_hex(8), self.flags)


def continue_or_start(header: str | None) -> TraceContext:
    """Continue a valid incoming ``traceparent`` with a new span, else start a trace.

    An invalid header is ignored (the spec says: restart the trace), never an error.
    """
    match = _TRACEPARENT.fullmatch(header.strip()) if header else None
    if match and set(match.group(1)) != {"0"} and set(match.group(2)) != {"0"}:
        return TraceContext(match.group(1), secrets.token_hex(8), match.group(3))
    return TraceContext(secrets.token_hex(16), secrets.token_hex(8))


current_trace: ContextVar[TraceContext | None] = ContextVar("bastion_trace", default=None)
