"""The prompt-injection screening engine: normalise, match the rules, decode, score, decide.

The overview, and the standards it follows, are in :mod:`bastion.safety.injection`;
the rules it matches are data in :mod:`bastion.safety.injection.rules`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote

from bastion.safety.injection.errors import PromptNotText, PromptTooLarge
from bastion.safety.injection.rules import RULES, Rule

Decision = Literal["allow", "sanitize", "block"]
Source = Literal["user", "retrieved", "output"]

MAX_CHARS = 1_000_000
BLOCK_AT = 50
"""A score at or over this blocks a user turn (and drops a retrieved chunk
that is still over it once sanitized)."""
SANITIZE_AT = 25
"""A retrieved chunk scoring this much has its offending sentences removed."""
_MAX_DEPTH = 2
_MAX_BLOBS = 32
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

    @property
    def reasons(self) -> list[str]:
        """The rules that fired, each once, in order (for audit events and problems)."""
        return list(dict.fromkeys(f.rule for f in self.findings))

    def summary(self) -> dict[str, Any]:
        """Identifiers only — never the text — for an audit event or a log line."""
        return {"decision": self.decision, "score": self.score, "reasons": self.reasons}


# -- normalisation -------------------------------------------------------------------------

# Confusables folded to Latin before matching Latin-script rules: the
# "intentional" set of Unicode TS #39 plus the Cyrillic, Greek, Armenian and
# Latin-extended letters used in published homoglyph attacks.
_CONFUSABLES = dict(
    zip(
        (
            "\u0410\u0412\u0421\u0415\u041d\u0406\u0408\u041a\u041c\u041e\u0420\u0405"
            "\u0422\u0425\u04ae\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0455\u0456"
            "\u0458\u04bb\u0501\u051b\u051d\u04cf\u0405\u0391\u0392\u0395\u0396\u0397"
            "\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u03b1\u03bf\u03b9"
            "\u03c1\u03c5\u03bd\u03f3\u0251\u0261\u0269\u0131\u028f\u0585\u057d\u0570"
            "\u01c3"
        ),
        "ABCEHIJKMOPSTXYaeopcyxsijhdqwlSABEZHIKMNOPTYXaoipuvjagiiyouh!",
        strict=True,
    )
)
_CONF_CLASS = "".join(sorted({c.casefold() for c in _CONFUSABLES} & set(_CONFUSABLES)))
_MIXED = re.compile(rf"[a-z]\w*?[{_CONF_CLASS}]|[{_CONF_CLASS}]\w*?[a-z]")
_LEET = str.maketrans("013457@$", "oieastas")
_LEET_HINT = re.compile(r"[a-z][013457]|[013457][a-z]")
_LEET_WORD = re.compile(r"\b(?=\w*[a-z])(?=\w*[013457])[a-z013457]{3,}\b")
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\u180e\u00ad")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_TAGS = re.compile("[\U000e0000-\U000e007f]+")
_FLAG_TAGS = re.compile("[\U000e0061-\U000e007a]{2,6}\U000e007f")
_VS = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]{4,}")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Views:
    visible: str  # invisible characters removed
    plain: str  # NFKC + casefold, one character per visible character where possible
    folded: str  # plain with confusables and leetspeak folded to Latin
    origin: list[int] | None  # plain index -> visible index; None when identical
    hidden: list[str] = field(default_factory=list)  # texts decoded from tag/VS runs
    findings: list[Finding] = field(default_factory=list)


def _leet(text: str) -> str:
    if not _LEET_HINT.search(text):
        return text
    return _LEET_WORD.sub(lambda m: m.group(0).translate(_LEET), text)


def _decode_vs(run: str) -> str:
    # "Emoji smuggling": VS1-16 carry bytes 0-15, VS17-256 bytes 16-255.
    out = bytearray()
    for ch in run:
        code = ord(ch)
        out.append(code - 0xFE00 if code <= 0xFE0F else code - 0xE0100 + 16)
    return out.decode("utf-8", "replace")


def text_views(text: str) -> Views:
    findings: list[Finding] = []
    hidden: list[str] = []
    work = text
    if _TAGS.search(work):
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
    if _VS.search(work):
        for run in _VS.findall(work):
            hidden.append(_decode_vs(run))
        findings.append(Finding("invisible.variation-selectors", "invisible", 40))
        work = _VS.sub("", work)
    if not work.isascii():
        zero = sum(work.count(c) for c in _ZERO_WIDTH)
        bidi = sum(work.count(c) for c in _BIDI)
        if zero:
            # A joiner between emoji, or ZWNJ in Persian, is normal; inside Latin
            # words it hides text.
            inside = len(re.findall(r"[a-zA-Z][\u200b-\u200d\u2060\ufeff\u00ad]+[a-zA-Z]", work))
            if inside >= 2:
                findings.append(Finding("invisible.zero-width", "invisible", 25))
            work = re.sub(r"(?<=[a-zA-Z])[\u200c\u200d](?=[a-zA-Z])", "", work)
            work = "".join(c for c in work if c not in _ZERO_WIDTH - {"\u200c", "\u200d"})
        if bidi:
            findings.append(Finding("invisible.bidi-control", "invisible", 25))
            work = "".join(c for c in work if c not in _BIDI)
    visible = work
    if visible.isascii():
        plain = visible.lower()
        folded = _leet(plain)
        return Views(visible, plain, folded, None, hidden, findings)
    # Per distinct character (a few hundred at most), not per character: the
    # translations then run in C. Only expansions (ligatures, ß) need offsets.
    plain_map: dict[int, str] = {}
    fold_map: dict[int, str] = {}
    styled = 0
    for ch in set(visible):
        norm = unicodedata.normalize("NFKC", ch)
        if not ch.isascii() and norm != ch and norm.isascii() and norm.isalnum():
            styled += visible.count(ch)  # fullwidth or mathematical letters spelling ASCII
        piece = norm.casefold()
        plain_map[ord(ch)] = piece
        conf = _CONFUSABLES.get(piece) or _CONFUSABLES.get(ch)
        fold_map[ord(ch)] = conf.lower() if conf else piece
    plain = visible.translate(plain_map)
    folded = visible.translate(fold_map)
    origin: list[int] | None = None
    if len(plain) != len(visible) or len(folded) != len(visible):
        origin = [i for i, ch in enumerate(visible) for _ in plain_map[ord(ch)]]
        folded = "".join(
            fold_map[ord(ch)]
            if len(fold_map[ord(ch)]) == len(plain_map[ord(ch)])
            else plain_map[ord(ch)]
            for ch in visible
        )
    mixed = 0
    if any(c in _CONFUSABLES for c in plain_map.values()) or any(
        c in _CONFUSABLES for c in set(visible)
    ):
        for _word in _MIXED.finditer(plain):
            mixed += 1
            if mixed > 2:
                break
    if mixed:
        findings.append(Finding("homoglyph.mixed-script", "homoglyph", 45 if mixed > 2 else 35))
    if styled >= 5:
        findings.append(Finding("homoglyph.styled-letters", "homoglyph", 15))
    folded = _leet(folded)
    return Views(visible, plain, folded, origin, hidden, findings)


_MAX_LEADS = 4000  # more occurrences than this: one regex pass over the text instead


def _matches(rule: Rule, haystack: str) -> Iterable[re.Match[str]]:
    """The rule's matches, tried only where one of its leads occurs.

    ``str.find`` skips through text in C; the regex then runs once per
    occurrence, anchored there, instead of at every position of the text.
    """
    starts: set[int] = set()
    for lead in rule.leads:
        at = haystack.find(lead)
        while at >= 0:
            starts.add(at)
            if len(starts) > _MAX_LEADS:
                yield from (
                    m for m in rule.pattern.finditer(haystack) if _at_line_start(rule, haystack, m)
                )
                return
            at = haystack.find(lead, at + 1)
    end = -1
    for at in sorted(starts):
        if at < end:
            continue  # inside the previous match
        match = rule.pattern.match(haystack, at)
        if match is not None and _at_line_start(rule, haystack, match):
            end = match.end()
            yield match


def _at_line_start(rule: Rule, haystack: str, match: re.Match[str]) -> bool:
    if not rule.line_start:
        return True
    line = haystack.rfind("\n", 0, match.start()) + 1
    return haystack[line : match.start()].strip(" \t#>*-") == ""


_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]{24,}|(?:[0-9a-fA-F]{2}[\s:,]){11,}[0-9a-fA-F]{2}")
_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2}){6,}|(?:%[0-9a-fA-F]{2}){6,}")
_SENTENCE_END = re.compile(r"[.!?\n]")


def _printable(text: str) -> bool:
    if len(text) < 8:
        return False
    good = sum(1 for c in text if c.isprintable() or c in "\n\t")
    letters = sum(1 for c in text if c.isalpha())
    return good / len(text) > 0.95 and letters / len(text) > 0.5


def _decoded_blobs(visible: str) -> Iterable[tuple[str, str, int, int]]:
    """(kind, decoded text, start, end) for encoded runs that decode to readable text."""
    seen = 0
    for kind, pattern in (("base64", _BASE64), ("hex", _HEX), ("escape", _ESCAPES)):
        for match in pattern.finditer(visible):
            if seen >= _MAX_BLOBS:
                return
            blob = match.group(0)[:_MAX_BLOB]
            try:
                if kind == "base64":
                    if blob.isalpha() or blob.isdigit():
                        continue  # a long word or number, not an encoding
                    padded = blob.rstrip("=").replace("-", "+").replace("_", "/")
                    raw = base64.b64decode(padded + "=" * (-len(padded) % 4), validate=True)
                elif kind == "hex":
                    raw = binascii.unhexlify(re.sub(r"[\s:,]", "", blob)[: (len(blob) // 2) * 2])
                else:
                    raw = (
                        unquote(blob).encode("latin-1", "replace")
                        if blob.startswith("%")
                        else bytes(int(h, 16) for h in re.findall(r"[0-9a-fA-F]{2}", blob))
                    )
                decoded = raw.decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                continue
            if _printable(decoded):
                seen += 1
                yield kind, decoded, match.start(), match.end()


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
    for i in range(start - 1, line_start - 1, -1):
        closing = _QUOTES.get(visible[i])
        if closing is None or (i > 0 and visible[i - 1].isalnum()):
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
    if not views.origin:
        return 0, 0
    last = len(views.origin) - 1
    return views.origin[min(start, last)], views.origin[min(max(end - 1, 0), last)] + 1


def _findings(text: str, depth: int = 0) -> tuple[Views, list[Finding]]:
    views = text_views(text)
    found = list(views.findings)
    for rule in RULES:
        haystack = {"folded": views.folded, "plain": views.plain}.get(rule.view, views.visible)
        for match in _matches(rule, haystack):
            start, end = (
                (match.start(), match.end())
                if rule.view == "visible"
                else _span(views, match.start(), match.end())
            )
            if rule.category in _MENTIONED and _mentioned(views.visible, start, end):
                # Quoted and talked about: a mention, weighed low (and still reported).
                found.append(Finding(f"{rule.rule}.quoted", rule.category, 5, start, end))
            else:
                found.append(Finding(rule.rule, rule.category, rule.weight, start, end))
            if len(found) > 200:
                break
    if depth < _MAX_DEPTH:
        for hidden in views.hidden:
            _inner_views, inner = _findings(hidden, depth + 1)
            found += [Finding(f"invisible>{f.rule}", f.category, f.weight, 0, 0) for f in inner]
        for kind, decoded, start, end in _decoded_blobs(views.visible):
            _inner_views, inner = _findings(decoded, depth + 1)
            if inner:
                found.append(Finding(f"encoding.{kind}", "encoding", 20, start, end))
                found += [
                    Finding(f"encoding.{kind}>{f.rule}", f.category, f.weight, start, end)
                    for f in inner
                ]
        if "rot13" in views.plain or "rot-13" in views.plain or "rot 13" in views.plain:
            _inner_views, inner = _findings(codecs.encode(views.visible, "rot13"), depth + 1)
            strong = [f for f in inner if f.category in ("override", "extraction", "exfiltration")]
            found += [
                Finding(f"encoding.rot13>{f.rule}", f.category, f.weight, 0, 0) for f in strong
            ]
    return views, found


def total_score(findings: Iterable[Finding]) -> int:
    # Each rule counts once (its heaviest hit); a repeated phrase is not more evidence.
    best: dict[str, int] = {}
    for f in findings:
        best[f.rule] = max(best.get(f.rule, 0), f.weight)
    return min(100, sum(best.values()))


def _neutralise(visible: str, findings: Iterable[Finding]) -> str:
    """Replace each sentence holding a finding by :data:`REMOVED`."""
    spans: list[tuple[int, int]] = []
    for f in findings:
        if f.end <= f.start:
            continue
        start = f.start
        while start > 0 and not _SENTENCE_END.match(visible[start - 1]):
            start -= 1
        end_match = _SENTENCE_END.search(visible, f.end)
        end = end_match.end() if end_match else len(visible)
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
    if not text.isascii() and _SURROGATE.search(text):
        raise PromptNotText("the text holds unpaired surrogates (not well-formed Unicode)")
    return text


def screen(text: str | bytes, source: Source = "user") -> Verdict:
    """Screen ``text`` coming from ``source`` and decide what to do with it.

    ``user`` turns are blocked at :data:`BLOCK_AT`; invisible or smuggled
    characters alone are stripped (``sanitize``). ``retrieved`` chunks are
    sanitized from :data:`SANITIZE_AT` (each offending sentence replaced by
    :data:`REMOVED`) and blocked — to be dropped — when still over
    :data:`BLOCK_AT` after that, or when less than 40% of the text is left.
    ``output`` gets the same analysis; use :func:`check_output` for answers.
    Raises :class:`PromptTooLarge` over :data:`MAX_CHARS` and
    :class:`PromptNotText` for bytes that are not UTF-8 or text with unpaired
    surrogates.
    """
    text = checked_text(text)
    views, found = _findings(text)
    score = total_score(found)
    stripped = views.visible != text
    if source == "retrieved":
        if score < SANITIZE_AT and not stripped:
            return Verdict("allow", score, tuple(found), text, source)
        cleaned = _neutralise(views.visible, found) if score >= SANITIZE_AT else views.visible
        _rest_views, rest = _findings(cleaned)
        left = len(cleaned.replace(REMOVED, "").strip())
        # Dropped when still hostile, or when little but the attack was there.
        if total_score(rest) >= BLOCK_AT or left < 0.4 * len(views.visible.strip()):
            return Verdict("block", score, tuple(found), "", source)
        return Verdict("sanitize", score, tuple(found), cleaned, source)
    if score >= BLOCK_AT:
        return Verdict("block", score, tuple(found), "", source)
    if stripped:
        return Verdict("sanitize", score, tuple(found), views.visible, source)
    return Verdict("allow", score, tuple(found), text, source)
