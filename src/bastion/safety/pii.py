"""Finding personal data and secrets in text, without a database (CHECKLIST M3).

:class:`PiiRecognizer` returns the spans of what it recognises; it is pure
(no I/O; its only state is a bounded memo of phone-validity answers, keyed
by digest), so the gateway can call it on every prompt and on every
model answer (:func:`scan_output`), and :class:`bastion.safety.vault.PiiVault`
replaces the spans with reversible tokens. What is recognised, and how:

``email``
    the RFC 5322 ``dot-atom`` subset people actually write, with an
    alphabetic top-level label (RFC 1123 section 2.1).
``phone``
    runs of digit groups shaped like telephone numbers (``+`` international
    forms, a ``0`` trunk prefix or a parenthesised area code, North American
    3-3-4), 8-15 digits (ITU-T E.164), dates and SSN shapes left alone; an
    extension (``x123``, ``ext. 123``) is included. A run with no telling
    shape (``3516014891``, ``92 9007-3878``) counts only if ``phonenumbers``
    (Google's libphonenumber metadata) says it is a valid number in one of the
    configured regions; so does an 8-digit trunk-prefixed run (a postcode
    otherwise). Those checks have a budget per call; past it a candidate is
    taken (over-redacting) rather than checked. Values are normalised to
    E.164 for their token.
``card``
    payment card numbers, ISO/IEC 7812-1: 13-19 digits (12 unbroken ones
    starting with 5 or 6, Maestro's range), unbroken or in the usual groups,
    only if the Luhn check (Annex B) passes.
``iban``
    ISO 13616-1, only if the ISO 7064 MOD 97-10 check passes.
``us_ssn``
    ``AAA-GG-SSSS`` (dashes or spaces) without the never-issued area 000, 666
    and 900-999, group 00 or serial 0000 (SSA; the SSN has no check digit).
``uk_nino``
    HMRC NIM39110: valid prefix letters, six digits, suffix A-D.
``fr_nir``
    INSEE number, key ``97 - (n mod 97)`` (Corsica's 2A/2B as 19/18).
``es_dni``
    Spanish DNI/NIF and NIE: the control letter ``TRWAGMYFPDXBNJZSQVHLCKE[n mod 23]``.
``it_fiscal_code``
    Italian codice fiscale (DM 23/12/1976), omocodia letters allowed, with
    its check character.
``br_cpf``
    Brazilian CPF, both mod-11 check digits (all-equal digits refused).
``nl_bsn``
    Dutch BSN, the "elfproef" (11-test); nine digits pass it one time in
    eleven, so only after the word BSN, burgerservicenummer or sofinummer.
``ip_address``
    IPv4 and IPv6 addresses, validated by :mod:`ipaddress`.
``secret``
    API keys by provider prefix (OpenAI ``sk-``, Stripe ``sk_live_``/``rk_``,
    GitHub ``ghp_``/``gho_``/``ghs_``/``ghu_``/``ghr_``/``github_pat_``, AWS
    ``AKIA``/``ASIA``, Slack ``xox?-``, Google ``AIza``, GitLab ``glpat-``,
    Hugging Face ``hf_``), JSON Web Tokens, PEM private-key blocks, and any
    other run of 24+ token characters mixing upper case, lower case and
    digits whose Shannon entropy is high (a random credential, not a word).

Not covered: person names and postal addresses. Doing them honestly needs a
named-entity model, and none ships offline with Bastion (Presidio's NER
wants a spaCy model downloaded at run time); a regex over capitalised words
would claim a coverage it does not have.

Overlaps are settled by priority (the order above is not it: secrets first,
then e-mail, IBAN, national ids, cards, IP addresses, phones), so a card
number is never half taken for a phone number. Vault tokens (``⟦EMAIL_...⟧``)
are left alone only when the caller vouches for them (``opaque``: the real
tokens of the tenant's vault, which :class:`~bastion.safety.vault.PiiVault`
looks up), so a token is never tokenized again; anything else shaped like a
token — ``⟦CARD_4111111111111111⟧`` is one — is scanned like any text. Every
pattern is precompiled and free of ambiguous nested repetition, so the scan
is linear in the input; inputs over ``max_chars`` are refused.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

import phonenumbers

from bastion.api.problems import Problem, problem_type

__all__ = [
    "BR_CPF",
    "CARD",
    "EMAIL",
    "ES_DNI",
    "FR_NIR",
    "IBAN",
    "IP_ADDRESS",
    "IT_FISCAL_CODE",
    "KINDS",
    "MAX_TEXT_CHARS",
    "NL_BSN",
    "PHONE",
    "SECRET",
    "TOKEN_PATTERN",
    "UK_NINO",
    "US_SSN",
    "Entity",
    "OutputScan",
    "PiiInputNotText",
    "PiiInputTooLarge",
    "PiiRecognizer",
    "iban_valid",
    "luhn_valid",
    "mask",
    "mask_email",
    "nir_valid",
    "normalize",
    "scan_output",
]

EMAIL = "email"
PHONE = "phone"
CARD = "card"
IBAN = "iban"
US_SSN = "us_ssn"
UK_NINO = "uk_nino"
FR_NIR = "fr_nir"
ES_DNI = "es_dni"
IT_FISCAL_CODE = "it_fiscal_code"
BR_CPF = "br_cpf"
NL_BSN = "nl_bsn"
IP_ADDRESS = "ip_address"
SECRET = "secret"  # noqa: S105 - a kind name, not a password

KINDS: tuple[str, ...] = (
    SECRET,
    EMAIL,
    IBAN,
    IT_FISCAL_CODE,
    FR_NIR,
    US_SSN,
    UK_NINO,
    ES_DNI,
    BR_CPF,
    NL_BSN,
    CARD,
    IP_ADDRESS,
    PHONE,
)
"""Every kind, in the priority order that settles overlaps."""

# Regions whose national formats phone candidates are tried in (ISO 3166-1).
DEFAULT_REGIONS: tuple[str, ...] = ("US", "GB", "FR", "DE", "ES", "IT", "NL", "BR", "JP", "IN")

# 4 Mi characters: a whole book. The ingest path is capped at the upload limit
# well below this; the bound keeps one call's CPU time and memory known.
MAX_TEXT_CHARS = 4 * 1024 * 1024

# The shape of a vault token (bastion.safety.vault). The shape proves nothing (a
# card number has sixteen hex digits): only the vault says which are tokens.
TOKEN_PATTERN = re.compile(r"⟦([A-Z][A-Z_]{1,30})_([0-9a-f]{16})⟧")


class PiiInputTooLarge(Problem):
    type = problem_type("pii-input-too-large")
    title = "The text is too large to scan for personal data"
    status = 413


class PiiInputNotText(Problem):
    type = problem_type("pii-input-not-text")
    title = "The input is not valid UTF-8 text"
    status = 422


@dataclass(frozen=True, slots=True)
class Entity:
    """One recognised value: its kind and ``text[start:end]``."""

    kind: str
    start: int
    end: int
    value: str


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


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni_valid(compact: str) -> bool:
    """Spanish DNI (8 digits) or NIE (X/Y/Z + 7 digits) and its mod-23 letter."""
    body, letter = compact[:-1], compact[-1]
    if body[0] in "XYZ":
        body = str("XYZ".index(body[0])) + body[1:]
    return body.isdigit() and _DNI_LETTERS[int(body) % 23] == letter


# Codice fiscale: values of the characters in odd (1st, 3rd, ...) positions.
# Digits 0-9 count as the letters A-J; then A..Z.
_CF_ODD_LETTERS = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10]
_CF_ODD = dict(
    zip(
        "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        [*_CF_ODD_LETTERS[:10], *_CF_ODD_LETTERS, 22, 25, 24, 23],
        strict=True,
    )
)


def fiscal_code_valid(code: str) -> bool:
    """The check character of an Italian codice fiscale (16 characters)."""
    total = 0
    for i, char in enumerate(code[:15]):
        if i % 2 == 0:
            total += _CF_ODD[char]
        else:
            total += int(char) if char.isdigit() else ord(char) - 65
    return chr(65 + total % 26) == code[15]


def cpf_valid(digits: str) -> bool:
    """Both mod-11 check digits of a Brazilian CPF (11 digits, not all equal)."""
    if len(set(digits)) == 1:
        return False
    numbers = [ord(c) - 48 for c in digits]
    for size in (9, 10):
        total = sum(n * (size + 1 - i) for i, n in enumerate(numbers[:size]))
        if (total * 10) % 11 % 10 != numbers[size]:
            return False
    return True


def bsn_valid(digits: str) -> bool:
    """The Dutch "elfproef": sum of digits weighted 9..2 minus the last, mod 11."""
    numbers = [ord(c) - 48 for c in digits]
    total = sum(n * (9 - i) for i, n in enumerate(numbers[:8])) - numbers[8]
    return total % 11 == 0 and numbers[0] + numbers[1] > 0


def _entropy(text: str) -> float:
    """Shannon entropy in bits per character of ``text``'s character distribution."""
    size = len(text)
    return -sum(n / size * math.log2(n / size) for n in Counter(text).values())


# --- patterns ---------------------------------------------------------------
# Shared with bastion.knowledge.redact's masking redactor, whose "[CARD]"
# placeholders count as the characters they replaced (hence the lookarounds).

NOT_AFTER = r"(?<![A-Z_]\])"  # not right after a placeholder such as [CARD]
NOT_BEFORE = r"(?!\[[A-Z])"  # nor right before one

# Speed: each pattern starts with a plain character class and checks what
# precedes that first character with a lookbehind placed *after* it
# ("\d(?<![\w-]\d)" rather than "(?<![\w-])\d"). A leading class lets the
# regex engine skip ahead to candidate characters in C; a leading lookbehind
# makes it try every position (measured: 10-15x on prose).
_NA1 = r"(?<![A-Z_]\].)"  # NOT_AFTER, once the first character is consumed

# Starting only where no local-part character precedes keeps the scan linear
# (otherwise every position inside a long word would be retried).
EMAIL_RE = re.compile(
    rf"(?<![A-Za-z0-9._%+-]){NOT_AFTER}[A-Za-z0-9._%+-]+@"
    rf"(?:[A-Za-z0-9-]+\.)+[A-Za-z]{{2,63}}(?![A-Za-z0-9-]){NOT_BEFORE}"
)
_EMAIL_LOCAL = frozenset(string.ascii_letters + string.digits + "._%+-")
_EMAIL_DOMAIN = re.compile(rf"(?:[A-Za-z0-9-]+\.)+[A-Za-z]{{2,63}}(?![A-Za-z0-9-]){NOT_BEFORE}")
IBAN_RE = re.compile(
    rf"[A-Z](?<![A-Za-z0-9].){_NA1}[A-Z]\d{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}"
    rf"(?: ?[A-Z0-9]{{1,3}})?(?![A-Za-z0-9]){NOT_BEFORE}"
)
NIR_RE = re.compile(
    rf"[1-478](?<![A-Za-z0-9].){_NA1} ?\d{{2}} ?\d{{2}} ?(?:\d{{2}}|2[ABab])"
    rf" ?\d{{3}} ?\d{{3}} ?\d{{2}}(?![A-Za-z0-9]){NOT_BEFORE}"
)
# Area 000, 666 and 900-999 never issued: "(?<!9)" looks at the first digit.
SSN_RE = re.compile(
    rf"\d(?<![\w-].){_NA1}(?<!9)(?!(?<=0)00|(?<=6)66)\d{{2}}([- ])(?!00)\d{{2}}\1(?!0000)\d{{4}}"
    rf"(?![\w-]|\.\d|\.\[[A-Z]){NOT_BEFORE}"
)
NINO_RE = re.compile(
    rf"[A-CEGHJ-PR-TW-Z](?<![A-Za-z0-9].){_NA1}"
    rf"(?!(?<=B)G|(?<=G)B|(?<=K)N|(?<=N)[KT]|(?<=T)N|(?<=Z)Z)[A-CEGHJ-NPR-TW-Z]"
    rf" ?\d{{2}} ?\d{{2}} ?\d{{2}} ?[A-D](?![A-Za-z0-9]){NOT_BEFORE}"
)
_DNI_RE = re.compile(
    r"[\dXYZ](?<![A-Za-z0-9].)(?:(?<=\d)\d{7}|(?<=[XYZ])-?\d{7})[- ]?[A-Z](?![A-Za-z0-9])"
)
_CF_DIGIT = "[0-9LMNP-V]"  # omocodia replaces digits with L..V
_CF_RE = re.compile(
    rf"[A-Z](?<![A-Za-z0-9].)[A-Z]{{5}}{_CF_DIGIT}{{2}}[ABCDEHLMPRST]{_CF_DIGIT}{{2}}"
    rf"[A-Z]{_CF_DIGIT}{{3}}[A-Z](?![A-Za-z0-9])"
)
_CPF_RE = re.compile(r"\d(?<![\d.-].)(?:\d{2}\.\d{3}\.\d{3}-\d{2}|\d{10})(?![\d-]|\.\d)")
_BSN_RE = re.compile(
    r"\b(?:BSN|burgerservicenummer|sofinummer)\b[^0-9\n]{0,30}?(?<!\d)(\d{4}\.?\d{2}\.?\d{3})(?!\d)",
    re.IGNORECASE,
)
_IPV4_RE = re.compile(r"\d(?<![\w.].)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\d)")
_IPV6_RE = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.].)(?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)

# Known prefixes; the character before is checked in Python (see _secrets).
_SECRET_RE = re.compile(
    r"(?:"
    r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT (RFC 7519)
    r")(?![A-Za-z0-9_-])"
    # PEM private keys (RFC 7468), bounded so an unterminated block stays linear.
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[A-Za-z0-9+/=\s]{0,8192}?"
    r"-----END (?:[A-Z]+ )?PRIVATE KEY-----"
)
_UPPER_ = frozenset(string.ascii_uppercase + "_")
_SECRET_NOT_AFTER = frozenset(string.ascii_letters + string.digits + "_-")
_ENTROPY_CANDIDATE = re.compile(
    r"[A-Za-z0-9+/_=-](?<![A-Za-z0-9+/_=@.-].)[A-Za-z0-9+/_=-]{23,511}(?![A-Za-z0-9+/_=@-])"
)
_ENTROPY_MIN = 4.0  # bits per character; English words and identifiers stay below


def _high_entropy(candidate: str) -> bool:
    if not (
        any(c.isupper() for c in candidate)
        and any(c.islower() for c in candidate)
        and any(c.isdigit() for c in candidate)
    ):
        return False
    # A sample of n characters cannot exceed log2(n) bits: scale for short ones.
    return _entropy(candidate) >= min(_ENTROPY_MIN, 0.85 * math.log2(len(candidate)))


# Digit groups joined by single separators: one unambiguous repetition, so a
# long run of digits and separators is consumed once, in linear time.
CARD_RUN_RE = re.compile(rf"\d(?<!\d.)(?<!\d[.,].)(?<![A-Z_]\][.,].){_NA1}\d{{3,}}(?:[ -]\d+)*")
_PHONE_ELEMENT = r"(?:\(\d{1,6}\)|\d+)"
_PHONE_SEP = r"(?:[ ./-]|(?<=\))|(?=\())"
PHONE_RUN_RE = re.compile(
    rf"(?<![\w+#/.-]){NOT_AFTER}"
    rf"(?:(?:\+ ?)?{_PHONE_ELEMENT}(?:{_PHONE_SEP}{_PHONE_ELEMENT})+|\+?\d{{8,}})"
)
# Where a phone run can be: PHONE_RUN_RE (whose first item is not a plain
# class) only runs inside these.
_PHONE_REGION = re.compile(r"[+(\d][\d+() ./-]*")
_EXTENSION = re.compile(r" ?(?:x|ext\.? ?|extension )\d{1,6}(?!\w)", re.IGNORECASE)
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


class DigitRun:
    """A run of digit groups, as parallel lists (cheaper than an object per group)."""

    __slots__ = ("digits", "lengths", "parenthesised", "parts", "seps", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        # (separator before, "(" or "", digits, ")" or "") for each group; they
        # tile the run, so spans are only computed when something is found.
        self.parts: list[tuple[str, str, str, str]] = _GROUP.findall(text)
        self.digits = [part[2] for part in self.parts]
        self.lengths = [len(digits) for digits in self.digits]
        self.seps = [part[0] for part in self.parts]
        self.parenthesised = [bool(part[1]) for part in self.parts]

    def spans(self, windows: list[tuple[int, int]], whole: bool) -> list[tuple[int, int]]:
        """Character spans, within the run, of each [first, last) group window.

        A window keeps the parentheses around its groups; with ``whole`` a
        window at the first group also takes whatever precedes it in the run
        (the ``+`` of an international number).
        """
        ends = list(accumulate(sum(map(len, part)) for part in self.parts))
        out = []
        for first, last in windows:
            start = ends[first - 1] if first else 0
            if not (whole and first == 0):
                start += len(self.seps[first])
            out.append((start, ends[last - 1]))
        return out


def card_windows(run: DigitRun) -> list[tuple[int, int]]:
    """Non-overlapping [first, last) group windows that are Luhn-valid card numbers."""
    lengths, digits, seps = run.lengths, run.digits, run.seps
    windows: list[tuple[int, int]] = []
    i = 0
    while i < len(lengths):
        found = 0
        if 13 <= lengths[i] <= 19 or (lengths[i] == 12 and digits[i][0] in "56"):
            # 12 digits only with a Maestro-range first digit (5, 6).
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


def _date_groups(run: DigitRun) -> set[int]:
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


def phone_windows(run: DigitRun) -> list[tuple[int, int]]:
    """Non-overlapping [first, last) group windows shaped like telephone numbers."""
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


# --- normalisation (what a vault token is computed over) --------------------


def normalize(kind: str, value: str, regions: Sequence[str] = DEFAULT_REGIONS) -> str:
    """The canonical form of a value, so that spellings of one value share a token.

    E-mail addresses are case-folded (domains are case-insensitive; local
    parts nearly always are in practice), phone numbers become E.164 when
    they parse, IP addresses their compressed form, and ids and numbers lose
    their separators and case.
    """
    if kind == EMAIL:
        return value.casefold()
    if kind == PHONE:
        number = _parse_phone(value, regions)
        if number is not None:
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        return "".join(c for c in value if c.isdigit())
    if kind == IP_ADDRESS:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            return value
    if kind == SECRET:
        return value
    return "".join(c for c in value if c.isalnum()).upper()


def _parse_phone(text: str, regions: Sequence[str]) -> phonenumbers.PhoneNumber | None:
    """The number ``text`` is a possible telephone number of, trying each region."""
    main = _EXTENSION.sub("", text)
    for region in (None,) if main.lstrip().startswith("+") else regions:
        try:
            number = phonenumbers.parse(main, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_possible_number(number):
            return number
    return None


_VALIDATION_BUDGET = 256


@functools.cache
def _plan(region: str) -> tuple[frozenset[int], str]:
    """The possible national number lengths of ``region`` and its trunk prefix."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if metadata is None or metadata.general_desc is None:
        return frozenset(range(1, 18)), ""
    return frozenset(metadata.general_desc.possible_length or ()), metadata.national_prefix or ""


# A chat resends its whole history every turn: the same numbers come back.
# Keyed by a digest, so the memo holds no phone number in the clear; cleared
# when full rather than ordered (a bound, not an LRU).
_VALIDITY: dict[bytes, bool] = {}
_VALIDITY_MAX = 16384


def _valid_phone(text: str, regions: Sequence[str]) -> bool:
    """Whether ``text`` is a number in use in one of ``regions``' numbering plans."""
    key = hashlib.blake2b(f"{text}\x00{','.join(regions)}".encode(), digest_size=16).digest()
    known = _VALIDITY.get(key)
    if known is None:
        if len(_VALIDITY) >= _VALIDITY_MAX:
            _VALIDITY.clear()
        known = _VALIDITY[key] = _check_phone(text, regions)
    return known


def _check_phone(text: str, regions: Sequence[str]) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    for region in regions:
        lengths, trunk = _plan(region)
        national = len(digits) - (len(trunk) if trunk and digits.startswith(trunk) else 0)
        if national not in lengths and len(digits) not in lengths:
            continue  # a parse could not make it valid there: skip the cost
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return True
    return False


# --- the recognizer ---------------------------------------------------------

Finder = Callable[[str], Iterator[tuple[int, int]]]


def _checked(text: str | bytes, max_chars: int) -> str:
    if isinstance(text, bytes | bytearray | memoryview):
        if len(text) > 4 * max_chars:
            raise PiiInputTooLarge(f"at most {max_chars} characters may be scanned at once")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PiiInputNotText(f"the input is not UTF-8 (byte offset {exc.start})") from None
    if len(text) > max_chars:
        raise PiiInputTooLarge(f"at most {max_chars} characters may be scanned at once")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Lone surrogates (e.g. from a JSON "\ud800" escape) are no text.
            raise PiiInputNotText(f"the input has an unpaired surrogate at {exc.start}") from None
    return text


class PiiRecognizer:
    """Finds personal data and secrets in text; pure and thread-safe.

    ``kinds`` selects what to look for (default: all of :data:`KINDS`),
    ``regions`` the countries whose national phone formats are accepted,
    ``max_chars`` the largest text :meth:`find` accepts.
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        *,
        regions: Sequence[str] = DEFAULT_REGIONS,
        max_chars: int = MAX_TEXT_CHARS,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}")
        self.kinds = tuple(kind for kind in KINDS if kind in kinds)
        self.regions = tuple(regions)
        self.max_chars = max_chars
        finders: dict[str, Finder] = {
            SECRET: self._secrets,
            EMAIL: self._emails,
            IBAN: self._ibans,
            IT_FISCAL_CODE: self._checked_regex(_CF_RE, fiscal_code_valid),
            FR_NIR: self._checked_regex(NIR_RE, nir_valid),
            US_SSN: self._regex(SSN_RE),
            UK_NINO: self._regex(NINO_RE),
            ES_DNI: self._checked_regex(_DNI_RE, dni_valid),
            BR_CPF: self._checked_regex(_CPF_RE, cpf_valid),
            NL_BSN: self._bsns,
            CARD: self._cards,
            IP_ADDRESS: self._ips,
            PHONE: self._phones,
        }
        self._finders = [(kind, finders[kind]) for kind in self.kinds]

    def find(self, text: str | bytes, *, opaque: Collection[str] = ()) -> list[Entity]:
        """Return the entities in ``text``, in order, never overlapping.

        ``opaque`` are vault tokens known to be real (of the caller's tenant):
        where one stands in ``text`` nothing is looked for. Any other text,
        token-shaped or not, is scanned.

        Raises :class:`PiiInputTooLarge` over ``max_chars`` and
        :class:`PiiInputNotText` for bytes that are not UTF-8 (or a string
        with unpaired surrogates).
        """
        text = _checked(text, self.max_chars)
        taken = bytearray(len(text))  # 1 where a span (or a real vault token) already is
        for match in TOKEN_PATTERN.finditer(text) if opaque else ():
            if match.group() in opaque:
                taken[match.start() : match.end()] = b"\x01" * (match.end() - match.start())
        found: list[Entity] = []
        for kind, finder in self._finders:
            for start, end in finder(text):
                if taken.find(1, start, end) == -1:
                    taken[start:end] = b"\x01" * (end - start)
                    found.append(Entity(kind, start, end, text[start:end]))
        found.sort(key=lambda entity: entity.start)
        return found

    # -- finders: each yields (start, end) spans of one kind ---------------

    @staticmethod
    def _regex(pattern: re.Pattern[str]) -> Finder:
        def finder(text: str) -> Iterator[tuple[int, int]]:
            for match in pattern.finditer(text):
                yield match.span()

        return finder

    @staticmethod
    def _checked_regex(pattern: re.Pattern[str], valid: Callable[[str], bool]) -> Finder:
        def finder(text: str) -> Iterator[tuple[int, int]]:
            for match in pattern.finditer(text):
                compact = "".join(c for c in match.group() if c.isalnum()).upper()
                if valid(compact):
                    yield match.span()

        return finder

    @staticmethod
    def _emails(text: str) -> Iterator[tuple[int, int]]:
        # EMAIL_RE's matches, found from each "@" outwards: prose has few "@"
        # and many letters, where a regex would try every word.
        done = 0
        at = text.find("@")
        while at != -1:
            start = at
            while start > done and text[start - 1] in _EMAIL_LOCAL and at - start < 256:
                start -= 1
            domain = _EMAIL_DOMAIN.match(text, at + 1)
            if (
                start < at
                and domain is not None
                and not (start and text[start - 1] in _EMAIL_LOCAL)
                and not (start > 1 and text[start - 1] == "]" and text[start - 2] in _UPPER_)
            ):
                yield start, domain.end()
                done = domain.end()
            at = text.find("@", max(at + 1, done))

    @staticmethod
    def _secrets(text: str) -> Iterator[tuple[int, int]]:
        # Known prefixes first; a generic candidate overlapping one is dropped
        # by find()'s overlap check.
        for match in _SECRET_RE.finditer(text):
            start = match.start()
            if start and text[start - 1] in _SECRET_NOT_AFTER and text[start] != "-":
                continue  # inside a word: "task-..." is no OpenAI key
            yield match.span()
        for match in _ENTROPY_CANDIDATE.finditer(text):
            if _high_entropy(match.group()):
                yield match.span()

    @staticmethod
    def _ibans(text: str) -> Iterator[tuple[int, int]]:
        for match in IBAN_RE.finditer(text):
            # The last groups may be a following word or number that the
            # pattern swallowed; retry without them before giving up.
            parts = match.group().split(" ")
            for keep in range(len(parts), 0, -1):
                if iban_valid("".join(parts[:keep])):
                    yield match.start(), match.start() + len(" ".join(parts[:keep]))
                    break

    @staticmethod
    def _bsns(text: str) -> Iterator[tuple[int, int]]:
        if "bsn" not in text.lower() and "nummer" not in text.lower():
            return
        for match in _BSN_RE.finditer(text):
            if bsn_valid(match.group(1).replace(".", "")):
                yield match.span(1)

    @staticmethod
    def _cards(text: str) -> Iterator[tuple[int, int]]:
        for match in CARD_RUN_RE.finditer(text):
            run = DigitRun(match.group())
            windows = card_windows(run)
            if windows:
                for start, end in run.spans(windows, whole=False):
                    yield match.start() + start, match.start() + end

    @staticmethod
    def _ips(text: str) -> Iterator[tuple[int, int]]:
        if "." in text:
            for match in _IPV4_RE.finditer(text):
                try:
                    ipaddress.IPv4Address(match.group())
                except ValueError:
                    continue
                yield match.span()
        if ":" in text:
            for match in _IPV6_RE.finditer(text):
                candidate = match.group()
                # Three groups, or two around "::" (fe80::1); "10:30:00" fails
                # the parse below, and "a::" alone is no address worth hiding.
                groups = sum(1 for group in candidate.split(":") if group)
                if groups < 2 or (groups == 2 and "::" not in candidate):
                    continue
                try:
                    ipaddress.IPv6Address(candidate)
                except ValueError:
                    continue
                yield match.span()

    def _phones(self, text: str) -> Iterator[tuple[int, int]]:
        # Numbering-plan checks cost ~0.1 ms a region: a budget per call keeps
        # a text made of nothing but digit runs linear. Past it, a candidate
        # that would need the check is taken as a phone (over-redacting).
        budget = _VALIDATION_BUDGET + len(text) // 512

        def valid(candidate: str) -> bool:
            nonlocal budget
            budget -= 1
            return budget < 0 or _valid_phone(candidate, self.regions)

        for match in (
            found
            for region in _PHONE_REGION.finditer(text)
            # One character past the region, so lookaheads see what follows.
            for found in PHONE_RUN_RE.finditer(text, region.start(), region.end() + 1)
        ):
            if text[match.end() : match.end() + 1].isalnum() and not _EXTENSION.match(
                text, match.end()
            ):
                continue  # part of a word: a hash, a UUID, a reference
            run = DigitRun(match.group())
            spans = []
            for start, end in run.spans(phone_windows(run), whole=True):
                candidate = run.text[start:end]
                # Eight digits after a trunk 0 may be a postcode (04276-792).
                weak = candidate[0] == "0" and sum(c.isdigit() for c in candidate) < 9
                if weak and not valid(candidate):
                    continue
                spans.append((start, end))
            total = sum(run.lengths)
            whole = [(0, len(run.text))]
            if (
                spans != whole
                and (10 <= total <= 12 if len(run.lengths) == 1 else 9 <= total <= 12)
                and len(run.lengths) <= 4
                and run.lengths != _SSN_SHAPE
                and not _date_groups(run)
                and valid(run.text)
            ):
                # No telling shape (92 9007-3878, 3516014891), or a shape that
                # misses the area code (86 0738-9081), but the whole run is a
                # number of a configured region's numbering plan. Nine
                # unbroken digits are left: references look like that.
                spans = whole
            for start, end in spans:
                start += match.start()
                end += match.start()
                extension = _EXTENSION.match(text, end)
                if extension is not None:
                    end = extension.end()
                yield start, end


def mask(text: str, entities: Sequence[Entity], replace: Callable[[Entity], str]) -> str:
    """``text`` with each entity (in order, not overlapping) replaced by ``replace(entity)``."""
    pieces: list[str] = []
    cursor = 0
    for entity in entities:
        pieces.append(text[cursor : entity.start])
        pieces.append(replace(entity))
        cursor = entity.end
    pieces.append(text[cursor:])
    return "".join(pieces)


def mask_email(address: str) -> str:
    """A hint of an e-mail address that is not the address: ``j***@example.com``.

    For lists that show people to colleagues (a tenant's members): the local
    part, which names the person, is hidden but for its first character (all
    of it when shorter than three); the domain, usually the organisation's,
    is kept so that a member can still be told apart.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[0] if len(local) >= 3 else ''}***@{domain}"


@dataclass(frozen=True)
class OutputScan:
    """A model answer after scanning: masked text and what was found, by kind."""

    text: str
    counts: dict[str, int]
    entities: tuple[Entity, ...]

    @property
    def clean(self) -> bool:
        return not self.entities


_DEFAULT = PiiRecognizer()


def scan_output(
    text: str | bytes, recognizer: PiiRecognizer | None = None, *, opaque: Collection[str] = ()
) -> OutputScan:
    """Scan a model's answer for personal data and secrets; mask what is found.

    For the gateway's output stage: a model may repeat what it saw in training
    or in a tool result. Found values become ``[KIND]`` (not vault tokens: an
    answer's stray value is not something to make revealable); the vault
    tokens in ``opaque`` (the real ones the prompt carried) are left as they
    are, anything else token-shaped is scanned. Raises like
    :meth:`PiiRecognizer.find`.
    """
    entities = (recognizer or _DEFAULT).find(text, opaque=opaque)
    plain = text if isinstance(text, str) else bytes(text).decode("utf-8")
    masked = mask(plain, entities, lambda e: f"[{e.kind.upper()}]")
    return OutputScan(masked, dict(Counter(e.kind for e in entities)), tuple(entities))
