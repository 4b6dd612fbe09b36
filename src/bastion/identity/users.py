"""The people who sign in: the owner of ``bastion.users``.

Every read and write of the users table goes through these functions (the
ownership map in docs/architecture.md). Each one runs inside the caller's
transaction ``tx``, so the caller's tenant context and RLS decide what is
seen, and the caller's audit event commits with the change. Users are global:
one person may belong to several tenants (``bastion.memberships``, owned by
``bastion.tenants``).
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID, uuid4

from bastion.db.pool import Conn


async def user_id_by_email(tx: Conn, email: str) -> UUID | None:
    """Return the id of the user with ``email`` (case-insensitive) that ``tx`` may see."""
    row = await (
        await tx.execute("SELECT id FROM bastion.users WHERE email = %s", (email,))
    ).fetchone()
    return None if row is None else UUID(str(row["id"]))


async def ensure_user(tx: Conn, email: str, display_name: str = "") -> UUID:
    """Return the id of the user with ``email``, creating the user if new."""
    new_id = uuid4()
    await tx.execute(
        "INSERT INTO bastion.users (id, email, display_name) VALUES (%s, %s, %s) "
        "ON CONFLICT (email) DO NOTHING",
        (new_id, email, display_name),
    )
    existing = await user_id_by_email(tx, email)
    return new_id if existing is None else existing


async def profile(tx: Conn, user_id: UUID) -> tuple[str | None, str | None]:
    """Return the user's e-mail and display name, or Nones when ``tx`` cannot see them."""
    row = await (
        await tx.execute("SELECT email, display_name FROM bastion.users WHERE id = %s", (user_id,))
    ).fetchone()
    return (row["email"], row["display_name"]) if row else (None, None)


async def emails_by_email_order(tx: Conn, user_ids: Sequence[UUID]) -> list[tuple[UUID, str]]:
    """Return ``(id, e-mail)`` of those of ``user_ids`` that ``tx`` may see,
    ordered by e-mail as the database orders it (citext: case-insensitive)."""
    rows = await (
        await tx.execute(
            "SELECT id, email FROM bastion.users WHERE id = ANY(%s) ORDER BY email",
            (list(user_ids),),
        )
    ).fetchall()
    return [(UUID(str(r["id"])), r["email"]) for r in rows]
