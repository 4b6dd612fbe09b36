"""Signed checkpoints of the audit chain, exported outside the database.

A checkpoint run signs, with Ed25519 (JWS, RFC 7515; ``alg: Ed25519``,
RFC 9864), one statement per tenant whose trail grew since its last
checkpoint — ``{tenant_id, number, seq, hash}`` — and one global statement
``{number, at, prev, tenants}``: ``prev`` is the SHA-256 of the previous
global statement (so the checkpoints form a chain of their own), ``tenants``
the SHA-256 of each tenant statement of the run. The global chain is over
checkpoints, not events: no event waits on another tenant's.

A run happens when some tenant's trail grew by ``every_events`` or
``every_seconds`` passed since the last one, whichever comes first. Its
statements are stored (``bastion.audit_checkpoints``, for the api's
endpoint) and then written to the sink, a directory outside the database,
one file per run, never overwritten. ``bastion audit verify`` trusts the
sink's files, not the tables: a superuser who rewrites the tables cannot
rewrite what was exported.

The signing keys are a :class:`~bastion.secrets.keyring.JwkRing` in the key
ring (secret ``audit/checkpoint-signing``), published as a JWK Set at
``/.well-known/bastion-audit-keys``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from bastion import jsonsafe
from bastion.audit.chain import Anchor
from bastion.db.pool import Database
from bastion.jcs import canonicalize
from bastion.logs import get_logger
from bastion.secrets.keyring import JwkRing
from bastion.secrets.protocols import Keystore
from bastion.settings import Settings

_log = get_logger("bastion.audit")

SECRET_NAME = "audit/checkpoint-signing"  # noqa: S105 - a secret's name, not a secret
ALGORITHM = "Ed25519"
KEYS_PATH = "/.well-known/bastion-audit-keys"
TENANT_TYPE = "bastion-audit-checkpoint+jws"
GLOBAL_TYPE = "bastion-audit-global-checkpoint+jws"
PLATFORM = UUID(int=0)
_LOCK = 0x61756469745F6370  # pg_advisory_xact_lock key: one checkpoint run at a time
_MAX_FILE_BYTES = 64 * 1024 * 1024
_FILE_PREFIX = "checkpoint-"


class AuditKeys(JwkRing[OKPKey]):
    """Ed25519 checkpoint-signing keys with publish-ahead rotation, in the key ring."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        publish_ahead: timedelta = timedelta(minutes=5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            keystore,
            secret_name=SECRET_NAME,
            key_type=OKPKey,
            curve="Ed25519",
            algorithm=ALGORITHM,
            publish_ahead=publish_ahead,
            clock=clock,
        )


def digest(compact: str) -> str:
    """The hex SHA-256 of a compact JWS: how one statement names another."""
    return hashlib.sha256(compact.encode()).hexdigest()


def _sign(keys: AuditKeys, typ: str, payload: Mapping[str, Any]) -> str:
    kid, key = keys.current()
    header = {"alg": ALGORITHM, "kid": kid, "typ": typ}
    return jws.serialize_compact(header, canonicalize(dict(payload)), key, algorithms=[ALGORITHM])


class CheckpointInvalid(Exception):
    """A checkpoint that does not verify; the message says why, never a key."""


def open_statement(
    compact: str, typ: str, public_key: Callable[[object], OKPKey | None]
) -> dict[str, Any]:
    """The payload of a signed statement of type ``typ``; raises
    :class:`CheckpointInvalid` unless its signature verifies with a published key."""
    try:
        header = jws.extract_compact(compact.encode()).protected
        key = public_key(header.get("kid"))
        if key is None:
            raise CheckpointInvalid("signed by an unknown key")
        if header.get("typ") != typ or header.get("alg") != ALGORITHM:
            raise CheckpointInvalid("not a checkpoint statement")
        payload = jsonsafe.loads(
            jws.deserialize_compact(compact, key, algorithms=[ALGORITHM]).payload
        )
    except (JoseError, ValueError, UnicodeDecodeError):
        raise CheckpointInvalid("signature or encoding does not verify") from None
    if not isinstance(payload, dict):
        raise CheckpointInvalid("not a checkpoint statement")
    return payload


# -- the sink: a directory outside the database ------------------------------------


def checkpoint_dir(settings: Settings) -> Path:
    """The sink: ``audit_checkpoint_dir``, else ``<home>-audit`` (outside the data)."""
    if settings.audit_checkpoint_dir is not None:
        return settings.audit_checkpoint_dir
    return settings.home.with_name(settings.home.name + "-audit")


class DirectorySink:
    """One file per checkpoint run (``checkpoint-<number>.json``, mode 0600),
    written once: an existing file is never replaced."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def last_number(self) -> int:
        numbers = [n for n, _path in self._files()]
        return max(numbers, default=0)

    def write(self, number: int, statement: str, tenants: list[str]) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self.directory / f"{_FILE_PREFIX}{number:012d}.json"
        body = json.dumps({"checkpoint": statement, "tenants": tenants}).encode()
        tmp = self.directory / f".{final.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, final)  # fails if the file exists: never overwritten
            except FileExistsError:
                if final.read_bytes() != body:
                    raise
        finally:
            tmp.unlink(missing_ok=True)

    def read(self) -> list[tuple[int, dict[str, Any] | None]]:
        """``(number, content)`` of every file, in order; content None when unreadable."""
        out: list[tuple[int, dict[str, Any] | None]] = []
        for number, path in sorted(self._files()):
            try:
                if path.stat().st_size > _MAX_FILE_BYTES:
                    raise ValueError("too large")
                value = jsonsafe.loads(path.read_text())
            except (OSError, ValueError):
                value = None
            out.append((number, value if isinstance(value, dict) else None))
        return out

    def files(self) -> list[tuple[int, Path]]:
        """``(number, path)`` of every checkpoint file, in order."""
        return sorted(self._files())

    def _files(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            stem = path.name.removeprefix(_FILE_PREFIX).removesuffix(".json")
            if path.name.startswith(_FILE_PREFIX) and stem.isdigit():
                found.append((int(stem), path))
        return found


@dataclass(frozen=True)
class SignedHistory:
    """What the sink's checkpoints prove: each tenant's signed heads, and what
    in the sink itself is wrong (a missing, unsigned or unlinked file)."""

    anchors: dict[str, list[Anchor]]
    problems: list[str]
    last_number: int


def read_history(
    sink: DirectorySink, public_key: Callable[[object], OKPKey | None]
) -> SignedHistory:
    """Verify every exported checkpoint and its link to the one before."""
    anchors: dict[str, list[Anchor]] = {}
    problems: list[str] = []
    prev = "0" * 64
    expected = 1
    last = 0
    for number, content in sink.read():
        if number != expected:
            problems.append(f"checkpoints {expected}..{number - 1} are missing from the sink")
        expected = number + 1
        try:
            if content is None:
                raise CheckpointInvalid("unreadable")
            statement = str(content.get("checkpoint", ""))
            payload = open_statement(statement, GLOBAL_TYPE, public_key)
            if payload.get("number") != number:
                raise CheckpointInvalid("its number is not its file's")
            if payload.get("prev") != prev:
                problems.append(f"checkpoint {number} does not link to checkpoint {number - 1}")
            tenant_statements = [str(t) for t in content.get("tenants") or []]
            if sorted(digest(t) for t in tenant_statements) != payload.get("tenants"):
                raise CheckpointInvalid("its tenant statements are not the signed ones")
            for compact in tenant_statements:
                head = open_statement(compact, TENANT_TYPE, public_key)
                if head.get("number") != number:
                    raise CheckpointInvalid("a tenant statement of another checkpoint")
                anchors.setdefault(str(head["tenant_id"]), []).append(
                    Anchor(number, int(head["seq"]), bytes.fromhex(str(head["hash"])))
                )
            prev = digest(statement)
            last = number
        except (CheckpointInvalid, KeyError, TypeError, ValueError) as exc:
            problems.append(f"checkpoint {number} does not verify: {exc}")
            prev = "unverifiable"
    return SignedHistory(anchors, problems, last)


# -- taking checkpoints --------------------------------------------------------------


class Checkpointer:
    """Signs the tenants' heads every ``every_events`` events or ``every_seconds``."""

    def __init__(
        self,
        db: Database,
        keys: AuditKeys,
        sink: DirectorySink,
        *,
        every_events: int = 1000,
        every_seconds: float = 60.0,
    ) -> None:
        self.db = db
        self.keys = keys
        self.sink = sink
        self.every_events = every_events
        self.every_seconds = every_seconds

    async def run_once(self, *, force: bool = False) -> int | None:
        """Take a checkpoint if one is due (any growth at all with ``force``);
        export every stored checkpoint the sink lacks. Returns the new number."""
        number = await self._take(force)
        await self.export()
        return number

    async def _take(self, force: bool) -> int | None:
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            heads = await (await tx.execute("SELECT * FROM bastion.audit_heads_all()")).fetchall()
            due = [
                h for h in heads if h["hash"] is not None and h["seq"] > (h["checkpoint_seq"] or 0)
            ]
            if not due:
                return None
            last = await (
                await tx.execute(
                    "SELECT number, jws, extract(epoch FROM now() - at)::float8 AS age "
                    "FROM bastion.audit_checkpoints ORDER BY number DESC LIMIT 1"
                )
            ).fetchone()
            grown = max(h["seq"] - (h["checkpoint_seq"] or 0) for h in due)
            if not (
                force
                or last is None
                or grown >= self.every_events
                or last["age"] >= self.every_seconds
            ):
                return None
            number = 1 if last is None else int(last["number"]) + 1
            statements = [
                (
                    h,
                    _sign(
                        self.keys,
                        TENANT_TYPE,
                        {
                            "tenant_id": str(h["tenant_id"]),
                            "number": number,
                            "seq": int(h["seq"]),
                            "hash": bytes(h["hash"]).hex(),
                        },
                    ),
                )
                for h in due
            ]
            statement = _sign(
                self.keys,
                GLOBAL_TYPE,
                {
                    "number": number,
                    "at": int(time.time()),
                    "prev": "0" * 64 if last is None else digest(str(last["jws"])),
                    "tenants": sorted(digest(s) for _h, s in statements),
                },
            )
            await tx.execute(
                "INSERT INTO bastion.audit_checkpoints (number, jws) VALUES (%s, %s)",
                (number, statement),
            )
            async with tx.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO bastion.audit_tenant_checkpoints "
                    "(tenant_id, number, seq, hash, jws) VALUES (%s, %s, %s, %s, %s)",
                    [(h["tenant_id"], number, h["seq"], h["hash"], s) for h, s in statements],
                )
        _log.info("audit_checkpoint", number=number, tenants=len(statements))
        return number

    async def export(self) -> None:
        """Write to the sink every stored checkpoint it does not hold yet."""
        after = await anyio.to_thread.run_sync(self.sink.last_number)
        async with self.db.tenant_tx(PLATFORM, None, "system") as tx:
            runs = await (
                await tx.execute(
                    "SELECT c.number, c.jws, coalesce(array_agg(t.jws ORDER BY t.tenant_id) "
                    "FILTER (WHERE t.jws IS NOT NULL), '{}') AS tenants "
                    "FROM bastion.audit_checkpoints c "
                    "LEFT JOIN bastion.audit_tenant_checkpoints t ON t.number = c.number "
                    "WHERE c.number > %s GROUP BY c.number ORDER BY c.number",
                    (after,),
                )
            ).fetchall()
        for run in runs:
            await anyio.to_thread.run_sync(
                self.sink.write, int(run["number"]), str(run["jws"]), list(run["tenants"])
            )

    @classmethod
    def from_settings(cls, settings: Settings, db: Database, keys: AuditKeys) -> Checkpointer:
        """The checkpointer the settings describe, exporting to :func:`checkpoint_dir`."""
        return cls(
            db,
            keys,
            DirectorySink(checkpoint_dir(settings)),
            every_events=settings.audit_checkpoint_events,
            every_seconds=settings.audit_checkpoint_seconds,
        )

    async def run_forever(self, poll_seconds: float | None = None) -> None:
        """Check every ``poll_seconds`` whether a checkpoint is due (the worker runs this).

        The default polls each second, or faster when ``every_seconds`` is
        shorter, so a checkpoint is never more than a poll late. Several
        workers may run this: the run's advisory lock and its "due" check
        make one of them sign and the others find nothing due.
        """
        if poll_seconds is None:
            poll_seconds = min(1.0, self.every_seconds / 2)
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # the next poll retries; never stops the worker
                _log.warning("audit_checkpoint_failed", error=type(exc).__name__)
            await anyio.sleep(poll_seconds)


# -- reading the published checkpoints ----------------------------------------------


@dataclass(frozen=True)
class TenantCheckpoint:
    """One tenant's signed head at a checkpoint run."""

    number: int
    seq: int
    hash: bytes
    jws: str


MAX_PAGE = 500


async def tenant_checkpoints(
    db: Database, tenant_id: UUID, user_id: UUID | None, role: str, *, after: int, limit: int
) -> list[TenantCheckpoint]:
    """The tenant's signed heads after checkpoint ``after``, oldest first (at most
    ``limit``, capped at :data:`MAX_PAGE`). Row-level security lets only the
    tenant's owners and auditors read them: anyone else reads none."""
    async with db.tenant_tx(tenant_id, user_id, role) as tx:
        rows = await (
            await tx.execute(
                "SELECT number, seq, hash, jws FROM bastion.audit_tenant_checkpoints "
                "WHERE number > %s ORDER BY number LIMIT %s",
                (after, max(1, min(limit, MAX_PAGE))),
            )
        ).fetchall()
    return [
        TenantCheckpoint(int(r["number"]), int(r["seq"]), bytes(r["hash"]), str(r["jws"]))
        for r in rows
    ]


__all__ = [
    "ALGORITHM",
    "KEYS_PATH",
    "AuditKeys",
    "CheckpointInvalid",
    "Checkpointer",
    "DirectorySink",
    "SignedHistory",
    "TenantCheckpoint",
    "checkpoint_dir",
    "digest",
    "open_statement",
    "read_history",
    "tenant_checkpoints",
]
