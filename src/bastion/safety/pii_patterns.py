"""What the PII recognizer looks for: the kinds, their patterns and checksums.

The data half of :mod:`bastion.safety.pii` (which documents each kind and the
standard it follows, and holds the engine that runs these): precompiled
regular expressions, the check-digit algorithms that confirm a match, and the
digit-group layouts of card and telephone numbers. Also used by
:mod:`bastion.knowledge.redact`'s masking redactor.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from itertools import accumulate

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
# Found by a model, not a pattern (bastion.safety.pii_names).
DOB = "dob"
PERSON = "person"
ADDRESS = "address"
PLACE = "place"
MODEL_KINDS: tuple[str, ...] = (ADDRESS, PERSON, PLACE)

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
    DOB,
    PHONE,
    ADDRESS,
    PERSON,
    PLACE,
)
"""Every kind, in the priority order that settles overlaps."""

# Regions whose national formats phone candidates are tried in (ISO 3166-1).
DEFAULT_REGIONS: tuple[str, ...] = ("US", "GB", "FR", "DE", "ES", "IT", "NL", "BR", "JP", "IN")


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
    """ISO 13616-1 / ISO 7064 MOD 97-10 over an IBAN without spaces (any case)."""
    if not 15 <= len(compact) <= 34 or not compact.isalnum() or not compact.isascii():
        return False
    compact = compact.upper()
    rearranged = compact[4:] + compact[:4]
    # Letters count as two-digit numbers A=10 .. Z=35.
    numeric = "".join(str(int(char, 36)) for char in rearranged)
    return int(numeric) % 97 == 1


def nir_valid(compact: str) -> bool:
    """A 15-character NIR: its structure and its INSEE key ``97 - (first 13 mod 97)``.

    Structure (INSEE): sex 1-4 or 7-8; month 01-12, 20 or 30-42 and 50-99
    (unknown or fictitious months); department not 00; commune and order
    number not 000. And not a card: a Luhn-valid number with an American
    Express prefix (34, 37; ISO/IEC 7812) is one, whatever its key says.
    """
    body = compact[:13].upper().replace("2A", "19").replace("2B", "18")
    if not body.isdigit() or not compact[13:].isdigit():
        return False
    month = int(body[3:5])
    if not (1 <= month <= 12 or month == 20 or 30 <= month <= 42 or month >= 50):
        return False
    if body[5:7] == "00" or body[7:10] == "000" or body[10:13] == "000":
        return False
    if compact[:2] in {"34", "37"} and compact.isdigit() and luhn_valid(compact):
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
EMAIL_LOCAL = frozenset(string.ascii_letters + string.digits + "._%+-")
EMAIL_DOMAIN_RE = re.compile(rf"(?:[A-Za-z0-9-]+\.)+[A-Za-z]{{2,63}}(?![A-Za-z0-9-]){NOT_BEFORE}")
IBAN_RE = re.compile(
    rf"[A-Z](?<![A-Za-z0-9].){_NA1}[A-Z]\d{{2}}(?: ?[A-Z0-9]{{4}}){{2,7}}"
    rf"(?: ?[A-Z0-9]{{1,3}})?(?![A-Za-z0-9]){NOT_BEFORE}"
)
# The loose form: any case, spaces anywhere (DE8937 0400 ...), its end set by
# the country's IBAN length (IBAN_LENGTHS), so a following word is never
# swallowed. Bounded: at most 32 more characters after the check digits.
IBAN_LOOSE_RE = re.compile(
    rf"[A-Za-z](?<![A-Za-z0-9].){_NA1}[A-Za-z]\d{{2}}(?: ?[A-Za-z0-9]){{11,32}}"
)
# IBAN length per country, from the ISO 13616 registry (SWIFT, IBAN Registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27,
    "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def loose_iban_end(text: str, start: int, end: int) -> int | None:
    """The end of the IBAN starting at ``text[start]`` within ``text[start:end]``
    (a match of IBAN_LOOSE_RE): as many letters and digits as its country's
    IBAN has, ending at a word boundary and passing MOD 97-10; else None."""
    length = IBAN_LENGTHS.get(text[start : start + 2].upper())
    if length is None:
        return None
    taken = 0
    i = start
    while i < end and taken < length:
        if text[i] != " ":
            taken += 1
        i += 1
    if taken < length or (i < len(text) and text[i].isalnum()):
        return None
    compact = text[start:i].replace(" ", "")
    return i if iban_valid(compact) else None


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
DNI_RE = re.compile(
    r"[\dXYZ](?<![A-Za-z0-9].)(?:(?<=\d)\d{7}|(?<=[XYZ])-?\d{7})[- ]?[A-Z](?![A-Za-z0-9])"
)
_CF_DIGIT = "[0-9LMNP-V]"  # omocodia replaces digits with L..V
CF_RE = re.compile(
    rf"[A-Z](?<![A-Za-z0-9].)[A-Z]{{5}}{_CF_DIGIT}{{2}}[ABCDEHLMPRST]{_CF_DIGIT}{{2}}"
    rf"[A-Z]{_CF_DIGIT}{{3}}[A-Z](?![A-Za-z0-9])"
)
CPF_RE = re.compile(r"\d(?<![\d.-].)(?:\d{2}\.\d{3}\.\d{3}-\d{2}|\d{10})(?![\d-]|\.\d)")
BSN_RE = re.compile(
    r"\b(?:BSN|burgerservicenummer|sofinummer)\b[^0-9\n]{0,30}?(?<!\d)(\d{4}\.?\d{2}\.?\d{3})(?!\d)",
    re.IGNORECASE,
)
IPV4_RE = re.compile(r"\d(?<![\w.].)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\d)")
IPV6_RE = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.].)(?:(?<=:)|[0-9A-Fa-f]{0,3}:)(?:[0-9A-Fa-f]{0,4}:){1,6}"
    r"(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)

# Known prefixes; the character before is checked in Python (see _secrets).
SECRET_RE = re.compile(
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
# What every match of SECRET_RE starts with, looked for with str's own search
# first: a text holding none (most) skips the regex, which tries each of its
# branches at every position. Those with "_" only where the text has one.
SECRET_LEADS = ("sk-", "AKIA", "ASIA", "xox", "AIza", "glpat-", "eyJ", "-----BEGIN ")
SECRET_LEADS_UNDERSCORED = (
    *("k_live_", "k_test_"),  # Stripe
    *("hp_", "ho_", "hu_", "hs_", "hr_", "github_pat_"),  # GitHub (ghp_...)
    "hf_",
)


def may_hold_secret(text: str) -> bool:
    """Whether ``text`` has a lead of :data:`SECRET_RE` (False: it has no match)."""
    return any(map(text.__contains__, SECRET_LEADS)) or (
        "_" in text and any(map(text.__contains__, SECRET_LEADS_UNDERSCORED))
    )


UPPER_OR_UNDERSCORE = frozenset(string.ascii_uppercase + "_")
SECRET_NOT_AFTER = frozenset(string.ascii_letters + string.digits + "_-")
ENTROPY_CANDIDATE_RE = re.compile(
    r"[A-Za-z0-9+/_=-](?<![A-Za-z0-9+/_=@.-].)[A-Za-z0-9+/_=-]{23,511}(?![A-Za-z0-9+/_=@-])"
)
_ENTROPY_MIN = 4.0  # bits per character; English words and identifiers stay below


def high_entropy(candidate: str) -> bool:
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
# class) only runs inside these. Eight characters at least: a run shorter than
# that has fewer than _MIN_PHONE_DIGITS digits, and no window or whole-run
# check of _phones takes one ("Ticket 4.12", "3.5 GB": most numbers of prose).
PHONE_REGION_RE = re.compile(r"[+(\d][\d+() ./-]{7,}")
# A telephone label and the 7-15 digit number right after it: a local number
# without its area code (555 12 34, 45 67 89 12) is only told from an order
# number or an amount by the word before it. Speed: digit runs are found first
# (a leading plain class), and only then is the label looked for, anchored at
# the run's start (\Z at endpos); a leading \b would be tried everywhere.
LOCAL_NUMBER_RE = re.compile(r"\d(?<![\w+#/.-]\d)(?:[ ./-]?\d){6,14}(?![\w@]|[.,/-]\d)")
# The words people put before a telephone number, in the languages of the
# locales the recognizers are trained and tested on (written from usage, round
# 8 of issue 16; matched case-insensitively, whole words, an optional "." after
# an abbreviation and an optional "number" word after the label).
PHONE_LABELS: tuple[str, ...] = (
    # English
    *("phone", "telephone", "tel", "tele", "ph", "phn", "fone", "mobile", "mob", "cell"),
    *("cellphone", "cell phone", "mobile phone", "landline", "fax", "contact number"),
    *("whatsapp", "viber", "call me on", "call me at", "reach me on"),
    # German
    *("telefon", "telefonnummer", "fon", "handy", "handynummer", "mobil", "mobilnummer"),
    *("mobiltelefon", "rufnummer", "festnetz", "telefax"),
    # French
    *("téléphone", "telephone", "tél", "portable", "numéro de téléphone", "gsm"),
    # Spanish, Italian, Portuguese
    *("teléfono", "telefono", "tfno", "tlf", "tlfn", "móvil", "movil", "celular", "cel"),
    *("cellulare", "telefone", "telemóvel", "telemovel", "contacto"),
    # Dutch; Scandinavian, Icelandic
    *("telefoon", "telefoonnummer", "mobiel", "mobielnummer", "tlf", "mobiltelefon"),
    *("telefonnummer", "sími", "simi", "farsími", "gsm"),
    # Polish, Czech and Slovak, Baltic, Hungarian, Turkish, Albanian, Azerbaijani
    *("telefonu", "tel kom", "kom", "komórka", "komorka", "telefonas", "mobilus"),
    # (not "cep" alone: a Brazilian postcode is a CEP)
    *("tālrunis", "tālr", "telefons", "mobiil", "telefonszám", "mobilszám"),
    *("cep telefonu", "celular", "telefonit", "numri i telefonit", "telefon nömrəsi"),
    # Indonesian, Vietnamese, Swahili, Zulu, Irish
    *("telepon", "telp", "ponsel", "nomor telepon", "điện thoại", "đt", "sđt", "di động"),
    *("simu", "nambari ya simu", "ucingo", "inombolo", "fón", "guthán", "fón póca"),
    # Greek, Russian, Ukrainian, Bulgarian
    *("τηλ", "τηλέφωνο", "κινητό", "тел", "телефон", "моб", "мобильный", "сотовый"),
    *("мобільний", "мобилен", "номер телефона", "номер телефону"),
)
PHONE_NUMBER_WORDS: tuple[str, ...] = (
    *("no", "nr", "n°", "nº", "num", "number", "numer", "número", "numero", "nummer"),
    *("numéro", "nomor", "номер", "#"),
)


def _alternatives(words: tuple[str, ...]) -> str:
    """``words`` as a regex alternation grouped by first letter (one branch tried
    per position, not a hundred), longest first within a group (so "tel" does not
    end "telefon" early); a space may have a "." before it ("Tel. kom.")."""
    groups: dict[str, list[str]] = {}
    for word in sorted({w.lower() for w in words}, key=lambda w: (-len(w), w)):
        pattern = r"\.? ?".join(map(re.escape, word[1:].split(" ")))
        groups.setdefault(word[0], []).append(pattern)
    return "|".join(f"{re.escape(first)}(?:{'|'.join(rest)})" for first, rest in groups.items())


PHONE_LABEL_BEFORE_RE = re.compile(
    rf"(?<![^\W_])(?:{_alternatives(PHONE_LABELS)})(?![^\W_])\.?"
    rf"(?: ?(?:{_alternatives(PHONE_NUMBER_WORDS)})\.?)? ?[:.]? ?\Z",
    re.IGNORECASE,
)
PHONE_LABEL_REACH = 40  # characters before a number searched for its label
# A Brazilian CEP (01310-100): five digits, a dash, three; a postcode, not a phone.
CEP_SHAPE = [5, 3]
EXTENSION_RE = re.compile(r" ?(?:x|ext\.? ?|extension )\d{1,6}(?!\w)", re.IGNORECASE)
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
SSN_SHAPE = [3, 2, 4]
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


def date_groups(run: DigitRun) -> set[int]:
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
    dated = date_groups(run)
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
            elif best == i + 3 and lengths[i:best] == SSN_SHAPE and run.seps[i + 1] == "-":
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
