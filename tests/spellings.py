"""Other spellings of the same bytes: what a lenient base64url or hex decoder
reads as the original value, and a strict one (:mod:`bastion.encoding`) refuses.

Every variant here decodes to the original bytes under Python's default
``base64.urlsafe_b64decode(text + padding)`` (padding added, stray characters
skipped, pad bits ignored, ``+``/``/`` taken for ``-``/``_``) — that is what
made one signed tool call run seven times."""

from __future__ import annotations

import base64

# The P-256 group order (SEC 2, section 2.4.2).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def lenient_b64url_decode(text: str) -> bytes:
    """What the old decoders did: pad, then decode skipping what does not fit."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pad_bits_flipped(text: str) -> str | None:
    """``text`` with the unused low bits of its last character set, or None when
    its length leaves no unused bits (a multiple of 4 characters)."""
    unused = {2: 4, 3: 2}.get(len(text) % 4)
    if not text or unused is None:
        return None
    last = _ALPHABET.index(text[-1])
    return text[:-1] + _ALPHABET[last | 1]  # the lowest bit is always unused here


def respellings(text: str) -> dict[str, str]:
    """Named variants of a base64url ``text`` that a lenient decoder reads as the
    same bytes (which ones depends on the length); each differs from ``text``."""
    # An inserted character counts for the old decoder's padding arithmetic:
    # the padding the text needs makes up for it.
    pad = "=" * (-len(text) % 4)
    variants = {
        "one '=' appended": text + "=",
        "two '=' appended": text + "==",
        "a '!' inserted": text[:1] + "!" + text[1:] + pad,
        "a space inserted": text[:2] + " " + text[2:] + pad,
        "a newline appended": text + pad + "\n",
        "a tab inserted": text[:3] + "\t" + text[3:] + pad,
    }
    flipped = pad_bits_flipped(text)
    if flipped is not None:
        variants["pad bits set"] = flipped
    for url, std in (("-", "+"), ("_", "/")):
        if url in text:
            variants[f"'{std}' for '{url}'"] = text.replace(url, std, 1)
    original = lenient_b64url_decode(text)
    return {name: v for name, v in variants.items() if _same_bytes(v, original)}


def _same_bytes(variant: str, original: bytes) -> bool:
    try:
        return lenient_b64url_decode(variant) == original
    except ValueError:  # binascii.Error: padding the old decoder refused too
        return False


def ecdsa_twin(signature: str) -> str:
    """The other valid ES256 signature of the same message: ``(r, n - s)`` for
    ``(r, s)`` (ECDSA signatures are malleable; RFC 7518 section 3.4 form)."""
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    twin = r + (P256_ORDER - s).to_bytes(32, "big")
    return base64.urlsafe_b64encode(twin).rstrip(b"=").decode()
