"""The compact JWS pre-checks every token reader shares (RFC 7515, sections 3.1 and 7.1).

Access tokens, DPoP proofs and external issuers' tokens are all compact JWS:
three base64url segments joined by dots, the first a JSON object (the
protected header). Each reader then applies its own header rules; this module
only decides whether a string has that shape, in one place, so the three
readers cannot drift apart on what they accept.
"""

from __future__ import annotations

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jws import CompactSignature, JWSRegistry


def segments(token: str) -> tuple[str, str, str] | None:
    """Return the header, payload and signature segments, or None if not three."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def parse(token: str, registry: JWSRegistry) -> CompactSignature | None:
    """Return ``token`` parsed (signature not checked) with a JSON-object header, or None."""
    if segments(token) is None:
        return None
    try:
        obj = jws.extract_compact(token.encode("ascii"), registry=registry)
    except (JoseError, ValueError, TypeError):
        return None
    return obj if isinstance(obj.protected, dict) else None
