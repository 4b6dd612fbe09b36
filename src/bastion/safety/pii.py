"""Finding personal data and secrets in text, without a database (CHECKLIST M3).

:class:`PiiRecognizer` returns the spans of what it recognises; it is pure
(no I/O, and nothing of a text is kept after the call: a memo of the numbers
it saw would let a memory dump recognise a tenant's numbers after its shred),
so the gateway can call it on every prompt and on every
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
    taken (over-redacting) rather than checked. A local number of 7-15
    digits without its area code counts right after a telephone label
    ("Phone:", "Tel.", "Tél :", "Móvil" ...) and only there. A house number
    and a postcode before a town (Hauptstraße 12 34567 Berlin) or a Brazilian
    CEP (01310-100) is an address, not a phone. Values are normalised to
    E.164 for their token.
``card``
    payment card numbers, ISO/IEC 7812-1: 13-19 digits (12 unbroken ones
    starting with 5 or 6, Maestro's range), unbroken or in the usual groups,
    only if the Luhn check (Annex B) passes.
``iban``
    ISO 13616-1, only if the ISO 7064 MOD 97-10 check passes; in any case
    and grouping (de89 3704 ..., DE8937 0400 ...), then only at the length
    the IBAN registry gives its country.
``us_ssn``
    ``AAA-GG-SSSS`` (dashes or spaces) without the never-issued area 000, 666
    and 900-999, group 00 or serial 0000 (SSA; the SSN has no check digit).
``uk_nino``
    HMRC NIM39110: valid prefix letters, six digits, suffix A-D.
``fr_nir``
    INSEE number, key ``97 - (n mod 97)`` (Corsica's 2A/2B as 19/18) and
    its structure; a Luhn-valid number with an Amex prefix is a card.
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

``dob``
    a date with a birth cue before it on its line ("DOB:", "born",
    "Geburtsdatum", "né le"); other dates are left alone.
``person``, ``address``, ``place``
    person names, street addresses (with their postcode and town), towns
    and countries, found by a small trained tagger that reads each
    capitalised word or number with its neighbours, not by a list alone
    (:mod:`bastion.safety.pii_names`: how, and what it does not cover).

Overlaps are settled by priority (the order above is not it: secrets first,
then e-mail, IBAN, national ids, cards, IP addresses, dates of birth, phones,
then the tagger's kinds), so a card number is never half taken for a phone
number. A tagger span that overlaps a pattern's keeps its other parts: what
the tagger found is never left in clear for being partly taken. Vault tokens (``⟦EMAIL_...⟧``)
are left alone only when the caller vouches for them (``opaque``: the real
tokens of the tenant's vault, which :class:`~bastion.safety.vault.PiiVault`
looks up), so a token is never tokenized again; anything else shaped like a
token — ``⟦CARD_4111111111111111⟧`` is one — is scanned like any text. Every
pattern is precompiled and free of ambiguous nested repetition, so the scan
is linear in the input; inputs over ``max_chars`` are refused.

The kinds, their patterns and checksums are data in
:mod:`bastion.safety.pii_patterns`; this module is the engine that runs them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import phonenumbers

from bastion.errors import BastionError, Kind
from bastion.safety import pii_names
from bastion.safety.pii_patterns import (
    ADDRESS,
    BR_CPF,
    BSN_RE,
    CARD,
    CARD_RUN_RE,
    CEP_SHAPE,
    CF_RE,
    CPF_RE,
    DEFAULT_REGIONS,
    DNI_RE,
    DOB,
    EMAIL,
    EMAIL_DOMAIN_RE,
    EMAIL_LOCAL,
    ENTROPY_CANDIDATE_RE,
    ES_DNI,
    EXTENSION_RE,
    FR_NIR,
    IBAN,
    IBAN_LOOSE_RE,
    IBAN_RE,
    IP_ADDRESS,
    IPV4_RE,
    IPV6_RE,
    IT_FISCAL_CODE,
    KINDS,
    LOCAL_NUMBER_RE,
    MODEL_KINDS,
    NINO_RE,
    NIR_RE,
    NL_BSN,
    PERSON,
    PHONE,
    PHONE_LABEL_BEFORE_RE,
    PHONE_LABEL_REACH,
    PHONE_REGION_RE,
    PHONE_RUN_RE,
    PLACE,
    SECRET,
    SECRET_NOT_AFTER,
    SECRET_RE,
    SSN_RE,
    SSN_SHAPE,
    UK_NINO,
    UPPER_OR_UNDERSCORE,
    US_SSN,
    DigitRun,
    bsn_valid,
    card_windows,
    cpf_valid,
    date_groups,
    dni_valid,
    fiscal_code_valid,
    high_entropy,
    iban_valid,
    loose_iban_end,
    luhn_valid,
    may_hold_secret,
    nir_valid,
    phone_windows,
)

__all__ = [
    "ADDRESS",
    "BR_CPF",
    "CARD",
    "DOB",
    "EMAIL",
    "ES_DNI",
    "FR_NIR",
    "IBAN",
    "IP_ADDRESS",
    "IT_FISCAL_CODE",
    "KINDS",
    "MAX_TEXT_CHARS",
    "NL_BSN",
    "PERSON",
    "PHONE",
    "PLACE",
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

# 4 Mi characters: a whole book. The ingest path is capped at the upload limit
# well below this; the bound keeps one call's CPU time and memory known.
MAX_TEXT_CHARS = 4 * 1024 * 1024

# The shape of a vault token (bastion.safety.vault). The shape proves nothing (a
# card number has sixteen hex digits): only the vault says which are tokens.
TOKEN_PATTERN = re.compile(r"⟦([A-Z][A-Z_]{1,30})_([0-9a-f]{16})⟧")


class PiiInputTooLarge(BastionError):
    slug = "pii-input-too-large"
    title = "The text is too large to scan for personal data"
    kind = Kind.TOO_LARGE


class PiiInputNotText(BastionError):
    slug = "pii-input-not-text"
    title = "The input is not valid UTF-8 text"
    kind = Kind.UNPROCESSABLE


@dataclass(frozen=True, slots=True)
class Entity:
    """One recognised value: its kind and ``text[start:end]``."""

    kind: str
    start: int
    end: int
    value: str


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
    main = EXTENSION_RE.sub("", text)
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


# No memo across calls (issue 23, B9): one kept the digests of the numbers
# seen, shared by every tenant and never shredded. It saved about 1 ms per
# request of a phone-dense chat resending its history (58 us per check,
# measured on the test corpus), and nothing in the worst case, which the
# per-call budget bounds (_phones).
def _valid_phone(text: str, regions: Sequence[str]) -> bool:
    """Whether ``text`` is a number in use in one of ``regions``' numbering plans."""
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
            IT_FISCAL_CODE: self._checked_regex(CF_RE, fiscal_code_valid),
            FR_NIR: self._checked_regex(NIR_RE, nir_valid),
            US_SSN: self._regex(SSN_RE),
            UK_NINO: self._regex(NINO_RE),
            ES_DNI: self._checked_regex(DNI_RE, dni_valid),
            BR_CPF: self._checked_regex(CPF_RE, cpf_valid),
            NL_BSN: self._bsns,
            CARD: self._cards,
            IP_ADDRESS: self._ips,
            DOB: pii_names.dates_of_birth,
            PHONE: self._phones,
        }
        self._finders = [(kind, finders.get(kind)) for kind in self.kinds]
        # The tagger finds its kinds in one pass; its model is read on first use,
        # once per process (not at import: most processes never scan).
        self._tagged = bool(set(MODEL_KINDS) & set(self.kinds))
        self._dated = self._tagged or DOB in self.kinds

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
        tagged: dict[str, list[tuple[int, int]]] = {kind: [] for kind in MODEL_KINDS}
        # Dates once, for the tagger (a date's numbers are no address) and the
        # dates of birth: the same scan would otherwise run twice.
        date_spans = pii_names.dates(text) if self._dated else None
        if self._tagged:
            for kind, start, end in pii_names.find(text, pii_names.load(), date_spans):
                tagged[kind].append((start, end))
        for kind, finder in self._finders:
            if finder is None:  # the tagger's: what a pattern took is cut out
                for start, end in tagged[kind]:
                    for begin, stop in _untaken(text, taken, start, end):
                        value = text[begin:stop]
                        if kind == ADDRESS and not pii_names.address_shaped(value):
                            continue  # what is left of it ("Card") is no address
                        taken[begin:stop] = b"\x01" * (stop - begin)
                        found.append(Entity(kind, begin, stop, value))
                continue
            spans = pii_names.dates_of_birth(text, date_spans) if kind == DOB else finder(text)
            for start, end in spans:
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
            while start > done and text[start - 1] in EMAIL_LOCAL and at - start < 256:
                start -= 1
            domain = EMAIL_DOMAIN_RE.match(text, at + 1)
            if (
                start < at
                and domain is not None
                and not (start and text[start - 1] in EMAIL_LOCAL)
                and not (
                    start > 1 and text[start - 1] == "]" and text[start - 2] in UPPER_OR_UNDERSCORE
                )
            ):
                yield start, domain.end()
                done = domain.end()
            at = text.find("@", max(at + 1, done))

    @staticmethod
    def _secrets(text: str) -> Iterator[tuple[int, int]]:
        # Known prefixes first; a generic candidate overlapping one is dropped
        # by find()'s overlap check.
        for match in SECRET_RE.finditer(text) if may_hold_secret(text) else ():
            start = match.start()
            if start and text[start - 1] in SECRET_NOT_AFTER and text[start] != "-":
                continue  # inside a word: "task-..." is no OpenAI key
            yield match.span()
        for match in ENTROPY_CANDIDATE_RE.finditer(text):
            if high_entropy(match.group()):
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
        # Then lower case and odd groupings (de89 370400 ...): the country's
        # length ends the value; find() drops what the pass above took.
        for match in IBAN_LOOSE_RE.finditer(text):
            end = loose_iban_end(text, match.start(), match.end())
            if end is not None:
                yield match.start(), end

    @staticmethod
    def _bsns(text: str) -> Iterator[tuple[int, int]]:
        if "bsn" not in text.lower() and "nummer" not in text.lower():
            return
        for match in BSN_RE.finditer(text):
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
            for match in IPV4_RE.finditer(text):
                try:
                    ipaddress.IPv4Address(match.group())
                except ValueError:
                    continue
                yield match.span()
        if ":" in text:
            for match in IPV6_RE.finditer(text):
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

        # A local number right after a telephone label (Tel. 555 12 34): the
        # label is what tells it from an order number, so 7 digits suffice.
        for number in LOCAL_NUMBER_RE.finditer(text):
            start, end = number.span()
            if PHONE_LABEL_BEFORE_RE.search(text, max(0, start - PHONE_LABEL_REACH), start):
                labelled = DigitRun(number.group())
                if labelled.lengths != SSN_SHAPE and not date_groups(labelled):
                    extension = EXTENSION_RE.match(text, end)
                    yield start, extension.end() if extension is not None else end

        for match in (
            found
            for region in PHONE_REGION_RE.finditer(text)
            # One character past the region, so lookaheads see what follows.
            for found in PHONE_RUN_RE.finditer(text, region.start(), region.end() + 1)
        ):
            if text[match.end() : match.end() + 1].isalnum() and not EXTENSION_RE.match(
                text, match.end()
            ):
                continue  # part of a word: a hash, a UUID, a reference
            run = DigitRun(match.group())
            if _postal(text, match.end(), run):
                continue
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
                and run.lengths != SSN_SHAPE
                and not date_groups(run)
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
                extension = EXTENSION_RE.match(text, end)
                if extension is not None:
                    end = extension.end()
                yield start, end


def _untaken(text: str, taken: bytearray, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of ``text[start:end]`` no span has taken, trimmed to letters and
    digits at both ends (nothing of a found name is left in clear)."""
    cursor = start
    while cursor < end:
        free = taken.find(0, cursor, end)
        if free == -1:
            return
        stop = taken.find(1, free, end)
        stop = end if stop == -1 else stop
        piece = text[free:stop]
        left = len(piece) - len(piece.lstrip(_TRIM))
        right = len(piece.rstrip(_TRIM))
        if left < right:
            yield free + left, free + right
        cursor = stop


_TRIM = " \t\r\n,;:.()/-'\"|"


def _postal(text: str, end: int, run: DigitRun) -> bool:
    """Whether ``run`` (ending at ``text[end]``) is the digits of a postal address,
    not a telephone number: a Brazilian CEP (01310-100), or a house number and
    a postcode before a town (Hauptstraße 12 34567 Berlin, 5 01310100 São
    Paulo, 12 160-0023 新宿区). A number written with ``+``, a parenthesised
    area code or a trunk ``0`` is a phone."""
    lengths = run.lengths
    if run.text[0] in "+(" or any(run.parenthesised):
        return False
    if lengths[-2:] == CEP_SHAPE and run.seps[-1] == "-":
        return True
    if run.digits[0][0] == "0":
        return False
    town = text[end : end + 3].lstrip(", ")[:1]
    # A town's name: a capital, or a letter of a script without case (東京).
    if not (town.isalpha() and (town.isupper() or not town.islower())):
        return False
    postcode = lengths[1:]
    return (
        len(lengths) >= 2
        and lengths[0] <= 4
        and (
            (len(postcode) == 1 and postcode[0] in (4, 5, 8))  # 75002, 01310100
            or (postcode in (CEP_SHAPE, [3, 4]) and run.seps[-1] == "-")  # 123-4567 (JP)
        )
    )


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
