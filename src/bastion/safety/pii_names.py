"""Person names, street addresses, places and dates of birth in free text (issue 16).

The pattern kinds (:mod:`bastion.safety.pii_patterns`) have a shape and a
checksum; these have neither, so a model decides, from the token and its
neighbours, not from a list alone:

``person``, ``address``, ``place``
    A multinomial logistic regression over hand-built features of each
    *candidate* token (a capitalised word, a number, or a lower-case word
    seen inside names and street addresses: "rue", "de", "van", "ul"): the
    word itself, its prefix, suffix and shape, whether it is in the
    gazetteers (first names, last names, towns, countries, street words,
    ordinary words),
    and the same of the two tokens either side (``Dear``, ``Mr``, ``born``,
    ``live at``, a line break, a capital after it). So "Will" starting a
    question, "May" the month or "Apple" the company are not names for
    being in a list, while an unknown "Kristjánsdóttir" after "Dear Ms" is.
    Consecutive tokens of one kind on one line make one span.

``dob``
    A date (numeric, or with a month name in one of eight languages) with a
    birth cue before it on the same line (``DOB``, ``born``,
    ``Geburtsdatum``, ``né le``, ``fecha de nacimiento`` ...). Other dates are
    left alone: an order date is not personal data.

The weights, the vocabulary and the gazetteers are trained by
``bench/train_pii.py`` (``make train-pii``) from synthetic text only (Faker,
MIT licence, in the training locales; see ``model/PII_NAMES.md``) and ship as
``model/pii-names.npz``: no download, no Faker, CPU and numpy only.

Latin, Greek and Cyrillic scripts (which have capital letters) are covered;
names written in scripts without case (Chinese, Japanese, Arabic, Hebrew)
and names written all in lower case are not found. Work is linear in the text:
one regex pass for tokens, a fixed number of features per candidate, one
vectorised product.
"""

from __future__ import annotations

import bisect
import functools
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, islice, repeat
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
import numpy.typing as npt

PERSON = "person"
ADDRESS = "address"
PLACE = "place"
DOB = "dob"

CLASSES: tuple[str, ...] = ("", PERSON, ADDRESS, PLACE)
"""The tagger's classes; index 0 is "not personal data"."""

MODEL_PATH = Path(__file__).with_name("model") / "pii-names.npz"

# Gazetteer flags (one letter each) as they appear in feature names.
# ``common``: ordinary words of the training languages ("report", "export"), so
# that a capitalised one after "Subject:" is read as a word, not as a town.
GAZETTEERS: tuple[str, ...] = ("first", "last", "town", "country", "street", "common")
_FLAG = {"first": "F", "last": "L", "town": "T", "country": "C", "street": "S", "common": "W"}

# Words (O'Brien, Jean-Luc; a possessive 's apart), numbers (12, 26-83, 7170BM,
# 01310-100, 12/03/1985), single punctuation.
TOKEN_RE = re.compile(
    r"(?P<w>[^\W\d_]+(?:(?:-|['\u2019](?!s\b))[^\W\d_]+)*)"
    r"|(?P<n>\d+(?:[./\-]\d+)*[^\W\d_]{0,2})"
    r"|(?P<p>[^\w\s])"
)

# Characters that may stand between two chunks of one address ("Nr. 20").
_JOIN = " ,./-()"
# The kinds of chunk that continue an address (numbers always do).
_JOINS_ADDRESS: frozenset[str] = frozenset((ADDRESS, PLACE))
# A chunk of no kind whose every token's log-probability of "not personal data"
# exceeds that of "address" by less than this joins an address it touches.
NEAR_ADDRESS = 2.0


def _joins(text: str, end: int, start: int) -> bool:
    """Whether ``text[end:start]``, between two chunks, keeps them in one address."""
    return not text[end:start].strip(_JOIN)


# -- dates of birth -------------------------------------------------------------

_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december"
    "|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec"
    "|janvier|février|fevrier|mars|avril|mai|juin|juillet|août|aout|septembre|octobre"
    "|novembre|décembre|decembre"
    "|januar|februar|märz|maerz|juni|juli|oktober|dezember"
    "|enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|setiembre|octubre"
    "|noviembre|diciembre"
    "|gennaio|febbraio|aprile|maggio|giugno|luglio|settembre|ottobre|dicembre"
    "|janeiro|fevereiro|março|marco|maio|junho|julho|setembro|outubro|novembro|dezembro"
    "|januari|februari|maart|mei|augustus"
)
DATE_RE = re.compile(
    r"(?<![\w.:/-])(?:"
    r"\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})"  # 12/03/1985, 03-12-85
    r"|\d{4}[./-]\d{1,2}[./-]\d{1,2}"  # 1985-03-12
    # 12 March 1985, 12 de marzo de 1985
    rf"|\d{{1,2}}\.?\s(?:de\s)?(?:{_MONTHS})\.?,?\s(?:de\s)?\d{{4}}"
    rf"|(?:{_MONTHS})\.?\s\d{{1,2}}(?:st|nd|rd|th)?,?\s\d{{4}}"  # March 12, 1985
    r")(?![\w/-]|\.\d)",
    re.IGNORECASE,
)
# A birth cue, up to _CUE_REACH characters before the date on its line.
BIRTH_CUE_RE = re.compile(
    r"birth|\bborn\b|\bd\.?o\.?b\b|\bné(?:e)?\b|naissance|geboren|geburt|\bgeb\."
    r"|nacimiento|\bnacid[oa]\b|nascita|\bnat[oa]\b|geboorte|nascimento|\bnascid[oa]\b"
    r"|urodzon|urodzeni|födelse|\bfödd?\b|fødsel|\bfødt\b|syntym|narozen",
    re.IGNORECASE,
)
_CUE_REACH = 48
# A month or weekday with no other capitalised word ("moved to May", "in
# January") is a date, never a name or a place, whatever its neighbours suggest;
# "May Lee" and "April Fernandes" are still judged by the model.
CALENDAR_WORDS = frozenset(
    (
        *_MONTHS.split("|"),
        *("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
        *("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
        *("montag", "dienstag", "mittwoch", "donnerstag", "freitag", "samstag", "sonntag"),
        *("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    )
)


# Words that end the name of an organisation, a product or a job ("Vandelay
# Hydraulics", "Becker Logistik GmbH", "Acme Cloud Console", "Finance
# Manager"): the capitalised words up to and including the last of them in a
# chunk are no person and no place (a company's name is not personal data);
# the words after it ("Manager Jan Kowalski") are still judged. Address chunks
# keep them: over-redacting an address is the safe side.
ORGANISATION_WORDS = frozenset(
    (
        *("inc", "ltd", "llc", "llp", "plc", "corp", "corporation", "company", "gmbh", "ag"),
        *("kg", "ug", "sarl", "sas", "srl", "spa", "bv", "nv", "oy", "ab", "asa", "pty"),
        *("group", "holding", "holdings", "partners", "associates", "foundation", "bank"),
        *("hydraulics", "logistics", "logistik", "services", "solutions", "systems"),
        *("technologies", "technology", "industries", "consulting", "software", "labs"),
        *("insights", "analytics", "networks", "media", "studio", "studios", "ventures"),
        *("cloud", "console", "platform", "portal", "dashboard", "app", "api", "business"),
        *("manager", "director", "officer", "team", "department", "desk", "support"),
        *("ids", "id"),
    )
)
# Greetings, thanks and function words that start a line or a sentence with a
# capital ("Merci,", "Vielen Dank", "If the job fails"): a chunk of these alone
# is nobody. "Hi Dana" keeps Dana (the chunk has another word).
NOT_NAME_WORDS = frozenset(
    (
        *("hi", "hello", "hey", "dear", "thanks", "thank", "cheers", "regards"),
        *("merci", "bonjour", "salut", "cordialement", "danke", "dank", "hallo", "grüße"),
        *("gracias", "hola", "saludos", "grazie", "ciao", "saluti", "obrigado", "obrigada"),
        *("if", "when", "then", "but", "and", "or", "so", "the", "this", "that", "it"),
        *("we", "you", "they", "please", "also", "yes", "no", "ok"),
    )
)


def never_alone(word: str) -> bool:
    """Whether a chunk of such words only is no personal data whatever the model
    says: a month or weekday, a greeting or function word, a lower-case word."""
    low = word.lower()
    return low in CALENDAR_WORDS or low in NOT_NAME_WORDS or word.islower()


# The runs of digits some form of DATE_RE can use, by what each form needs
# there: after a day, month or year of at most four digits, a separator, one
# or two digits, a separator and a digit (12/03/85, 1985-03-12: "0.5", "v2.1"
# and "4-6" are never tried), a space after a day of at most two (12 March),
# or a word and a space before such a day and a year after it (March 12, 1985).
# Every other run is skipped without a Python step (a text of numbers, "12,
# 3456 Main, ...", has one every few characters). A run is matched from its
# first digit only ((?<!\d\d) after it: linear in a long run), and each
# condition is read at its end, where a look-behind sees the whole run.
_LETTER = r"[^\W\d_]"
_DATE_DIGITS = re.compile(
    r"\d(?<!\d\d)\d*+(?:"
    r"(?<!\d{5})(?=[./-]\d{1,2}[./-]\d)"
    r"|(?<!\d{3})(?=\.?\s)"
    rf"|(?:(?<={_LETTER}\s\d)|(?<={_LETTER}\.\s\d)|(?<={_LETTER}\s\d\d)|(?<={_LETTER}\.\s\d\d))"
    r"(?=(?i:st|nd|rd|th)?,?\s\d)"
    r")"
)
_WORD_BEFORE = re.compile(r"([^\W\d_]+)\.?\s$")
# What follows the day of "March 12, 1985" (looked at before the month is
# searched for: "born 01/02/1990" has a word before its day, no year after it).
_YEAR_AFTER_DAY = re.compile(r"(?i:st|nd|rd|th)?,?\s\d")


def dates(text: str) -> list[tuple[int, int]]:
    """Spans of :data:`DATE_RE` in ``text``, tried only where digits are (and at the
    month name before them): a search from every letter would be slow."""
    out: list[tuple[int, int]] = []
    done = 0
    for digits in _DATE_DIGITS.finditer(text):
        start, end = digits.span()
        if start < done:
            continue
        # What every form of DATE_RE needs around its digits, checked before a
        # regex is tried: a month name and a space before a day ("March 12"), or
        # one of "./- " after a day, month or year ("12/03", "1985-", "12 March").
        after = text[end : end + 1]
        month_first = (
            end - start <= 2
            and start > 0
            and text[start - 1].isspace()
            and _YEAR_AFTER_DAY.match(text, end) is not None
        )
        digits_first = end - start <= 4 and after != "" and (after in "./-" or after.isspace())
        if not (month_first or digits_first):
            continue
        word = _WORD_BEFORE.search(text, max(0, start - 14), start) if month_first else None
        tries = (word.start(1),) if word is not None else ()
        for at in (*tries, start) if digits_first else tries:
            if at < done:
                continue
            found = DATE_RE.match(text, at)
            if found is not None:
                out.append(found.span())
                done = found.end()
                break
    return out


def dates_of_birth(
    text: str, found: Sequence[tuple[int, int]] | None = None
) -> Iterator[tuple[int, int]]:
    """Spans of dates with a birth cue before them on the same line (``found``:
    ``dates(text)``, when the caller has it already)."""
    for start, end in dates(text) if found is None else found:
        line = text.rfind("\n", max(0, start - _CUE_REACH), start) + 1
        if BIRTH_CUE_RE.search(text, max(line, start - _CUE_REACH), start):
            yield start, end


# -- tokens and features --------------------------------------------------------


class Token(NamedTuple):
    start: int
    end: int
    text: str
    kind: str  # "w" word, "n" number, "p" punctuation
    newline_before: bool


def tokens(text: str) -> list[Token]:
    """The words, numbers and punctuation of ``text``, in order."""
    return _scan(text, None)[0].as_list()


def scan(text: str, lexicon: Lexicon) -> tuple[list[Token], list[int]]:
    """``tokens(text)`` and ``candidates(text, those, lexicon)`` in one pass over
    the text (tests/test_pii_names_parts.py checks they agree)."""
    toks, found = _scan(text, lexicon.connectors)
    return toks.as_list(), _outside_dates(text, toks.starts, found)


class Scanned(Sequence[Token]):
    """The tokens of a text as parallel lists, the tagger's hot path: a ticket
    has thousands of tokens and the tagger reads a few fields of the candidates
    and their neighbours only, so a :class:`Token` is made only when one is
    asked for (``scanned[i]``)."""

    __slots__ = ("breaks", "ends", "kinds", "line_starts", "starts", "words")

    def __init__(self, text: str) -> None:
        # C-level loops (map) over the matches: a Python loop per token was a
        # third of the tagger's time on a support ticket. A few hundred at a
        # time, never all: a match is an object the garbage collector tracks,
        # and a block's 60,000 held at once outlived collections of the young
        # generation and set off full ones, whose cost grows with everything
        # else the process holds (in a process holding bench/pii.py's corpora,
        # a third of the whole recognizer's time on the demo tickets). A batch
        # under the collector's threshold (700 allocations) dies before it
        # triggers one.
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.words: list[str] = []
        self.kinds: list[str] = []
        found = TOKEN_RE.finditer(text)
        while batch := list(islice(found, _MATCH_BATCH)):
            self.starts += map(_START, batch)
            self.ends += map(_END, batch)
            self.words += map(_GROUP, batch)
            self.kinds += map(_LASTGROUP, batch)
        count = len(self.starts)
        # A line break stands between two tokens (no token holds one): the token
        # after it is the first of its line (found by C-level passes too).
        after = map(bisect.bisect_right, repeat(self.starts), map(_START, _NEWLINE.finditer(text)))
        self.line_starts: list[int] = sorted(set(after) - {count})
        self.breaks: list[bool] = [False] * count
        for first in self.line_starts:
            self.breaks[first] = True

    def __len__(self) -> int:
        return len(self.words)

    @overload
    def __getitem__(self, index: int) -> Token: ...

    @overload
    def __getitem__(self, index: slice) -> list[Token]: ...

    def __getitem__(self, index: int | slice) -> Token | list[Token]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return Token(
            self.starts[index],
            self.ends[index],
            self.words[index],
            self.kinds[index],
            self.breaks[index],
        )

    def as_list(self) -> list[Token]:
        # tuple.__new__: a NamedTuple's own constructor is a Python call per token.
        return list(
            map(
                tuple.__new__,
                repeat(Token),
                zip(self.starts, self.ends, self.words, self.kinds, self.breaks, strict=True),
            )
        )


# Matches held at once while tokenising (see Scanned).
_MATCH_BATCH = 256
_NEWLINE = re.compile("\n")
_START = re.Match.start
_END = re.Match.end
_GROUP = re.Match.group
_LASTGROUP = operator.attrgetter("lastgroup")


def _scan(text: str, connectors: frozenset[str] | None) -> tuple[Scanned, list[int]]:
    """The tokens of ``text`` and, given the connectors, the indexes of those
    :func:`is_candidate` would keep (dates not yet taken out)."""
    toks = Scanned(text)
    if connectors is None:
        return toks, []
    # is_candidate once per distinct spelling of the call (a text repeats its
    # words; the table dies with the call), then one C-level pass over the
    # tokens: a number, or a word whose first letter is a capital (one
    # character's istitle() is isupper() or istitle()) or that is a connector.
    # A spelling has one kind: TOKEN_RE's branch is set by its first character.
    words = toks.words
    keep = {
        word: kind == "n" or (kind == "w" and (word[0].istitle() or word in connectors))
        for word, kind in dict(zip(words, toks.kinds, strict=True)).items()
    }
    return toks, list(compress(range(len(words)), map(keep.__getitem__, words)))


def shape(word: str) -> str:
    """``Xx``, ``X``, ``d``, ``Xx-Xx``: the case and digit pattern, repeats collapsed, at most 6."""
    if word.isalpha():  # the common cases, without a loop
        if word.islower():
            return "x"
        if word[0].isupper() and (len(word) == 1 or word[1:].islower()):
            return "Xx" if len(word) > 1 else "X"
        if word.isupper():
            return "X"
    elif word.isdigit():
        return "d"
    out: list[str] = []
    for char in word:
        code = "X" if char.isupper() else "x" if char.islower() else "d" if char.isdigit() else char
        if not out or out[-1] != code:
            out.append(code)
    return "".join(out[:6])


@dataclass(frozen=True)
class Lexicon:
    """Gazetteers (lower-cased words) and the lower-case words that may stand
    inside a name or an address (``connectors``)."""

    sets: dict[str, frozenset[str]]
    connectors: frozenset[str]
    _flags: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in GAZETTEERS:
            for word in self.sets[name]:
                self._flags[word] = self._flags.get(word, "") + _FLAG[name]

    def flags(self, low: str) -> str:
        """One letter per gazetteer ``low`` is in (``FL``: a first and a last name)."""
        return self._flags.get(low, "")

    def combinations(self) -> set[str]:
        """Every value :meth:`flags` can take (``""`` included)."""
        return {"", *self._flags.values()}


def is_candidate(token: Token, lexicon: Lexicon) -> bool:
    """Whether the tagger looks at ``token``: all others are not personal data."""
    if token.kind == "n":
        return True
    if token.kind != "w":
        return False
    first = token.text[0]
    return first.isupper() or first.istitle() or token.text in lexicon.connectors


def candidates(text: str, toks: Sequence[Token], lexicon: Lexicon) -> list[int]:
    """Indexes of the tokens the tagger classifies: candidates not inside a date
    (a date's year is no house number; :func:`dates_of_birth` judges dates)."""
    return _outside_dates(
        text,
        [tok.start for tok in toks],
        [i for i, tok in enumerate(toks) if is_candidate(tok, lexicon)],
    )


def _outside_dates(
    text: str,
    starts: Sequence[int],
    indexes: list[int],
    found: Sequence[tuple[int, int]] | None = None,
) -> list[int]:
    """``indexes`` but those of tokens (starting at ``starts``) inside a date
    (``found``: ``dates(text)``, when the caller has it already)."""
    spans = dates(text) if found is None else found
    if not spans:
        return indexes
    out = []
    d = 0
    for i in indexes:
        start = starts[i]
        while d < len(spans) and spans[d][1] <= start:
            d += 1
        if d < len(spans) and spans[d][0] <= start:
            continue
        out.append(i)
    return out


def lexical_features(low: str, lexicon: Lexicon) -> list[str]:
    """The features of a candidate's own (lower-cased) word."""
    out = ["w=" + low, "p3=" + low[:3], "s3=" + low[-3:], "s4=" + low[-4:]]
    # Only a hit is a feature: a word missing from the lists says little
    # (most names of the world are), and the training drops hits at random.
    out.extend("g=" + flag for flag in lexicon.flags(low))
    return out


# The feature of a candidate whose word the model has never seen (a name of a
# locale it was not trained on, mostly): bench/train_pii.py gives it to rare
# words whose word and gazetteer features it drops, so that it means the same.
UNKNOWN = "u"


def context_lexical(offset: int, low: str, lexicon: Lexicon) -> list[str]:
    """The features a neighbour's (lower-cased) word ``offset`` tokens away gives."""
    return [f"w{offset}={low}", *(f"g{offset}={flag}" for flag in lexicon.flags(low))]


_OFFSETS = (-2, -1, 1, 2)
# Rows of NameModel._table (after row 0, the zero row).
_NEWLINE_ROW, _NEWLINE_NEXT_ROW = 1, 2
_EDGE_ROW = {offset: 3 + k for k, offset in enumerate(_OFFSETS)}


def features(toks: Sequence[Token], i: int, lexicon: Lexicon) -> list[str]:
    """The feature names of candidate ``toks[i]`` (shared by training and use)."""
    tok = toks[i]
    out = lexical_features(tok.text.lower(), lexicon)
    for offset in _OFFSETS:
        j = i + offset
        if 0 <= j < len(toks):
            out += context_lexical(offset, toks[j].text.lower(), lexicon)
    out += _shapes(toks, i, [shape(t.text) for t in toks[max(0, i - 2) : i + 3]], max(0, i - 2))
    return out


def _shapes(toks: Sequence[Token], i: int, shapes: Sequence[str], base: int = 0) -> list[str]:
    """The features of case, layout and the text's edges (``shapes[j - base]`` is
    the shape of ``toks[j]``)."""
    tok = toks[i]
    own = shapes[i - base]
    prev = toks[i - 1].text.lower() if i else "<edge>"
    out = ["b", "sh=" + own, f"w-1|sh={prev}|{own}"]
    for offset in _OFFSETS:
        j = i + offset
        if 0 <= j < len(toks):
            out.append(f"sh{offset}={shapes[j - base]}")
        else:
            out.append(f"w{offset}=<edge>")
    if tok.newline_before:
        # A line's first word, and what ended the line before: after a postcode
        # or a town it is the next line of a postal block (a town, a country).
        out += ["nl", "nl|sh-1=" + (shapes[i - 1 - base] if i else "<edge>")]
    if i + 1 < len(toks) and toks[i + 1].newline_before:
        out.append("nl+1")
    return out


# -- the model ------------------------------------------------------------------


class NameModel:
    """The trained tagger: a vocabulary of features, their weights, the lexicon."""

    def __init__(
        self, vocabulary: dict[str, int], weights: npt.NDArray[np.float32], lexicon: Lexicon
    ) -> None:
        self.vocabulary = vocabulary
        self.weights = weights
        self.lexicon = lexicon
        # The summed weights of the word features of every word the model
        # knows, computed once here. Never filled from the texts scanned: a memo
        # of their words would keep a tenant's names in memory after its shred.
        own: list[list[int]] = []
        context: list[list[int]] = []
        self._own: dict[str, int] = {}
        self._context: dict[tuple[int, str], int] = {}
        for name in vocabulary:
            head, _, low = name.partition("=")
            if head == "w":
                self._own[low] = len(own)
                own.append(self._ids(lexical_features(low, lexicon)))
            elif head in ("w-2", "w-1", "w1", "w2") and low != "<edge>":
                offset = int(head[1:])
                self._context[(offset, low)] = len(context)
                context.append(self._ids(context_lexical(offset, low, lexicon)))
        self._own_sums = self._sums(own)
        self._context_sums = self._sums(context)
        self._nothing = np.zeros(len(CLASSES), dtype=np.float32)
        self._bias = self._vector(["b"])
        # One table of every weight vector a call may need (the "static" rows;
        # rows a call computes for its unknown words follow them): nothing, the
        # line breaks, the text's edges, each feature's weights, the summed own
        # and context word features of the words the model knows.
        fixed = [
            self._nothing,
            self._vector(["nl"]),
            self._vector(["nl+1"]),
            *(self._vector([f"w{offset}=<edge>"]) for offset in _OFFSETS),
        ]
        self._weights_at = len(fixed)
        self._own_at = self._weights_at + len(weights)
        self._context_at = self._own_at + len(own)
        # A word the model has not seen as context has features only through
        # the lists, so its rows there are those of its gazetteer hits (``FL``),
        # as is the part of its own row that is not its spelling's.
        combinations = sorted(lexicon.combinations())
        by_hits = [
            self._vector([f"g{offset}={flag}" for flag in flags])
            for flags in combinations
            for offset in _OFFSETS
        ]
        hits_at = self._context_at + len(context)
        self._context_of_hits = {
            flags: tuple(
                hits_at + len(_OFFSETS) * n + k if flags else 0 for k in range(len(_OFFSETS))
            )
            for n, flags in enumerate(combinations)
        }
        self._own_of_hits = {
            flags: self._ids([*("g=" + flag for flag in flags), UNKNOWN]) for flags in combinations
        }
        self._table = np.concatenate(
            (np.stack(fixed), weights, self._own_sums, self._context_sums, np.stack(by_hits))
        ).astype(np.float32)
        # The rows of each word the model knows (own, then as the neighbour at
        # each offset; -1: its own row is made per call).
        self._word_table: dict[str, tuple[int, ...]] = {}
        for low in (*self._own, *(low for _offset, low in self._context)):
            if low in self._word_table:
                continue
            known = self._own.get(low)
            hits = self._context_of_hits[lexicon.flags(low)]
            self._word_table[low] = (
                -1 if known is None else self._own_at + known,
                *(
                    hits[k] if seen is None else self._context_at + seen
                    for k, seen in enumerate(self._context.get((o, low)) for o in _OFFSETS)
                ),
            )
        # The ids of the affix features by affix ("p3=" + low[:3]…), and the
        # gazetteer flags by word: an unknown word's look-ups, without a string
        # built per look-up.
        affix_ids: dict[str, dict[str, int]] = {"p3": {}, "s3": {}, "s4": {}}
        for name, index in vocabulary.items():
            head, _, affix = name.partition("=")
            if head in affix_ids:
                affix_ids[head][affix] = index
        self._p3 = affix_ids["p3"].get
        self._s3 = affix_ids["s3"].get
        self._s4 = affix_ids["s4"].get
        self._flags_of = lexicon._flags.get
        # The rows of each word shape the model knows ("Xxxx", "dd"…), as the
        # candidate and at each offset around it (0: no weight).
        self._shape_rows: dict[str, tuple[int, ...]] = {}
        for name in vocabulary:
            head, _, form = name.partition("=")
            if head in ("sh", "sh-2", "sh-1", "sh1", "sh2") and form not in self._shape_rows:
                self._shape_rows[form] = tuple(
                    self._row(f"sh{offset}={form}") for offset in ("", *_OFFSETS)
                )

    def _row(self, name: str) -> int:
        """The row of :attr:`_table` of one feature's weights (0: not a feature)."""
        index = self.vocabulary.get(name)
        return 0 if index is None else self._weights_at + index

    def _ids(self, names: list[str]) -> list[int]:
        get = self.vocabulary.get
        return [i for i in map(get, names) if i is not None]

    def _sums(self, rows: list[list[int]]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(rows), len(CLASSES)), dtype=np.float32)
        for row, ids in enumerate(rows):
            if ids:
                out[row] = self.weights[ids].sum(axis=0)
        return out

    def _vector(self, names: list[str]) -> npt.NDArray[np.float32]:
        ids = self._ids(names)
        if not ids:
            return np.zeros(len(CLASSES), dtype=np.float32)
        summed: npt.NDArray[np.float32] = self.weights[ids].sum(axis=0)
        return summed

    def _word_rows(self, low: str, pending: list[list[int]]) -> tuple[int, ...]:
        """The rows of the word ``low``: its own, then as the neighbour at each
        offset of :data:`_OFFSETS`. The own row of a word the model does not
        know is numbered after :attr:`_table`: the sum of the feature ids it
        appends to ``pending`` (summed for the whole call at once)."""
        rows = self._word_table.get(low)
        if rows is not None and rows[0] != -1:
            return rows
        flags = self._flags_of(low, "")
        # lexical_features(low) + UNKNOWN but its word, which the model lacks.
        affixes = (self._p3(low[:3]), self._s3(low[-3:]), self._s4(low[-4:]))
        ids = [i for i in affixes if i is not None] + self._own_of_hits[flags]
        own = self._pending(ids, pending)
        return (own, *(self._context_of_hits[flags] if rows is None else rows[1:]))

    def _pending(self, ids: list[int], pending: list[list[int]]) -> int:
        if not ids:
            return 0
        pending.append(ids)
        return len(self._table) + len(pending) - 1

    def _summed(self, pending: list[list[int]]) -> npt.NDArray[np.float32]:
        """The sum of the weights of each list of feature ids in ``pending``, each
        added in its order as ``weights[ids].sum(axis=0)`` does (the same bits):
        one gather into a grid padded with the zero row, one addition per column."""
        lengths = np.fromiter(map(len, pending), dtype=np.int64, count=len(pending))
        flat = np.fromiter(chain.from_iterable(pending), dtype=np.int64, count=int(lengths.sum()))
        grid = np.zeros((len(pending), int(lengths.max())), dtype=np.int64)
        firsts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        grid[np.repeat(np.arange(len(pending)), lengths), np.arange(len(flat)) - firsts] = (
            flat + self._weights_at
        )
        parts = self._table[grid]
        out: npt.NDArray[np.float32] = parts[:, 0].copy()
        for column in range(1, grid.shape[1]):
            out += parts[:, column]
        return out

    def scores(self, toks: Sequence[Token], indexes: Sequence[int]) -> npt.NDArray[np.float32]:
        """Log-probabilities of each class (columns: :data:`CLASSES`) for ``toks[indexes]``.

        The sum over :func:`features`, computed per distinct word and shape of
        the call (a support ticket repeats its words): each candidate's terms
        are rows of one table (the model's, and the call's unknown words'), and
        one gather and a fixed number of additions (in the order of the
        features) sum them — a call pays for a few numpy calls and a dictionary
        look-up per distinct word, not for one numpy call per term.
        """
        classes = len(CLASSES)
        if not indexes:
            return np.zeros((0, classes), dtype=np.float32)
        if isinstance(toks, Scanned):
            words, line_starts = toks.words, toks.line_starts
        else:
            words = [tok.text for tok in toks]
            line_starts = [j for j, tok in enumerate(toks) if tok.newline_before]
        count = len(words)
        at = np.asarray(indexes, dtype=np.int64)
        # The candidates and their neighbours, in order (marks shifted by two:
        # no bounds check, no sort).
        marked = np.zeros(count + 4, dtype=bool)
        for shift in range(5):
            marked[at + shift] = True
        near = np.flatnonzero(marked[2 : count + 2])
        # Each distinct spelling of the candidates and their neighbours, looked
        # up once (the memo lives for this call only): its word's rows, its
        # shape's, and the ids of its lower-cased word and of its shape.
        spellings: dict[str, int] = {}
        slot = np.zeros(count, dtype=np.int64)
        slot[near] = [spellings.setdefault(words[j], len(spellings)) for j in near.tolist()]
        lows: dict[str, tuple[int, tuple[int, ...]]] = {}
        forms: dict[str, tuple[int, tuple[int, ...]]] = {}
        pending: list[list[int]] = []
        per_spelling: list[list[int]] = []
        for text in spellings:
            low = text.lower()
            word = lows.get(low)
            if word is None:
                word = lows[low] = (len(lows), self._word_rows(low, pending))
            form = shape(text)
            known = forms.get(form)
            if known is None:
                known = forms[form] = (len(forms), self._shape_rows.get(form, (0, 0, 0, 0, 0)))
            per_spelling.append([*word[1], *known[1], word[0], known[0]])
        table = np.asarray(per_spelling, dtype=np.int64)
        # Columns of ``table``: the word's own row and as neighbour at each
        # offset (0-4), the same of its shape (5-9), its word's id, its shape's.
        mine = table[slot[at]]
        terms = [mine[:, 0], mine[:, 5]]
        for k, offset in enumerate(_OFFSETS, start=1):
            other = at + offset
            inside = (other >= 0) & (other < count)
            theirs = table[slot[np.clip(other, 0, count - 1)]]
            terms.append(np.where(inside, theirs[:, k], _EDGE_ROW[offset]))
            terms.append(np.where(inside, theirs[:, 5 + k], 0))
        # The pair of the word before and the candidate's shape; a line's first
        # word and the shape of the token before it: looked up per distinct pair.
        low_names = [*lows, "<edge>"]
        form_names = [*forms, "<edge>"]
        before = table[slot[np.maximum(at - 1, 0)]]
        first = at == 0
        pair = np.where(first, len(lows), before[:, 10]) * len(form_names) + mine[:, 11]
        kinds, which = np.unique(pair, return_inverse=True)
        pair_rows = [
            self._row(
                f"w-1|sh={low_names[code // len(form_names)]}|{form_names[code % len(form_names)]}"
            )
            for code in kinds.tolist()
        ]
        terms.append(np.asarray(pair_rows, dtype=np.int64)[which])
        breaks = np.zeros(count, dtype=bool)
        breaks[line_starts] = True
        line = breaks[at]
        line_pairs = np.zeros(len(at), dtype=np.int64)
        if line.any():
            form_before = np.where(first, len(forms), before[:, 11])[line]
            kinds, which = np.unique(form_before, return_inverse=True)
            line_rows = [self._row("nl|sh-1=" + form_names[code]) for code in kinds.tolist()]
            line_pairs[line] = np.asarray(line_rows, dtype=np.int64)[which]
        terms.append(line_pairs)
        terms.append(np.where(line, _NEWLINE_ROW, 0))
        after = np.minimum(at + 1, count - 1)
        terms.append(np.where((at + 1 < count) & breaks[after], _NEWLINE_NEXT_ROW, 0))
        grid = np.stack(terms)
        gathered = self._table.take(grid, axis=0, mode="clip")
        if pending:
            computed = grid >= len(self._table)
            gathered[computed] = self._summed(pending)[grid[computed] - len(self._table)]
        raw = self._bias + gathered[0] + gathered[1]
        for k in range(len(_OFFSETS)):
            raw += gathered[2 + 2 * k] + gathered[3 + 2 * k]
        for extra in gathered[2 + 2 * len(_OFFSETS) :]:
            raw += extra
        raw -= raw.max(axis=1, keepdims=True)
        logp: npt.NDArray[np.float32] = raw - np.log(np.exp(raw).sum(axis=1, keepdims=True))
        return logp.astype(np.float32)

    def find(
        self, text: str, date_spans: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[tuple[str, int, int]]:
        """``(kind, start, end)`` of the person names, addresses and places in ``text``
        (``date_spans``: ``dates(text)``, when the caller has it already).

        Candidates standing next to each other on one line (only spaces, or a
        period after an initial, between them) form a chunk, and a chunk takes
        one kind: the best by the sum of its tokens' log-probabilities, so
        "Miloslava Poláková" is one name even where one of its words alone
        would look like a town. Address chunks then join across commas and
        parentheses, and take the town that follows them ("Via Roma, 12,
        00184, Roma (RM)").
        """
        toks, found = _scan(text, self.lexicon.connectors)
        indexes = _outside_dates(text, toks.starts, found, date_spans)
        starts, ends, words, kinds, breaks = (
            toks.starts,
            toks.ends,
            toks.words,
            toks.kinds,
            toks.breaks,
        )
        # The chunks: their first and last rows of ``indexes`` (two lists of
        # integers, not a list per chunk: see Scanned on tracked objects).
        firsts: list[int] = []
        lasts: list[int] = []
        before = -1  # the candidate of the row before
        for row, i in enumerate(indexes):
            if firsts and not breaks[i]:
                gap = text[ends[before] : starts[i]]
                if (i == before + 1 and (gap == " " or gap.strip(" ") == "")) or (
                    # an initial: "J. Smith" (not a list's number: "2. Tell")
                    i == before + 2
                    and gap.strip(" ") == "."
                    and len(words[before]) == 1
                    and kinds[before] == "w"
                ):
                    lasts[-1] = row
                    before = i
                    continue
            firsts.append(row)
            lasts.append(row)
            before = i
        if not _any_may_be_named(words, kinds, indexes, zip(firsts, lasts, strict=True)):
            # Every chunk would be dropped below whatever the model says ("The
            # refund was issued.", "When was it sent?"): it is not run.
            return
        logp = self.scores(toks, indexes)
        # One kind per chunk: the best sum of the log-probabilities of its
        # tokens that are personal data on their own (so "Dear Mr" does not
        # outvote "Kowalczyk"); words before a name that are not ("Customer",
        # "Dear") are left out of it.
        alone = logp.argmax(axis=1)
        named = np.where(alone[:, None] > 0, logp, 0.0)
        sums = np.add.reduceat(named, firsts, axis=0)
        some = np.add.reduceat(alone > 0, firsts).tolist()
        best = (sums[:, 1:].argmax(axis=1) + 1).tolist()
        alone_list = alone.tolist()
        near_address = (logp[:, 0] - logp[:, CLASSES.index(ADDRESS)] < NEAR_ADDRESS).tolist()
        numbers = [kinds[i] == "n" for i in indexes]
        decided: list[tuple[str, int, int, bool]] = []  # (kind, start, end, joins an address)
        last_row = 0  # of the chunk before
        for first, last, label, any_named in zip(firsts, lasts, best, some, strict=True):
            kind = CLASSES[label] if any_named else ""
            if kind in (PERSON, PLACE):
                kind, first = _after_organisation(words, indexes, first, last, kind, named, alone)
            while kind == PERSON and first < last and alone_list[first] == 0:
                first += 1
            chunk = indexes[first : last + 1]
            may_be_named = _may_be_named(words, kinds, chunk)
            if not may_be_named:
                kind = ""
            elif kind in (PERSON, PLACE) and any(numbers[first : last + 1]):
                # No one's name and no town's has a number in it: "Novi Goljak
                # 5c", "Mihaljevac 9c" are streets.
                kind = ADDRESS
            # Numbers, and words the model is not sure are outside an address
            # ("H.No.", a street's unknown name before its number), are taken
            # into an address they touch: continuing an address needs less
            # evidence than starting one.
            numeric = all(numbers[first : last + 1]) or (
                not kind and may_be_named and all(near_address[first : last + 1])
            )
            if (
                numbers[first]
                and decided
                and decided[-1][0] in (PERSON, PLACE)
                and text[decided[-1][2] : starts[chunk[0]]].rstrip(" ") == "."
                and len(words[indexes[last_row]]) <= 3
            ):
                # A street's name, an abbreviation and its number ("Strada Mare
                # Nr. 5"): the words before the number are the street's.
                decided[-1] = (ADDRESS, *decided[-1][1:])
            decided.append((kind, starts[chunk[0]], ends[chunk[-1]], numeric))
            last_row = last
        open_kind, open_start, open_end, open_numeric = "", 0, 0, False
        for kind, start, end, numeric in decided:
            if (
                open_kind == ADDRESS
                and (kind in _JOINS_ADDRESS or numeric)
                and _joins(text, open_end, start)
            ):
                # The parts of one address ("Nr. 20 Bl. 89, 943874", "5b/0"), and
                # its town where the model says so.
                open_end = end
                continue
            if kind == ADDRESS and open_numeric and not open_kind and _joins(text, open_end, start):
                # A house number before its street ("088, Ray Marg").
                open_kind, open_end = ADDRESS, end
                continue
            if open_kind:
                yield open_kind, open_start, open_end
            open_kind, open_start, open_end, open_numeric = kind, start, end, numeric
        if open_kind:
            yield open_kind, open_start, open_end


def _may_be_named(words: Sequence[str], kinds: Sequence[str], chunk: Sequence[int]) -> bool:
    """Whether the tokens ``chunk`` of one chunk (``words[i]``, ``kinds[i]``) can be
    personal data at all (the model then says which kind, if any). False of a
    chunk, it is false of every part of it too: a text whose chunks are all no
    personal data needs no model."""
    if len(chunk) == 1:  # most chunks: the same test, without the generators
        word = words[chunk[0]]
        return not never_alone(word) and (
            kinds[chunk[0]] == "n" or (len(word) > 1 and not word.islower())
        )
    # "May", "in January": a date, not a place; "Merci": nobody.
    if all(never_alone(words[i]) for i in chunk):
        return False
    # A chunk needs a word of two letters or more with a capital, or a
    # number: "I do" (a pronoun and a connector) is nobody.
    return any(kinds[i] == "n" or (len(words[i]) > 1 and not words[i].islower()) for i in chunk)


def _any_may_be_named(
    words: Sequence[str],
    kinds: Sequence[str],
    indexes: Sequence[int],
    chunks: Iterable[tuple[int, int]],
) -> bool:
    """Whether any chunk (rows ``first..last`` of ``indexes``) may be personal data."""
    return any(_may_be_named(words, kinds, indexes[first : last + 1]) for first, last in chunks)


def _after_organisation(
    words: Sequence[str],
    indexes: Sequence[int],
    first: int,
    last: int,
    kind: str,
    named: npt.NDArray[np.float32],
    alone: npt.NDArray[np.int64],
) -> tuple[str, int]:
    """The kind and first row of a person or place chunk once the organisation's
    name in it (up to its last :data:`ORGANISATION_WORDS` word) is cut off: the
    rest takes the best kind of its own tokens, or none."""
    cut = -1
    for row in range(first, last + 1):
        if words[indexes[row]].lower() in ORGANISATION_WORDS:
            cut = row
    if cut == -1:
        return kind, first
    first = cut + 1
    if first > last or not (alone[first : last + 1] > 0).any():
        return "", min(first, last)
    return CLASSES[int(named[first : last + 1, 1:].sum(axis=0).argmax()) + 1], first


def save(
    path: Path, vocabulary: Sequence[str], weights: npt.NDArray[np.float32], lexicon: Lexicon
) -> None:
    """Write a model (by bench/train_pii.py): plain arrays, no pickle."""
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "vocabulary": np.asarray(vocabulary, dtype=str),
        "weights": weights.astype(np.float32),
        "connectors": np.asarray(sorted(lexicon.connectors), dtype=str),
    }
    for name in GAZETTEERS:
        arrays[f"gazetteer_{name}"] = np.asarray(sorted(lexicon.sets[name]), dtype=str)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


@functools.cache
def load(path: Path = MODEL_PATH) -> NameModel:
    """The shipped model (read once per process)."""
    with np.load(path, allow_pickle=False) as data:
        vocabulary = {str(name): i for i, name in enumerate(data["vocabulary"].tolist())}
        weights = np.ascontiguousarray(data["weights"], dtype=np.float32)
        sets = {name: frozenset(data[f"gazetteer_{name}"].tolist()) for name in GAZETTEERS}
        connectors = frozenset(data["connectors"].tolist())
    if weights.shape != (len(vocabulary), len(CLASSES)):
        raise ValueError(f"{path}: weights of shape {weights.shape} for {len(vocabulary)} features")
    return NameModel(vocabulary, weights, Lexicon(sets, connectors))


# Text tagged per pass: bounds the tokens held in memory (about 60,000, some
# 8 MB), large enough that the per-call lookups of repeated words pay off.
BLOCK_CHARS = 256 * 1024


def blocks(text: str, size: int = BLOCK_CHARS) -> Iterator[tuple[int, int]]:
    """``(start, end)`` pieces of ``text`` of at most ``size`` characters, cut at a
    line break (or else a space) in their last eighth where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            floor = end - size // 8
            cut = text.rfind("\n", floor, end)
            if cut == -1:
                cut = text.rfind(" ", floor, end)
            if cut > start:
                end = cut + 1
        yield start, end
        start = end


# A number standing as a word (12, 4B, 75002), not a digit inside one (IPv6).
_HOUSE_NUMBER = re.compile(r"(?<![^\W\d_])\d")


def address_shaped(value: str) -> bool:
    """Whether ``value`` can be a street address: a number standing as a word and
    a word with a lower-case letter ("1,299.00 EUR" is a price, "IPv6" no street)."""
    return _HOUSE_NUMBER.search(value) is not None and any(c.islower() for c in value)


def _place_shaped(value: str) -> bool:
    """Whether ``value`` can be a place: no digit, and it opens on a capital."""
    return value[:1].isupper() and not any(c.isdigit() for c in value)


def find(
    text: str,
    model: NameModel | None = None,
    date_spans: Sequence[tuple[int, int]] | None = None,
) -> Iterator[tuple[str, int, int]]:
    """``(kind, start, end)`` of the names, addresses and places in ``text``, block
    by block (``date_spans``: ``dates(text)``, when the caller has it already; it
    stands for a block's only where the text is one block)."""
    model = model or load()
    for start, end in blocks(text):
        piece = text[start:end]
        whole = start == 0 and end == len(text)
        for kind, s, e in model.find(piece, date_spans if whole else None):
            if kind != ADDRESS or address_shaped(piece[s:e]):
                yield kind, start + s, start + e
            elif _place_shaped(piece[s:e]):
                # An address without a house number is a town or a street
                # named alone: personal data all the same, kept as a place.
                yield PLACE, start + s, start + e
