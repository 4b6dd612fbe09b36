"""Egress control for proposed tool calls (CHECKLIST M4, issue 15 item 4).

The structural defence behind the injection screen: a model that was talked
into exfiltrating data by a retrieved document (or by an earlier tool result)
still cannot get a signed tool call that carries that data to a destination
the tenant did not allow.

* **Taint** (:class:`Taint`): the spans of the prompt that did not come from the
  user — every ``tool``-role message, and the spans a request marks as
  retrieved (the api marks the fenced documents of the prompt it signs).
* **Carried content** (:func:`carried`): an argument string carries tainted text
  when it shares a run of at least :data:`TAINT_MIN_CHARS` characters with a
  tainted span once both are normalised (NFKC, case-folded, letters and digits
  only: case, spacing and punctuation changes do not hide it), also after
  undoing percent-encoding (RFC 3986 §2.1), HTML character references,
  ``\\uXXXX`` escapes, base64/base64url (RFC 4648 §4, §5) and hex runs. Vault
  tokens (``⟦EMAIL_…⟧``, with or without their brackets) and secrets (known
  credential formats, and the key ring's values given) count as well.
* **Destinations** (:func:`destinations`): URLs (RFC 3986), e-mail addresses
  (RFC 5321 mailbox shape) and host names found in any string of the
  arguments (keys included), and every value of a property the tool's schema
  declares with ``format`` ``uri``/``iri``/``email``/``hostname`` (and their
  variants) — such a value is a destination whatever it looks like.
* **Decision** (:func:`decide`): a call that carries any of this to a
  destination not on the tenant's allow-list for the tool (:class:`EgressRules`:
  hosts, URL prefixes, e-mail domains, per tenant and per tool) violates the
  policy; the tenant's action says whether it is blocked (default) or flagged.

Pure functions, no I/O: the allow-lists are read by
:class:`bastion.safety.egress_lists.EgressPolicies`, the gateway applies the
decision (:meth:`bastion.gateway.service.GatewayService.sign_tool_calls`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import ipaddress
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, unquote_plus, urlsplit

from bastion.errors import BastionError, Kind
from bastion.safety.confusables import CONFUSABLES

# A tainted run shorter than this (normalised: letters and digits) is not
# counted: shorter runs are common phrases, not a document's text.
TAINT_MIN_CHARS = 24
# Index windows: every common run of WINDOW + STRIDE - 1 <= TAINT_MIN_CHARS
# characters contains one indexed window, so none is missed; memory is a
# window per STRIDE characters of tainted text.
_WINDOW = 16
_STRIDE = 8
# Work bounds per argument string: decoded layers and their size.
_MAX_DECODE_ROUNDS = 3
_MAX_STRING_CHARS = 1_000_000

EgressAction = Literal["block", "flag"]
ACTIONS: tuple[EgressAction, ...] = ("block", "flag")
EntryKind = Literal["host", "url_prefix", "email_domain"]
ENTRY_KINDS: tuple[EntryKind, ...] = ("host", "url_prefix", "email_domain")
# Schema formats (JSON Schema 2020-12 §7.3) whose values are destinations.
DESTINATION_FORMATS = frozenset(
    {"uri", "uri-reference", "iri", "iri-reference", "url", "email", "idn-email", "hostname",
     "idn-hostname", "uri-template"}
)  # fmt: skip


class InvalidTaintMark(BastionError):
    slug = "invalid-taint-mark"
    title = "A tainted-span mark does not fit the request's messages"
    kind = Kind.INVALID


# -- normalisation ----------------------------------------------------------------------


# Look-alikes folded to one letter, on both sides of a comparison: homoglyphs
# of other scripts (Unicode TS #39) to the Latin letter they imitate, and the
# digits and signs of leetspeak to the letter they stand for (1, l, i, ! and |
# all read "i"; 0 "o"; 3 "e"; 4 and @ "a"; 5 and $ "s"; 7 "t"; 8 "b"; 9 "g").
_HOMOGLYPHS = {ch: latin.casefold() for ch, latin in CONFUSABLES.items()}
_LOOKALIKES = str.maketrans(
    {**_HOMOGLYPHS, **dict(zip("01!|l34@57$89", "oiiiieaastsbg", strict=True))}
)
_LATIN = str.maketrans(_HOMOGLYPHS)


def normalise(text: str, *, leet: bool = True) -> str:
    """``text`` reduced to what survives a paraphrase of its spelling: NFKC,
    case-folded, look-alikes folded (homoglyphs; with ``leet``, leetspeak too),
    letters and digits only."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    folded = folded.translate(_LOOKALIKES if leet else _LATIN)
    return "".join(ch for ch in folded if ch.isalnum())


def letter_steps(normalised: str) -> str:
    """The steps between consecutive Latin letters of ``normalised`` text, each
    as a letter (``a`` + step mod 26): the same for the text under any Caesar
    shift (ROT13 among them), so a shifted copy of a tainted run is found by
    comparing steps. Other characters are left out."""
    codes = [ord(ch) - 97 for ch in normalised if "a" <= ch <= "z"]
    return "".join(chr(97 + (b - a) % 26) for a, b in itertools.pairwise(codes))


def _mirrored(steps: str) -> str:
    # Atbash (a<->z) negates every step.
    return "".join(chr(97 + (-(ord(ch) - 97)) % 26) for ch in steps)


_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_U_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})")
# Runs in either alphabet, and base64url alone (a run inside a URL path, where
# the standard alphabet's "/" would glue it to the path before it).
_B64_RUNS = (
    re.compile(r"[A-Za-z0-9+/]{16,}={0,2}"),
    re.compile(r"[A-Za-z0-9_-]{16,}={0,2}"),
)
_HEX_RUN = re.compile(r"(?:[0-9A-Fa-f]{2}){12,}")
# Base32 (RFC 4648 §6) in either case; 16 characters carry 10 bytes.
_B32_RUN = re.compile(r"(?:[A-Z2-7]{16,}|[a-z2-7]{16,})={0,6}")


def _b64(run: str) -> str | None:
    body = run.rstrip("=")
    padded = body + "=" * (-len(body) % 4)
    alphabet = "-_" if ("-" in body or "_" in body) else "+/"
    try:
        raw = base64.b64decode(padded, altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError):
        return None
    text = raw.decode("utf-8", errors="ignore")
    # Decoded text, not noise: mostly printable.
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    return text if text and printable >= 0.9 * len(text) else None


def _b32(run: str) -> str | None:
    body = run.rstrip("=").upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        return None
    text = raw.decode("utf-8", errors="ignore")
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    return text if text and printable >= 0.9 * len(text) else None


def _hex(run: str) -> str | None:
    text = bytes.fromhex(run).decode("utf-8", errors="ignore")
    printable = sum(ch.isprintable() or ch.isspace() for ch in text)
    return text if text and printable >= 0.9 * len(text) else None


def readings(text: str) -> list[str]:
    """``text`` and what it says once encodings are undone: percent-encoding
    (also ``+`` for space), HTML references, ``\\u`` escapes, base64/base64url,
    base32 and hex runs (each decoded run on its own, and the whole string without
    whitespace), a few layers deep. Bounded: at most a few dozen readings."""
    seen: dict[str, None] = {}
    layer = [text[:_MAX_STRING_CHARS]]
    for _ in range(_MAX_DECODE_ROUNDS):
        nxt: list[str] = []
        for item in layer:
            if item in seen:
                continue
            seen[item] = None
            if _PERCENT.search(item) or "+" in item:
                nxt.append(unquote_plus(item))
                nxt.append(unquote(item))
            if "&" in item:
                nxt.append(html.unescape(item))
            if "\\u" in item:
                nxt.append(_U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), item))
            compact = "".join(item.split())
            runs = (m.group(0) for run in _B64_RUNS for m in run.finditer(compact))
            for candidate in (compact, *runs):
                if len(candidate) >= 16 and (decoded := _b64(candidate)) is not None:
                    nxt.append(decoded)
            for m in _HEX_RUN.finditer(compact):
                if (decoded := _hex(m.group(0))) is not None:
                    nxt.append(decoded)
            for m in _B32_RUN.finditer(compact):
                if (decoded := _b32(m.group(0))) is not None:
                    nxt.append(decoded)
        layer = [item for item in nxt if item not in seen][:32]
        if not layer:
            break
    for item in layer:
        seen.setdefault(item, None)
    return list(seen)


# -- taint --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaintMark:
    """``messages[message].content[start:end]`` (code points) came from a
    retrieved document or a tool result."""

    message: int
    start: int
    end: int


class _Runs:
    """Text indexed to answer: does a probe share a run of at least
    :data:`TAINT_MIN_CHARS` characters with it? (``\\x00`` separates parts.)"""

    def __init__(self, text: str) -> None:
        self.text = text
        self._index: dict[str, list[int]] | None = None

    def _windows(self) -> dict[str, list[int]]:
        if self._index is None:
            index: dict[str, list[int]] = {}
            text = self.text
            for q in range(0, max(len(text) - _WINDOW + 1, 0), _STRIDE):
                window = text[q : q + _WINDOW]
                if "\x00" in window:
                    continue
                found = index.setdefault(window, [])
                if len(found) < 4:
                    found.append(q)
            self._index = index
        return self._index

    def shared_with(self, probe: str) -> bool:
        if not self.text or len(probe) < TAINT_MIN_CHARS:
            return False
        index, tainted = self._windows(), self.text
        for i in range(len(probe) - _WINDOW + 1):
            for q in index.get(probe[i : i + _WINDOW], ()):
                left = 0
                while left < min(i, q) and probe[i - left - 1] == tainted[q - left - 1]:
                    left += 1
                right = _WINDOW
                while (
                    i + right < len(probe)
                    and q + right < len(tainted)
                    and probe[i + right] == tainted[q + right]
                ):
                    right += 1
                if left + right >= TAINT_MIN_CHARS:
                    return True
        return False


class Taint:
    """The tainted text of one request, indexed for :meth:`found_in`: as
    normalised, and as its letters' steps (:func:`letter_steps`), which a
    Caesar shift does not change."""

    def __init__(self, spans: Iterable[str] = ()) -> None:
        kept = [(span, p) for span in spans if len(p := normalise(span)) >= TAINT_MIN_CHARS]
        self._text = _Runs("\x00".join(p for _span, p in kept))
        # Steps of the letters as written (leetspeak folds letters together, which
        # a shift would not keep).
        self._steps = _Runs(
            "\x00".join(letter_steps(normalise(span, leet=False)) for span, _p in kept)
        )

    def __bool__(self) -> bool:
        return bool(self._text.text)

    @classmethod
    def of_request(
        cls, messages: Sequence[Mapping[str, Any]], marks: Sequence[TaintMark] = ()
    ) -> Taint:
        """The taint of a chat request: each ``tool``-role message whole, and each
        mark. Raises :class:`InvalidTaintMark` for a mark outside the messages."""
        spans = [str(m.get("content") or "") for m in messages if m.get("role") == "tool"]
        for i, mark in enumerate(marks):
            if not 0 <= mark.message < len(messages):
                raise InvalidTaintMark(f"bastion_tainted[{i}] names no message", mark_index=i)
            content = str(messages[mark.message].get("content") or "")
            if not 0 <= mark.start < mark.end <= len(content):
                raise InvalidTaintMark(
                    f"bastion_tainted[{i}] is not a span of its message", mark_index=i
                )
            spans.append(content[mark.start : mark.end])
        return cls(spans)

    def found_in(self, text: str) -> bool:
        """True when ``text`` shares a normalised run of at least
        :data:`TAINT_MIN_CHARS` characters with a tainted span, as written or
        under a letter substitution that keeps its steps (any Caesar shift,
        ROT13 among them) or mirrors them (Atbash)."""
        if not self:
            return False
        probe = normalise(text)
        if len(probe) < TAINT_MIN_CHARS:
            return False
        if self._text.shared_with(probe):
            return True
        steps = letter_steps(normalise(text, leet=False))
        return self._steps.shared_with(steps) or self._steps.shared_with(_mirrored(steps))


# -- what an argument carries ---------------------------------------------------------------

# A vault token (bastion.safety.pii.TOKEN_PATTERN) in its brackets in any case,
# or without them in its own spelling (label in capitals, 16 hex digits).
_VAULT_TOKEN = re.compile(
    r"(?i:⟦\s*[a-z][a-z_]{1,30}_[0-9a-f]{16}\s*⟧)"
    r"|(?<![A-Za-z0-9])[A-Z][A-Z_]{1,30}_[0-9a-f]{16}(?![0-9A-Za-z])"
)
# Credential formats with a recognisable shape.
_SECRET_PATTERNS = re.compile(
    "|".join(
        (
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----",
            r"\bsk-(?:proj-|live-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic
            r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
            r"\bwhsec_[A-Za-z0-9+/=]{16,}",  # webhook signing secrets
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",  # AWS access key ids
            r"\bgh[pousr]_[A-Za-z0-9]{30,}",  # GitHub
            r"\bgithub_pat_[A-Za-z0-9_]{30,}",
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
            r"\bAIza[0-9A-Za-z_-]{35}",  # Google API keys
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
            r"\bhvs\.[A-Za-z0-9_-]{20,}",  # Vault/OpenBao tokens
        )
    )
)
# A known secret value shorter than this is not looked for (too many false hits).
MIN_SECRET_CHARS = 12


def carried(
    strings: Iterable[str], taint: Taint, secret_values: Iterable[str] = ()
) -> frozenset[str]:
    """What sensitive content the argument ``strings`` carry, under any reading
    (:func:`readings`): ``tainted``, ``vault-token``, ``secret``."""
    secrets = [s for s in secret_values if len(s) >= MIN_SECRET_CHARS]
    found: set[str] = set()
    for text in strings:
        for reading in readings(text):
            if "tainted" not in found and taint.found_in(reading):
                found.add("tainted")
            if "vault-token" not in found and _VAULT_TOKEN.search(reading):
                found.add("vault-token")
            if "secret" not in found and (
                _SECRET_PATTERNS.search(reading) or any(s in reading for s in secrets)
            ):
                found.add("secret")
    return frozenset(found)


# -- destinations ------------------------------------------------------------------------------

_URL = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]{1,15}):(?://|\\\\)[^\s<>\"'`]+")
_EMAIL = re.compile(r"(?i)[a-z0-9._%+'-]+@([a-z0-9-]+(?:\.[a-z0-9-]+)+)")
_HOST = re.compile(r"(?i)[a-z0-9](?:[a-z0-9-]{0,62}\.)+[a-z][a-z0-9-]{1,62}\.?")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True)
class Destination:
    """Where a call would send something: a URL (normalised), a host or an
    e-mail address's domain."""

    kind: Literal["url", "host", "email"]
    host: str  # the host (url, host) or the domain (email), normalised
    url: str = ""  # for kind "url": scheme://host[:port]/path, normalised


def normalise_host(host: str) -> str:
    """Lower-case, no trailing dot, IDNA (RFC 5891) A-labels; an IP address in
    its canonical form. Raises ValueError for something that is not a host."""
    host = host.strip().strip("[]").rstrip(".").lower()
    if not host:
        raise ValueError("empty host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("not a host name") from None
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError("not a host name")
    return host


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    result = "/".join(out)
    if path.endswith(("/.", "/..")):
        result += "/"
    return result if result.startswith("/") else "/" + result


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21}


def normalise_url(url: str) -> tuple[str, str]:
    """(host, ``scheme://host[:port]/path``) of an absolute URL, normalised for
    prefix matching: scheme and host lower-case, default port dropped,
    backslashes read as slashes, path percent-decoded and its dot segments
    removed (RFC 3986 §6.2.2). Query and fragment are dropped. Raises
    ValueError for a URL without a host."""
    parts = urlsplit(url.strip().replace("\\", "/"))
    if not parts.scheme or parts.hostname is None:
        raise ValueError("not an absolute URL")
    host = normalise_host(unquote(parts.hostname))
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port") from None
    scheme = parts.scheme.lower()
    netloc = host if ":" not in host else f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    return host, f"{scheme}://{netloc}{_remove_dot_segments(unquote(parts.path) or '/')}"


def _destination_of(value: str) -> Destination | None:
    """A declared destination value: a URL, an e-mail address, or a host."""
    text = value.strip()
    if text.lower().startswith("mailto:"):
        text = text[7:]
    if "://" in text or ":\\\\" in text:
        try:
            host, url = normalise_url(text)
        except ValueError:
            return Destination("host", text.lower())  # unparseable: never allow-listed
        return Destination("url", host, url)
    if "@" in text:
        domain = text.rsplit("@", 1)[1]
        try:
            return Destination("email", normalise_host(domain))
        except ValueError:
            return Destination("email", domain.lower())
    try:
        return Destination("host", normalise_host(text.split("/", 1)[0]))
    except ValueError:
        return Destination("host", text.lower())


def _found_in(text: str) -> Iterator[Destination]:
    """URLs and e-mail addresses anywhere in ``text``; the whole of it if it is a host."""
    for m in _URL.finditer(text):
        try:
            host, url = normalise_url(m.group(0).rstrip(".,;:!?)]}"))
        except ValueError:
            continue
        yield Destination("url", host, url)
    for m in _EMAIL.finditer(text):
        try:
            yield Destination("email", normalise_host(m.group(1)))
        except ValueError:
            continue
    if _HOST.fullmatch(text.strip()):
        with contextlib.suppress(ValueError):
            yield Destination("host", normalise_host(text))


def destination_names(declaration: Mapping[str, Any] | None) -> frozenset[str]:
    """Names of the properties the tool's parameters declare with a
    destination ``format``, at any depth."""
    names: set[str] = set()

    def walk(schema: Any, depth: int) -> None:
        if depth > 64:
            return
        if isinstance(schema, Mapping):
            for name, sub in (schema.get("properties") or {}).items():
                if isinstance(sub, Mapping) and sub.get("format") in DESTINATION_FORMATS:
                    names.add(str(name))
            for value in schema.values():
                walk(value, depth + 1)
        elif isinstance(schema, list):
            for value in schema:
                walk(value, depth + 1)

    function = (declaration or {}).get("function")
    if isinstance(function, Mapping):
        walk(function.get("parameters"), 0)
    return frozenset(names)


def strings_of(value: Any, under: str | None = None) -> Iterator[tuple[str | None, str]]:
    """Every string in a JSON value with the name of the member it sits under
    (object keys are strings too)."""
    stack: list[tuple[str | None, Any]] = [(under, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            yield name, item
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                yield None, str(key)
                stack.append((str(key), sub))
        elif isinstance(item, list):
            stack.extend((name, sub) for sub in item)


def destinations(arguments: Any, declaration: Mapping[str, Any] | None) -> list[Destination]:
    """Every destination in the call's arguments (a parsed JSON value)."""
    declared = destination_names(declaration)
    found: dict[Destination, None] = {}
    for name, text in strings_of(arguments):
        if name in declared and (one := _destination_of(text)) is not None:
            found.setdefault(one, None)
        for reading in readings(text):
            for one in _found_in(reading):
                found.setdefault(one, None)
    return list(found)


# -- allow-lists ---------------------------------------------------------------------------------


def normalise_entry(kind: str, value: str) -> str:
    """The stored form of an allow-list entry; raises ValueError when it is not one.

    ``host``: a host name or IP address (``*.example.com`` for its subdomains);
    ``url_prefix``: an absolute http(s) URL (normalised as :func:`normalise_url`);
    ``email_domain``: the domain after the ``@``.
    """
    value = value.strip()
    if kind == "host":
        if value.startswith("*."):
            return "*." + normalise_host(value[2:])
        return normalise_host(value)
    if kind == "url_prefix":
        if not value.lower().startswith(("https://", "http://")):
            raise ValueError("a URL prefix is an absolute http(s) URL")
        if urlsplit(value).query or urlsplit(value).fragment:
            raise ValueError("a URL prefix has no query or fragment")
        return normalise_url(value)[1]
    if kind == "email_domain":
        return normalise_host(value.removeprefix("@"))
    raise ValueError("unknown entry kind")


@dataclass(frozen=True)
class AllowEntry:
    kind: EntryKind
    value: str  # normalised (normalise_entry)
    tool: str | None = None  # None: every tool

    def allows(self, destination: Destination) -> bool:
        if self.kind == "host":
            if destination.kind == "email":
                return False
            if self.value.startswith("*."):
                return destination.host.endswith(self.value[1:])
            return destination.host == self.value
        if self.kind == "url_prefix":
            if destination.kind != "url" or not destination.url.startswith(self.value):
                return False
            rest = destination.url[len(self.value) :]
            return self.value.endswith("/") or rest == "" or rest[0] == "/"
        return destination.kind == "email" and destination.host == self.value


@dataclass(frozen=True)
class EgressRules:
    """A tenant's egress policy: the action on a violation, and its allow-list."""

    action: EgressAction = "block"
    entries: tuple[AllowEntry, ...] = ()

    def allows(self, tool: str, destination: Destination) -> bool:
        return any(
            entry.allows(destination)
            for entry in self.entries
            if entry.tool is None or entry.tool == tool
        )


# -- the decision ----------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """What one proposed call would carry out, before the allow-list is asked."""

    carried: frozenset[str] = frozenset()
    destinations: tuple[Destination, ...] = ()

    @property
    def needs_check(self) -> bool:
        return bool(self.carried and self.destinations)


def exposure(
    arguments: str,
    declaration: Mapping[str, Any] | None,
    taint: Taint,
    secret_values: Iterable[str] = (),
) -> Exposure:
    """The sensitive content a call's ``arguments`` (JSON text) carry, and the
    destinations they name; nothing when either is absent."""
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        parsed = arguments  # checked against the schema elsewhere; scan it as text
    found = destinations(parsed, declaration)
    if not found:
        return Exposure()
    return Exposure(
        carried([text for _name, text in strings_of(parsed)], taint, secret_values),
        tuple(found),
    )


@dataclass(frozen=True)
class EgressDecision:
    carried: frozenset[str]
    refused_destinations: tuple[Destination, ...] = field(default=())

    @property
    def violates(self) -> bool:
        return bool(self.refused_destinations)

    def details(self) -> dict[str, Any]:
        """For the audit event: kinds and counts, never a value of the arguments."""
        return {
            "carried": sorted(self.carried),
            "destinations": sorted({d.kind for d in self.refused_destinations}),
            "destinations_refused": len(self.refused_destinations),
        }


def decide(tool: str, seen: Exposure, rules: EgressRules) -> EgressDecision:
    """Which of the call's destinations the rules do not allow, given what it carries."""
    if not seen.needs_check:
        return EgressDecision(seen.carried)
    refused = tuple(d for d in seen.destinations if not rules.allows(tool, d))
    return EgressDecision(seen.carried, refused)
