"""Single use across processes: DPoP proofs' ``jti`` (RFC 9449 section 11.1) and
the api's signed envelopes' nonces, shared through PostgreSQL.

Each process first checks its own memory (:class:`~bastion.identity.dpop.MemoryReplayCache`,
the envelope signer's nonces); what passes there is then recorded with
``bastion.use_once`` (migration 0013), so a proof or envelope replayed to
another process on the same database is refused too. Opt-in
(``replay_store = "postgres"``): a single process needs none of it.

The caller hands over what its verifier accepted, explicitly: a DPoP proof's
:class:`~bastion.identity.dpop.AcceptedProof` (``replay_key``, ``expires_at``),
an envelope's nonce.
"""

from __future__ import annotations

import hashlib
from uuid import UUID

from bastion.audit import log as audit
from bastion.db.pool import Database
from bastion.logs import get_logger

_log = get_logger("bastion.identity")

# Kept this long past the caller's expiry: the checks still accept a proof at
# its last instant, and the database's clock may trail this process's.
_MARGIN_SECONDS = 5.0


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


class ReplayAudit:
    """Records a refused DPoP proof replay in the token's tenant's trail
    (``dpop.replay``, target the user), for the detectors."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __call__(self, tenant_id: UUID, user_id: UUID) -> None:
        # The request is refused either way: a failed write is logged, and
        # never turns the 401 into another answer.
        try:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                await audit.record(
                    tx, actor="identity", action="dpop.replay", target=f"user:{user_id}"
                )
        except Exception as error:
            _log.warning("dpop_replay_unrecorded", error=type(error).__name__)
