"""Strict text encodings of bytes: exactly one spelling per value (RFC 4648).

Signatures, tokens, key ids, nonces and digests travel as text. A decoder that
takes several spellings of the same bytes — with or without padding, with
whitespace or stray characters skipped, with the unused low bits of the last
character set or clear, hex in upper or lower case — lets one value pass for
many, and anything keyed on the text (a run or replay record, a cache, a
deny list) then counts it many times. RFC 4648 section 3.3 says decoders MUST
reject characters outside the alphabet; section 3.5 names the canonical
encoding, whose pad bits are zero. Every decoder here accepts exactly the
spelling its encoder writes and raises :class:`EncodingError` for any other:
``decode(text)`` succeeds only if ``encode(decode(text)) == text``.

- :func:`b64url_encode` / :func:`b64url_decode`: base64url without padding
  (RFC 4648 section 5, as JOSE uses it: RFC 7515 section 2 and appendix C);
- :func:`b64_encode` / :func:`b64_decode`: base64 with padding (section 4),
  the keystore file's format;
- :func:`hex_decode`: base16 in lower case (section 8), as ``hexdigest()`` writes it;
- :func:`parse_uuid`: the lower-case hyphenated UUID form (RFC 9562 section 4).

Ground floor: the standard library only, importable from every layer.
"""

from __future__ import annotations

import base64
import binascii
import re
from uuid import UUID

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class EncodingError(ValueError):
    """Text that is not the one canonical spelling of any byte string."""


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise EncodingError("not ASCII") from None
    return value


def _sized(data: bytes, size: int | None) -> bytes:
    if size is not None and len(data) != size:
        raise EncodingError(f"expected {size} bytes")
    return data


def b64url_encode(data: bytes) -> str:
    """base64url of ``data`` without padding (RFC 4648 section 5, RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes, *, size: int | None = None) -> bytes:
    """The bytes ``text`` spells in base64url without padding; ``size``, when given,
    is the exact length required. Raises :class:`EncodingError` for padding,
    whitespace, any character outside ``A-Z a-z 0-9 - _``, a length no byte string
    has, or set pad bits (so ``"AB"`` is refused: ``"AA"`` spells that byte)."""
    text = _text(text)
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise EncodingError("not base64url without padding")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise EncodingError("non-canonical base64url (pad bits set)")
    return _sized(data, size)


def b64_encode(data: bytes) -> str:
    """base64 of ``data`` with padding (RFC 4648 section 4)."""
    return base64.b64encode(data).decode("ascii")


def b64_decode(text: str | bytes, *, size: int | None = None) -> bytes:
    """The bytes ``text`` spells in padded base64 (RFC 4648 section 4); raises
    :class:`EncodingError` for anything but the canonical spelling."""
    text = _text(text)
    if len(text) % 4 or not _B64.fullmatch(text):
        raise EncodingError("not padded base64")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise EncodingError("not padded base64") from None
    if b64_encode(data) != text:
        raise EncodingError("non-canonical base64 (pad bits set)")
    return _sized(data, size)


def hex_decode(text: str | bytes, *, size: int | None = None) -> bytes:
    """The bytes ``text`` spells in lower-case hex (RFC 4648 section 8, the
    spelling of ``hexdigest()``); upper case, whitespace, separators, an odd
    length or a ``0x`` prefix raise :class:`EncodingError`."""
    text = _text(text)
    if not _HEX.fullmatch(text):
        raise EncodingError("not lower-case hex")
    return _sized(bytes.fromhex(text), size)


def parse_uuid(text: object) -> UUID:
    """The UUID ``text`` spells as ``str(UUID)`` does (lower-case, hyphenated,
    RFC 9562 section 4); braces, ``urn:uuid:``, upper case or missing hyphens
    raise :class:`EncodingError`."""
    if not isinstance(text, str) or not _UUID.fullmatch(text):
        raise EncodingError("not a lower-case hyphenated UUID")
    return UUID(text)


__all__ = [
    "EncodingError",
    "b64_decode",
    "b64_encode",
    "b64url_decode",
    "b64url_encode",
    "hex_decode",
    "parse_uuid",
]
