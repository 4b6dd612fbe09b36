"""Parsing JSON from outside: nesting depth bounded before the parser runs (RFC 8259).

RFC 8259 section 9 lets a parser "set limits on the maximum depth of
nesting". The standard library's sets none of its own: its C scanner
recurses once per ``[`` or ``{`` until the interpreter's recursion limit, and
then raises :class:`RecursionError` — not a :class:`ValueError`, so it
escapes every ``except ValueError`` around a parse and becomes a 500 with a
stack trace. Two hundred kilobytes of ``[`` are enough, and a document that
parses just under the limit still breaks the first recursive walk over it.

:func:`loads` measures the nesting first and refuses a document nested
deeper than ``max_depth`` without parsing it. The measure runs at C speed in
time linear in the input: escapes are removed, every byte but quotes and
brackets is deleted, what lies between quotes (string literals) is dropped,
and what is left must be a sequence of balanced brackets at most
``max_depth`` deep — a regular expression whose nested possessive groups
never backtrack and stop at the first bracket too deep. Every failure is a :class:`ValueError`
(:class:`json.JSONDecodeError`, or :class:`UnicodeDecodeError` for bytes that
are not UTF-8), so one ``except ValueError`` covers whatever the input is.

Ground floor: the standard library only, importable from every layer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

__all__ = ["MAX_DEPTH", "loads", "loads_i_json", "nesting_exceeds"]

# Deeper than any event, token header, key set or request Bastion reads (they
# nest under ten levels), far below the parser's recursion limit.
MAX_DEPTH = 64

# Every byte but quotes and brackets is deleted (UTF-8 never has these bytes
# inside a multi-byte character); objects then count as arrays.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")


@functools.cache
def _balanced(max_depth: int) -> re.Pattern[bytes]:
    """Balanced brackets at most ``max_depth`` deep: S(0) is empty and S(k) is
    any number of ``[`` S(k-1) ``]``. Possessive (``*+``): brackets pair up one
    way only, so there is nothing to backtrack into."""
    pattern = b""
    for _ in range(max_depth):
        pattern = rb"(?:\[" + pattern + rb"\])*+"
    return re.compile(pattern)


def nesting_exceeds(document: str | bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``document`` is not JSON nested at most ``max_depth`` deep: its
    brackets outside string literals nest deeper, or do not pair up (which no
    JSON document's do). A document with at most ``max_depth`` opening brackets
    is never too deep: it is left to the parser to judge."""
    data = document.encode("utf-8", "surrogatepass") if isinstance(document, str) else document
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    # Escapes (RFC 8259 section 7) first: pairs of backslashes, then escaped
    # quotes, so that every quote left opens or closes a string literal.
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Outside and inside string literals alternate between the quotes.
    outside = b"".join(data.translate(_OBJECTS_AS_ARRAYS, _NOT_STRUCTURE).split(b'"')[::2])
    return _balanced(max_depth).fullmatch(outside) is None


def loads(document: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``document`` as :func:`json.loads` does, nested at most ``max_depth`` deep.

    Raises :class:`json.JSONDecodeError` (a :class:`ValueError`) for a document
    that is too deep, is not JSON, or exhausts the parser's recursion anyway,
    and :class:`UnicodeDecodeError` for bytes that are not UTF-8.
    """
    data = bytes(document) if isinstance(document, bytearray) else document
    if nesting_exceeds(data, max_depth):
        raise json.JSONDecodeError(f"unbalanced, or nested deeper than {max_depth}", "", 0)
    try:
        return json.loads(data)
    except RecursionError:  # not reached with a sane max_depth; never let it escape
        raise json.JSONDecodeError("nested too deep", "", 0) from None


# RFC 7493 section 2.2: integers beyond this lose precision in other parsers.
_I_JSON_INTEGER = 2**53 - 1


def loads_i_json(document: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``document`` as :func:`loads` does, and only if it is an I-JSON
    message (RFC 7493): one value however it is read, by whichever parser.

    Refused with :class:`ValueError`: a member name twice in one object
    (section 2.3: which one counts depends on the parser), ``NaN`` and the
    infinities (not JSON, RFC 8259 section 6), a number beyond a double's
    range such as ``1e400`` or an integer beyond 2**53 - 1 (section 2.2), a
    lone surrogate escape (``"\\ud800"``, section 2.1), nesting deeper than
    ``max_depth``.
    """
    value = _loads_strictly(document, max_depth)
    _no_lone_surrogates(value)
    return value


def _loads_strictly(document: str | bytes | bytearray, max_depth: int) -> Any:
    data = bytes(document) if isinstance(document, bytearray) else document
    if nesting_exceeds(data, max_depth):
        raise json.JSONDecodeError(f"unbalanced, or nested deeper than {max_depth}", "", 0)
    try:
        return json.loads(
            data,
            object_pairs_hook=_unique_members,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_exact_int,
        )
    except RecursionError:
        raise json.JSONDecodeError("nested too deep", "", 0) from None


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member name appears twice in one object")
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("a number beyond the range of a double")
    return number


def _exact_int(text: str) -> int:
    if len(text) > 17:  # never convert a huge digit string (and 2**53 has 16 digits)
        raise ValueError("an integer beyond 2**53 - 1")
    number = int(text)
    if abs(number) > _I_JSON_INTEGER:
        raise ValueError("an integer beyond 2**53 - 1")
    return number


def _no_lone_surrogates(value: Any) -> None:
    """Raise ValueError for a string (or member name) that holds a lone surrogate,
    which no UTF-8 text can (section 2.1). Iterative: depth is already bounded."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError, a ValueError
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
