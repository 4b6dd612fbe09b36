"""PII scans (and injection screens) of text of any size without blocking the
event loop (issue 23, A3).

A scan (:meth:`~bastion.safety.pii.PiiRecognizer.find`) is linear in its
input but not cheap: with the name tagger (issue 16), measured on a loaded
2-core box (median of 60 runs over a dozen windows of the demo tickets, and of
text dense with e-mail addresses and phones), 0.8 / 1.3 / 2.0 ms for 256 /
512 / 1024 characters of tickets and 1.0 / 1.5 / 3.0 ms of the dense text (a
fixed ~0.5 ms of it is the tagger's per-call numpy work). A prompt of 500 turns, a document's
text or a model's answer is that big at the sender's choice, and one event
loop serves every tenant of the process.

Threads do not help: a regular expression holds the GIL for its whole run,
so two 256 KiB scans in threads delayed a 2 ms timer on the loop by up to
96 ms. In :class:`~bastion.offload.FairProcessPool`'s processes the same
scans delayed it by 11 ms (both cores busy), and a small job's round trip
costs 0.2 ms. Hence:

- up to :data:`INLINE_SCAN_CHARS` in one call (all texts together: a
  thousand short turns are as heavy as one long one) are scanned inline,
  about 1.5 ms at worst (the dense text's median at 512 characters); an
  injection screen, 0.25 / 0.42 ms at 512 / 1024 characters, inline up to
  :data:`INLINE_SCREEN_CHARS`;
- anything larger goes to this process's ``screens`` pool under the
  tenant's share (:func:`bastion.offload.shared_pool`): a flood of one
  tenant waits behind itself, and past its queue is refused at once with
  429 :class:`ScanBusy` and ``Retry-After``;
- a scan that runs out of time or whose process dies is
  :class:`ScanUnavailable` (503): the text is never passed on unscanned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, TypeVar

from bastion.errors import BastionError, Kind
from bastion.offload import FairProcessPool, JobFailed, JobTimedOut, PoolBusy, shared_pool
from bastion.safety.injection import DEFAULT_POLICY, ScreenPolicy, Source, Verdict, screen
from bastion.safety.pii import Entity, OutputScan, PiiRecognizer, scan_output

__all__ = [
    "INLINE_SCAN_CHARS",
    "INLINE_SCREEN_CHARS",
    "ScanBusy",
    "ScanUnavailable",
    "find_each",
    "in_scanning_pool",
    "offloadable",
    "scan_each",
    "scanning_recognizer",
    "screen_each",
]

T = TypeVar("T")

# Characters per call scanned on the event loop (<= ~1.5 ms measured, see above).
INLINE_SCAN_CHARS = 512
# Characters per call screened for injection on the event loop (~0.4 ms measured).
INLINE_SCREEN_CHARS = 1024


class ScanBusy(BastionError):
    """The tenant's texts already fill its share of the scanning processes and
    its queue: retry after ``Retry-After``. Other tenants are not affected."""

    slug = "busy"
    title = "Too many texts of this tenant are being scanned"
    kind = Kind.RATE_LIMITED


class ScanUnavailable(BastionError):
    """The scan could not finish (its process ran out of time or died)."""

    slug = "pii-scan-unavailable"
    title = "The text could not be scanned for personal data"
    kind = Kind.UNAVAILABLE


# -- in a scanning process ----------------------------------------------------------


@functools.lru_cache(maxsize=8)
def scanning_recognizer(
    kinds: tuple[str, ...], regions: tuple[str, ...], max_chars: int
) -> PiiRecognizer:
    return PiiRecognizer(kinds, regions=regions, max_chars=max_chars)


def _find_each(
    spec: tuple[tuple[str, ...], tuple[str, ...], int],
    texts: Sequence[str | bytes],
    opaque: frozenset[str],
) -> list[list[Entity]]:
    recognizer = scanning_recognizer(*spec)
    return [recognizer.find(text, opaque=opaque) for text in texts]


def _scan_each(texts: Sequence[str | bytes], opaque: frozenset[str]) -> list[OutputScan]:
    return [scan_output(text, opaque=opaque) for text in texts]


def _screen_each(
    texts: Sequence[str | bytes], source: Source, policy: ScreenPolicy = DEFAULT_POLICY
) -> list[Verdict]:
    return [screen(text, source, policy) for text in texts]


# -- on the event loop ---------------------------------------------------------------


def _size(texts: Sequence[str | bytes]) -> int:
    return sum(len(text) for text in texts)


def offloadable(recognizer: PiiRecognizer) -> bool:
    # A recognizer is rebuilt in the scanning process from its settings; a
    # subclass (a test's) could not be, and is run where it is.
    return type(recognizer) is PiiRecognizer


async def in_scanning_pool(
    pool: FairProcessPool | None, tenant: Hashable, fn: Callable[..., T], *args: Any
) -> T:
    try:
        return await (pool or shared_pool("screens")).run(tenant, fn, *args)
    except PoolBusy as busy:
        raise ScanBusy(
            "this tenant's texts already fill its share of the scanning; retry shortly",
            retry_after=busy.retry_after,
        ) from None
    except (JobTimedOut, JobFailed):
        raise ScanUnavailable("the text could not be scanned for personal data") from None


async def find_each(
    tenant: Hashable,
    texts: Sequence[str | bytes],
    *,
    recognizer: PiiRecognizer,
    opaque: Collection[str] = frozenset(),
    pool: FairProcessPool | None = None,
) -> list[list[Entity]]:
    """``recognizer.find(text, opaque=opaque)`` of each of ``texts``, for ``tenant``.

    Inline up to :data:`INLINE_SCAN_CHARS` in all, else in ``pool`` (default:
    this process's ``screens`` pool). Raises what :meth:`PiiRecognizer.find`
    raises, :class:`ScanBusy` (429) and :class:`ScanUnavailable` (503).
    """
    if _size(texts) <= INLINE_SCAN_CHARS or not offloadable(recognizer):
        return [recognizer.find(text, opaque=opaque) for text in texts]
    spec = (recognizer.kinds, recognizer.regions, recognizer.max_chars)
    return await in_scanning_pool(pool, tenant, _find_each, spec, list(texts), frozenset(opaque))


async def scan_each(
    tenant: Hashable,
    texts: Sequence[str | bytes],
    *,
    opaque: Collection[str] = frozenset(),
    pool: FairProcessPool | None = None,
) -> list[OutputScan]:
    """:func:`~bastion.safety.pii.scan_output` of each of ``texts`` (masks, counts),
    for ``tenant``; inline or in the pool as :func:`find_each`, raising as it does."""
    if _size(texts) <= INLINE_SCAN_CHARS:
        return [scan_output(text, opaque=opaque) for text in texts]
    return await in_scanning_pool(pool, tenant, _scan_each, list(texts), frozenset(opaque))


async def screen_each(
    tenant: Hashable,
    texts: Sequence[str | bytes],
    source: Source,
    *,
    policy: ScreenPolicy = DEFAULT_POLICY,
    pool: FairProcessPool | None = None,
) -> list[Verdict]:
    """The injection :func:`~bastion.safety.injection.screen` of each of ``texts``
    from ``source`` under ``policy`` (about 0.4 ms per KiB), for ``tenant``; inline
    up to :data:`INLINE_SCREEN_CHARS`, else in the pool as :func:`find_each`, raising
    as it does (and as the screen does)."""
    if _size(texts) <= INLINE_SCREEN_CHARS:
        return [screen(text, source, policy) for text in texts]
    return await in_scanning_pool(pool, tenant, _screen_each, list(texts), source, policy)
