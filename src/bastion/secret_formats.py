"""What a secret looks like: providers' published token formats, Shannon
entropy for the rest, and what a secret *reference* looks like.

Shared by the settings (which refuse a literal secret at start-up) and by
``bastion secrets scan`` (which looks for secrets in files and git history).
Ground floor: imports nothing of Bastion.

A match reports the span of the secret itself, so callers can point at it
(line, column) and redact it: nothing here returns or formats a value.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

# A reference to a value in a secret store (local://name, bao://kv/path#field,
# awskms://alias/name): a scheme, "://", and no credentials of its own; or a
# file (file:/run/secrets/x) or an environment variable (env:NAME) to read.
REFERENCE = re.compile(
    r"[a-z][a-z0-9]*://[^\s:@#]+(?:#[^\s]+)?|file:/[^\s]+|env:[A-Za-z_][A-Za-z0-9_]*"
)


@dataclass(frozen=True)
class SecretFormat:
    """One kind of secret: a stable rule id, a description, and its pattern.

    ``group`` is the pattern's group holding the secret (0: the whole match);
    ``public_prefix`` is how many leading characters of it are the format's
    published prefix (``sk_live_``), safe to show in a redacted preview.
    """

    rule_id: str
    title: str
    pattern: re.Pattern[str]
    group: int = 0
    public_prefix: int = 0
    # Literal substrings one of which every match holds (lower case: checked
    # on the lowered text): a text without any is skipped, which keeps a
    # repository scan fast.
    hints: tuple[str, ...] = ()


def _p(regex: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(regex, flags)


# Providers' own formats (their documentation or their secret-scanning
# partner patterns). Order matters where prefixes overlap (Anthropic's sk-ant-
# before OpenAI's sk-): an earlier format claims the span.
FORMATS: tuple[SecretFormat, ...] = (
    SecretFormat(
        "private-key",
        "Private key (PEM block)",
        _p(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
            r"(?:\r?\n|\\n)(?:[A-Za-z0-9+/=:,\- \t]|\r?\n|\\n){64,}?"
            r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        ),
        public_prefix=5,
        hints=("private key-----",),
    ),
    SecretFormat(
        "stripe-secret-key",
        "Stripe secret or restricted API key",
        _p(r"(?<![A-Za-z0-9_])(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,247}(?![0-9A-Za-z])"),
        public_prefix=8,
        hints=("_live_", "_test_"),
    ),
    SecretFormat(
        "stripe-webhook-secret",
        "Stripe webhook signing secret",
        _p(r"(?<![A-Za-z0-9_])whsec_[A-Za-z0-9+/=_\-]{24,}"),
        public_prefix=6,
        hints=("whsec_",),
    ),
    SecretFormat(
        "anthropic-api-key",
        "Anthropic API key",
        _p(r"(?<![A-Za-z0-9_-])sk-ant-(?:api|admin|oat)[0-9]{2}-[A-Za-z0-9_\-]{32,}"),
        public_prefix=7,
        hints=("sk-ant-",),
    ),
    SecretFormat(
        "openai-api-key",
        "OpenAI API key",
        _p(
            r"(?<![A-Za-z0-9_-])sk-(?!ant-)(?:proj-|svcacct-|admin-)?"
            r"(?=[A-Za-z0-9_\-]*[0-9])(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}"
        ),
        public_prefix=3,
        hints=("sk-",),
    ),
    SecretFormat(
        "aws-access-key-id",
        "AWS access key id",
        _p(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}(?![A-Z0-9])"),
        public_prefix=4,
        hints=("akia", "asia", "abia", "acca"),
    ),
    SecretFormat(
        "aws-secret-access-key",
        "AWS secret access key",
        _p(
            r"(?i:aws_?secret(?:_?access)?(?:_?key)?|secret_?access_?key)"
            r"[\"']?\s*[:=]{1,2}>?\s*[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
        ),
        group=1,
        hints=("secret",),
    ),
    SecretFormat(
        "github-token",
        "GitHub token",
        _p(
            r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,242})"
            r"(?![A-Za-z0-9_])"
        ),
        public_prefix=4,
        hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    SecretFormat(
        "slack-token",
        "Slack token or incoming-webhook URL",
        _p(
            r"(?<![A-Za-z0-9])xox[abposre]-[A-Za-z0-9\-]{10,}"
            r"|https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_\-]{20,}"
        ),
        public_prefix=5,
        hints=("xox", "hooks.slack.com"),
    ),
    SecretFormat(
        "google-api-key",
        "Google API key",
        _p(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_-])"),
        public_prefix=4,
        hints=("aiza",),
    ),
    SecretFormat(
        "jwt",
        "JSON Web Token",
        _p(
            r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}"
            r"\.[A-Za-z0-9_\-]{16,}(?![A-Za-z0-9_-])"
        ),
        public_prefix=3,
        hints=("eyj",),
    ),
)

HIGH_ENTROPY = SecretFormat(
    "high-entropy-secret",
    "High-entropy value assigned to a secret-like name",
    # name = "value" / name: value / "name": "value": a secret-like word in
    # the name (matched from the word on, so a scan stays linear), then a token.
    _p(
        r"(?i:(?:secret|token|passw(?:or)?d|passwd|api_?key|apikey|"
        r"private_?key|access_?key|signing_?key|credential|auth_?key)[A-Za-z0-9_.\-]{0,40})"
        r"[\"']?\s*(?::=|=>|[:=])\s*[bfru]{0,2}[\"']?([A-Za-z0-9+/=_\-]{20,})(?![A-Za-z0-9+/=_\-])"
    ),
    group=1,
    hints=(
        *("secret", "token", "passw", "api_key", "apikey", "private"),
        *("access", "signing", "credential", "auth"),
    ),
)


@dataclass(frozen=True)
class Match:
    """Where a secret is in a text: ``start``/``end`` are offsets of the secret."""

    fmt: SecretFormat
    start: int
    end: int


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    if not text:
        return 0.0
    counts = Counter(text)
    total = len(text)
    return -sum(n / total * math.log2(n / total) for n in counts.values())


def is_random_looking(token: str) -> bool:
    """Whether ``token`` looks like random key material rather than a word or name.

    Hex needs 32+ characters at >= 3 bits/char; other base64-ish tokens need
    letters and digits mixed at >= 4 bits/char (20+ characters). Identifiers
    (only letters and underscores) and all-one-case names are never random.
    """
    if re.fullmatch(r"[0-9a-fA-F]{32,}", token):
        return shannon_entropy(token) >= 3.0
    has_digit = any(c.isdigit() for c in token)
    has_upper = any(c.isupper() for c in token)
    has_lower = any(c.islower() for c in token)
    if not (has_digit and has_upper and has_lower):
        return False
    return shannon_entropy(token) >= 4.0


def find_secrets(text: str, *, entropy: bool = True) -> Iterator[Match]:
    """Yield every secret in ``text``, in order; formats first claim their span."""
    claimed: list[tuple[int, int]] = []
    found: list[Match] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in claimed)

    lowered = text.lower()
    for fmt in FORMATS:
        if fmt.hints and not any(hint in lowered for hint in fmt.hints):
            continue
        for hit in fmt.pattern.finditer(text):
            start, end = hit.span(fmt.group)
            if free(start, end):
                claimed.append((start, end))
                found.append(Match(fmt, start, end))
    if entropy and any(hint in lowered for hint in HIGH_ENTROPY.hints):
        for hit in HIGH_ENTROPY.pattern.finditer(text):
            start, end = hit.span(1)
            if free(start, end) and is_random_looking(hit.group(1)):
                claimed.append((start, end))
                found.append(Match(HIGH_ENTROPY, start, end))
    yield from sorted(found, key=lambda m: m.start)


def redacted(fmt: SecretFormat, secret: str) -> str:
    """A preview that shows the format's public prefix only, never secret characters."""
    return f"{secret[: fmt.public_prefix]}****({len(secret)} chars)"


def is_reference(value: str) -> bool:
    """Whether ``value`` is a secret-store reference rather than a secret."""
    return REFERENCE.fullmatch(value) is not None
