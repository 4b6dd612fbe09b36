"""The decoded layers of a text: escapes, encoded runs, spaced-out letters, ciphers.

:func:`_layers` yields each layer (:data:`Layer`) the engine screens as it
does the text itself (nested up to a bounded depth): %-escapes (RFC 3986
§2.1), HTML character references (HTML Living Standard §13.1.4) and
``\\uXXXX`` (RFC 8259 §7) undone; base64 and base32 (RFC 4648), ascii85 and
base85 (RFC 1924), hex, binary, ``\\x`` escapes and Morse decoded where they
decode to readable text; letters spaced out joined; Caesar, ROT13 and Atbash
undone where the result reads far likelier as language. Each encoding's
regex runs only on the windows holding its signature, found in C.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import string
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

import numpy as np

from bastion.safety.injection import classifier
from bastion.safety.injection.normalise import _IS_SPACE, _WINDOW, Views, _latin1, _run_edges

# Decoding works window by window (:data:`_WINDOW`), so its work grows
# linearly with the text and no run early in a text uses up what a later window
# may decode (decoys cannot hide a later encoded run): every candidate run is
# decoded (a pure-Python decoder, :data:`_SLOW_TRIES` per window), and what the
# runs of one window decode to is screened as one layer once they are more than
# :data:`_SEPARATE`; %-escapes and spaced-out letters of a long text are undone
# per window, with :data:`_CONTEXT` characters around it.
_SEPARATE = 4  # decoded runs of a window screened one by one, with their own spans
_SLOW_TRIES = 32  # candidates per window of the encodings decoded in pure Python
_SLOW_KINDS = frozenset({"base85", "morse"})
_CONTEXT = 256
_MAX_BLOB = 65_536

# Tried only where a run starts (the same matches: a run too short from its start
# is too short from any place in it), not again at each of its characters.
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}={0,2}")
_BASE32 = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{16,}={0,6}")
_BASE85 = re.compile(r"<~[!-u\s]{10,}~>|(?<!\S)[!-~]{20,}(?!\S)")  # ascii85 or RFC 1924
_HEX = re.compile(r"[0-9a-fA-F]{24,}|(?:[0-9a-fA-F]{2}[\s:,]){11,}[0-9a-fA-F]{2}")
_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2}){6,}")
_BINARY = re.compile(r"(?<![01])(?:[01]{8}[\s,]?){4,}")
_MORSE = re.compile(
    r"(?<![.\-\w])(?:[.\-\u2022\u2013_]{1,7}(?:\s*/\s*|\s+|\|)){4,}[.\-\u2022\u2013_]{1,7}"
)

_MORSE_SIGNS = (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - "
    "..- ...- .-- -..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. "
    "----. .-.-.- --..-- ..--.. -.-.-- ---... .----. -..-."
)
_MORSE_CODE = dict(
    zip(_MORSE_SIGNS.split(" "), "abcdefghijklmnopqrstuvwxyz0123456789.,?!:'/", strict=True)
)

# Escapes that any text may carry, decoded wherever they occur, runs of any
# length: percent-encoding (RFC 3986 §2.1), HTML character references (HTML
# Living Standard §13.1.4) and JSON/Python ``\uXXXX`` (RFC 8259 §7).
_ANY_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}|&#?\w{1,32};|\\[uU][0-9a-fA-F]{4}|\\x[0-9a-fA-F]{2}")
_UNICODE_ESCAPE = re.compile(
    r"\\u(?:d[89ab][0-9a-f]{2}\\u d[c-f][0-9a-f]{2}|[0-9a-f]{4})".replace(" ", ""),
    re.I,
)
_SURROGATE = re.compile("[\ud800-\udfff]")
# Each alphabet's characters deleted: a blob of one alphabet leaves nothing
# (RFC 1924's; Ascii85's "!" to "u" and "z", whitespace ignored by its decoder).
_RFC1924 = (
    string.digits + string.ascii_uppercase + string.ascii_lowercase + "!#$%&()*+-;<=>?@^_`{|}~"
)
_B85_ALPHABET = str.maketrans(dict.fromkeys(_RFC1924))
_A85_ALPHABET = str.maketrans(dict.fromkeys([*map(chr, range(33, 118)), "z", *" \t\n\r\v"]))
_SPACED = re.compile(r"(?<![^\W_])(?:[^\W\d_](?: {1,3}|[.\-_*|] ?)){3,}[^\W\d_](?![^\W_])")


_NOT_LETTER = re.compile(r"[\W\d_]+")


def _printable(text: str) -> bool:
    if len(text) < 8:
        return False
    # In C for readable text; character by character only for what is not.
    body = text.replace("\n", "").replace("\t", "")
    bad = 0 if body.isprintable() else sum(1 for c in body if not c.isprintable())
    letters = len(_NOT_LETTER.sub("", text))
    return (len(text) - bad) / len(text) > 0.95 and letters / len(text) > 0.5


def _unicode_escape(match: re.Match[str]) -> str:
    units = [int(h, 16) for h in re.findall(r"[0-9a-fA-F]{4}", match.group(0))]
    if len(units) == 2:
        return chr(0x10000 + ((units[0] - 0xD800) << 10) + (units[1] - 0xDC00))
    return "" if 0xD800 <= units[0] <= 0xDFFF else chr(units[0])


def _unescaped(text: str) -> str | None:
    """``text`` with every %-, HTML and backslash escape decoded, or None if it has none."""
    if not _ANY_ESCAPE.search(text):
        return None
    out = text
    if "%" in out:
        out = unquote(out, errors="replace")
    if "&" in out:
        out = html.unescape(out)
    if "\\" in out:
        out = _UNICODE_ESCAPE.sub(_unicode_escape, out)
        out = re.sub(
            r"\\U000([0-9a-fA-F]{5})", lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), out
        )
        out = re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), out)
    out = _SURROGATE.sub("", out)
    return out if out != text else None


def _morse(blob: str) -> str:
    words = re.split(
        r"\s*/\s*|\s{3,}|\|", blob.replace("\u2022", ".").replace("\u2013", "-").replace("_", "-")
    )
    return " ".join("".join(_MORSE_CODE.get(sym, "?") for sym in word.split()) for word in words)


def _despaced(run: str) -> str:
    # "i g n o r e  a l l": one space joins letters, a wider gap ends a word;
    # "i.g.n.o.r.e a.l.l": a dot (dash, star…) joins letters, a space ends a word.
    gap = r"\s+" if re.search(r"[^\W\d_][.\-_*|][^\W\d_]", run) else r" {2,}| / "
    return " ".join(re.sub(r"[\s.\-_*|]", "", word) for word in re.split(gap, run))


def _blob_bytes(kind: str, blob: str) -> bytes:
    if kind == "base64":
        if blob.isalpha() or blob.isdigit():
            raise ValueError("a long word or number, not an encoding")
        padded = blob.rstrip("=").replace("-", "+").replace("_", "/")
        return base64.b64decode(padded + "=" * (-len(padded) % 4), validate=True)
    if kind == "base32":
        if blob.isalpha():
            raise ValueError("an upper-case word, not an encoding")
        stripped = blob.rstrip("=")
        return base64.b32decode(stripped + "=" * (-len(stripped) % 8))
    if kind == "base85":
        if blob.startswith("<~"):
            return base64.a85decode(blob, adobe=True)
        if "/" in blob and "://" in blob:
            raise ValueError("a URL, not an encoding")
        # A character outside a decoder's alphabet fails it: not run (in Python,
        # they cost most of a megabyte of source code, whose every token is a candidate).
        if not blob.translate(_B85_ALPHABET):
            try:
                return base64.b85decode(blob)
            except ValueError:
                pass
        if blob.translate(_A85_ALPHABET):
            raise ValueError("outside both alphabets")
        return base64.a85decode(blob)
    if kind == "hex":
        digits = re.sub(r"[\s:,]", "", blob)
        return binascii.unhexlify(digits[: (len(digits) // 2) * 2])
    if kind == "binary":
        bits = "".join(re.findall(r"[01]{8}", blob))
        return int(bits, 2).to_bytes(len(bits) // 8, "big")
    return bytes.fromhex("".join(re.findall(r"[0-9a-fA-F]{2}", blob)))  # \x escapes


_BLOB_PATTERNS = (
    ("base64", _BASE64),
    ("base32", _BASE32),
    ("base85", _BASE85),
    ("hex", _HEX),
    ("escape", _ESCAPES),
    ("binary", _BINARY),
)


# -- where encoded runs may be, found in C -------------------------------------------------
#
# Each encoding's regular expression tries every position of the text, which
# in a long text costs more than anything else. A run of an encoding always
# holds a literal signature once its characters are mapped to classes (16
# base64 characters in a row, "<~", "\\x"...): ``bytes.translate`` maps the
# text (one byte per character: other characters read as "?") and
# ``bytes.find`` finds the signatures, both in C; the expression then runs only
# on the windows that hold one. A character "?" may stand for any other one,
# so it is mapped into every class it could belong to: nothing is missed.


def _classes(members: str, also: str = "") -> bytes:
    """A translate table: bytes of ``members`` to ``x``, of ``also`` to ``s``, others to a space."""
    return bytes(
        ord("x") if chr(b) in members else ord("s") if chr(b) in also else 32 for b in range(256)
    )


_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_HEX_DIGITS = "0123456789abcdefABCDEF"
_PRINTABLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))
# What ``\s`` matches in ASCII; with "?" (any other character) in a text
# that holds whitespace past ASCII (``Views.wide_spaces``: U+00A0, U+3000…):
# else a text of other characters, all "?", would read as all whitespace.
_WHITE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _signatures(white: str) -> dict[str, tuple[tuple[bytes | None, bytes], ...]]:
    """kind: (class table or None for the text itself, signature), any of which."""
    return {
        "base64": ((_classes(_ALNUM + "+/_-"), b"x" * 16),),
        "base32": ((_classes("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"), b"x" * 16),),
        "base85": ((_classes(_PRINTABLE_ASCII), b"x" * 20), (None, b"<~")),
        "hex": (
            (_classes(_HEX_DIGITS), b"x" * 24),
            (_classes(_HEX_DIGITS, white + ":,"), b"xxs" * 11 + b"xx"),
        ),
        "escape": ((None, b"\\x"),),
        "binary": ((_classes("01"), b"x" * 8),),
    }


_SIGNATURES = {wide: _signatures(_WHITE + "?" * wide) for wide in (False, True)}
_MORSE_CLASSES = {wide: _classes(".-_", _WHITE + "?" * wide + "/|") for wide in (False, True)}
# Five groups of dots and dashes, as _MORSE: opening with a literal, the scan
# skips to each "x" in C (its match may end up to six dots short of the run,
# well inside the context every window gets).
_MORSE_SIGNATURE = re.compile(rb"x(?:x{0,6}s+x){4,}")
_SPACED_CLASSES = _classes(_ALNUM + "?", " .-_*|")
# Three one-letter gaps in a row: _SPACED's second and third letters stand
# alone, so every run holds "sxs" — a literal the scan skips to in C (a match
# starts at most five characters after the run, inside the windows' context).
_SPACED_SIGNATURE = re.compile(rb"sxs(?:s{0,3})x(?:s{1,4})x")


def _marked(text: bytes, table: bytes | None, signature: bytes, windows: set[int]) -> None:
    classes = text if table is None else text.translate(table)
    at = classes.find(signature)
    while at >= 0:
        # The run the signature starts may go on: every window it reaches counts.
        end = at + len(signature)
        if table is not None and signature.count(b"x") == len(signature):
            stop = classes.find(b" ", end)
            end = len(classes) if stop < 0 else stop
        windows.update(range(at // _WINDOW, end // _WINDOW + 1))
        at = classes.find(signature, max(end, (at // _WINDOW + 1) * _WINDOW))


def _spans(windows: set[int], size: int) -> list[tuple[int, int]]:
    """The windows, neighbours merged, with :data:`_CONTEXT` characters around."""
    merged: list[list[int]] = []
    for w in sorted(windows):
        if merged and merged[-1][1] == w:
            merged[-1][1] = w + 1
        else:
            merged.append([w, w + 1])
    return [(max(0, a * _WINDOW - _CONTEXT), min(size, b * _WINDOW + _CONTEXT)) for a, b in merged]


# Signatures (kind, number) that are runs of base64 characters, 16 or more: their
# classes are in base64's. A text without base64's signature holds none of them.
_IN_BASE64 = frozenset({("base32", 0), ("hex", 0)})


def _candidates(
    visible: str, kind: str, text: bytes, wide: bool, base64: bool = True
) -> list[tuple[int, int]]:
    """Where runs of the encoding ``kind`` may be: the windows holding its
    signature (for a short text, all of it or nothing). ``text``: ``visible``
    encoded to ASCII with "?" for other characters; ``wide``: whether it holds
    whitespace past ASCII. ``base64``: False when the text has no base64
    signature (then none of :data:`_IN_BASE64` either: not looked for)."""
    if kind == "morse" and ("\u2022" in visible or "\u2013" in visible):
        return [(0, len(visible))]  # its other dots and dashes are not ASCII
    windows: set[int] = set()
    if kind == "morse":
        for m in _MORSE_SIGNATURE.finditer(text.translate(_MORSE_CLASSES[wide])):
            windows.update(range(m.start() // _WINDOW, m.end() // _WINDOW + 1))
    else:
        for number, (table, signature) in enumerate(_SIGNATURES[wide][kind]):
            if base64 or (kind, number) not in _IN_BASE64:
                _marked(text, table, signature, windows)
    return _spans(windows, len(visible))


Layer = tuple[str, str, int, int]  # (kind, decoded text, start, end in the text)


def _per_window(groups: dict[tuple[str, int], list[Layer]], size: int) -> Iterable[Layer]:
    """The decoded runs of each (kind, window) of a text of ``size`` characters:
    one by one when few in a short text, else joined."""
    separate = _SEPARATE if size <= 2 * _WINDOW else 1
    for (kind, _window), runs in groups.items():
        if len(runs) <= separate:
            yield from runs
        else:
            yield kind, "\n".join(run[1] for run in runs), runs[0][2], runs[-1][3]


def _runs_kept(kind: str, text: bytes, starts: _Array, ends: _Array) -> list[tuple[int, int]]:
    """The runs (in order) left to decode: of a kind decoded in pure Python, the
    first :data:`_SLOW_TRIES` of each window; of base64 and base85, when many,
    those their sift keeps."""
    if kind in _SLOW_KINDS and len(starts) > _SLOW_TRIES:
        # Each run's rank among its window's, in order (a stable sort: runs
        # found in windows that overlap may come out of order).
        order = np.argsort(starts // _WINDOW, kind="stable")
        windows = (starts // _WINDOW)[order]
        rank = np.empty(len(order), dtype=np.intp)
        rank[order] = np.arange(len(order)) - np.searchsorted(windows, windows)
        starts, ends = starts[rank < _SLOW_TRIES], ends[rank < _SLOW_TRIES]
    if kind in ("base64", "base85") and len(starts) > _SIFT_FROM:
        keep = (_sifted_base64 if kind == "base64" else _opening_may_read)(text, starts, ends)
        starts, ends = starts[keep], ends[keep]
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


# Base85 and Ascii85 are decoded in Python (base64's modules): in a megabyte of
# source code every token of 20 characters is a candidate, and most decode to
# bytes no text has. Many candidates are first read at once in numpy, each by
# the decoder that would read it (RFC 1924's, or Ascii85's where that one
# fails): those whose result overflows a group, or holds more control
# characters than _printable allows, or is too short, are not decoded again. A
# necessary condition only: what passes is decoded as before, so the layers
# found are the same.
_SIFT_FROM = 16
_POWERS_85 = 85 ** np.arange(4, -1, -1, dtype=np.int64)
_B85_DIGITS = np.full(256, 255, dtype=np.uint8)
_B85_DIGITS[np.frombuffer(_RFC1924.encode(), dtype=np.uint8)] = np.arange(85, dtype=np.uint8)
_A85_DIGITS = np.full(256, 255, dtype=np.uint8)
_A85_DIGITS[33:118] = np.arange(85, dtype=np.uint8)


# Per byte: how many continuation bytes it leads (-1: it is one; 9: no UTF-8 has it).
_UTF8_LEADS = np.zeros(256, dtype=np.int8)
_UTF8_LEADS[0x80:0xC0] = -1
_UTF8_LEADS[0xC0:0xE0] = 1
_UTF8_LEADS[0xE0:0xF0] = 2
_UTF8_LEADS[0xF0:0xF5] = 3
_UTF8_LEADS[[0xC0, 0xC1, *range(0xF5, 0x100)]] = 9
_B85_PREFIX = 20  # a base85 candidate's run has as many (four groups)


def _opens_utf8(out: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per row of bytes, whether they may open valid UTF-8: no byte UTF-8 lacks,
    no continuation byte first or after an ASCII one, and each lead byte
    followed by its continuation bytes (those within the row)."""
    leads = _UTF8_LEADS[out.astype(np.uint8)]
    continuation = leads == -1
    bad: np.ndarray[Any, Any] = leads == 9
    bad[:, 0] |= continuation[:, 0]
    bad[:, 1:] |= (leads[:, :-1] == 0) & continuation[:, 1:]  # after ASCII
    for k in (1, 2, 3):  # a lead of k continuations, each of them
        bad[:, k:] |= (leads[:, :-k] >= k) & (leads[:, :-k] != 9) & ~continuation[:, k:]
    return np.logical_not(bad.any(axis=1))


_Array = np.ndarray[Any, Any]


def _openings(text: bytes, starts: _Array, width: int) -> tuple[_Array, _Array]:
    """``text`` as bytes, and the first ``width`` bytes from each of ``starts``,
    one row per start (past the text's end: its last byte)."""
    codes = np.frombuffer(text, dtype=np.uint8)
    return codes, codes[np.minimum(starts[:, None] + np.arange(width), len(codes) - 1)]


def _opening_may_read(text: bytes, starts: _Array, ends: _Array) -> _Array:
    """For each base85 candidate ``text[a:b]``, whether its first four groups,
    read by either decoder, fit and may open valid UTF-8 (cheap: most junk
    ends there; an Adobe frame, an Ascii85 "z" there, or a shorter candidate:
    left to :func:`_sifted`)."""
    _codes, opening = _openings(text, starts, _B85_PREFIX)
    zeros = opening == ord("z")  # Ascii85's "z" shifts the groups, where Ascii85 may read it
    foreign = (_A85_DIGITS[opening] == 255) & ~zeros
    may = (ends - starts < _B85_PREFIX) | (zeros.any(axis=1) & ~foreign.any(axis=1))
    may |= (opening[:, 0] == ord("<")) & (opening[:, 1] == ord("~"))
    for table in (_B85_DIGITS, _A85_DIGITS):
        digits = table[opening]
        five = digits.reshape(len(starts), -1, 5).astype(np.int64)
        values = (((five[..., 0] * 85 + five[..., 1]) * 85 + five[..., 2]) * 85 + five[..., 3]) * 85
        values += five[..., 4]
        fits = ~(digits == 255).any(axis=1) & ~(values > 0xFFFFFFFF).any(axis=1)
        out = ((values[:, :, None] >> np.array([24, 16, 8, 0])) & 0xFF).reshape(len(starts), -1)
        may |= fits & _opens_utf8(out)
    kept: _Array = may
    return kept


def _sifted(blobs: list[str]) -> list[bool]:
    """For each base85 candidate, whether it may decode to readable text (see above)."""
    adobe = np.array([b.startswith("<~") for b in blobs])  # left to the decoder
    # Ascii85's "z" shifts the groups: left to the decoder, if Ascii85 may read the rest.
    zeros = np.array(["z" in b and not b.translate(_A85_ALPHABET) for b in blobs])
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    pads = -lengths % 5
    sized = lengths + pads
    codes = np.frombuffer(
        "".join(b + "~" * (-len(b) % 5) for b in blobs).encode("ascii", "replace"), dtype=np.uint8
    )
    firsts = np.concatenate(([0], np.cumsum(sized)[:-1]))
    padding = (np.arange(len(codes)) - np.repeat(firsts, sized)) >= np.repeat(lengths, sized)
    groups = sized // 5
    group_firsts = firsts // 5
    kept_bytes = 4 * groups - pads
    byte_firsts = 4 * group_firsts
    offsets = np.arange(4 * len(codes) // 5) - np.repeat(byte_firsts, 4 * groups)
    kept = offsets < np.repeat(kept_bytes, 4 * groups)

    def read(table: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        digits = table[codes]
        digits[padding] = 84  # each decoder pads with its last digit
        values = digits.reshape(-1, 5).astype(np.int64) @ _POWERS_85
        broken = (
            np.add.reduceat(
                (digits == 255).reshape(-1, 5).any(axis=1) | (values > 0xFFFFFFFF), group_firsts
            )
            > 0
        )
        out = (values[:, None] >> np.array([24, 16, 8, 0])) & 0xFF
        out = out.reshape(-1)
        control = kept & (((out < 32) & (out != 9) & (out != 10)) | (out == 127))
        bad = np.add.reduceat(control, byte_firsts)
        return ~broken, (kept_bytes >= 8) & (20 * bad < kept_bytes)

    b85_reads, b85_text = read(_B85_DIGITS)
    a85_reads, a85_text = read(_A85_DIGITS)
    may = adobe | np.where(b85_reads, b85_text, zeros | (a85_reads & a85_text))
    return list(may.tolist())


# The same for base64 (or its URL-safe alphabet), whose candidates in source
# code are identifiers of 16 characters or more: the first 16 characters of
# every candidate are read at once in numpy, and those whose first 12 bytes
# cannot open valid UTF-8 (a byte no UTF-8 has; a continuation byte first or
# after an ASCII one; a lead byte without its continuation bytes), or that are
# one character over a group (the decoder refuses them), are not decoded. A
# necessary condition only: the rest is decoded as before, the same layers.
_B64_DIGITS = np.full(256, 255, dtype=np.uint8)
_B64_DIGITS[np.frombuffer(string.ascii_uppercase.encode(), dtype=np.uint8)] = np.arange(26)
_B64_DIGITS[np.frombuffer(string.ascii_lowercase.encode(), dtype=np.uint8)] = np.arange(26, 52)
_B64_DIGITS[np.frombuffer(string.digits.encode(), dtype=np.uint8)] = np.arange(52, 62)
_B64_DIGITS[[ord("+"), ord("-")]] = 62
_B64_DIGITS[[ord("/"), ord("_")]] = 63
_B64_PREFIX = 16  # every candidate has as many (a run of base64 is 16 or more)


def _sifted_base64(text: bytes, starts: _Array, ends: _Array) -> _Array:
    """For each base64 candidate ``text[a:b]`` (16 characters or more), whether
    it may decode to readable text (see above)."""
    codes, opening = _openings(text, starts, _B64_PREFIX)
    digits = _B64_DIGITS[opening]
    # "=", a character past ASCII, or a shorter run: left to the decoder.
    foreign = (digits == 255).any(axis=1) | (ends - starts < _B64_PREFIX)
    six = (digits & 63).reshape(len(starts), -1, 4).astype(np.uint32)
    values = (six[:, :, 0] << 18) | (six[:, :, 1] << 12) | (six[:, :, 2] << 6) | six[:, :, 3]
    out = np.stack([values >> 16, (values >> 8) & 0xFF, values & 0xFF], axis=2)
    broken = ~_opens_utf8(out.reshape(len(starts), -1))
    trailing = (codes[ends - 1] == ord("=")).astype(np.int64)
    trailing += (codes[ends - 2] == ord("=")) & (trailing == 1)
    lengths = np.minimum(ends - starts, _MAX_BLOB)
    whole = ends - starts <= _MAX_BLOB
    refused = whole & ((lengths - trailing) % 4 == 1)  # the decoder's error
    kept: _Array = foreign | ~(broken | refused)
    return kept


_IN_BASE64_RUN = bytes(
    1 if chr(b) in string.ascii_letters + string.digits + "+/_-" else 0 for b in range(256)
)
_IN_BASE85_RUN = bytes(1 if 33 <= b <= 126 else 0 for b in range(256))
_SPACE_BYTE = bytes(_IS_SPACE[:256].tolist())


def _runs(
    visible: str, text: bytes, kind: str, spans: list[tuple[int, int]]
) -> tuple[_Array, _Array] | None:
    """Where the runs :data:`_BASE64` or :data:`_BASE85` match in ``spans`` of
    a long text start and end, found in numpy as the expression finds them (it
    tried every place of a megabyte of source code: ~15 ms each); None for the
    other kinds, a short text, or an Ascii85 run in its delimiters (the
    expression then)."""
    if len(visible) <= 2 * _WINDOW or not spans or kind not in ("base64", "base85"):
        return None
    if kind == "base64":
        # A run of the alphabet, 16 or more, from its start (the look-behind),
        # cut at the window's end; then up to two "=".
        member = np.frombuffer(text.translate(_IN_BASE64_RUN), dtype=np.bool_)
        spaced = None
        least = 16
    else:
        if "<~" in visible:
            return None
        # A run of printable ASCII, 20 or more, with whitespace (or an end) on each side.
        if visible.isascii():  # read through byte tables, in C
            spaced = np.frombuffer(text.translate(_SPACE_BYTE), dtype=np.bool_)
            member = np.frombuffer(text.translate(_IN_BASE85_RUN), dtype=np.bool_)
        else:
            codes = np.frombuffer(visible.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            spaced = _IS_SPACE[np.minimum(codes, 0x3001)]
            member = (codes >= 33) & (codes <= 126)
        least = 20
    starts, ends = _run_edges(member)
    found_starts, found_ends = [], []
    for a, b in spans:
        first, last = np.searchsorted(starts, [a, b])
        run_starts, run_ends = starts[first:last], ends[first:last]
        cut = np.minimum(run_ends, b)
        long_enough = cut - run_starts >= least  # the only runs read further
        run_starts, run_ends, cut = run_starts[long_enough], run_ends[long_enough], cut[long_enough]
        if spaced is None:  # base64's padding, inside the window
            tail = np.zeros(len(cut), dtype=np.intp)
            for offset in (0, 1):
                at = np.minimum(run_ends + offset, len(text) - 1)
                more = (
                    (run_ends + offset < b)
                    & (tail == offset)
                    & (np.frombuffer(text, np.uint8)[at] == 61)
                )
                tail += more
            cut = cut + tail
        else:  # whitespace (or the text's start) before; after: whitespace, or the window's end
            before = (run_starts == 0) | spaced[np.maximum(run_starts - 1, 0)]
            after = (run_ends >= b) | spaced[np.minimum(run_ends, len(spaced) - 1)]
            run_starts, cut = run_starts[before & after], cut[before & after]
        found_starts.append(run_starts)
        found_ends.append(cut)
    return np.concatenate(found_starts), np.concatenate(found_ends)


def _decoded_blobs(visible: str, text: bytes, wide: bool) -> Iterable[Layer]:
    """(kind, decoded text, start, end) for encoded runs that decode to readable text.
    ``text``, ``wide``: as in :func:`_candidates`."""
    groups: dict[tuple[str, int], list[Layer]] = {}
    base64 = True  # base64's signature somewhere (the first kind)
    for kind, pattern in (*_BLOB_PATTERNS, ("morse", _MORSE)):
        spans = _candidates(visible, kind, text, wide, base64)
        base64 = base64 and (kind != "base64" or bool(spans))
        runs = _runs(visible, text, kind, spans)
        if runs is None:  # the expression, window by window
            found = [m.span() for a, b in spans for m in pattern.finditer(visible, a, b)]
            if len(found) > _SIFT_FROM:
                runs = np.array([a for a, _b in found]), np.array([b for _a, b in found])
        if runs is not None:
            found = _runs_kept(kind, text, *runs)
        blobs = [visible[a:b][:_MAX_BLOB] for a, b in found]
        if kind == "base85" and len(blobs) > _SIFT_FROM:
            kept = _sifted(blobs)
            found = [span for span, keep in zip(found, kept, strict=True) if keep]
            blobs = [blob for blob, keep in zip(blobs, kept, strict=True) if keep]
        for (start, end), blob in zip(found, blobs, strict=True):
            try:
                decoded = (
                    _morse(blob) if kind == "morse" else _blob_bytes(kind, blob).decode("utf-8")
                )
            except (ValueError, UnicodeDecodeError):
                continue
            if _printable(decoded):
                window = (kind, start // _WINDOW)
                groups.setdefault(window, []).append((kind, decoded, start, end))
    return _per_window(groups, len(visible))


# Letter frequencies (per mille) of English, German, French, Spanish and Italian
# text, averaged: a substitution cipher is undone where the shifted letters are
# far likelier language than the letters as written (never because of a keyword).
_FREQ = (
    84, 15, 32, 42, 134, 11, 21, 32, 70, 4, 6, 47, 26, 69, 70, 22, 4, 63, 63, 64, 38, 11, 10,
    2, 5, 5,
)  # fmt: skip
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_CIPHERS: tuple[tuple[str, dict[int, int]], ...] = (
    *(
        (
            "rot13" if shift == 13 else f"caesar{shift}",
            str.maketrans(
                _ALPHABET + _ALPHABET.upper(),
                _ALPHABET[shift:]
                + _ALPHABET[:shift]
                + (_ALPHABET[shift:] + _ALPHABET[:shift]).upper(),
            ),
        )
        for shift in range(1, 26)
    ),
    (
        "atbash",
        str.maketrans(_ALPHABET + _ALPHABET.upper(), _ALPHABET[::-1] + _ALPHABET[::-1].upper()),
    ),
)
# Row k: the log-likelihood weight of each written letter once cipher k is undone
# (row 0: as written). One product scores all ciphers of a segment at once.
_LOG_FREQ = np.log(np.array(_FREQ, dtype=np.float64) / 1000)
_CIPHER_WEIGHTS = np.array(
    [_LOG_FREQ]
    + [
        [_LOG_FREQ[ord(chr(97 + i).translate(table)) - 97] for i in range(26)]
        for _name, table in _CIPHERS
    ]
)
_CIPHER_SEGMENT = re.compile(r"[^.!?\n:;,()\[\]\"]{12,}")
_CIPHER_STOPS = bytes(1 if chr(b) in '.!?\n:;,()[]"' else 0 for b in range(256))
_CIPHER_INSIDE = bytes(1 - stop for stop in _CIPHER_STOPS)
_CIPHER_STOP_MARKS = np.frombuffer(_CIPHER_STOPS[:128] + b"\x00", dtype=np.uint8)  # 128: any other
_MIN_GAIN = 0.6  # nats per letter the deciphered text must gain over the text as written
_ASCII_LETTERS = string.ascii_letters.encode()


def _deciphered(visible: str, raw: bytes) -> Iterable[Layer]:
    """(cipher, plain text, start, end) for segments that read far likelier deciphered.

    All segments are scored at once (numpy): one count matrix of letters per
    segment, one product with every cipher's weights. ``raw``: ``visible`` as
    ASCII, "?" for each other character."""
    if len(raw) - len(raw.translate(None, _ASCII_LETTERS)) < 12:
        return []  # no segment holds the letters a cipher is read from (a text in another script)
    if len(visible) > 2 * _WINDOW:
        # The segments as runs between stops, found in numpy (as _CIPHER_SEGMENT).
        one_byte = raw if visible.isascii() else _latin1(visible)
        if one_byte is not None:  # a byte per character (no stop past ASCII)
            inside = np.frombuffer(one_byte.translate(_CIPHER_INSIDE), dtype=np.bool_)
        else:  # "?" in ``raw`` stands for any other character too: read the code points
            codes = np.frombuffer(visible.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            inside = _CIPHER_STOP_MARKS[np.minimum(codes, 128)] == 0
        starts, ends = _run_edges(inside)
        keep = ends - starts >= 12
        starts, ends = starts[keep], np.minimum(ends[keep], starts[keep] + _MAX_BLOB)
        count = len(starts)  # the spans as two arrays: a list of pairs only when few
        spans = list(zip(starts.tolist(), ends.tolist(), strict=True)) if count <= 4 else []
    else:
        spans = [
            (m.start(), min(m.end(), m.start() + _MAX_BLOB))
            for m in _CIPHER_SEGMENT.finditer(visible)
        ]
        starts = np.array([start for start, _end in spans], dtype=np.intp)
        ends = np.array([end for _start, end in spans], dtype=np.intp)
        count = len(spans)
    if count <= 4:  # numpy's fixed cost outweighs a few segments
        return _deciphered_few(visible, spans)
    # Each character's row (its segment's number + 1; 0 between segments) by
    # one repeat, and its column (its letter 0-25; 26 any other character: the
    # text one byte per character, "?" for non-ASCII, no letter a cipher
    # shifts): one tally of every character, no selection before it; the row
    # between segments is then cut off, and the column of other characters
    # gives each segment's count of letters (its length less them).
    bounds = np.empty(2 * count + 2, dtype=np.intp)
    bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, ends, len(raw)
    ids = np.zeros(2 * count + 1, dtype=np.intp)  # bincount's own type: no copy to it
    ids[1::2] = np.arange(27, 27 * count + 1, 27, dtype=np.intp)
    row = np.repeat(ids, np.diff(bounds))
    letter = np.frombuffer(raw.lower(), dtype=np.uint8) - np.uint8(97)  # a-z to 0-25, others wrap
    np.minimum(letter, np.uint8(26), out=letter)
    row += letter
    counts = np.bincount(row, minlength=(count + 1) * 27).reshape(count + 1, 27)[1:]
    letters = (ends - starts) - counts[:, 26]
    with classifier.one_blas_thread(count):
        # in BLAS (ints would not be)
        scores = counts[:, :26].astype(np.float64) @ _CIPHER_WEIGHTS.T
    best = scores.argmax(axis=1)
    gain = (scores[np.arange(count), best] - scores[:, 0]) / np.maximum(letters, 1)
    chosen = np.flatnonzero((letters >= 12) & (best > 0) & (gain >= _MIN_GAIN))
    groups: dict[tuple[str, int], list[Layer]] = {}
    for i in chosen.tolist():
        name, table = _CIPHERS[int(best[i]) - 1]
        start, end = int(starts[i]), int(ends[i])
        run = (name, visible[start:end].translate(table), start, end)
        groups.setdefault((name, start // _WINDOW), []).append(run)
    return _per_window(groups, len(visible))


def _deciphered_few(visible: str, spans: list[tuple[int, int]]) -> list[Layer]:
    """:func:`_deciphered` for a few segments, one by one."""
    found = []
    for start, end in spans:
        segment = visible[start:end]
        raw = np.frombuffer(segment.lower().encode("ascii", "ignore"), dtype=np.uint8)
        counts = np.bincount(raw, minlength=128)[97:123]
        letters = int(counts.sum())
        if letters < 12:
            continue
        scores = _CIPHER_WEIGHTS @ counts
        best = int(scores.argmax())
        if best and (scores[best] - scores[0]) / letters >= _MIN_GAIN:
            name, table = _CIPHERS[best - 1]
            found.append((name, segment.translate(table), start, end))
    return found


def _regions(text: str, pattern: re.Pattern[str], raw: bytes) -> list[tuple[int, int]]:
    """Where ``pattern`` occurs: the whole of a short text, else the windows it
    occurs in (neighbours merged, up to four), with :data:`_CONTEXT` around.

    The expression runs only on windows holding what each of its matches
    holds, found in C first (a regex scan tries every position)."""
    if pattern is _SPACED:
        # Three one-letter gaps in a row, found in the classes (see _candidates).
        classes = raw.translate(_SPACED_CLASSES)
        found = {
            w
            for m in _SPACED_SIGNATURE.finditer(classes)
            for w in range(m.start() // _WINDOW, m.end() // _WINDOW + 1)
        }
    elif pattern is _ANY_ESCAPE:
        # Every escape starts with "%", "&" or a backslash: only windows holding one.
        found = set()
        for lead in "%&\\":
            at = text.find(lead)
            while at >= 0:
                found.add(at // _WINDOW)
                at = text.find(lead, (at // _WINDOW + 1) * _WINDOW)
    else:
        found = set(range(len(text) // _WINDOW + 1))
    if len(text) <= 2 * _WINDOW:
        return [(0, len(text))] if found and pattern.search(text) else []
    windows = [w * _WINDOW for w in sorted(found)]
    # Each window searched with the context after it: a run across its end is seen whole.
    hit = [w for w in windows if pattern.search(text, w, w + _WINDOW + _CONTEXT)]
    merged: list[list[int]] = []
    for w in hit:
        if merged and merged[-1][1] == w and w - merged[-1][0] < 4 * _WINDOW:
            merged[-1][1] = w + _WINDOW
        else:
            merged.append([w, w + _WINDOW])
    return [(max(0, a - _CONTEXT), min(len(text), b + _CONTEXT)) for a, b in merged]


def _layers(views: Views) -> Iterable[Layer]:
    """Every decoded layer of the text: (kind, decoded text, start, end)."""
    visible = views.visible
    raw = visible.encode("ascii", "replace")  # once, for every kind's signatures
    whole = len(visible) <= 2 * _WINDOW
    for start, end in _regions(visible, _ANY_ESCAPE, raw):
        unescaped = _unescaped(visible[start:end])
        if unescaped is not None:
            yield ("escape", unescaped, 0, 0) if whole else ("escape", unescaped, start, end)
    yield from _decoded_blobs(visible, raw, views.wide_spaces)
    for start, end in _regions(visible, _SPACED, raw):
        region = visible[start:end]
        runs = list(_SPACED.finditer(region))
        if runs:
            # Runs joined back into the text around them: "p l e a s e ignore…" reads whole.
            last = runs[-1].end()
            joined = _SPACED.sub(lambda m: _despaced(m.group(0)), region[:last])
            yield "spaced", joined + region[last:], start + runs[0].start(), start + last
    yield from _deciphered(visible, raw)
