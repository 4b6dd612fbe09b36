"""The JSON Canonicalization Scheme (JCS, RFC 8785): one byte string per JSON value.

A hash of JSON is only meaningful if everyone who computes it writes the value
the same way. JCS fixes every choice a serialiser makes:

- no whitespace between tokens (section 3.2.1);
- strings as ECMAScript's ``JSON.stringify`` writes them: ``"`` and ``\\`` and the
  controls below U+0020 escaped (``\\b \\t \\n \\f \\r``, else ``\\u00xx``), every
  other character as itself, in UTF-8 (sections 3.2.2.2, 3.2.4);
- numbers as IEEE 754 doubles, written as ECMAScript's ``Number.prototype.toString``
  does: the shortest digits that round-trip, ``1e+21`` not ``1e21``, ``1`` not
  ``1.0`` (section 3.2.2.3); NaN and the infinities are not JSON and are refused;
- object members sorted by their names as UTF-16 code units (section 3.2.3).

Values that JSON cannot hold (lone surrogates, NaN, non-string keys, other types)
raise :class:`ValueError`; nothing is silently dropped or coerced.

Ground floor: the standard library only, importable from every layer.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

# Integers beyond this are no longer exact as doubles: they are written as the double.
_EXACT_INTEGER = 2**53


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 serialisation of ``value`` (parsed JSON), UTF-8 encoded.

    Raises ValueError for anything that is not JSON (NaN, a lone surrogate, a
    non-string key, a set...) and RecursionError for absurd nesting."""
    text = _plain(value)
    if text is None:
        out: list[str] = []
        _write(value, out)
        text = "".join(out)
    return text.encode("utf-8")  # a lone surrogate fails here


# -- the common case at C speed ---------------------------------------------------------

_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class _NotPlain(Exception):
    """A number the standard library would not write as ECMAScript does."""


def _plain_int(text: str) -> int:
    number = int(text)
    if abs(number) > _EXACT_INTEGER:  # JCS writes it as the nearest double
        raise _NotPlain
    return number


def _plain_float(text: str) -> float:
    # repr() and Number::toString agree (shortest round-trip digits, no
    # exponent) on doubles that are not integers, from 1e-4 up to 1e16.
    number = float(text)
    if number.is_integer() or not 1e-4 <= abs(number) < 1e16:
        raise _NotPlain
    return number


def _plain(value: Any) -> str | None:
    """``json.dumps``'s compact, sorted output when it is already JCS, else None.

    It is when reading it back gives ``value`` itself (no tuple, no non-string
    key, nothing coerced), every number is written as ECMAScript writes it, and
    no character lies beyond U+FFFF (where sorting by code point and by UTF-16
    code unit differ). Strings are escaped alike (see :func:`_string`)."""
    try:
        text = json.dumps(
            value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        back = json.loads(text, parse_int=_plain_int, parse_float=_plain_float)
    except (TypeError, ValueError, _NotPlain):
        return None
    if type(back) is not type(value) or back != value or _ASTRAL.search(text):
        return None
    return text


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        if abs(value) <= _EXACT_INTEGER:
            out.append(str(value))
        elif abs(value) < 2**1024:  # beyond that, float() overflows
            out.append(_number(float(value)))
        else:
            raise ValueError("a number beyond the range of a double")
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("object member names must be strings")
        out.append("{")
        # UTF-16 code units (section 3.2.3): big-endian bytes compare the same way.
        for i, name in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            out.append("," if i else "")
            out.append(_string(name))
            out.append(":")
            _write(value[name], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _write(item, out)
        out.append("]")
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def _string(text: str) -> str:
    # The standard library escapes exactly JCS's set (", \, controls < 0x20, with
    # the short forms) and writes \u00xx in lower case, as ECMAScript does.
    return json.dumps(text, ensure_ascii=False)


def _number(number: float) -> str:
    """ECMAScript ``Number.prototype.toString`` (ECMA-262, Number::toString)."""
    if not math.isfinite(number):
        raise ValueError("NaN and the infinities are not JSON numbers")
    if number == 0:
        return "0"  # -0 included
    sign = "-" if number < 0 else ""
    # repr() gives the shortest digits that round-trip, as ECMAScript requires.
    _, digit_tuple, exponent = Decimal(repr(abs(number))).as_tuple()
    digits = "".join(map(str, digit_tuple)).rstrip("0")
    assert isinstance(exponent, int)  # finite
    exponent += len(digit_tuple) - len(digits)
    k = len(digits)
    n = exponent + k  # the value is 0.digits * 10**n
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else f"{digits[0]}.{digits[1:]}"
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


__all__ = ["canonicalize"]
