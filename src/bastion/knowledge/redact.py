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

The patterns, checksums and digit-run logic live in
:mod:`bastion.safety.pii`, which also recognises more kinds and feeds the
reversible vault (:mod:`bastion.safety.vault`); this masking redactor is
kept for callers that want irreversible ``[KIND]`` placeholders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from bastion.safety.pii_patterns import (
    CARD_RUN_RE,
    EMAIL_RE,
    IBAN_RE,
    NINO_RE,
    NIR_RE,
    PHONE_RUN_RE,
    SSN_RE,
    DigitRun,
    card_windows,
    iban_valid,
    luhn_valid,
    nir_valid,
    phone_windows,
)

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


def _replace(run: DigitRun, windows: list[tuple[int, int]], placeholder: str, whole: bool) -> str:
    pieces: list[str] = []
    cursor = 0
    for start, end in run.spans(windows, whole):
        pieces.append(run.text[cursor:start])
        pieces.append(placeholder)
        cursor = end
    pieces.append(run.text[cursor:])
    return "".join(pieces)


class BasicRedactor:
    """Regex-and-checksum masking of e-mail, IBAN, national ID, card and phone numbers.

    Each pattern runs over the output of the previous one, so a placeholder
    blocks what it replaced (see :data:`bastion.safety.pii_patterns.NOT_AFTER`).
    """

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
            run = DigitRun(match.group())
            windows = card_windows(run)
            if not windows:
                return run.text
            bump(CARD, len(windows))
            return _replace(run, windows, _placeholder(CARD), whole=False)

        def phone(match: re.Match[str]) -> str:
            run = DigitRun(match.group())
            windows = phone_windows(run)
            if not windows:
                return run.text
            bump(PHONE, len(windows))
            return _replace(run, windows, _placeholder(PHONE), whole=True)

        text = EMAIL_RE.sub(email, text)
        text = IBAN_RE.sub(iban, text)
        text = NIR_RE.sub(nir, text)
        text = SSN_RE.sub(national_id, text)
        text = NINO_RE.sub(national_id, text)
        # Cards before phones, so that a card number is not half taken for one.
        text = CARD_RUN_RE.sub(card, text)
        text = PHONE_RUN_RE.sub(phone, text)
        return Redaction(text=text, counts=counts)
