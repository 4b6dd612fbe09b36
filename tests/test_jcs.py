"""RFC 8785 (JCS) canonical JSON, which tool-call signatures hash declarations in:
the RFC's own examples, byte for byte, and refusal of what JSON cannot hold."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.jcs import _plain, _write, canonicalize

# RFC 8785 appendix B: IEEE 754 doubles (hex) and their canonical text.
NUMBERS = {
    "0000000000000000": "0",
    "8000000000000000": "0",
    "0000000000000001": "5e-324",
    "8000000000000001": "-5e-324",
    "7fefffffffffffff": "1.7976931348623157e+308",
    "4340000000000000": "9007199254740992",
    "4430000000000000": "295147905179352830000",
    "44b52d02c7e14af6": "1e+23",
    "444b1ae4d6e2ef50": "1e+21",
    "3eb0c6f7a0b5ed8d": "0.000001",
    "3eb0c6f7a0b5ed8c": "9.999999999999997e-7",
    "41b3de4355555553": "333333333.3333332",
    "becbf647612f3696": "-0.0000033333333333333333",
    "43143ff3c1cb0959": "1424953923781206.2",
}


@pytest.mark.parametrize(("bits", "text"), NUMBERS.items())
def test_numbers_are_written_as_ecmascript_writes_them(bits: str, text: str) -> None:
    (number,) = struct.unpack(">d", bytes.fromhex(bits))
    assert canonicalize(number) == text.encode()


def test_the_rfc_examples_serialise_byte_for_byte() -> None:
    # Section 3.2.2: whitespace, escapes, numbers and literals.
    parsed = json.loads(
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    assert (
        canonicalize(parsed)
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )
    # Section 3.2.3: members sorted by UTF-16 code units (the emoji's surrogates
    # come before U+FB33, though its code point is higher).
    names = ["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"]
    text = canonicalize({name: 0 for name in names}).decode()
    assert list(json.loads(text)) == [
        "\r",
        "1",
        "\u0080",
        "\u00f6",
        "\u20ac",
        "\U0001f600",
        "\ufb33",
    ]


def test_one_value_one_spelling() -> None:
    a = json.loads('{"b": [1.0, 2e2, 10000000000000000000000], "a": {"y": 1, "x": "é"}}')
    b = json.loads('{ "a":{"x":"\\u00e9","y":1.00},"b":[1,200,1e22] }')
    assert canonicalize(a) == canonicalize(b) == b'{"a":{"x":"\xc3\xa9","y":1},"b":[1,200,1e+22]}'


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), "\ud800", {1: "x"}, {"a": {1, 2}}, 10**400, b"bytes"],
    ids=["nan", "inf", "lone surrogate", "int key", "set", "huge int", "bytes"],
)
def test_what_json_cannot_hold_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        canonicalize(value)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_the_fast_path_writes_what_the_reference_writes(value: Any) -> None:
    """The standard library's output is taken only where it is JCS's spelling:
    for any JSON value, the same bytes as the writer that follows the RFC."""
    out: list[str] = []
    _write(value, out)
    try:
        reference = "".join(out).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: refused either way
        with pytest.raises(ValueError):
            canonicalize(value)
        return
    assert canonicalize(value) == reference


def test_the_fast_path_is_taken_for_an_ordinary_event() -> None:
    event = {"tokens": 17, "latency_ms": 31.5, "pii_in": {}, "screen": [{"reasons": []}]}
    assert _plain(event) == '{"latency_ms":31.5,"pii_in":{},"screen":[{"reasons":[]}],"tokens":17}'
    for other in ({"n": 1.0}, {"n": 1e-5}, {"n": 2**53 + 1}, {"\U0001f600": 1}, (1, 2), {1: 2}):
        assert _plain(other) is None  # left to the reference writer


@pytest.mark.parametrize(
    "number",
    [1e-7, 1.5e-6, 1e-5, 9.99e-5, 1e-4, 0.000123, 0.5, 123456789.125, 9.5e15, 1.2e16, 3e20],
)
def test_numbers_near_where_the_notations_change_are_written_as_the_reference(
    number: float,
) -> None:
    for value in (number, -number, [number], {"n": number}):
        out: list[str] = []
        _write(value, out)
        assert canonicalize(value) == "".join(out).encode()
