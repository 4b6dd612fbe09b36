"""Redact personal data from text before it is indexed.

A multi-tenant knowledge base must not turn uploaded documents into a search
index of customers' contact and payment details, so text is redacted before
it is chunked and embedded. :class:`BasicRedactor` replaces, in this order:

``[EMAIL]``
    e-mail addresses (the RFC 5322 ``dot-atom`` subset people actually write).
``[IBAN]``
    International Bank Account Numbers, ISO 13616-1: a country code, two check
    digits and an alphanumeric BBAN, printed in groups of four or not; only
    if the ISO 7064 MOD 97-10 check (remainder 1) passes.
``[NATIONAL_ID]``
    French NIR (INSEE number: 13 digits and a key of ``97 - (n mod 97)``,
    Corsica's ``2A``/``2B`` counted as 19/18); US Social Security numbers
    (``AAA-GG-SSSS`` without the never-issued area 000, 666 and 900-999,
    group 00 or serial 0000); UK National Insurance numbers (HMRC NIM39110:
    two prefix letters, six digits, suffix A-D; D, F, I, Q, U, V are never a
    prefix letter, O never the second, and BG, GB, KN, NK, NT, TN, ZZ are
    not allocated, which also leaves out HMRC's specimen ``QQ 12 34 56 C``).
``[CARD]``
    payment card numbers, ISO/IEC 7812-1: 13-19 digits, unbroken or printed
    in the usual groups (4-4-4-4, 4-6-5, ...), only if the Luhn check passes.
``[PHONE]``
    telephone numbers of 8-15 digits (the ITU-T E.164 maximum): ``+``
    international forms, national numbers with a ``0`` trunk prefix or a
    parenthesised area code, and North American 3-3-4 numbers. Dates
    (2026-11-29, 29/11/2026), years, ``#12345`` order numbers and 3-2-4
    SSN-shaped numbers are left alone.

Every pattern is precompiled and free of ambiguous nested repetition, and a
candidate run of digit groups is checked window by window with bounded work
per group, so redaction takes time linear in the input. Placeholders contain
no digits and no ``@``, and each pattern treats a placeholder next to it like
the characters it replaced, so redacting twice gives the same text as
redacting once.

Counts are keyed by kind (``email``, ``iban``, ``national_id``, ``card``,
``phone``) and only list kinds that were found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

__all__ = [
    "CARD",
    "EMAIL",
    "IBAN",
    "NATIONAL_ID",
    "PHONE",
    "BasicRedactor",
    "Redaction",
    "Redactor",
    "iban_valid",
    "luhn_valid",
    "nir_valid",
]


@dataclass(frozen=True)
class Redaction:
    """Redacted text and how many of each kind (``email``, ``phone``, ...) were replaced."""

    text: str
    counts: dict[str, int]


class Redactor(Protocol):
    """Anything that removes personal data from text before it is indexed."""

    def redact(self, text: str) -> Redaction: ...


EMAIL = "email"
IBAN = "iban"
NATIONAL_ID = "national_id"
CARD = "card"
PHONE = "phone"


def _placeholder(kind: str) -> str:
    return f"[{kind.upper()}]"


# --- checksums --------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The ISO/IEC 7812-1 Annex B (Luhn) check over a string of ASCII digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    """ISO 13616-1 / ISO 7064 MOD 97-10 over an IBAN without spaces."""
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    # Letters count as two-digit numbers A=10 .. Z=35.
    numeric = "".join(str(int(char, 36)) for char in rearranged)
    return int(numeric) % 97 == 1


def nir_valid(compact: str) -> bool:
    """The INSEE key of a 15-character NIR: ``97 - (first 13 digits mod 97)``."""
    body = compact[:13].upper().replace("2A", "19").replace("2B", "18")
    if not body.isdigit():
        return False
    return 97 - int(body) % 97 == int(compact[13:])


# --- patterns ---------------------------------------------------------------

# A placeholder counts as the letters and digits it replaced: a match that
# was blocked by a neighbouring character stays blocked once that neighbour has
# become "[CARD]", which makes redaction idempotent.
_NOT_AFTER = r"(?<![A-Z_]\])"  # not right after a placeholder such as [CARD]
_NOT_BEFORE = r"(?!\[[A-Z])"  # nor right before one

# Starting only where no local-part character precedes keeps the scan linear
# (otherwise every position inside a long word would be retried). The domain
# ends in an alphabetic top-level label (RFC 1123 section 2.1).
_EMAIL = re.compile(
    rf"(?<![A-Za-z0-9._%+-]){_NOT_AFTER}[A-Za-z0-9._%+-]+@"
    rf"(?:[A-Za-z0-9-]+\.)+[A-Za-z]{{2,63}}(?![A-Za-z0-9-]){_NOT_BEFORE}"
)

_IBAN = re.compile(
    rf"(?<![A-Za-z0-9]){_NOT_AFTER}[A-Z]{{2}}\d{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}"
    rf"(?: ?[A-Z0-9]{{1,3}})?(?![A-Za-z0-9]){_NOT_BEFORE}"
)

_NIR = re.compile(
    rf"(?<![A-Za-z0-9]){_NOT_AFTER}[1-478] ?\d{{2}} ?\d{{2}} ?(?:\d{{2}}|2[ABab])"
    rf" ?\d{{3}} ?\d{{3}} ?\d{{2}}(?![A-Za-z0-9]){_NOT_BEFORE}"
)
_SSN = re.compile(
    rf"(?<![\w-]){_NOT_AFTER}(?!000|666|9)\d{{3}}([- ])(?!00)\d{{2}}\1(?!0000)\d{{4}}"
    rf"(?![\w-]|\.\d|\.\[[A-Z]){_NOT_BEFORE}"
)
_NINO = re.compile(
    rf"(?<![A-Za-z0-9]){_NOT_AFTER}(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    rf" ?\d{{2}} ?\d{{2}} ?\d{{2}} ?[A-D](?![A-Za-z0-9]){_NOT_BEFORE}"
)

# Digit groups joined by single separators: one unambiguous repetition, so a
# long run of digits and separators is consumed once, in linear time. A card
# starts with a group of at least four digits and a phone number has several
# groups or eight digits, which keeps years and short numbers in prose from
# reaching the (slower) Python checks at all.
_CARD_RUN = re.compile(rf"(?<!\d)(?<!\d[.,])(?<![A-Z_]\][.,]){_NOT_AFTER}\d{{4,}}(?:[ -]\d+)*")
_PHONE_ELEMENT = r"(?:\(\d{1,6}\)|\d+)"
_PHONE_SEP = r"(?:[ ./-]|(?<=\))|(?=\())"
_PHONE_RUN = re.compile(
    rf"(?<![\w+#/.-]){_NOT_AFTER}"
    rf"(?:(?:\+ ?)?{_PHONE_ELEMENT}(?:{_PHONE_SEP}{_PHONE_ELEMENT})+|\+?\d{{8,}})"
)
# One digit group of a run: the separator before it, an optional "(", the
# digits and an optional ")".
_GROUP = re.compile(r"([^\d(]*)(\(?)(\d+)(\)?)")

# Group layouts cards are printed in, longest first (ISO/IEC 7812 numbers are
# 13-19 digits; 4-6-5 is American Express, 4-6-4 Diners Club).
_CARD_LAYOUTS: tuple[list[int], ...] = (
    [4, 4, 4, 4, 3],
    [4, 4, 4, 4],
    [4, 6, 5],
    [4, 4, 4, 3],
    [4, 6, 4],
)
_NANP = [3, 3, 4]
_NANP_WITH_1 = [1, 3, 3, 4]
_SSN_SHAPE = [3, 2, 4]
_MIN_PHONE_DIGITS = 8
_MAX_PHONE_DIGITS = 15  # ITU-T E.164


class _Run:
    """A run of digit groups, as parallel lists (cheaper than an object per group)."""

    __slots__ = ("digits", "lengths", "parenthesised", "parts", "seps", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        # (separator before, "(" or "", digits, ")" or "") for each group; they
        # tile the run, so spans are only computed when something is replaced.
        self.parts: list[tuple[str, str, str, str]] = _GROUP.findall(text)
        self.digits = [part[2] for part in self.parts]
        self.lengths = [len(digits) for digits in self.digits]
        self.seps = [part[0] for part in self.parts]
        self.parenthesised = [bool(part[1]) for part in self.parts]

    def replace(self, windows: list[tuple[int, int]], placeholder: str, whole: bool) -> str:
        """Replace each [first, last) group window with ``placeholder``.

        A window keeps the parentheses around its groups; with ``whole`` a
        window at the first group also takes whatever precedes it in the run
        (the ``+`` of an international number).
        """
        ends = list(accumulate(sum(map(len, part)) for part in self.parts))
        pieces: list[str] = []
        cursor = 0
        for first, last in windows:
            start = ends[first - 1] if first else 0
            if not (whole and first == 0):
                start += len(self.seps[first])
            pieces.append(self.text[cursor:start])
            pieces.append(placeholder)
            cursor = ends[last - 1]
        pieces.append(self.text[cursor:])
        return "".join(pieces)


# --- the redactor -----------------------------------------------------------


class BasicRedactor:
    """Regex-and-checksum redaction of e-mail, IBAN, national ID, card and phone numbers."""

    def redact(self, text: str) -> Redaction:
        counts: dict[str, int] = {}

        def bump(kind: str, n: int = 1) -> None:
            counts[kind] = counts.get(kind, 0) + n

        def email(match: re.Match[str]) -> str:
            bump(EMAIL)
            return _placeholder(EMAIL)

        def national_id(match: re.Match[str]) -> str:
            bump(NATIONAL_ID)
            return _placeholder(NATIONAL_ID)

        def iban(match: re.Match[str]) -> str:
            # The last groups may be a following word or number that the
            # pattern swallowed; retry without them before giving up.
            parts = match.group().split(" ")
            for keep in range(len(parts), 0, -1):
                if iban_valid("".join(parts[:keep])):
                    bump(IBAN)
                    rest = " ".join(parts[keep:])
                    return _placeholder(IBAN) + (" " + rest if rest else "")
            return match.group()

        def nir(match: re.Match[str]) -> str:
            if not nir_valid(match.group().replace(" ", "")):
                return match.group()
            bump(NATIONAL_ID)
            return _placeholder(NATIONAL_ID)

        def card(match: re.Match[str]) -> str:
            run = _Run(match.group())
            windows = _card_windows(run)
            if not windows:
                return run.text
            bump(CARD, len(windows))
            return run.replace(windows, _placeholder(CARD), whole=False)

        def phone(match: re.Match[str]) -> str:
            run = _Run(match.group())
            windows = _phone_windows(run)
            if not windows:
                return run.text
            bump(PHONE, len(windows))
            return run.replace(windows, _placeholder(PHONE), whole=True)

        text = _EMAIL.sub(email, text)
        text = _IBAN.sub(iban, text)
        text = _NIR.sub(nir, text)
        text = _SSN.sub(national_id, text)
        text = _NINO.sub(national_id, text)
        # Cards before phones, so that a card number is not half taken for one.
        text = _CARD_RUN.sub(card, text)
        text = _PHONE_RUN.sub(phone, text)
        return Redaction(text=text, counts=counts)


def _card_windows(run: _Run) -> list[tuple[int, int]]:
    """Non-overlapping [first, last) group windows that are Luhn-valid card numbers."""
    lengths, digits, seps = run.lengths, run.digits, run.seps
    windows: list[tuple[int, int]] = []
    i = 0
    while i < len(lengths):
        found = 0
        if 13 <= lengths[i] <= 19:
            found = 1 if luhn_valid(digits[i]) else 0
        elif lengths[i] == 4:
            for layout in _CARD_LAYOUTS:
                last = i + len(layout)
                if (
                    lengths[i:last] == layout
                    and len(set(seps[i + 1 : last])) == 1
                    and luhn_valid("".join(digits[i:last]))
                ):
                    found = len(layout)
                    break
        if found:
            windows.append((i, i + found))
            i += found
        else:
            i += 1
    return windows


def _date_groups(run: _Run) -> set[int]:
    """Indexes of groups forming a date with a four-digit year: 2026-11-29, 29/11/2026."""
    dated: set[int] = set()
    if not any(sep in run.text for sep in "-/."):
        return dated
    lengths, seps = run.lengths, run.seps
    for i in range(len(lengths) - 2):
        if seps[i + 1] != seps[i + 2] or seps[i + 1] not in {"-", "/", "."}:
            continue
        la, lb, lc = lengths[i : i + 3]
        if lb <= 2 and ((la == 4 and lc <= 2) or (lc == 4 and la <= 2)):
            dated.update((i, i + 1, i + 2))
    return dated


def _phone_windows(run: _Run) -> list[tuple[int, int]]:
    """Non-overlapping [first, last) group windows that look like telephone numbers."""
    lengths, digits = run.lengths, run.digits
    plus = run.text.startswith("+")
    dated = _date_groups(run)
    windows: list[tuple[int, int]] = []
    count = len(lengths)
    i = 0
    while i < count:
        first = digits[i]
        # A national trunk prefix (020 ...) or the international 00 prefix
        # (0044 ...), but not a zero-padded reference (000123...).
        zero = first.startswith("0") and not first.startswith("000")
        best = 0
        if (plus and i == 0) or run.parenthesised[i] or zero:
            # International, "(area)" or trunk-prefixed: the longest window of
            # 8-15 digits that does not run into a date.
            total = 0
            j = i
            while j < count and j not in dated:
                total += lengths[j]
                if total > _MAX_PHONE_DIGITS:
                    break
                j += 1
                if total >= _MIN_PHONE_DIGITS:
                    best = j
            if best == i + 1 and not (plus and i == 0) and not 10 <= lengths[i] <= 11:
                best = 0  # unbroken and too short for a national number: 01234567
            elif best == i + 3 and lengths[i:best] == _SSN_SHAPE and run.seps[i + 1] == "-":
                best = 0  # SSN-shaped
        elif lengths[i : i + 3] == _NANP:
            best = i + 3  # North American 555-010-0199
        elif first == "1" and lengths[i : i + 4] == _NANP_WITH_1:
            best = i + 4  # 1-800-555-0199
        if best and dated.isdisjoint(range(i, best)):
            windows.append((i, best))
            i = best
        else:
            i += 1
    return windows
