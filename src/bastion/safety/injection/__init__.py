"""Prompt-injection screening (OWASP Top 10 for LLM Applications 2025, LLM01).

:func:`screen` scores a text — a user's turn, a retrieved chunk, a model's
answer — with heuristics and returns a :class:`Verdict`: ``allow``,
``sanitize`` (the returned text has the offending parts removed) or
``block``, a score from 0 to 100 and the rules that fired. What it looks for:

* instruction-override phrases ("ignore previous instructions") in English,
  German, French, Spanish, Italian, Portuguese, Dutch, Polish, Turkish,
  Russian, Ukrainian, Chinese, Japanese, Korean, Arabic, Hindi, Vietnamese;
* system-prompt extraction, role-play jailbreaks (DAN, developer mode…), fake
  chat-template turns and delimiters, text addressed to "the AI" inside data;
* obfuscation: base64, base32, base85/ascii85 (RFC 4648, RFC 1924), hex,
  binary and Morse runs are decoded; %-, HTML and ``\\u`` escapes (any run
  length), spaced-out letters and Caesar/ROT13/Atbash text (chosen by letter
  frequency, never by a keyword) too; every decoded layer is screened, to a
  bounded depth and count; Unicode tag characters and variation-selector runs
  (invisible ASCII) are decoded; zero-width and bidi controls are stripped;
  homoglyphs (confusables after UTS #39) and compatibility letters (NFKC,
  UAX #15) are folded before matching;
* exfiltration: markdown/HTML images and links that carry data to a host,
  and instructions to send the tenant's data somewhere.

Structural defences live here too: :class:`Canary` (a secret per prompt in
the system prompt whose appearance in an answer blocks it), :func:`fence`
(retrieved text wrapped in per-request boundaries and labelled as data) and
:func:`check_output` (canary, and links or images to hosts not allow-listed).

Heuristics only: no scoring model is included (an offline classifier could be
added behind :func:`screen`; none ships with Bastion). Input is bounded:
:data:`MAX_CHARS` characters, well-formed Unicode; encoded blobs are decoded
to a bounded depth, count and size, so screening time is linear in the input.
"""

from bastion.safety.injection.engine import (
    BLOCK_AT,
    DEFAULT_POLICY,
    MAX_CHARS,
    REMOVED,
    SANITIZE_AT,
    Action,
    Decision,
    ScreenPolicy,
    Source,
    Verdict,
    screen,
)
from bastion.safety.injection.errors import (
    AnswerWithheld,
    PromptNotText,
    PromptRefused,
    PromptTooLarge,
)
from bastion.safety.injection.normalise import Finding
from bastion.safety.injection.output import Canary, check_output, derived_syllables, fence
from bastion.safety.injection.rules import RULES, Rule

__all__ = [
    "BLOCK_AT",
    "DEFAULT_POLICY",
    "MAX_CHARS",
    "REMOVED",
    "RULES",
    "SANITIZE_AT",
    "Action",
    "AnswerWithheld",
    "Canary",
    "Decision",
    "Finding",
    "PromptNotText",
    "PromptRefused",
    "PromptTooLarge",
    "Rule",
    "ScreenPolicy",
    "Source",
    "Verdict",
    "check_output",
    "derived_syllables",
    "fence",
    "screen",
]
