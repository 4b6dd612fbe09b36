"""Where the rules match, found fast: rule leads, their automata, required words.

A rule (:mod:`bastion.safety.injection.rules`) is tried only where one of its
literal leads starts, found for every rule in one Aho-Corasick pass per view
(:func:`_lead_hits`; a long text read with its non-word characters as
spaces, so that a word-start lead costs a try only at starts of words). A rule
whose leads are too dense is matched in one regex pass instead, and only when
the text holds the literals every match of the rule needs (:class:`_Present`,
read from the rule's parsed expression). The matches are those of one
``finditer`` per rule: this module is only about their cost.
"""

from __future__ import annotations

import importlib
import itertools
import re
from collections.abc import Container, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import ahocorasick
import numpy as np

from bastion.safety.injection.normalise import _WINDOW, _latin1
from bastion.safety.injection.rules import RULES, Rule

_MAX_LEADS = 4000  # more occurrences than this: one regex pass over the text instead


def _utf16_units(text: str) -> np.ndarray[Any, np.dtype[np.uint16]]:
    return np.frombuffer(text.encode("utf-16-le", "surrogatepass"), dtype="<u2")


class _Coded:
    """A view's text with what the searches for the rules' leads and literals
    read of it, made once for both (a megabyte's encoding costs a millisecond
    or two): its bytes, one per character, each past Latin-1 as "?" (in no
    lead or literal); and which UTF-16 code units it holds (a word of other
    characters may occur in it only if it holds every one of the word's)."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def latin1(self) -> bytes | None:
        return _latin1(self.text)

    @cached_property
    def one_byte(self) -> bytes:
        return self.text.encode("latin-1", "replace") if self.latin1 is None else self.latin1

    @cached_property
    def held(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        return np.bincount(_utf16_units(self.text), minlength=1 << 16) > 0


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
    limit = _dense(rule, haystack)
    for lead in rule.leads if found is None else [lead for lead in rule.leads if lead in found]:
        at = haystack.find(lead)
        while at >= 0:
            starts.add(at)
            if len(starts) > limit:
                yield from (
                    m for m in rule.pattern.finditer(haystack) if _at_line_start(rule, haystack, m)
                )
                return
            at = haystack.find(lead, at + 1)
    yield from _tried_at(rule, haystack, sorted(starts))


def _dense(rule: Rule, haystack: str) -> int:
    """Starts past which the rule is matched by one regex pass over ``haystack``
    instead of a try at each: a try costs about what the pass costs over 16
    characters. A rule whose every lead opens with a non-word character ("<",
    "![", "[") is found by the pass as fast as by ``str.find`` (the engine scans
    for its first character in C): past :data:`_MAX_LEADS` the pass
    (an empty-images megabyte as a document: 69 ms against 94 tried)."""
    if not any(lead[:1].isalnum() for lead in rule.leads):
        return _MAX_LEADS
    return max(_MAX_LEADS, len(haystack) // 16)


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

    @cached_property
    def lists(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """The arrays as lists, for :func:`_few_lead_hits`."""
        return (
            self.lengths.tolist(),
            self.firsts.tolist(),
            self.rules.tolist(),
            self.shifts.tolist(),
        )


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


def _spellings(lead: str) -> list[str]:
    """``lead`` with each of its spaces a space or a line break."""
    words = lead.split(" ")
    return [
        "".join(word + gap for word, gap in zip(words, (*gaps, ""), strict=True))
        for gaps in itertools.product(" \n", repeat=len(words) - 1)
    ]


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
                # The views' one space or line break between words, each either.
                keys, at = _spellings(lead) if rule.view != "visible" else [lead], 0
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


# A view with this few leads is read by ``str.find``, one lead at a time, in
# place of an automaton's pass: a search for one literal runs several times
# faster than the automaton walks each character (2.5 against 9 ms for the
# five leads of the visible view in a megabyte, most of it in no lead).
_FIND_AT_MOST = 8


def _rules_of_leads(views: tuple[str, ...]) -> dict[str, list[int]]:
    """Each lead of the rules on ``views``, with the rules it leads."""
    rules_of_lead: dict[str, list[int]] = {}
    for index, rule in enumerate(RULES):
        for lead in rule.leads if rule.view in views else ():
            rules_of_lead.setdefault(lead, []).append(index)
    return rules_of_lead


_FOUND_ONE_BY_ONE = {
    views: rules_of_lead
    for views in _AUTOMATA
    if len(rules_of_lead := _rules_of_leads(views)) <= _FIND_AT_MOST
}


def _found_lead_hits(rules_of_lead: dict[str, list[int]], haystack: str) -> _LeadHits | None:
    """:func:`_lead_hits` of a view with few leads: each looked for by ``str.find``
    (every place a lead starts, a word's start or not: the rule's try decides)."""
    starts_of: dict[int, set[int]] = {}
    hits = 0
    for lead, rules in rules_of_lead.items():
        at = haystack.find(lead)
        while at >= 0:
            hits += 1
            if hits > _MAX_LEADS:
                return None
            for rule in rules:
                starts_of.setdefault(rule, set()).add(at)
            at = haystack.find(lead, at + 1)
    return {rule: sorted(starts) for rule, starts in starts_of.items()}


# The leads beyond Latin-1 of each automaton's views (every spelling, with the
# rules each leads, and its UTF-16 code units): a long text of other
# characters too is read for the Latin-1 leads as a one-byte text, each other
# character a space (:func:`_lead_hits`), and for these, only those whose
# every unit it holds (a text in one script holds none of most).
_OTHER_LEADS = {
    views: [
        (spelling, rules, _utf16_units(spelling).astype(np.intp))
        for lead, rules in _rules_of_leads(views).items()
        if _latin1(lead) is None
        for spelling in _spellings(lead)
    ]
    for views in _AUTOMATA
}


_LEAD_SEGMENT = 65_536
_LONGEST_LEAD = 1 + max(len(lead) for rule in RULES for lead in rule.leads)  # with its space


_FEW_LEADS_TEXT = 2048
"""Characters up to which a text's leads are read in Python: numpy's cost per
call (tens of microseconds) is more than a loop over a short text's hits."""


def _few_lead_hits(leads: _Leads, haystack: str) -> _LeadHits | None:
    """:func:`_lead_hits` of a short text (the ``all`` automaton, read as it is)."""
    lengths, firsts, rules, shifts = leads.lists
    starts_of: dict[int, set[int]] = {}
    hits = 0
    for end, number in leads.automaton.iter(haystack):
        hits += 1
        start = end - lengths[number] + 1 + shifts[number]
        for rule in rules[firsts[number] : firsts[number + 1]]:
            starts_of.setdefault(rule, set()).add(start)
    if hits > _MAX_LEADS:
        return None
    return {rule: sorted(starts) for rule, starts in starts_of.items()}


def _lead_hits(
    views: tuple[str, ...], haystack: str, coded: _Coded | None = None
) -> _LeadHits | None:
    """Where each rule's leads start in ``haystack`` (``coded``: it read, when
    made already); None when the leads are so dense that one regex pass per
    rule costs less (:func:`_matches`).

    The automaton's hits are read into numpy in C (no Python per hit: a text
    dense in the rules' words has a lead every few characters), then sorted
    by rule and place in one sort; a rule's starts are ascending and distinct."""
    if views in _FOUND_ONE_BY_ONE:
        return _found_lead_hits(_FOUND_ONE_BY_ONE[views], haystack)
    limit = max(_MAX_LEADS, len(haystack) // 8)
    every, one_byte = _AUTOMATA[views]
    leads, text, others = every, haystack, {}
    if len(haystack) > 2 * _WINDOW:  # short: as it is
        coded = _Coded(haystack) if coded is None else coded
        if coded.latin1 is None:
            # Each other character as "?" (a space below): the Latin-1 leads'
            # places are the same, and the others are looked for apart.
            if (found_others := _other_lead_hits(views, coded, limit)) is None:
                return None
            others = found_others
        # " " first: a lead at the text's start has its space; " lead" ending at
        # ``end`` there starts at ``end - length + 1`` in ``haystack``, as below.
        leads, text = one_byte, " " + coded.one_byte.translate(_LEAD_CLASSES).decode("latin-1")
    hits = _automaton_hits(leads, text, haystack, limit)
    if hits is None or not others:
        return hits
    for rule, starts in others.items():
        hits[rule] = sorted({*hits[rule], *starts}) if rule in hits else starts
    return hits


def _other_lead_hits(views: tuple[str, ...], coded: _Coded, limit: int) -> _LeadHits | None:
    """Where the leads of other characters than Latin-1 start in ``haystack``
    (:data:`_OTHER_LEADS`), found in numpy over its code points: the places of
    a lead's first character, kept where each next one follows (a lead in
    every few words, as "не" in Russian prose, costs no Python per place)."""
    held = coded.held
    wanted = [(lead, rules) for lead, rules, units in _OTHER_LEADS[views] if held[units].all()]
    if not wanted:
        return {}
    codes = np.frombuffer(coded.text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts_of: dict[int, list[np.ndarray[Any, np.dtype[np.intp]]]] = {}
    total = 0
    for lead, rules in wanted:
        at = np.flatnonzero(codes[: len(codes) - len(lead) + 1] == ord(lead[0]))
        for offset, char in enumerate(lead[1:], 1):
            at = at[codes[at + offset] == ord(char)]
        total += at.size
        if total > limit:
            return None
        for rule in rules if at.size else ():
            starts_of.setdefault(rule, []).append(at)
    return {
        rule: (parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))).tolist()
        for rule, parts in starts_of.items()
    }


def _automaton_hits(leads: _Leads, text: str, haystack: str, limit: int) -> _LeadHits | None:
    """:func:`_lead_hits` from the automaton ``leads`` read over ``text`` (the
    view ``haystack`` itself, or read as one byte per character)."""
    if leads.automaton.kind == ahocorasick.EMPTY:
        return {}
    if text is haystack and len(haystack) <= _FEW_LEADS_TEXT:
        return _few_lead_hits(leads, haystack)
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
        if piece.isspace():
            continue  # no lead: a text of other characters, read as one byte
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
    if len(starts) > _dense(rule, haystack):
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
    (``names``); those of one byte per character — a single character, or
    two or more by their pairs of characters (``a << 8 | b``, ``firsts``: where
    each one's start in ``codes``); and the others (``others``), by their
    UTF-16 code units (``units``)."""

    names: list[str]
    members: frozenset[str]
    longest: int
    singles: list[str]
    paired: list[str]
    codes: np.ndarray[Any, np.dtype[np.intp]]
    firsts: np.ndarray[Any, np.dtype[np.intp]]
    others: list[str]
    units: list[np.ndarray[Any, np.dtype[np.intp]]]

    @classmethod
    def of(cls, literals: set[str]) -> _Literals:
        paired = sorted(word for word in literals if len(word) > 1 and _latin1(word))
        pairs = [[a << 8 | b for a, b in itertools.pairwise(_latin1(w) or b"")] for w in paired]
        others = sorted(word for word in literals if _latin1(word) is None)
        return cls(
            sorted(literals),
            frozenset(literals),
            max(map(len, literals)),
            sorted(word for word in literals if len(word) == 1 and _latin1(word)),
            paired,
            np.array([code for codes in pairs for code in codes], dtype=np.intp),
            np.cumsum([0] + [len(codes) for codes in pairs[:-1]], dtype=np.intp),
            others,
            [_utf16_units(word).astype(np.intp) for word in others],
        )

    def possible(self, coded: _Coded) -> list[str]:
        """Those that may occur in ``text``: every pair of whose characters it
        holds, for a literal of one byte per character (read in numpy: a text
        of a few words repeated holds a few hundred pairs of 65,536); every
        UTF-16 unit, for another. A text of other characters too is read
        for the pairs with each of those as "?", in no literal."""
        raw = coded.one_byte
        seen = np.zeros(1 << 16, dtype=np.intp)
        for offset in (0, 1)[: len(raw)]:  # the pairs at even and odd offsets, two bytes each
            pairs = np.frombuffer(raw, dtype=">u2", count=(len(raw) - offset) // 2, offset=offset)
            seen += np.bincount(pairs, minlength=1 << 16)
        whole = np.logical_and.reduceat(seen[self.codes] > 0, self.firsts).tolist()
        possible = self.singles + [w for w, ok in zip(self.paired, whole, strict=True) if ok]
        if coded.latin1 is None and self.others:
            held = coded.held
            others = zip(self.others, self.units, strict=True)
            possible += [word for word, units in others if held[units].all()]
        return sorted(possible)


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
    rules' words lacks dozens). Only the literals that may occur are looked
    for (:meth:`_Literals.possible`). ``leads``: the rules' leads looked for too
    (their places were not gathered: too dense). ``coded``: the text read,
    when made already (:class:`_Coded`)."""

    def __init__(self, text: str, leads: bool, coded: _Coded | None = None) -> None:
        self.text = text
        self.coded = _Coded(text) if coded is None else coded
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
        left = self.literals.possible(self.coded)
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
