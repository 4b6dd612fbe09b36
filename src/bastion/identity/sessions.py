"""A user's sessions: ending the others, and how recent the sign-in is.

A session is a refresh-token family (RFC 9700 section 4.14.2): one sign-in and
every token rotated from it. An access token names its family in ``sid``
(OpenID Connect Back-Channel Logout 1.0 section 2.1).

* After a password change, an MFA change or "sign out everywhere" every other
  family of the user ends, in every tenant (credentials and factors belong to
  the person), and unredeemed authorization codes with them
  (``bastion.revoke_sessions``, migration 0017). The caller's own session
  stays. Access tokens already issued live out their minutes (15 by default).
* Changing a second factor needs a sign-in within the last five minutes: the
  token's ``auth_time`` (OpenID Connect Core 1.0 section 2), which a refresh
  keeps, so a stolen refresh token cannot pass for a recent sign-in (the
  step-up of RFC 9470 with ``max_age``).
"""

from __future__ import annotations

import time
from uuid import UUID

from bastion.db.pool import Conn
from bastion.identity.tokens import AccessClaims

RECENT_SIGN_IN_SECONDS = 300
_MAX_REASON = 64


def session_of(claims: AccessClaims) -> UUID | None:
    """Return the refresh-token family ``claims`` were issued in, or None
    (an external issuer's token, or one minted outside a sign-in)."""
    if claims.sid is None:
        return None
    try:
        return UUID(claims.sid)
    except ValueError:
        return None


def signed_in_recently(
    claims: AccessClaims, max_age: int = RECENT_SIGN_IN_SECONDS, *, now: float | None = None
) -> bool:
    """Return True if the user behind ``claims`` signed in at most ``max_age``
    seconds ago. A token without ``auth_time`` never counts as recent."""
    if claims.auth_time is None:
        return False
    age = (time.time() if now is None else now) - claims.auth_time
    return -60 <= age <= max_age  # a minute of clock skew into the future, no more


async def revoke_other_sessions(tx: Conn, user_id: UUID, *, keep: UUID | None, reason: str) -> int:
    """End every session of ``user_id`` but ``keep``, in every tenant; return
    how many families were revoked.

    ``tx`` runs as the user themself (or as ``system``); the database refuses
    anyone else (``insufficient_privilege``). Commits or rolls back with the
    change that asked for it. Raises ValueError for a reason longer than 64.
    """
    if not reason or len(reason) > _MAX_REASON:
        raise ValueError("a reason of 1-64 characters is required")
    row = await (
        await tx.execute(
            "SELECT bastion.revoke_sessions(%s, %s, %s) AS revoked", (user_id, keep, reason)
        )
    ).fetchone()
    return int(row["revoked"]) if row else 0


async def revoke_sessions_scoped(
    tx: Conn, *, tenant_id: UUID | None, user_id: UUID | None, reason: str
) -> int:
    """End every session of ``user_id`` (in every tenant), of ``tenant_id`` (every
    user of it), of both together, or of everyone (neither); return how many
    families were revoked. Unredeemed authorization codes in the scope are
    spent first. ``tx`` must run as ``system`` (the incident runbook); the
    database refuses anyone else. Raises ValueError for a reason longer than 64.
    """
    if not reason or len(reason) > _MAX_REASON:
        raise ValueError("a reason of 1-64 characters is required")
    row = await (
        await tx.execute(
            "SELECT bastion.revoke_sessions_scoped(%s, %s, %s) AS revoked",
            (tenant_id, user_id, reason),
        )
    ).fetchone()
    return int(row["revoked"]) if row else 0
