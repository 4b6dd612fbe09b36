"""The text views the rules match: a text normalised three ways before screening.

:func:`text_views` reads a text as ``visible`` (zero-width and bidi controls,
Unicode tags and variation selectors removed; what tag and selector runs
smuggle kept aside as ``hidden``), ``plain`` (NFKC, casefolded, three or more
words joined by underscores read as words: :func:`_words_joined`) and ``folded``
(confusables folded to Latin, Unicode TS #39, and leetspeak undone). What the
normalisation finds on its way (invisible characters, mixed scripts, styled
letters) are the text's first findings (:class:`Finding`). A long text takes paths in
numpy and C (tallies, gathers), so the work stays linear and cheap per
character; :func:`_latin1` and :data:`_WINDOW` are shared with the rule search
(:mod:`bastion.safety.injection.matching`) and the decoding
(:mod:`bastion.safety.injection.decoding`).
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.safety.confusables import CONFUSABLES

_WINDOW = 4096
"""A long text is one of more than two windows of this many characters: it
takes the paths in numpy and C, here, in the rule search and in the decoding
(which works window by window: :mod:`bastion.safety.injection.decoding`)."""


@dataclass(frozen=True)
class Finding:
    """One piece of evidence: a rule (or a normalisation step) that fired, its weight."""

    rule: str
    category: str
    weight: int
    start: int = 0  # span in the verdict's visible text (invisible characters removed)
    end: int = 0


# Confusables folded to Latin before matching Latin-script rules (Unicode TS #39).
_CONFUSABLES = CONFUSABLES
_CONF_CLASS = "".join(sorted({c.casefold() for c in _CONFUSABLES} & set(_CONFUSABLES)))
_MIXED = re.compile(rf"[a-z]\w*?[{_CONF_CLASS}]|[{_CONF_CLASS}]\w*?[a-z]")
_LEET = str.maketrans("013457@$", "oieastas")
_LEET_HINT = re.compile(r"[a-z][013457]|[013457][a-z]")
_LEET_WORD = re.compile(r"\b(?=\w*[a-z])(?=\w*[013457])[a-z013457]{3,}\b")
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\u180e\u00ad")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_DROP_ZERO_WIDTH = str.maketrans(dict.fromkeys(_ZERO_WIDTH - {"\u200c", "\u200d"}))
_DROP_BIDI = str.maketrans(dict.fromkeys(_BIDI))
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_FLAG_TAGS = re.compile("[\U000e0061-\U000e007a]{2,6}\U000e007f")
_VS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{4,}")
_BMP_SELECTORS = tuple(map(chr, range(0xFE00, 0xFE10)))


_Offsets = np.ndarray[Any, np.dtype[np.intp]]


@dataclass(frozen=True)
class Origin:
    """Where a character of plain (and folded) comes from in visible.
    ``expanded``: plain as NFKC expanded it (ligatures, ß), offset by offset;
    ``stretches`` and ``dropped``: plain read a run of whitespace as one
    character (:func:`_single_spaced`), where each stretch kept starts and
    how many characters the runs before it dropped (a few numbers per run,
    not one per character)."""

    expanded: _Offsets | None = None
    stretches: _Offsets | None = None
    dropped: _Offsets | None = None

    def at(self, offset: int) -> int:
        """The visible offset of plain's ``offset``."""
        if self.stretches is not None and self.dropped is not None:
            stretch = int(np.searchsorted(self.stretches, offset, "right")) - 1
            offset += int(self.dropped[stretch])
        if self.expanded is not None:
            if not self.expanded.size:
                return 0
            offset = int(self.expanded[min(offset, self.expanded.size - 1)])
        return offset


@dataclass
class Views:
    visible: str  # invisible characters removed
    plain: str  # NFKC + casefold, one character per visible character where possible
    folded: str  # plain with confusables and leetspeak folded to Latin
    # None when plain's offsets are visible's (plain and folded read a run of
    # whitespace as one character: see _single_spaced)
    origin: Origin | None
    hidden: list[str] = field(default_factory=list)  # texts decoded from tag/VS runs
    findings: list[Finding] = field(default_factory=list)
    wide_spaces: bool = False  # visible holds whitespace past ASCII (U+00A0, U+3000…)

    def named(self) -> tuple[tuple[str, str], ...]:
        """Each view by its name (a rule's ``view``)."""
        return (("visible", self.visible), ("plain", self.plain), ("folded", self.folded))


def unmarked(text: str) -> str:
    """``text`` with the marks over its Latin letters taken off, and combining
    marks left alone dropped: "ïgnörë" reads "ignore", as does "i\u0308gnore"
    (canonical decomposition, UAX #15; a letter of another script keeps its
    marks: "й" is not "и"). The rules' views read letters so, and the rules
    are written so (:func:`bastion.safety.injection.rules._r`): "règles" and
    "regles" are one spelling."""
    if text.isascii():
        return text
    return "".join(map(_unmarked_char, text))  # short: a character's piece, a pattern


def _unmarked_char(c: str) -> str:
    if "\u0300" <= c <= "\u036f":
        return ""
    parts = unicodedata.normalize("NFD", c)
    base, marks = parts[0], parts[1:]
    if base.isascii() and base.isalpha() and marks and all(map(unicodedata.combining, marks)):
        return base
    return c


def _latin1(text: str) -> bytes | None:
    """``text`` as Latin-1 bytes (one per character), or None when it has others."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return None


_LEET_CLASSES = bytes(
    ord("a") if chr(b).isascii() and chr(b).islower() else ord("d") if chr(b) in "013457" else 32
    for b in range(256)
)


def _leet(text: str) -> str:
    # _LEET_HINT's "a letter beside a digit", looked for in C first: the
    # expression tries every position of a long text.
    # One byte per character (Latin-1's past ASCII are spaces here, as "?" is).
    one_byte = _latin1(text)
    raw = text.encode("ascii", "replace") if one_byte is None else one_byte
    classes = raw.translate(_LEET_CLASSES)
    if (b"ad" not in classes and b"da" not in classes) or not _LEET_HINT.search(text):
        return text
    if len(text) <= 2 * _WINDOW:
        return _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), text)
    return _leet_long(text)


# Per character, one bit of its kind: 1 a lower-case letter, 2 a digit
# leetspeak stands a letter for, 4 any other word character (ASCII ``\w``); 0
# not a word character. A run's kinds are then the bitwise or of its characters'.
_LEET_RUNS = bytes(
    1 if 97 <= b <= 122 else 2 if chr(b) in "013457" else 4 if chr(b).isalnum() or b == 95 else 0
    for b in range(128)
) + bytes(128)
_LEET_TABLE = np.frombuffer(
    bytes(range(256)).translate(bytes.maketrans(b"013457", b"oieast")), np.uint8
)


def _leet_long(text: str) -> str:
    r""":data:`_LEET_WORD`'s substitution on a long text, in numpy: a word (a
    run of ``\w``) is folded when it is only letters and such digits, at least
    three long, with one of each (the expression tries every position)."""
    raw: np.ndarray[Any, Any]
    if text.isascii():
        raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        kind = np.frombuffer(text.encode("ascii").translate(_LEET_RUNS), dtype=np.uint8)
    else:  # past ASCII: a word character (4) or not (0), per distinct one
        raw = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        kind = np.frombuffer(_LEET_RUNS, dtype=np.uint8)[np.minimum(raw, 255)]
        high = raw > 127
        distinct = np.unique(raw[high])
        kinds = np.array([4 * chr(c).isalnum() for c in distinct.tolist()], dtype=np.uint8)
        kind[high] = kinds[np.searchsorted(distinct, raw[high])]
    edges = np.diff(np.concatenate(([0], (kind > 0).view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not starts.size:
        return text
    # Between runs every kind is 0: or-ing from one run's start to the next's is the run's.
    kinds = np.bitwise_or.reduceat(kind, starts)
    chosen = (ends - starts >= 3) & (kinds == 3)  # letters and such digits, nothing else
    if not chosen.any():
        return text
    marks = np.zeros(len(raw) + 1, dtype=np.int8)
    marks[starts[chosen]] = 1
    marks[ends[chosen]] = -1  # a run ends before the next starts: never the same place
    inside = np.cumsum(marks[:-1], dtype=np.int8) > 0
    out = raw.copy()
    out[inside] = _LEET_TABLE[raw[inside]]  # ASCII letters and digits only
    if out.dtype == np.uint8:
        return out.tobytes().decode("ascii")
    return out.tobytes().decode("utf-32-le", "surrogatepass")


def _decode_vs(run: str) -> str:
    # "Emoji smuggling": VS1-16 carry bytes 0-15, VS17-256 bytes 16-255.
    out = bytearray()
    for ch in run:
        code = ord(ch)
        out.append(code - 0xFE00 if code <= 0xFE0F else code - 0xE0100 + 16)
    return out.decode("utf-8", "replace")


# Words joined by underscores ("ignore_all_previous_instructions") are read as
# words where they make three or more, with the words whitespace in a line
# joins to them: a sentence written with underscores, or an identifier in a
# sentence. Two joined alone are an identifier ("ADMIN_OVERRIDE=false",
# "system_prompt:"), as config and code write them, one a line, and are left as they are.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines's
_JOINED = re.compile(rf"[^\W_]+(?:(?:[^\S{_LINE_BREAKS}]|_)+[^\W_]+){{2,}}")


def _join_class(c: str) -> int:
    """1 a word character (as the regex's ``[^\\W_]``), 2 "_", 3 whitespace in a
    line, 0 any other."""
    return 2 if c == "_" else 3 if c.isspace() and c not in _LINE_BREAKS else int(c.isalnum())


_JOIN_TABLE = bytes(_join_class(chr(b)) for b in range(256))
_JOIN_CLASSES = np.frombuffer(_JOIN_TABLE, dtype=np.uint8)


def _words_joined(text: str, like: str | None = None) -> str:
    """``text`` with the underscores of words joined (:data:`_JOINED`) read as
    spaces; ``like``: where those are, when already read (a view as long as it)."""
    if "_" not in text:
        return text
    if like is not None:
        return (
            "".join(" " if c == "_" and d == " " else c for c, d in zip(text, like, strict=True))
            if len(text) <= 2 * _WINDOW
            else _set_spaces(text, np.flatnonzero((_points(like) == 32) & (_points(text) == 95)))
        )
    if len(text) <= 2 * _WINDOW:
        pieces: list[str] = []
        at = 0
        for run in _JOINED.finditer(text):
            if "_" in run.group(0):
                pieces += (text[at : run.start()], run.group(0).replace("_", " "))
                at = run.end()
        return "".join(pieces) + text[at:] if pieces else text
    # A long text in numpy, as the regex reads it: a joint is a stretch between
    # two words of underscores and whitespace in a line only; a run of three
    # words or more is one whose joint has a joint next to it (the stretch
    # before the word on its left or after the word on its right).
    points = _points(text)
    classes = _classes_of(points)
    nonword = classes != 1
    starts, ends = _run_edges(nonword)  # the stretches between words
    if nonword[0]:
        starts, ends = starts[1:], ends[1:]  # the stretch before the first word joins nothing
    if nonword[-1]:
        starts, ends = starts[:-1], ends[:-1]  # nor the one after the last
    one = ends - starts == 1  # most stretches: read by their one character
    joint = one & (classes[starts] >= 2)
    if not one.all():  # wider ones: when no other character lies in them
        # (the text's end stands for one past the last: a text may hold none)
        other = np.append(np.flatnonzero(classes == 0), len(classes))
        wide = np.flatnonzero(~one)
        joint[wide] = other[np.searchsorted(other, starts[wide])] >= ends[wide]
    beside = np.zeros(len(joint), dtype=bool)
    beside[1:] |= joint[:-1]
    beside[:-1] |= joint[1:]
    chosen = joint & beside  # the stretches whose underscores are read as spaces
    if not chosen.any():
        return text
    underscores = np.flatnonzero(points == 95)
    stretch = np.searchsorted(starts[chosen], underscores, side="right") - 1
    inside = (stretch >= 0) & (underscores < ends[chosen][np.maximum(stretch, 0)])
    return _set_spaces(text, underscores[inside])


def _classes_of(points: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each code point's :func:`_join_class` (those past Latin-1: per distinct one)."""
    if points.dtype == np.uint8:  # a byte per character: read in C
        return np.frombuffer(points.tobytes().translate(_JOIN_TABLE), dtype=np.uint8)
    classes: np.ndarray[Any, Any] = _JOIN_CLASSES[np.minimum(points, 255)]
    high = points > 255
    if high.any():
        distinct = np.unique(points[high])
        kinds = np.array([_join_class(chr(c)) for c in distinct.tolist()], dtype=np.uint8)
        classes[high] = kinds[np.searchsorted(distinct, points[high])]
    return classes


def _set_spaces(text: str, underscores: np.ndarray[Any, Any]) -> str:
    """``text`` with the underscores at these places read as spaces."""
    out = _points(text).copy()
    out[underscores] = 32
    if out.dtype == np.uint8:
        return out.tobytes().decode("ascii")
    return out.tobytes().decode("utf-32-le", "surrogatepass")


def _run_edges(member: np.ndarray[Any, np.dtype[np.bool_]]) -> tuple[Any, Any]:
    """Where each run of True in ``member`` starts and ends (one past it): with
    a False on each side, the places where it changes alternate, from a start."""
    padded = np.concatenate(([False], member, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return edges[0::2], edges[1::2]


# Words joined in camelCase ("IgnoreAllPreviousInstructions") are read as words
# joined by "_": the views grow there by a character (their offsets,
# Origin.expanded, take a match back to the visible text), and then read as
# underscores are (_words_joined): three words or more, with the words around
# them, are words; two alone ("getUser") stay an identifier.
# (Leetspeak's digits are small letters here: "Ign0reAllPr3vious" is three words;
# a run may open with a word in capitals: "IGNOREAllPrevious", "XMLHttpRequest".)
_CAMEL = re.compile(
    r"(?<![A-Za-z013457])(?:[A-Z]{2,}(?=[A-Z][a-z013457])|[A-Za-z013457][a-z013457]+)"
    r"(?:[A-Z][a-z013457]+)+(?![A-Za-z013457])"
)
_CAMEL_JOINT = re.compile(r"(?<=[a-z013457])[A-Z]|(?<=[A-Z])[A-Z](?=[a-z013457])")
_CASES = bytes(
    1 if 97 <= b <= 122 or chr(b) in "013457" else 2 if 65 <= b <= 90 else 0 for b in range(256)
)


def _may_join(cases: bytes) -> bool:
    return b"\x01\x02" in cases or b"\x02\x02\x01" in cases


def _camel_joints(visible: str) -> _Offsets:
    """Where a capital starts a word of a camelCase run (:data:`_CAMEL`), in ``visible``."""
    if len(visible) <= 2 * _WINDOW:
        # A small letter then a capital, or two capitals then a small one: looked
        # for in C first (most texts have neither).
        if not _may_join(visible.encode("ascii", "replace").translate(_CASES)):
            return np.empty(0, dtype=np.intp)
        return np.array(
            [
                run.start() + joint.start()
                for run in _CAMEL.finditer(visible)
                for joint in _CAMEL_JOINT.finditer(run.group(0))
            ],
            dtype=np.intp,
        )
    # A long text in numpy, as the expression reads it: a run of ASCII letters
    # (and those digits) whose second is small, or which opens with two capitals
    # or more before its first word's; and whose every other capital sits
    # between small ones.
    case = np.frombuffer(visible.encode("ascii", "replace").translate(_CASES), dtype=np.uint8)
    small, capital = case == 1, case == 2
    joints = np.flatnonzero(small[:-1] & capital[1:]) + 1  # a capital after a small one
    if not joints.size and not (capital[:-2] & capital[1:-1] & small[2:]).any():
        return joints.astype(np.intp)  # (bytes.find skips little here: in numpy)
    letter = case > 0
    starts = np.flatnonzero(letter[1:] & ~letter[:-1]) + 1
    if letter[0]:
        starts = np.concatenate(([0], starts))
    # A run opening with three capitals or more opens with a word in capitals:
    # its last capital starts the next word (a joint), the others are exempt.
    last = len(case) - 1
    opening = starts[capital[starts] & capital[np.minimum(starts + 1, last)]]
    exempt = np.zeros(len(case), dtype=bool)
    if opening.size:
        stops = np.flatnonzero(capital[:-1] & ~capital[1:]) + 1  # where capitals stop
        first = stops[np.minimum(np.searchsorted(stops, opening), len(stops) - 1)]
        worded = (first > opening) & (first - opening >= 3) & small[np.minimum(first, last)]
        opening, first = opening[worded], first[worded]
        marks = np.zeros(len(case) + 1, dtype=np.int8)
        marks[opening] += 1
        marks[first] -= 1
        exempt = np.cumsum(marks[:-1]) > 0
        joints = np.sort(np.concatenate((joints, first - 1)))
    # Capitals elsewhere than between two small ones (a run's first letter, or
    # its opening word, aside) spoil their run.
    between = np.zeros(len(case), dtype=bool)
    between[1:-1] = small[:-2] & small[2:]
    misplaced = capital & ~between & ~exempt
    misplaced[starts] = False
    run = np.searchsorted(starts, joints, "right") - 1  # each joint's run
    spoiled = np.zeros(len(starts), dtype=bool)
    spoiled[np.searchsorted(starts, np.flatnonzero(misplaced), "right") - 1] = True
    counts = np.bincount(run, minlength=len(starts))
    second = small[np.minimum(starts + 1, last)]
    second[np.searchsorted(starts, opening)] = True  # or an opening word in capitals
    camel = ~spoiled & (counts >= 1) & second
    found: _Offsets = joints[camel[run]].astype(np.intp)
    return found


def _camel_split(
    plain: str, folded: str, joints: _Offsets, origin: _Offsets | None
) -> tuple[str, str, _Offsets]:
    """``plain`` and ``folded`` (as long) with "_" before each joint (visible
    offsets), and where each of their characters comes from in visible."""
    offsets = np.arange(len(plain), dtype=np.intp) if origin is None else origin
    at = joints if origin is None else np.searchsorted(origin, joints).astype(np.intp)
    texts = [plain] if folded is plain else [plain, folded]
    if len(plain) <= 2 * _WINDOW:
        cuts = [0, *at.tolist(), len(plain)]
        spaced = ["_".join(text[a:b] for a, b in itertools.pairwise(cuts)) for text in texts]
    else:
        spaced = []
        for text in texts:
            out = np.insert(_points(text), at, 95)
            raw = out.tobytes()
            spaced.append(
                raw.decode("ascii")
                if out.dtype == np.uint8
                else raw.decode("utf-32-le", "surrogatepass")
            )
    return spaced[0], spaced[-1], np.insert(offsets, at, offsets[np.minimum(at, len(offsets) - 1)])


_Codes = np.ndarray[Any, np.dtype[np.uint32]]
_Tally = np.ndarray[Any, np.dtype[np.intp]]


def _tallied(text: str) -> tuple[_Codes, _Tally] | None:
    """A long non-ASCII text's code points and how often each occurs (one pass
    in numpy), else None: its character counts are then read from the tally,
    not by a scan of the text per character looked for."""
    if text.isascii() or len(text) <= 2 * _WINDOW:
        return None
    one_byte = _latin1(text)
    if one_byte is not None:  # a byte per character: tallied as bytes, a quarter of the work
        small = np.frombuffer(one_byte, dtype=np.uint8)
        return small.astype(np.uint32), np.bincount(small)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return codes, np.bincount(codes)


def _occurrences(text: str, tally: _Tally | None, chars: Iterable[str]) -> int:
    """How many times the characters ``chars`` occur in ``text`` (``tally``: its
    :func:`_tallied` counts, when it has them)."""
    if tally is None:
        return sum(text.count(c) for c in chars)
    return int(sum(int(tally[ord(c)]) for c in chars if ord(c) < tally.size))


def text_views(text: str) -> Views:
    findings: list[Finding] = []
    hidden: list[str] = []
    work = text
    tallied = _tallied(work)
    tally = None if tallied is None else tallied[1]
    # Tags and most selectors are outside the BMP: looked for only in a text
    # that has such characters (its UTF-16 form is longer), not by a scan of
    # every position; the BMP selectors are found by ``in``, in C.
    astral = not work.isascii() and (
        tally.size > 0x10000
        if tally is not None
        else len(work.encode("utf-16-le", "surrogatepass")) > 2 * len(work)
    )
    # Both lie past U+E0000: a long text's tally tells whether it holds any
    # (a scan of a megabyte for them costs about 14 ms).
    far = astral and (tally is None or tally.size > 0xE0000)
    if far and _TAGS.search(work):
        kept: list[str] = []
        pos = 0
        for run in _TAGS.finditer(work):
            # Emoji subdivision flags (England, Scotland, Wales) are legitimate tag sequences.
            if work[run.start() - 1 : run.start()] == "\U0001f3f4" and _FLAG_TAGS.fullmatch(
                run.group(0)
            ):
                continue
            hidden.append("".join(chr(ord(c) - 0xE0000) for c in run.group(0) if ord(c) < 0xE007F))
            kept.append(work[pos : run.start()])
            pos = run.end()
        if hidden:
            findings.append(Finding("invisible.unicode-tags", "invisible", 40))
            work = "".join(kept) + work[pos:]
    if work is not text:
        tallied, tally = None, None  # the tags are gone: counted again if need be
    selectors = not work.isascii() and (far or _occurrences(work, tally, _BMP_SELECTORS) > 0)
    if selectors and _VS.search(work):
        for run in _VS.findall(work):
            hidden.append(_decode_vs(run))
        findings.append(Finding("invisible.variation-selectors", "invisible", 40))
        work = _VS.sub("", work)
        tallied, tally = None, None
    if not work.isascii():
        zero = _occurrences(work, tally, _ZERO_WIDTH)
        bidi = _occurrences(work, tally, _BIDI)
        if zero:
            # A joiner between emoji, or ZWNJ in Persian, is normal; inside Latin
            # words it hides text.
            inside = len(re.findall(r"[a-zA-Z][\u200b-\u200d\u2060\ufeff\u00ad]+[a-zA-Z]", work))
            if inside >= 2:
                findings.append(Finding("invisible.zero-width", "invisible", 25))
            work = re.sub(r"(?<=[a-zA-Z])[\u200c\u200d](?=[a-zA-Z])", "", work)
            work = work.translate(_DROP_ZERO_WIDTH)
        if bidi:
            findings.append(Finding("invisible.bidi-control", "invisible", 25))
            work = work.translate(_DROP_BIDI)
    visible = work
    if visible.isascii():
        plain, expanded = visible.lower(), None
        if (joints := _camel_joints(visible)).size:
            plain, _same, expanded = _camel_split(plain, plain, joints, None)
        plain = _words_joined(plain)
        folded = _leet(plain)
        return Views(visible, *_single_spaced(plain, folded, expanded), hidden, findings)
    # Per distinct character (a few hundred at most), not per character: the
    # translations then run in C. Only expansions (ligatures, ß) need offsets.
    # A long text's characters are tallied in numpy (one pass in C, not a set
    # built character by character); its translations are then gathers.
    codes = None
    if len(visible) > 2 * _WINDOW:
        if visible is not text or tallied is None:  # invisible characters removed
            tallied = _tallied(visible)
        assert tallied is not None  # a long non-ASCII text
        codes, tally = tallied
        distinct = [chr(c) for c in np.flatnonzero(tally).tolist()]
    else:
        distinct = list(set(visible))
    plain_map: dict[int, str] = {}
    fold_map: dict[int, str] = {}
    styled = 0
    for ch in distinct:
        norm = unicodedata.normalize("NFKC", ch)
        if not ch.isascii() and norm != ch and norm.isascii() and norm.isalnum():
            # Fullwidth or mathematical letters spelling ASCII.
            styled += visible.count(ch) if tally is None else int(tally[ord(ch)])
        piece = unmarked(norm.casefold())
        plain_map[ord(ch)] = piece
        conf = _CONFUSABLES.get(piece) or _CONFUSABLES.get(ch)
        fold_map[ord(ch)] = conf.lower() if conf else piece
    # Each translation of a long non-ASCII text costs; only the needed ones run.
    plain = _translated(visible, codes, plain_map)
    origin = None
    if any(len(piece) != 1 for piece in plain_map.values()):
        # In C, not per character: each character's expansion length, read as
        # one code point per character, repeats its index that many times.
        lengths = visible.translate({c: chr(len(piece)) for c, piece in plain_map.items()})
        counts = np.frombuffer(lengths.encode("utf-32-le"), dtype=np.uint32)
        origin = np.repeat(np.arange(len(visible), dtype=np.intp), counts)
        fold_map = {
            c: fold if len(fold) == len(plain_map[c]) else plain_map[c]
            for c, fold in fold_map.items()
        }
    folded = (
        plain
        if all(fold == plain_map[c] for c, fold in fold_map.items())
        else _translated(visible, codes, fold_map)
    )
    mixed = 0
    if any(c in _CONFUSABLES for c in plain_map.values()) or any(
        c in _CONFUSABLES for c in distinct
    ):
        mixed = _mixed_words(plain, "".join(plain_map.values()), 3)
    if mixed:
        findings.append(Finding("homoglyph.mixed-script", "homoglyph", 45 if mixed > 2 else 35))
    if styled >= 5:
        findings.append(Finding("homoglyph.styled-letters", "homoglyph", 15))
    if (joints := _camel_joints(visible)).size:
        plain, folded, origin = _camel_split(plain, folded, joints, origin)
        codes = None  # ``codes`` no longer tell plain's whitespace
    if "_" in plain:
        split = _words_joined(plain)
        if split is not plain:  # the same places in folded (as long as plain)
            folded = split if folded is plain else _words_joined(folded, split)
            plain, codes = split, None  # ``codes`` no longer tell plain's whitespace
    folded = _leet(folded)
    wide = any(ch.isspace() and not ch.isascii() for ch in distinct)
    spaced = _single_spaced(plain, folded, origin, codes, tally)
    return Views(visible, *spaced, hidden, findings, wide)


_SPACE_RUN = re.compile(r"\s{2,}")
# What \s matches besides the space and the line break ("\x1c".."\x1f" too).
_OTHER_SPACES = tuple(c for c in map(chr, range(0x3001)) if c.isspace() and c not in " \n")
_ASCII_OTHER_SPACES = tuple(c.encode() for c in _OTHER_SPACES if c.isascii())
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3002)])  # 0x3001: any after
_FEW_RUNS = 2048  # runs of whitespace put together in Python; more, in numpy
_Spans = tuple[_Offsets, _Offsets]


def _points(text: str) -> np.ndarray[Any, Any]:
    """``text``'s code points, one array element per character."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _space_runs(plain: str, codes: _Codes | None, tally: _Tally | None) -> _Spans:
    """Where ``plain``'s runs of two or more whitespace characters start and
    end. A long text is read in numpy, not by a regex scan (several
    milliseconds a megabyte): ``codes`` and ``tally`` are a long non-ASCII
    visible text's code points and counts (one character of plain per
    visible one when as many: its whitespace where plain's is)."""
    if len(plain) <= 2 * _WINDOW:
        spans = [m.span() for m in _SPACE_RUN.finditer(plain)]
        return (
            np.array([start for start, _end in spans], dtype=np.intp),
            np.array([end for _start, end in spans], dtype=np.intp),
        )
    if plain.isascii():
        points = _points(plain)
        raw = points.tobytes()
        others = any(c in raw for c in _ASCII_OTHER_SPACES)
    else:
        same = codes is not None and codes.size == len(plain)
        points = codes if same and codes is not None else _points(plain)
        others = (
            not same
            or tally is None
            or any(ord(c) < tally.size and tally[ord(c)] for c in _OTHER_SPACES)
        )
    if others:  # a byte indexes the table as it is
        spaces = _IS_SPACE[points if points.dtype == np.uint8 else np.minimum(points, 0x3001)]
    else:  # the space and the line break only: two comparisons
        spaces = (points == 32) | (points == 10)
    pairs = np.flatnonzero(spaces[1:] & spaces[:-1])
    # A run of k characters is k - 1 pairs in a row.
    breaks = np.flatnonzero(np.diff(pairs) != 1)
    starts = pairs[np.concatenate(([0], breaks + 1))] if pairs.size else pairs
    ends = pairs[np.concatenate((breaks, [pairs.size - 1]))] + 2 if pairs.size else pairs
    return starts.astype(np.intp), ends.astype(np.intp)


def _single_spaced(
    plain: str,
    folded: str,
    expanded: _Offsets | None,
    codes: _Codes | None = None,
    tally: _Tally | None = None,
) -> tuple[str, str, Origin | None]:
    """``plain`` and ``folded`` with each run of whitespace read as one character
    (a line break if the run holds one, else a space), and where each of their
    characters comes from (``expanded``: plain's own offsets, when NFKC
    expanded some): "before  my" and "before\tmy" are the rules' "before my",
    which a fixed-width lookbehind or a literal space would otherwise not read.
    (``codes``, ``tally``: as :func:`_space_runs` reads them.)"""
    starts, ends = _space_runs(plain, codes, tally)
    if not starts.size:
        return plain, folded, None if expanded is None else Origin(expanded)
    # Each run's first character stays, the others go: a stretch kept (from a
    # run's end up to the next run's first character) sits as many characters
    # further on in plain as the runs before it dropped.
    dropped = np.concatenate(([0], np.cumsum(ends - starts - 1))).astype(np.intp)
    stretches = np.concatenate(([0], ends)).astype(np.intp) - dropped
    texts = [plain] if folded is plain or folded == plain else [plain, folded]
    if starts.size <= _FEW_RUNS:
        spans = list(zip(starts.tolist(), ends.tolist(), strict=True))
        ones = ["\n" if "\n" in plain[start:end] else " " for start, end in spans]

        def squeeze(text: str) -> str:
            pieces: list[str] = []
            at = 0
            for (start, end), one in zip(spans, ones, strict=True):
                pieces += (text[at:start], one)
                at = end
            return "".join(pieces) + text[at:]

    else:  # a text of many runs ("a  b  c  …"): put together in numpy
        # The characters that go (each run's after its first), as a mask.
        gone = ends - starts - 1
        places = np.arange(int(dropped[-1])) + np.repeat(starts + 1 - dropped[:-1], gone)
        keep = np.ones(len(plain), dtype=np.bool_)
        keep[places] = False
        line_breaks = np.flatnonzero(_points(plain) == 10)
        held = np.searchsorted(line_breaks, ends) > np.searchsorted(line_breaks, starts)
        firsts = np.where(held, 10, 32)

        def squeeze(text: str) -> str:
            out = _points(text).copy()  # folded is as long as plain
            out[starts] = firsts
            kept = out[keep]
            return str(kept.tobytes().decode("ascii" if kept.dtype == np.uint8 else "utf-32-le"))

    squeezed = [squeeze(text) for text in texts]
    return squeezed[0], squeezed[-1], Origin(expanded, stretches, dropped)


_MIXED_WORD, _MIXED_LATIN, _MIXED_CONFUSABLE = 1, 2, 4


def _mixed_words(plain: str, alphabet: Iterable[str], most: int) -> int:
    """How many matches of :data:`_MIXED` ``plain`` (whose characters are
    ``alphabet``) holds, counted up to ``most``.

    A match is a Latin letter and a confusable in one run of word characters
    (or confusables): in a long text the expression runs only on the runs
    that hold both, found in numpy, not at every position of the text."""
    if plain.isascii() or len(plain) <= 2 * _WINDOW:
        regions = [(0, len(plain))]
    else:
        chars = sorted(set(alphabet), key=ord)
        kinds = np.zeros(ord(chars[-1]) + 1, dtype=np.uint8)
        for ch in chars:
            kinds[ord(ch)] = (
                (_MIXED_WORD if ch.isalnum() or ch == "_" or ch in _CONF_CLASS else 0)
                | (_MIXED_LATIN if "a" <= ch <= "z" else 0)
                | (_MIXED_CONFUSABLE if ch in _CONF_CLASS else 0)
            )
        codes = np.frombuffer(plain.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        kind = kinds[codes]
        # int8 ends: a Python 0 would make the whole difference int64 (8 bytes a character).
        zero = np.int8(0)
        edges = np.diff((kind & _MIXED_WORD).view(np.int8), prepend=zero, append=zero)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if not starts.size:
            return 0
        # Between runs every kind is 0: or-ing from one run's start to the next's is the run's.
        both = _MIXED_LATIN | _MIXED_CONFUSABLE
        chosen = (np.bitwise_or.reduceat(kind, starts) & both) == both
        regions = list(zip(starts[chosen].tolist(), ends[chosen].tolist(), strict=True))
    count = 0
    for start, end in regions:
        for _match in _MIXED.finditer(plain, start, end):
            count += 1
            if count >= most:
                return count
    return count


def _translated(
    text: str, codes: np.ndarray[Any, np.dtype[np.uint32]] | None, table: dict[int, str]
) -> str:
    """``text.translate(table)``; for a long text (``codes``: its code points)
    whose table maps each character to one, by one gather in numpy (``str.translate``
    looks each character of a non-ASCII text up in the table)."""
    if codes is None or any(len(piece) != 1 for piece in table.values()):
        return text.translate(table)
    lookup = np.arange(int(codes.max()) + 1, dtype=np.uint32)
    lookup[np.fromiter(table, dtype=np.uint32, count=len(table))] = [
        ord(piece) for piece in table.values()
    ]
    translated: bytes = lookup[codes].tobytes()
    return translated.decode("utf-32-le")
