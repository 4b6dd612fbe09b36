"""The prompt-injection screening engine: normalise, match the rules, decode, score, decide.

The overview, and the standards it follows, are in :mod:`bastion.safety.injection`;
the rules it matches are data in :mod:`bastion.safety.injection.rules`.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import html
import importlib
import itertools
import re
import unicodedata
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

import ahocorasick
import numpy as np

from bastion.safety.confusables import CONFUSABLES
from bastion.safety.injection import classifier
from bastion.safety.injection.errors import PromptNotText, PromptTooLarge
from bastion.safety.injection.rules import RULES, Rule

Decision = Literal["allow", "sanitize", "block"]
Source = Literal["user", "retrieved", "tool", "output"]
"""Where a text comes from: ``tool`` results are untrusted content, screened as
retrieved documents are (under the tool surface's own policy)."""

MAX_CHARS = 1_000_000
BLOCK_AT = 50
"""A score at or over this blocks a user turn (and drops a retrieved chunk
that is still over it once sanitized)."""
SANITIZE_AT = 25
"""A retrieved chunk scoring this much has its offending sentences removed."""
_MAX_DEPTH = 3  # layers of encoding decoded inside each other
_WINDOW = 4096
"""Decoding works window by window of this many characters, so its work grows
linearly with the text and no run early in a text uses up what a later window
may decode (decoys cannot hide a later encoded run): every candidate run is
decoded (a pure-Python decoder, :data:`_SLOW_TRIES` per window), and what the
runs of one window decode to is screened as one layer once they are more than
:data:`_SEPARATE`; %-escapes and spaced-out letters of a long text are undone
per window, with :data:`_CONTEXT` characters around it."""
_SEPARATE = 4  # decoded runs of a window screened one by one, with their own spans
_SLOW_TRIES = 32  # candidates per window of the encodings decoded in pure Python
_SLOW_KINDS = frozenset({"base85", "morse"})
_CONTEXT = 256
_LAYER_BUDGET = 8  # characters screened in decoded layers, per character of the text
_MAX_BLOB = 65_536
REMOVED = "[removed by Bastion: suspected instruction]"


@dataclass(frozen=True)
class Finding:
    rule: str
    category: str
    weight: int
    start: int = 0  # span in the verdict's visible text (invisible characters removed)
    end: int = 0


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    score: int
    findings: tuple[Finding, ...]
    text: str
    """The text to use: the input for ``allow``, the cleaned text for
    ``sanitize``, empty for ``block``."""
    source: Source = "user"
    action: Literal["none", "flag", "drop", "block"] = "none"
    """What the policy did at its threshold: nothing, ``flag`` (the text passes,
    marked), ``drop`` (a retrieved chunk is left out) or ``block`` (the turn is
    refused — for a retrieved chunk, the whole question)."""
    threshold: int = 50

    @property
    def reasons(self) -> list[str]:
        """The rules that fired, each once, in order (for audit events and problems)."""
        return list(dict.fromkeys(f.rule for f in self.findings))

    def summary(self) -> dict[str, Any]:
        """Identifiers only — never the text — for an audit event or a log line."""
        return {
            "decision": self.decision,
            "score": self.score,
            "reasons": self.reasons,
            "action": self.action,
            "threshold": self.threshold,
        }


Action = Literal["block", "drop", "flag"]


@dataclass(frozen=True)
class ScreenPolicy:
    """How the screen acts on a score, per tenant (issue 15, item 5).

    ``block_at``: the score from which ``user_action`` applies to a user turn
    and ``retrieved_action`` to a retrieved chunk still over it once
    sanitized; ``sanitize_at``: the score from which a retrieved chunk loses
    its offending sentences. ``flag`` lets the text through, marked in the
    verdict (and so in the audit event); ``drop`` leaves a chunk out of the
    prompt; ``block`` refuses the turn.
    """

    block_at: int = BLOCK_AT
    sanitize_at: int = SANITIZE_AT
    user_action: Literal["block", "flag"] = "block"
    retrieved_action: Action = "drop"

    def __post_init__(self) -> None:
        if not 1 <= self.sanitize_at <= self.block_at <= 100:
            raise ValueError("a screen policy needs 1 <= sanitize_at <= block_at <= 100")
        if self.user_action not in ("block", "flag"):
            raise ValueError("a user turn is blocked or flagged")
        if self.retrieved_action not in ("block", "drop", "flag"):
            raise ValueError("a retrieved chunk is blocked, dropped or flagged")


DEFAULT_POLICY = ScreenPolicy()


# -- normalisation -------------------------------------------------------------------------

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
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Views:
    visible: str  # invisible characters removed
    plain: str  # NFKC + casefold, one character per visible character where possible
    folded: str  # plain with confusables and leetspeak folded to Latin
    # plain index -> visible index; None when identical
    origin: np.ndarray[Any, np.dtype[np.intp]] | None
    hidden: list[str] = field(default_factory=list)  # texts decoded from tag/VS runs
    findings: list[Finding] = field(default_factory=list)

    def named(self) -> tuple[tuple[str, str], ...]:
        """Each view by its name (a rule's ``view``)."""
        return (("visible", self.visible), ("plain", self.plain), ("folded", self.folded))


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
    if len(text) <= 2 * _WINDOW or not text.isascii():
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
    r""":data:`_LEET_WORD`'s substitution on a long ASCII text, in numpy: a word
    (a run of ``\w``) is folded when it is only letters and such digits, at
    least three long, with one of each (the expression tries every position)."""
    raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    kind = np.frombuffer(text.encode("ascii").translate(_LEET_RUNS), dtype=np.uint8)
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
    out[inside] = _LEET_TABLE[raw[inside]]
    return out.tobytes().decode("ascii")


def _decode_vs(run: str) -> str:
    # "Emoji smuggling": VS1-16 carry bytes 0-15, VS17-256 bytes 16-255.
    out = bytearray()
    for ch in run:
        code = ord(ch)
        out.append(code - 0xFE00 if code <= 0xFE0F else code - 0xE0100 + 16)
    return out.decode("utf-8", "replace")


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
    if astral and _TAGS.search(work):
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
    selectors = not work.isascii() and (astral or _occurrences(work, tally, _BMP_SELECTORS) > 0)
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
        plain = visible.lower()
        folded = _leet(plain)
        return Views(visible, plain, folded, None, hidden, findings)
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
        piece = norm.casefold()
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
    folded = _leet(folded)
    return Views(visible, plain, folded, origin, hidden, findings)


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
        edges = np.diff((kind & _MIXED_WORD).view(np.int8), prepend=0, append=0)
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


_MAX_LEADS = 4000  # more occurrences than this: one regex pass over the text instead
_MAX_USES = 32  # matches of one rule that are not quoted mentions: enough to sanitize


def _matches(
    rule: Rule, haystack: str, found: Container[str] | None = None
) -> Iterable[re.Match[str]]:
    """The rule's matches, tried only where one of its leads occurs.

    ``str.find`` skips through text in C; the regex then runs once per
    occurrence, anchored there, instead of at every position of the text.
    ``found``: the literals known to occur in ``haystack`` (:class:`_Present`),
    when known: a lead not among them is not looked for (it has no occurrence).
    """
    starts: set[int] = set()
    for lead in rule.leads if found is None else [lead for lead in rule.leads if lead in found]:
        at = haystack.find(lead)
        while at >= 0:
            starts.add(at)
            if len(starts) > _MAX_LEADS:
                yield from (
                    m for m in rule.pattern.finditer(haystack) if _at_line_start(rule, haystack, m)
                )
                return
            at = haystack.find(lead, at + 1)
    yield from _tried_at(rule, haystack, sorted(starts))


def _tried_at(rule: Rule, haystack: str, starts: Iterable[int]) -> Iterable[re.Match[str]]:
    """The rule's matches anchored at ``starts`` (ascending), none inside the
    one before. The tries run in C (``map``, ``filter``): a text dense in a
    rule's leads costs a Python step per match, not per try. A start inside
    the previous match is tried too (a loop skipped it), and its match is
    then passed over: the same matches, yielded as they are needed."""
    end = -1
    for match in filter(None, map(rule.pattern.match, itertools.repeat(haystack), starts)):
        if match.start() < end:
            continue  # inside the previous match
        if _at_line_start(rule, haystack, match):
            end = match.end()
            yield match


# Every rule's leads in one Aho-Corasick automaton per text view (and one for
# the plain and folded views together, when they are the same text): one pass
# over the text finds where every lead of every rule starts, instead of a
# ``str.find`` scan per lead. Most rules match only at the start of a word
# (``\b``), and short leads ("hi", "cc", "act") occur inside many words
# ("shipped", "account", "contract"): a text of one byte per character (ASCII
# or Latin-1: English and the Western European languages) is read with most
# non-word characters as a space (:data:`_LEAD_CLASSES`), where those leads
# are looked for as " hi", so that only their starts of words cost a try of
# the rule (in Python); one pass finds them and every other lead.
_LeadHits = dict[int, list[int]]  # rule index -> where its leads start


def _starts_at_word(pattern: str) -> bool:
    r"""True when every match of ``pattern`` starts at a word boundary: each of
    its alternatives at the top level opens with ``\b``."""
    branches, depth, i, in_class, start = [], 0, 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            # "]" first in a class ("[]…]", "[^]…]") is a literal.
            i += 1 + (pattern[i + 1 : i + 2] == "^")
            i += pattern[i : i + 1] == "]"
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            branches.append(pattern[start:i])
            start = i + 1
        i += 1
    branches.append(pattern[start:])
    return all(branch.startswith("\\b") for branch in branches)


@dataclass(frozen=True)
class _Leads:
    """An automaton of leads, each stored as its number: ``lengths[n]`` its
    length, ``rules[firsts[n]:firsts[n + 1]]`` the rules it leads, ``shifts[n]``
    where a lead found ending at ``end`` starts: ``end - lengths[n] + 1 +
    shifts[n]`` (a word-start lead is stored with the character before it)."""

    automaton: Any
    lengths: np.ndarray[Any, np.dtype[np.int64]]
    firsts: np.ndarray[Any, np.dtype[np.int64]]
    rules: np.ndarray[Any, np.dtype[np.int64]]
    shifts: np.ndarray[Any, np.dtype[np.int64]]


def _is_word_lead(rule: Rule, lead: str) -> bool:
    r"""True when ``lead`` (of ``rule``) is looked for at word starts only:
    every match of the rule starts at ``\b`` and the lead with a word character."""
    return _starts_at_word(rule.pattern.pattern) and lead[:1].isalnum()


# The text a one-byte text's leads are looked for in: its word characters and
# the other characters of leads not looked for at word starts ("![", "<", "--")
# as they are, any other character a space. A lead looked for anywhere then
# occurs in it where it occurs in the text; a word-start lead is looked for as
# itself after a space or one of those characters ("[admin", " admin"): where
# it starts a word in the text.
_LEAD_MARKS = "".join(
    sorted(
        {
            c
            for rule in RULES
            for lead in rule.leads
            if _latin1(lead) is not None and not _is_word_lead(rule, lead)
            for c in lead
            if not (c.isalnum() or c == "_")
        }
    )
)
# Word characters as ``re``'s \w sees them (str.isalnum() or "_").
_LEAD_CLASSES = bytes(
    b if chr(b).isalnum() or chr(b) == "_" or chr(b) in _LEAD_MARKS else 32 for b in range(256)
)


def _lead_automaton(views: tuple[str, ...], part: str) -> _Leads:
    """``part``: ``all`` leads as they are; ``one byte``, for a Latin-1 text
    read as :data:`_LEAD_CLASSES` with a space before it: the Latin-1 leads,
    those at word starts after each character that may come before one (a lead
    of other characters cannot occur). (An automaton whose leads start with few
    distinct characters runs several times faster: most of these start with a
    space.)"""
    by_lead: dict[str, set[int]] = {}
    shift: dict[str, int] = {}
    for index, rule in enumerate(RULES):
        if rule.view not in views:
            continue
        for lead in rule.leads:
            latin1 = _latin1(lead)
            if part == "all":
                keys, at = [lead], 0
            elif latin1 is None:
                continue
            elif _is_word_lead(rule, lead):
                word = latin1.translate(_LEAD_CLASSES).decode("latin-1")
                keys, at = [before + word for before in " " + _LEAD_MARKS], 0
            else:
                keys, at = [lead], -1  # the space before the text
            for key in keys:
                if shift.setdefault(key, at) != at:
                    # Never so today: a key means one place of the lead in it.
                    raise ValueError(f"lead {key!r} is both a word start and not")
                by_lead.setdefault(key, set()).add(index)
    automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for number, lead in enumerate(by_lead):
        automaton.add_word(lead, number)
    if by_lead:
        automaton.make_automaton()
    led = [sorted(rules) for rules in by_lead.values()]
    return _Leads(
        automaton,
        np.array([len(lead) for lead in by_lead], dtype=np.int64),
        np.cumsum([0, *map(len, led)], dtype=np.int64),
        np.array([index for rules in led for index in rules], dtype=np.int64),
        np.array([shift[lead] for lead in by_lead], dtype=np.int64),
    )


_AUTOMATA: dict[tuple[str, ...], tuple[_Leads, _Leads]] = {
    views: (_lead_automaton(views, "all"), _lead_automaton(views, "one byte"))
    for views in (("plain",), ("folded",), ("visible",), ("plain", "folded"))
}


_LEAD_SEGMENT = 65_536
_LONGEST_LEAD = 1 + max(len(lead) for rule in RULES for lead in rule.leads)  # with its space


def _lead_hits(views: tuple[str, ...], haystack: str) -> _LeadHits | None:
    """Where each rule's leads start in ``haystack``; None when the leads are
    so dense that one regex pass per rule costs less (:func:`_matches`).

    The automaton's hits are read into numpy in C (no Python per hit: a text
    dense in the rules' words has a lead every few characters), then sorted
    by rule and place in one sort; a rule's starts are ascending and distinct."""
    limit = max(_MAX_LEADS, len(haystack) // 8)
    every, one_byte = _AUTOMATA[views]
    raw = _latin1(haystack) if len(haystack) > 2 * _WINDOW else None  # short: as it is
    leads, text = every, haystack
    if raw is not None:
        # " " first: a lead at the text's start has its space; " lead" ending at
        # ``end`` there starts at ``end - length + 1`` in ``haystack``, as below.
        leads, text = one_byte, " " + raw.translate(_LEAD_CLASSES).decode("latin-1")
    if leads.automaton.kind == ahocorasick.EMPTY:
        return {}
    n = 0
    found: list[tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, Any]]] = []
    # Segment by segment: leads denser than the limit's share in the text read
    # so far give up there, not after a limit's worth of hits (a megabyte
    # dense with attacks).
    for segment in range(0, len(haystack), _LEAD_SEGMENT):
        stop = segment + _LEAD_SEGMENT
        # A lead starting in the segment ends before ``stop + _LONGEST_LEAD``.
        # A slice, not iter's bounds: it reads the whole string on each call.
        piece = text[segment : stop + _LONGEST_LEAD]
        pairs = np.fromiter(
            itertools.chain.from_iterable(leads.automaton.iter(piece)), dtype=np.int64
        )
        numbers = pairs[1::2]
        starts = segment + pairs[0::2] - leads.lengths[numbers] + 1 + leads.shifts[numbers]
        # Past ``stop``: the next segment's; before ``segment`` (a lead stored
        # without the space before it, found from the piece's first character): the last one's.
        kept = (starts >= segment) & (starts < stop)
        n += int(np.count_nonzero(kept))
        if n > max(_MAX_LEADS, stop // 8) or n > limit:
            return None
        found.append((starts[kept], numbers[kept]))
    starts = np.concatenate([np.empty(0, np.int64), *(starts for starts, _numbers in found)])
    if not starts.size:
        return {}
    numbers = np.concatenate([numbers for _starts, numbers in found])
    # Each hit once per rule its lead leads, as one key (rule, place): grouped
    # by rule (a radix sort of small integers), where places come nearly in
    # order (as the automaton ends leads), then sorted (runs already in order
    # cost little) and made distinct; then cut by rule.
    per = leads.firsts[numbers + 1] - leads.firsts[numbers]
    offsets = np.repeat(leads.firsts[numbers] - np.cumsum(per) + per, per)
    rules = leads.rules[np.arange(int(per.sum())) + offsets]
    span = len(haystack) + 1
    by_rule = np.argsort(rules.astype(np.int16), kind="stable")
    keys = (rules * span + np.repeat(starts, per))[by_rule]
    keys.sort(kind="stable")
    keys = keys[np.concatenate(([True], np.diff(keys) != 0))]
    rules, at = np.divmod(keys, span)
    bounds = np.flatnonzero(np.diff(rules)) + 1
    return {
        index: group.tolist()
        for index, group in zip(
            rules[np.concatenate(([0], bounds))].tolist(), np.split(at, bounds), strict=True
        )
    }


def _rule_matches(
    rule: Rule,
    haystack: str,
    hits: _LeadHits | None,
    index: int,
    found: Container[str] | None = None,
) -> Iterable[re.Match[str]]:
    """The rule's matches, tried where its leads start (``hits``, found in one
    pass for all rules); as :func:`_matches` when ``hits`` is None."""
    if hits is None:
        yield from _matches(rule, haystack, found)
        return
    starts = hits.get(index, ())
    # Anchored tries cost more than one pass of the regex only when leads are dense.
    if len(starts) > max(_MAX_LEADS, len(haystack) // 16):
        yield from (m for m in rule.pattern.finditer(haystack) if _at_line_start(rule, haystack, m))
        return
    yield from _tried_at(rule, haystack, starts)  # ascending and distinct


# What every match of a rule holds, read from its parsed expression: groups of
# literals, each group's one member at least in any match ("override.en" holds
# one of its instruction nouns). A text without one of a rule's groups cannot
# match it: a megabyte dense in a rule's leads ("ignore the noise in [x] data")
# but without its other words then costs no pass of the rule (the leads too
# dense to try one by one, that pass is over the whole text). Only literals
# that must occur are kept: optional parts, classes and lookarounds say nothing.
_sre_parser: Any = importlib.import_module("re._parser")
_sre: Any = importlib.import_module("re._constants")
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)


def _required(items: Any, leads: tuple[str, ...]) -> list[frozenset[str]]:
    """Groups of literals, one of each in every match of the parsed ``items``
    (of a rule with ``leads``)."""
    groups: list[frozenset[str]] = []
    run = ""  # consecutive literal characters: one string every match holds
    for op, av in items:
        if op is _sre.LITERAL:
            run += chr(av)
            continue
        if run:
            groups.append(frozenset({run}))
            run = ""
        if op is _sre.SUBPATTERN and not av[1] & re.IGNORECASE:
            groups += _required(av[3], leads)
        elif op is _sre.ATOMIC_GROUP:
            groups += _required(av, leads)
        elif op in _REPEATS and av[0] >= 1:
            groups += _required(av[2], leads)
        elif op is _sre.BRANCH:
            chosen = [_required(alternative, leads) for alternative in av[1]]
            if all(chosen):
                rank = _selective(leads)
                groups.append(frozenset().union(*(max(g, key=rank) for g in chosen)))
    if run:
        groups.append(frozenset({run}))
    return groups


def _selective(leads: tuple[str, ...]) -> Any:
    """How likely a group is to rule a rule out, as a sort key: groups of its
    own leads last (a text that costs has them, densely), then by the length
    of the shortest member (a long word is rarer, and ruled out faster)."""

    def rank(group: frozenset[str]) -> tuple[bool, int]:
        lead_like = any(member.startswith(leads) for member in group)
        return (not lead_like, min(map(len, group)))

    return rank


def _needs(rule: Rule) -> tuple[frozenset[str], ...]:
    if rule.pattern.flags & re.IGNORECASE:
        return ()
    groups = _required(_sre_parser.parse(rule.pattern.pattern, rule.pattern.flags), rule.leads)
    # Distinct groups in the pattern's order, then a stable sort: the same two
    # groups in every process (a set's order follows the string hash's seed).
    distinct = list(dict.fromkeys(groups))
    return tuple(sorted(distinct, key=_selective(rule.leads), reverse=True)[:_NEEDS_GROUPS])


_NEEDS_GROUPS = 2  # groups looked for per rule: the two most selective
_NEEDS = tuple(_needs(rule) for rule in RULES)
_NEEDS_FROM = 2048  # leads of a rule from which its groups are looked for first
_SCANS = 4  # literals not found one by one before all are looked for at once
_FIRST_PIECE = 4096  # characters read for the rules' literals before the first is struck off


@dataclass(frozen=True)
class _Literals:
    """Literals looked for in a text at once (:class:`_Present`): in order
    (``names``), and those of one byte per character — a single character, or
    two or more by their pairs of characters (``a << 8 | b``, ``firsts``: where
    each one's start in ``codes``)."""

    names: list[str]
    members: frozenset[str]
    longest: int
    singles: list[str]
    paired: list[str]
    codes: np.ndarray[Any, np.dtype[np.intp]]
    firsts: np.ndarray[Any, np.dtype[np.intp]]

    @classmethod
    def of(cls, literals: set[str]) -> _Literals:
        paired = sorted(word for word in literals if len(word) > 1 and _latin1(word))
        pairs = [[a << 8 | b for a, b in itertools.pairwise(_latin1(w) or b"")] for w in paired]
        return cls(
            sorted(literals),
            frozenset(literals),
            max(map(len, literals)),
            sorted(word for word in literals if len(word) == 1 and _latin1(word)),
            paired,
            np.array([code for codes in pairs for code in codes], dtype=np.intp),
            np.cumsum([0] + [len(codes) for codes in pairs[:-1]], dtype=np.intp),
        )

    def possible(self, raw: bytes) -> list[str]:
        """Those that may occur in a Latin-1 text (``raw``, its bytes): every
        pair of whose characters it holds (read in numpy: a text of a few words
        repeated holds a few hundred pairs of 65,536)."""
        seen = np.zeros(1 << 16, dtype=np.intp)
        for offset in (0, 1)[: len(raw)]:  # the pairs at even and odd offsets, two bytes each
            pairs = np.frombuffer(raw, dtype=">u2", count=(len(raw) - offset) // 2, offset=offset)
            seen += np.bincount(pairs, minlength=1 << 16)
        whole = np.logical_and.reduceat(seen[self.codes] > 0, self.firsts).tolist()
        return sorted(self.singles + [w for w, ok in zip(self.paired, whole, strict=True) if ok])


# Every literal a rule's match needs: one of each of its groups (and one of its
# leads: looked for too where the leads' places are not known).
_GROUP_LITERALS = _Literals.of({word for groups in _NEEDS for group in groups for word in group})
_ALL_LITERALS = _Literals.of(
    set(_GROUP_LITERALS.names) | {lead for rule in RULES for lead in rule.leads}
)


def _literal_automaton(literals: list[str]) -> Any:
    automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for number, literal in enumerate(literals):
        automaton.add_word(literal, number)
    if literals:  # none: never read (the search stops)
        automaton.make_automaton()
    return automaton


class _Present:
    """Which of the rules' required literals (:data:`_NEEDS`) occur in a text.
    Literals asked about are looked for one by one (a scan of the text in C,
    which stops at an occurrence: cheap when few rules ask) until
    :data:`_SCANS` of them were not found (each a whole scan); then all are
    looked for at once, by an automaton of them read over
    the text piece by piece (pieces growing from :data:`_FIRST_PIECE`
    characters). A literal found is struck off: the automaton of those left is
    made again (a fraction of a millisecond) for the next piece, so that a
    common word costs hits only in the piece it is first found in, and a
    literal the text lacks costs nothing but the pass (a scan per absent
    literal costs half a millisecond a megabyte, and a text dense in the
    rules' words lacks dozens). In a Latin-1 text, only the literals all of
    whose pairs of characters occur are looked for
    (:meth:`_Literals.possible`). ``leads``: the rules' leads looked for too
    (their places were not gathered: too dense)."""

    def __init__(self, text: str, leads: bool) -> None:
        self.text = text
        self.literals = _ALL_LITERALS if leads else _GROUP_LITERALS
        self.leads = leads
        self.seen: dict[str, bool] = {}
        self.absent = 0  # literals looked for one by one and not found
        self.found: set[str] | None = None  # every literal's, once read at once

    def __contains__(self, literal: object) -> bool:
        if not isinstance(literal, str):
            return False
        if self.found is not None and literal in self.literals.members:
            return literal in self.found
        known = self.seen.get(literal)
        if known is None:
            if self.absent >= _SCANS and self.found is None:
                self.found = self._read()
                return literal in self
            known = self.seen[literal] = literal in self.text
            self.absent += not known  # a whole scan (one that finds stops there)
        return known

    def _read(self) -> set[str]:
        text, found = self.text, set[str]()
        raw = _latin1(text)
        left = self.literals.names if raw is None else self.literals.possible(raw)
        automaton, at, size = _literal_automaton(left), 0, _FIRST_PIECE
        while left and at < len(text):
            # Each literal starting in the piece ends in it (plus a literal's length).
            piece = text[at : at + size + self.literals.longest - 1]
            numbers = {number for _end, number in automaton.iter(piece)}
            at, size = at + size, min(2 * size, _LEAD_SEGMENT)
            if numbers:
                found.update(left[number] for number in numbers)
                left = [literal for literal in left if literal not in found]
                automaton = _literal_automaton(left)
        return found

    def may_match(self, index: int) -> bool:
        """False when the text lacks every member of one of the rule's groups
        (or, with ``leads``, every one of its leads)."""
        if self.leads and not any(lead in self for lead in RULES[index].leads):
            return False
        return all(any(literal in self for literal in group) for group in _NEEDS[index])


def _at_line_start(rule: Rule, haystack: str, match: re.Match[str]) -> bool:
    if not rule.line_start:
        return True
    line = haystack.rfind("\n", 0, match.start()) + 1
    return haystack[line : match.start()].strip(" \t#>*-") == ""


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_BASE32 = re.compile(r"(?<![A-Za-z0-9])[A-Z2-7]{16,}={0,6}")
_BASE85 = re.compile(r"<~[!-u\s]{10,}~>|(?<!\S)[!-~]{20,}(?!\S)")  # ascii85 or RFC 1924
_HEX = re.compile(r"[0-9a-fA-F]{24,}|(?:[0-9a-fA-F]{2}[\s:,]){11,}[0-9a-fA-F]{2}")
_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2}){6,}")
_BINARY = re.compile(r"(?<![01])(?:[01]{8}[\s,]?){4,}")
_MORSE = re.compile(
    r"(?<![.\-\w])(?:[.\-\u2022\u2013_]{1,7}(?:\s*/\s*|\s+|\|)){4,}[.\-\u2022\u2013_]{1,7}"
)
_SENTENCE_END = re.compile(r"[.!?\n]")

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
        try:
            return base64.b85decode(blob)
        except ValueError:
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
# What ``\s`` matches in ASCII; "?": any other character, a Unicode space among them.
_WHITE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f?"
_SIGNATURES: dict[str, tuple[tuple[bytes | None, bytes], ...]] = {
    # kind: (class table or None for the text itself, signature), any of which
    "base64": ((_classes(_ALNUM + "+/_-"), b"x" * 16),),
    "base32": ((_classes("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"), b"x" * 16),),
    "base85": ((_classes(_PRINTABLE_ASCII), b"x" * 20), (None, b"<~")),
    "hex": (
        (_classes(_HEX_DIGITS), b"x" * 24),
        (_classes(_HEX_DIGITS, _WHITE + ":,"), b"xxs" * 11 + b"xx"),
    ),
    "escape": ((None, b"\\x"),),
    "binary": ((_classes("01"), b"x" * 8),),
}
_MORSE_CLASSES = _classes(".-_", _WHITE + "/|")
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
    visible: str, kind: str, text: bytes | None = None, base64: bool = True
) -> list[tuple[int, int]]:
    """Where runs of the encoding ``kind`` may be: the windows holding its
    signature (for a short text, all of it or nothing). ``text``: ``visible``
    encoded to ASCII with "?" for other characters, when the caller has it.
    ``base64``: False when the text has no base64 signature (then none of
    :data:`_IN_BASE64` either: not looked for)."""
    if kind == "morse" and ("\u2022" in visible or "\u2013" in visible):
        return [(0, len(visible))]  # its other dots and dashes are not ASCII
    text = visible.encode("ascii", "replace") if text is None else text
    windows: set[int] = set()
    if kind == "morse":
        for m in _MORSE_SIGNATURE.finditer(text.translate(_MORSE_CLASSES)):
            windows.update(range(m.start() // _WINDOW, m.end() // _WINDOW + 1))
    else:
        for number, (table, signature) in enumerate(_SIGNATURES[kind]):
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


def _decoded_blobs(visible: str) -> Iterable[Layer]:
    """(kind, decoded text, start, end) for encoded runs that decode to readable text."""
    groups: dict[tuple[str, int], list[Layer]] = {}
    tries: dict[tuple[str, int], int] = {}
    text = visible.encode("ascii", "replace")  # once, for every kind's signatures
    base64 = True  # base64's signature somewhere (the first kind)
    for kind, pattern in (*_BLOB_PATTERNS, ("morse", _MORSE)):
        spans = _candidates(visible, kind, text, base64)
        base64 = base64 and (kind != "base64" or bool(spans))
        matches = (match for a, b in spans for match in pattern.finditer(visible, a, b))
        for match in matches:
            window = (kind, match.start() // _WINDOW)
            if kind in _SLOW_KINDS:
                tries[window] = tries.get(window, 0) + 1
                if tries[window] > _SLOW_TRIES:
                    continue
            blob = match.group(0)[:_MAX_BLOB]
            try:
                decoded = (
                    _morse(blob) if kind == "morse" else _blob_bytes(kind, blob).decode("utf-8")
                )
            except (ValueError, UnicodeDecodeError):
                continue
            if _printable(decoded):
                groups.setdefault(window, []).append((kind, decoded, match.start(), match.end()))
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
_CIPHER_STOP_MARKS = np.frombuffer(_CIPHER_STOPS[:128] + b"\x00", dtype=np.uint8)  # 128: any other
_MIN_GAIN = 0.6  # nats per letter the deciphered text must gain over the text as written


def _deciphered(visible: str) -> Iterable[Layer]:
    """(cipher, plain text, start, end) for segments that read far likelier deciphered.

    All segments are scored at once (numpy): one count matrix of letters per
    segment, one product with every cipher's weights."""
    raw = visible.encode("ascii", "replace")
    if len(visible) > 2 * _WINDOW:
        # The segments as runs between stops, found in numpy (as _CIPHER_SEGMENT).
        one_byte = raw if visible.isascii() else _latin1(visible)
        if one_byte is not None:  # a byte per character (no stop past ASCII)
            marks = one_byte.translate(_CIPHER_STOPS)
        else:  # "?" in ``raw`` stands for any other character too: read the code points
            codes = np.frombuffer(visible.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            marks = _CIPHER_STOP_MARKS[np.minimum(codes, 128)].tobytes()
        stops = np.frombuffer(b"\x01" + marks + b"\x01", dtype=np.int8)
        edges = np.diff(stops)
        starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
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
    # and column of what is not counted are then cut off.
    bounds = np.empty(2 * count + 2, dtype=np.intp)
    bounds[0], bounds[1:-1:2], bounds[2:-1:2], bounds[-1] = 0, starts, ends, len(raw)
    ids = np.zeros(2 * count + 1, dtype=np.int32)
    ids[1::2] = np.arange(1, count + 1, dtype=np.int32)
    row = np.repeat(ids, np.diff(bounds))
    letter = np.frombuffer(raw.lower(), dtype=np.uint8) - np.uint8(97)  # a-z to 0-25, others wrap
    np.minimum(letter, np.uint8(26), out=letter)
    row *= 27
    row += letter
    counts = np.bincount(row, minlength=(count + 1) * 27).reshape(count + 1, 27)[1:, :26]
    letters = counts.sum(axis=1)
    with classifier.one_blas_thread(count):
        scores = counts.astype(np.float64) @ _CIPHER_WEIGHTS.T  # in BLAS (ints would not be)
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


def _regions(text: str, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """Where ``pattern`` occurs: the whole of a short text, else the windows it
    occurs in (neighbours merged, up to four), with :data:`_CONTEXT` around.

    The expression runs only on windows holding what each of its matches
    holds, found in C first (a regex scan tries every position)."""
    if pattern is _SPACED:
        # Three one-letter gaps in a row, found in the classes (see _candidates).
        classes = text.encode("ascii", "replace").translate(_SPACED_CLASSES)
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
    whole = len(visible) <= 2 * _WINDOW
    for start, end in _regions(visible, _ANY_ESCAPE):
        unescaped = _unescaped(visible[start:end])
        if unescaped is not None:
            yield ("escape", unescaped, 0, 0) if whole else ("escape", unescaped, start, end)
    yield from _decoded_blobs(visible)
    for start, end in _regions(visible, _SPACED):
        region = visible[start:end]
        runs = list(_SPACED.finditer(region))
        if runs:
            # Runs joined back into the text around them: "p l e a s e ignore…" reads whole.
            last = runs[-1].end()
            joined = _SPACED.sub(lambda m: _despaced(m.group(0)), region[:last])
            yield "spaced", joined + region[last:], start + runs[0].start(), start + last
    yield from _deciphered(visible)


_QUOTES = {
    '"': '"',
    "'": "'",
    "\u201c": "\u201d",  # double quotes, English
    "\u201d": "\u201d",
    "\u2018": "\u2019",  # single quotes, English
    "\u00ab": "\u00bb",  # guillemets
    "\u201e": "\u201c",  # German
    "`": "`",
    "\u300c": "\u300d",  # CJK corner brackets
}
_QUOTE_CHARS = re.compile("[" + "".join(map(re.escape, _QUOTES)) + "]")
_META = re.compile(
    r"\b(?:prompt\s+injections?|injections?|attack\w*|jailbreak\w*|phrases?|examples?|e\.g\."
    r"|such\s+as|like|malicious|suspicious|phishing|spam|scam|detect\w*|prevent\w*|block\w*"
    r"|filter\w*|flag\w*|test\w*|means?|meaning|red[\s-]team\w*|security|payloads?|strings?"
    r"|patterns?|warn\w*|report\w*|classif\w*|defen[cs]e\w*|protect\w*)\b",
    re.I,
)
_MENTIONED = frozenset(
    {"override", "extraction", "role-play", "delimiter", "addressed", "exfiltration"}
)


def _mentioned(visible: str, start: int, end: int) -> bool:
    """True when ``visible[start:end]`` sits inside quotes in a sentence that talks
    about it ("what does 'ignore previous instructions' mean?") rather than says it."""
    line_start = max(visible.rfind("\n", 0, start) + 1, start - 300)
    line_end = visible.find("\n", end)
    line_end = min(len(visible) if line_end < 0 else line_end, end + 300)
    # The quote characters before the span, nearest first (found by a regex in C,
    # not by looking at every character).
    opening = [m.start() for m in _QUOTE_CHARS.finditer(visible, line_start, start)]
    for i in reversed(opening):
        closing = _QUOTES[visible[i]]
        if i > 0 and visible[i - 1].isalnum():
            continue
        close_at = visible.find(closing, end, line_end)
        if close_at < 0:
            continue
        outside = visible[line_start:i] + " " + visible[close_at + 1 : line_end]
        return _META.search(outside) is not None
    return False


def _span(views: Views, start: int, end: int) -> tuple[int, int]:
    if views.origin is None:
        return start, end
    if not len(views.origin):
        return 0, 0
    last = len(views.origin) - 1
    return int(views.origin[min(start, last)]), int(views.origin[min(max(end - 1, 0), last)]) + 1


_INTENT = frozenset({"override", "extraction", "role-play", "exfiltration"})
CLASSIFIER_WEIGHT = 24
"""What the learned tier adds when it judges a layer an injection: under
:data:`SANITIZE_AT`, so it never acts alone — it tips the rules' own evidence
(a role-play at 40 becomes a block) — until its cross-source false-positive
rate on hard negatives meets the target (``bench/injection.py``)."""


def _classifier_vote(visible: str, found: list[Finding]) -> list[Finding]:
    # A layer the rules judged a quoted mention ("what does 'ignore previous
    # instructions' mean?") keeps the rules' verdict: n-grams cannot tell a
    # mention from a use, so the rules' precision on hard negatives is kept.
    # It only corroborates the rules' own evidence of intent (not a lone
    # "addressed to the AI" or invisible-character hit), so a rule's near miss
    # on a benign question is not tipped into a block.
    if any(f.rule.endswith(".quoted") for f in found):
        return []
    if not any(f.category in _INTENT for f in found):
        return []
    model = classifier.model()
    if model.probability(_near_intent(visible, found)) < model.threshold:
        return []
    return [Finding("classifier.injection", "classifier", CLASSIFIER_WEIGHT)]


_NEAR = 2 * classifier.WINDOW  # characters of context the vote reads around a finding
_NEAR_SPANS = 16


def _near_intent(visible: str, found: list[Finding]) -> str:
    """What the vote reads: a short text whole; of a long one, the text around
    the rules' findings of intent (at most :data:`_NEAR_SPANS` of them, spread
    over the text, merged). The vote corroborates those findings, so it reads
    where they are; a megabyte then costs what a few kilobytes do."""
    if len(visible) <= 4 * _NEAR:
        return visible
    spans = sorted(
        (max(0, f.start - _NEAR), min(len(visible), f.end + _NEAR))
        for f in found
        if f.category in _INTENT and f.end > f.start
    )
    if not spans:
        return visible[: 4 * _NEAR]
    if len(spans) > _NEAR_SPANS:
        step = (len(spans) - 1) / (_NEAR_SPANS - 1)  # the first, the last and between
        spans = [spans[round(i * step)] for i in range(_NEAR_SPANS)]
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return "\n".join(visible[start:end] for start, end in merged)


@dataclass(frozen=True)
class _Enough:
    """When collecting findings may stop, the decision being fixed (a text
    dense with attacks otherwise costs per finding). ``score``: once the
    findings total this much (a total only grows). ``left_over``: once the
    rules that match more often than sanitizing removes (:data:`_MAX_USES`)
    weigh this much in all: what sanitizing leaves still holds them, so a
    retrieved text is dropped. Either only past ``findings`` findings: a text
    with few keeps its every reason. A verdict cut short says so
    (:data:`DECIDED`): its score and reasons are then "at least"."""

    score: int = 101
    left_over: int = 101
    findings: int = 0


DECIDED = "screen.decided-early"
"""The reason a verdict carries when the screen stopped once its decision could
not change: its score is a lower bound and its reasons the first found."""


def _findings(
    text: str, depth: int = 0, budget: list[int] | None = None, enough: _Enough | None = None
) -> tuple[Views, list[Finding]]:
    # ``budget``: characters the decoded layers may still have screened, in all
    # (a linear bound, whatever nests in what); spent, the text is judged too
    # deeply encoded to screen, which blocks it (fail closed).
    budget = [_LAYER_BUDGET * len(text) + _MAX_BLOB] if budget is None else budget
    views = text_views(text)
    found = list(views.findings)
    hits = {"visible": _lead_hits(("visible",), views.visible)}
    one_text = views.folded == views.plain  # no confusable or leetspeak folded
    if one_text:
        hits["plain"] = hits["folded"] = _lead_hits(("plain", "folded"), views.plain)
    else:
        hits["plain"] = _lead_hits(("plain",), views.plain)
        hits["folded"] = _lead_hits(("folded",), views.folded)
    # Only the rules one of whose leads occurs (all of a view whose leads were too dense).
    tried = {index for view_hits in hits.values() if view_hits is not None for index in view_hits}
    tried |= {i for i, rule in enumerate(RULES) if hits[rule.view] is None}
    left_over = 0  # weight of the rules matching more often than sanitizing removes
    present = {view: _Present(haystack, hits[view] is None) for view, haystack in views.named()}
    if one_text:  # one text: its literals looked for once
        present["plain"] = present["folded"] = _Present(views.plain, hits["plain"] is None)
    for index in sorted(tried):
        rule = RULES[index]
        haystack = {"folded": views.folded, "plain": views.plain}.get(rule.view, views.visible)
        view_hits = hits[rule.view]
        costly = view_hits is None or len(view_hits.get(index, ())) >= _NEEDS_FROM
        # A rule tried over the whole text, or at many leads, goes only where it may match.
        if costly and not present[rule.view].may_match(index):
            continue
        used = 0  # a rule counts once; its spans matter only for sanitizing
        # Which leads occur, when their places are not known (no need to look for the others).
        occur = present[rule.view] if view_hits is None else None
        matches = iter(_rule_matches(rule, haystack, view_hits, index, occur))
        for match in matches:
            finding = _rule_finding(views, rule, match)
            found.append(finding)
            used += not finding.rule.endswith(".quoted")
            if len(found) > 200 or used >= _MAX_USES:
                break
        if enough is None:
            continue
        if used >= _MAX_USES and enough.left_over <= 100:
            # One match more than sanitizing removes (a quoted one is not counted).
            extra = next(matches, None)
            if extra is not None and not _rule_finding(views, rule, extra).rule.endswith(".quoted"):
                left_over += rule.weight
        if len(found) >= enough.findings and (
            left_over >= enough.left_over or total_score(found) >= enough.score
        ):
            return views, [*found, Finding(DECIDED, "bound", 0)]
    if total_score(found) >= 100:
        return views, found  # nothing found further could change the score
    found += _classifier_vote(views.visible, found)
    if depth >= _MAX_DEPTH:
        return views, found
    layers = [("invisible", hidden, 0, 0) for hidden in views.hidden]
    # Every decoded layer is screened like the text itself (and decoded further).
    for kind, decoded, start, end in itertools.chain(layers, _layers(views)):
        if budget[0] < len(decoded):
            found.append(Finding("encoding.too-deep", "encoding", BLOCK_AT))
            break
        budget[0] -= len(decoded)
        _inner_views, inner = _findings(decoded, depth + 1, budget)
        if kind == "invisible":
            found += [Finding(f"invisible>{f.rule}", f.category, f.weight, 0, 0) for f in inner]
        elif inner := [f for f in inner if not f.rule.endswith(".quoted")]:
            found.append(Finding(f"encoding.{kind}", "encoding", 20, start, end))
            found += [
                Finding(f"encoding.{kind}>{f.rule}", f.category, f.weight, start, end)
                for f in inner
            ]
        if total_score(found) >= 100:
            break
        if (
            enough is not None
            and len(found) >= enough.findings
            and total_score(found) >= enough.score
        ):
            return views, [*found, Finding(DECIDED, "bound", 0)]
    return views, found


def _rule_finding(views: Views, rule: Rule, match: re.Match[str]) -> Finding:
    """The finding a rule's match makes: in the visible text's offsets, and
    weighed low when quoted and talked about (a mention, still reported)."""
    start, end = (
        (match.start(), match.end())
        if rule.view == "visible"
        else _span(views, match.start(), match.end())
    )
    if rule.category in _MENTIONED and _mentioned(views.visible, start, end):
        return Finding(f"{rule.rule}.quoted", rule.category, 5, start, end)
    return Finding(rule.rule, rule.category, rule.weight, start, end)


def total_score(findings: Iterable[Finding]) -> int:
    # Each rule counts once (its heaviest hit); a repeated phrase is not more evidence.
    best: dict[str, int] = {}
    for f in findings:
        best[f.rule] = max(best.get(f.rule, 0), f.weight)
    return min(100, sum(best.values()))


_SENTENCE_ENDS = bytes(1 if chr(b) in ".!?\n" else 0 for b in range(256))


def _sentence_ends(visible: str) -> list[int]:
    """Where :data:`_SENTENCE_END` matches in ``visible``: in a long text, its
    characters marked in C and found in numpy (the regex stops at each)."""
    if len(visible) <= 2 * _WINDOW:
        return [m.start() for m in _SENTENCE_END.finditer(visible)]
    if visible.isascii():
        marks = np.frombuffer(visible.encode("ascii").translate(_SENTENCE_ENDS), dtype=np.uint8)
    else:
        codes = np.frombuffer(visible.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        marks = (codes == 46) | (codes == 33) | (codes == 63) | (codes == 10)  # . ! ? newline
    ends: list[int] = np.flatnonzero(marks).tolist()
    return ends


def _neutralise(visible: str, findings: Iterable[Finding]) -> str:
    """Replace each sentence holding a finding by :data:`REMOVED`."""
    spans: list[tuple[int, int]] = []
    stops: list[int] | None = None  # where sentences end, found once (not per finding)
    for f in findings:
        if f.end <= f.start:
            continue
        if stops is None:
            stops = _sentence_ends(visible)
        before = bisect.bisect_left(stops, f.start)
        after = bisect.bisect_left(stops, f.end)
        start = stops[before - 1] + 1 if before else 0
        end = stops[after] + 1 if after < len(stops) else len(visible)
        spans.append((start, end))
    if not spans:
        return visible
    spans.sort()
    merged = [spans[0]]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out, pos = [], 0
    for start, end in merged:
        out.append(visible[pos:start])
        out.append(f" {REMOVED} ")
        pos = end
    out.append(visible[pos:])
    return "".join(out).strip()


# Binary junk (issue 15, "Bad input": scored, never a crash, in bounded time):
# a text with this share of control characters and U+FFFD (what undecodable
# bytes become) is screened on its runs of other characters, at least
# :data:`_TEXT_RUN` long, one per line. Random bytes hold a few thousand such
# runs per megabyte (about 37% of bytes are printable ASCII: a run of six,
# 0.37**6, starts at one byte in 400); a sentence placed in the junk is a run
# of its own and is read whole.
_JUNK_SHARE = 0.1
_TEXT_RUN = 6
_JUNK_ASCII = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])


def _text_runs(text: str) -> str | None:
    """The text runs of ``text`` when it is binary junk, else None."""
    if len(text) <= 2 * _WINDOW:
        return None
    if text.isascii():
        raw = text.encode("ascii")
        if len(text) - len(raw.translate(None, _JUNK_ASCII)) < _JUNK_SHARE * len(text):
            return None
        codes = np.frombuffer(raw, dtype=np.uint8).astype(np.uint32)
    else:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    junk = (
        ((codes < 32) & (codes != 9) & (codes != 10) & (codes != 13))
        | ((codes >= 127) & (codes < 160))  # DEL and the C1 controls
        | (codes == 0xFFFD)
    )
    if junk.sum() < _JUNK_SHARE * len(text):
        return None
    edges = np.diff(np.concatenate(([1], junk.view(np.int8), [1])))
    starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
    keep = ends - starts >= _TEXT_RUN
    return "\n".join(
        text[start:end]
        for start, end in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True)
    )


_INVISIBLE = re.compile(
    "["
    + "".join(sorted(_ZERO_WIDTH | _BIDI))
    + "\U000e0000-\U000e007f\ufe00-\ufe0f\U000e0100-\U000e01ef]"
)


def _without_invisible(text: str) -> str:
    """``text`` without zero-width, bidi, tag and selector characters (those
    :func:`text_views` removes), looked for in C before any regex runs."""
    astral = not text.isascii() and len(text.encode("utf-16-le", "surrogatepass")) > 2 * len(text)
    if astral or any(c in text for c in (*_ZERO_WIDTH, *_BIDI, *_BMP_SELECTORS)):
        return _INVISIBLE.sub("", text)
    return text


def checked_text(text: str | bytes) -> str:
    if isinstance(text, bytes | bytearray | memoryview):
        if len(text) > MAX_CHARS * 4:
            raise PromptTooLarge(f"texts are screened up to {MAX_CHARS} characters")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise PromptNotText("the text is not valid UTF-8") from None
    if len(text) > MAX_CHARS:
        raise PromptTooLarge(f"texts are screened up to {MAX_CHARS} characters")
    if not text.isascii() and _has_surrogates(text):
        raise PromptNotText("the text holds unpaired surrogates (not well-formed Unicode)")
    return text


def _has_surrogates(text: str) -> bool:
    # UTF-32 encodes every code point but a surrogate: one pass in C, where a
    # regex would try every position.
    try:
        text.encode("utf-32-le")
    except UnicodeEncodeError:
        return True
    return False


def screen(
    text: str | bytes, source: Source = "user", policy: ScreenPolicy = DEFAULT_POLICY
) -> Verdict:
    """Screen ``text`` coming from ``source`` and decide what to do with it.

    ``user`` turns are blocked at :data:`BLOCK_AT`; invisible or smuggled
    characters alone are stripped (``sanitize``). ``retrieved`` chunks are
    sanitized from :data:`SANITIZE_AT` (each offending sentence replaced by
    :data:`REMOVED`) and blocked — to be dropped — when still over
    :data:`BLOCK_AT` after that, or when less than 40% of the text is left.
    ``output`` gets the same analysis; use :func:`check_output` for answers.
    The thresholds and what happens at them are ``policy``'s
    (:class:`ScreenPolicy`; the defaults above when none is given). Raises
    :class:`PromptTooLarge` over :data:`MAX_CHARS` and :class:`PromptNotText`
    for bytes that are not UTF-8 or text with unpaired surrogates.
    """
    text = checked_text(text)
    runs = _text_runs(text)
    # Where collecting findings may stop (a total only grows): a user turn is
    # decided at the block threshold, a flagged or junk chunk at the sanitize
    # one, any other chunk once what sanitizing would leave is still hostile.
    # Only past :data:`_MAX_USES` findings: a text with fewer keeps every reason.
    retrieved = source in ("retrieved", "tool")
    if not retrieved:
        enough = _Enough(score=policy.block_at, findings=_MAX_USES)
    elif policy.retrieved_action == "flag" or runs is not None:
        enough = _Enough(score=policy.sanitize_at, findings=_MAX_USES)
    else:
        enough = _Enough(left_over=policy.block_at, findings=_MAX_USES)
    if runs is None:
        views, found = _findings(text, enough=enough)
        visible = views.visible
    else:
        # Binary junk: its text runs are screened; what passes is the junk
        # with its invisible characters removed, as any text's are.
        _run_views, found = _findings(runs, enough=enough)
        visible = _without_invisible(text)
    score = total_score(found)
    stripped = visible != text
    hits = tuple(found)
    at = policy.block_at
    # Invisible characters are stripped whatever the policy: they are never content.
    passed: tuple[Decision, str] = ("sanitize", visible) if stripped else ("allow", text)
    if source in ("retrieved", "tool"):
        if score < policy.sanitize_at:
            return Verdict(passed[0], score, hits, passed[1], source, threshold=at)
        if policy.retrieved_action == "flag":
            return Verdict(passed[0], score, hits, passed[1], source, "flag", at)
        if runs is not None or found[-1].rule == DECIDED:
            # Junk is not cut sentence by sentence; a chunk decided early would
            # still be hostile once sanitized: the chunk goes.
            return Verdict("block", score, hits, "", source, policy.retrieved_action, at)
        cleaned = _neutralise(views.visible, found)
        _rest_views, rest = _findings(cleaned, enough=_Enough(score=at))
        left = len(cleaned.replace(REMOVED, "").strip())
        # Dropped when still hostile, or when little but the attack was there.
        if total_score(rest) >= at or left < 0.4 * len(views.visible.strip()):
            return Verdict("block", score, hits, "", source, policy.retrieved_action, at)
        return Verdict("sanitize", score, hits, cleaned, source, threshold=at)
    if score >= at:
        if policy.user_action == "flag":
            return Verdict(passed[0], score, hits, passed[1], source, "flag", at)
        return Verdict("block", score, hits, "", source, "block", at)
    return Verdict(passed[0], score, hits, passed[1], source, threshold=at)
