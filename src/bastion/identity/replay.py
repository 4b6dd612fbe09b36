"""Single use across processes: DPoP proofs' ``jti`` (RFC 9449 section 11.1) and
the api's signed envelopes' nonces, shared through PostgreSQL.

Each process first checks its own memory (:class:`~bastion.identity.dpop.MemoryReplayCache`,
the envelope signer's nonces); what passes there is then recorded with
``bastion.use_once`` (migration 0013), so a proof or envelope replayed to
another process on the same database is refused too. Opt-in
(``replay_store = "postgres"``): a single process needs none of it.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar

from bastion.db.pool import Database
from bastion.identity.dpop import ReplayCache

# Kept this long past the caller's expiry: the checks still accept a proof at
# its last instant, and the database's clock may trail this process's.
_MARGIN_SECONDS = 5.0

# What the DPoP verifier accepted last in this context (request task): the
# verifier is synchronous, the shared check is not, so the authenticator picks
# the key up right after verify() returns.
_accepted_proof: ContextVar[tuple[str, float] | None] = ContextVar(
    "bastion_accepted_proof", default=None
)


class SharedReplayStore:
    """Keys used once across every process on the database (``bastion.use_once``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def first_use(self, namespace: str, key: str, expires_at: float) -> bool:
        """Return True the first time ``key`` is used in ``namespace`` (until the
        Unix time ``expires_at``), False if any process used it already.

        One round trip on a pooled connection, outside any tenant context: keys
        are digests of random identifiers, global by nature.
        """
        digest = hashlib.sha256(
            namespace.encode() + b"\x00" + key.encode("utf-8", "surrogatepass")
        ).digest()
        async with self.db.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT bastion.use_once(%s, to_timestamp(%s)) AS fresh",
                (digest, expires_at + _MARGIN_SECONDS),
            )
            row = await cursor.fetchone()
        return row is not None and row["fresh"] is True


class RecordingReplayCache:
    """A :class:`ReplayCache` that checks ``local`` (this process) first and notes
    what it accepted, for :func:`take_accepted_proof` to hand to the shared store."""

    def __init__(self, local: ReplayCache) -> None:
        self.local = local

    def seen(self, key: str, expires_at: float) -> bool:
        if self.local.seen(key, expires_at):
            return True
        _accepted_proof.set((key, expires_at))
        return False


def take_accepted_proof() -> tuple[str, float] | None:
    """The ``(key, expires_at)`` a :class:`RecordingReplayCache` accepted last in
    this context, once (cleared on reading)."""
    accepted = _accepted_proof.get()
    _accepted_proof.set(None)
    return accepted


async def first_use_everywhere(store: SharedReplayStore) -> bool:
    """Return True if the DPoP proof the verifier accepted just now (in this
    context, with no await in between) was used by no process before; record it.

    False also when nothing was recorded (a verifier without the recording
    cache): refused, never let by.
    """
    accepted = take_accepted_proof()
    return accepted is not None and await store.first_use("dpop", *accepted)
