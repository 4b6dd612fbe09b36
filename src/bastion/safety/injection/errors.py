"""What screening refuses with: a prompt blocked, a text too large or not text,
an answer withheld."""

from __future__ import annotations

from bastion.errors import BastionError, Kind


class PromptRefused(BastionError):
    """A prompt (user turn) was blocked as an injection attempt."""

    slug = "prompt-refused"
    title = "The prompt was refused"
    kind = Kind.UNPROCESSABLE


class PromptTooLarge(BastionError):
    slug = "prompt-too-large"
    title = "The text is too large to screen"
    kind = Kind.TOO_LARGE


class PromptNotText(BastionError):
    slug = "prompt-not-text"
    title = "The text is not well-formed UTF-8"
    kind = Kind.UNPROCESSABLE


class AnswerWithheld(BastionError):
    """The model's answer failed the output checks (canary, exfiltration link).

    502: the upstream model's output was unacceptable; the client's request was
    not at fault. ``reason`` is stable: ``canary-leaked`` or ``exfiltration``.
    """

    slug = "answer-withheld"
    title = "The model's answer was withheld"
    kind = Kind.UPSTREAM_FAILED
