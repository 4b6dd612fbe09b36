"""Split text into overlapping windows of model tokens for embedding.

An embedding model sees at most a fixed number of tokens (MiniLM: 256 word
pieces), so a document is indexed as chunks of at most ``max_tokens`` tokens,
each sharing about ``overlap`` tokens with the one before it so that a
sentence cut at a window edge is still whole in one of the two chunks.

A window ends, in order of preference, at a paragraph break (an empty line),
at the end of a sentence (``.``, ``?`` or ``!`` before whitespace, a CJK
full stop, or a line break), or else after exactly ``max_tokens`` tokens; a
break is only taken if the window keeps at least half of ``max_tokens``. The
next window starts ``overlap`` tokens before the end of the previous one, or
at the nearest sentence start less than ``overlap / 2`` tokens from there.

The tokens come from a :data:`TokenOffsets` function, so that chunk sizes are
counted in the tokens of the model that embeds them. Each chunk's text is the
exact slice ``text[start:end]`` from its first to its last token, without
surrounding whitespace. Every token is in at least one chunk, chunks are never
empty, and the output depends only on the input.

Break positions are found with one regular-expression pass each and looked
up by bisection, so chunking takes time linear in the text (plus a log factor
per chunk).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = ["Chunk", "TokenOffsets", "chunk_text"]

TokenOffsets = Callable[[str], list[tuple[int, int]]]
"""The ``(start, end)`` character span of each model token of a text, in
order, without special tokens such as ``[CLS]``."""


@dataclass(frozen=True)
class Chunk:
    """One window: ``text == source[start:end]`` and holds ``tokens`` tokens."""

    ordinal: int
    text: str
    start: int
    end: int
    tokens: int


_PARAGRAPH: Final = re.compile(r"\n[^\S\n]*\n")
_SENTENCE: Final = re.compile(r"""[.?!]["')\]\u2019\u201d\u00bb]*(?=\s)|[\u3002\uff01\uff1f]|\n""")


def _breaks(pattern: re.Pattern[str], text: str, starts: list[int], at_end: bool) -> list[int]:
    """Token indexes ``e`` (0 < e < n) such that a window may end just before token ``e``."""
    count = len(starts)
    found: list[int] = []
    for match in pattern.finditer(text):
        index = bisect_left(starts, match.end() if at_end else match.start())
        if 0 < index < count and (not found or found[-1] != index):
            found.append(index)
    return found


def _last_between(breaks: list[int], low: int, high: int) -> int | None:
    """The greatest break in ``[low, high]``, if any."""
    position = bisect_right(breaks, high) - 1
    if position >= 0 and breaks[position] >= low:
        return breaks[position]
    return None


def _windows(
    starts: list[int],
    paragraphs: list[int],
    sentences: list[int],
    max_tokens: int,
    overlap: int,
) -> Iterator[tuple[int, int]]:
    """Token windows ``[first, last)`` that cover every token."""
    count = len(starts)
    half = (max_tokens + 1) // 2
    first = 0
    previous_last = 0
    while True:
        last = min(first + max_tokens, count)
        if last < count:
            # Each window must add tokens the previous one did not have.
            low = max(first + half, previous_last + 1)
            cut = _last_between(paragraphs, low, last)
            if cut is None:
                cut = _last_between(sentences, low, last)
            if cut is not None:
                last = cut
        yield first, last
        if last >= count:
            return
        previous_last = last
        first = _next_first(sentences, first, last, overlap)


def _next_first(sentences: list[int], first: int, last: int, overlap: int) -> int:
    """Where the window after ``[first, last)`` starts: ``overlap`` tokens back,
    moved to the nearest sentence start within half of ``overlap`` of that."""
    target = last - overlap
    if overlap < 2:
        return max(target, first + 1)
    low = max(first + 1, target - overlap // 2)
    high = min(last - 1, target + overlap // 2)
    best = max(target, first + 1)
    distance = high - low + 1
    position = bisect_left(sentences, target)
    for candidate in sentences[max(position - 1, 0) : position + 1]:
        if low <= candidate <= high and abs(candidate - target) < distance:
            best, distance = candidate, abs(candidate - target)
    return best


def chunk_text(
    text: str,
    token_offsets: TokenOffsets,
    *,
    max_tokens: int = 200,
    overlap: int = 40,
) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``max_tokens`` tokens overlapping by ``overlap``."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), not {overlap}")
    offsets = token_offsets(text)
    if not offsets:
        return []
    starts = [start for start, _ in offsets]
    paragraphs = _breaks(_PARAGRAPH, text, starts, at_end=False)
    sentences = _breaks(_SENTENCE, text, starts, at_end=True)
    chunks: list[Chunk] = []
    for first, last in _windows(starts, paragraphs, sentences, max_tokens, overlap):
        start, end = offsets[first][0], offsets[last - 1][1]
        piece = text[start:end]
        stripped = piece.strip()
        if not stripped:
            continue
        start += len(piece) - len(piece.lstrip())
        chunks.append(
            Chunk(
                ordinal=len(chunks),
                text=stripped,
                start=start,
                end=start + len(stripped),
                tokens=last - first,
            )
        )
    return chunks
