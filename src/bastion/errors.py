"""Domain errors: what went wrong, in the domain's words, free of any web framework.

Domains (knowledge, billing, gateway, safety, ...) raise a :class:`BastionError`
that says what it *means* (:class:`Kind`: not found, over budget, busy, ...);
only the HTTP edge (``api/problems.py``) decides which status, headers and
body (RFC 9457 problem details) a client sees. That keeps the domains usable
from the CLI, the worker and tests without FastAPI, and keeps the answer of each
meaning in one table instead of at hundreds of raise sites.

The ``slug`` is the stable part of the problem type clients see,
``https://bastion.dev/problems/<slug>``: changing one is a breaking change.
This module imports nothing of Bastion (it is the ground floor).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

PROBLEM_TYPE_BASE = "https://bastion.dev/problems/"
# Members of an RFC 9457 problem an error's extensions may not override.
RESERVED_MEMBERS = frozenset({"type", "title", "status", "detail", "instance", "request_id"})


class Kind(Enum):
    """What an error means to the caller; the HTTP edge maps each to one status."""

    INVALID = "invalid"  # the request is malformed
    UNAUTHENTICATED = "unauthenticated"  # who is asking is not established
    PAYMENT_REQUIRED = "payment-required"  # the plan or budget does not cover it
    FORBIDDEN = "forbidden"  # known caller, not allowed
    NOT_FOUND = "not-found"  # absent, or not the caller's to see
    CONFLICT = "conflict"  # contradicts the current state
    TOO_LARGE = "too-large"  # beyond a size limit
    UNSUPPORTED_MEDIA = "unsupported-media"  # a content type Bastion does not read
    UNPROCESSABLE = "unprocessable"  # well-formed, but cannot be acted on
    RATE_LIMITED = "rate-limited"  # over a rate or a fair share: retry later
    INTERNAL = "internal"  # Bastion's own fault
    UPSTREAM_FAILED = "upstream-failed"  # a service Bastion called answered badly
    UNAVAILABLE = "unavailable"  # a dependency is down or not configured: retry later


class BastionError(Exception):
    """Base of every domain error.

    Subclasses set the class attributes ``slug``, ``title`` and ``kind``; an
    instance adds a ``detail`` (never the offending input), extension members
    (keyword arguments, JSON-serialisable) and ``retry_after`` (seconds). An
    instance may override ``kind``/``slug``/``title`` (one type, several
    meanings: e.g. a refusal whose ``reason`` decides not-found or conflict).
    Raises :class:`ValueError` if an extension reuses a standard member.
    """

    slug: str = "internal-error"
    title: str = "Internal error"
    kind: Kind = Kind.INTERNAL

    def __init__(
        self,
        detail: str | None = None,
        *,
        kind: Kind | None = None,
        slug: str | None = None,
        title: str | None = None,
        retry_after: int | None = None,
        **extensions: Any,
    ) -> None:
        clash = RESERVED_MEMBERS.intersection(extensions)
        if clash:
            raise ValueError(f"extension members may not be named {sorted(clash)}")
        if kind is not None:
            self.kind = kind
        if slug is not None:
            self.slug = slug
        if title is not None:
            self.title = title
        super().__init__(detail or self.title)
        self.detail = detail
        self.retry_after = retry_after
        self.extensions = extensions

    @property
    def type(self) -> str:
        """The stable problem type URI (RFC 9457 section 3.1.1)."""
        return PROBLEM_TYPE_BASE + self.slug
