"""The reversible PII vault: values become deterministic tokens, originals stay encrypted.

:meth:`PiiVault.tokenize` replaces every value :class:`~bastion.safety.pii.PiiRecognizer`
finds with a token such as ``⟦EMAIL_3f9a2c0b7d1e4a58⟧`` and stores the
original in ``bastion.pii_vault``. The token is the first 64 bits of
HMAC-SHA256 (RFC 2104) under the tenant's token key over the kind and the
normalised value, so within a tenant one value always gets one token (a
model or an index can still tell two customers apart) while another tenant's
token for the same value is unrelated. The original is sealed with AES-256-GCM
under the tenant's data key (:mod:`bastion.secrets.tenant_keys`), bound to the
tenant and a row id derived from the full HMAC.

:meth:`PiiVault.detokenize` gives originals back only to ``owner`` and
``system`` database roles (row-level security on ``pii_vault``), only for
tokens of the caller's tenant, and writes an audit event naming who, which
tokens and why in the same transaction. The HTTP route in front of it also
requires the Cedar action ``pii:reveal``.

What counts as a token is the tenant's vault's to say, not the text's shape:
before scanning, the token-shaped strings of a text are looked up among the
tenant's rows, and only those found are left as they are. Anything else in
token brackets — a card number wrapped as ``⟦CARD_4111111111111111⟧``, another
tenant's token — is scanned like any other text, so wrapping a value cannot
carry it past redaction, and one tenant's tokens mean nothing in another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

import psycopg

from bastion.audit import log as audit
from bastion.audit.notes import sealed_note
from bastion.db.pool import Conn, Database
from bastion.errors import BastionError, Kind
from bastion.offload import FairProcessPool
from bastion.safety.pii import TOKEN_PATTERN, Entity, PiiRecognizer, mask, normalize
from bastion.safety.pii_allow import (
    EMPTY,
    AllowList,
    PiiAllowLists,
    PiiAllowListUnavailable,
    StaticAllowLists,
)
from bastion.safety.scanning import (
    INLINE_SCAN_CHARS,
    find_each,
    in_scanning_pool,
    offloadable,
    scanning_recognizer,
)
from bastion.secrets.errors import KMSError
from bastion.secrets.protocols import KMS, KeyContext, RotatesKEKs
from bastion.secrets.tenant_keys import (
    DecryptionFailed,
    KeyUnavailable,
    TenantKeys,
    announced_tenants,
    open_sealed,
    seal,
)

__all__ = [
    "PURPOSE",
    "PiiAllowListUnavailable",
    "PiiAllowLists",
    "PiiVault",
    "Redaction",
    "RevealForbidden",
    "Revealed",
    "StaticAllowLists",
    "TokenCollision",
    "TokenMalformed",
    "TokenNotFound",
    "TokenRef",
    "VaultKeyUnavailable",
    "tokens_in",
]

PURPOSE = "pii"  # the AAD purpose of vault ciphertext
MAX_REVEAL = 100  # tokens one reveal may ask for


class TokenNotFound(BastionError):
    # Also what another tenant's token looks like: its existence is not confirmed.
    slug = "pii-token-not-found"
    title = "No such token in this tenant's vault"
    kind = Kind.NOT_FOUND


class RevealForbidden(BastionError):
    slug = "pii-reveal-forbidden"
    title = "This role may not reveal personal data"
    kind = Kind.FORBIDDEN


class TokenMalformed(BastionError):
    slug = "pii-token-malformed"
    title = "Not a vault token"
    kind = Kind.UNPROCESSABLE


class TokenCollision(BastionError):
    """Two values share a token (odds ~n²/2⁶⁵): refused rather than aliased."""

    slug = "pii-token-collision"
    title = "Token collision in the vault"
    kind = Kind.INTERNAL


class VaultKeyUnavailable(BastionError):
    slug = "pii-vault-key-unavailable"
    title = "The tenant's vault key is unavailable"
    kind = Kind.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class TokenRef:
    token: str
    kind: str


@dataclass(frozen=True)
class Redaction:
    """Tokenized text and the tokens in it (each distinct token once, in order)."""

    text: str
    tokens: tuple[TokenRef, ...]
    counts: dict[str, int]  # values replaced by kind, repeats included ({"email": 2})
    kept: frozenset[str] = frozenset()  # real tokens of the tenant the text already held

    @property
    def entities(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Revealed:
    token: str
    kind: str
    value: str


def tokens_in(text: str) -> list[str]:
    """The vault tokens in ``text``, each once, in order of appearance."""
    return list(dict.fromkeys(m.group() for m in TOKEN_PATTERN.finditer(text)))


def _token_shaped(text: str | bytes) -> list[str]:
    """:func:`tokens_in` of ``text``, bytes included (none in bytes that are not
    UTF-8: the scan refuses those)."""
    if not isinstance(text, str):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return []
    return tokens_in(text)


def _label(kind: str) -> str:
    return kind.upper()


def token_of(token_key: bytes, kind: str, value: str, regions: Sequence[str]) -> tuple[str, UUID]:
    """The token of a ``kind`` value and the vault row id bound to its ciphertext."""
    canonical = normalize(kind, value, regions)
    digest = hmac.new(token_key, f"{kind}\x00{canonical}".encode(), hashlib.sha256).digest()
    return f"⟦{_label(kind)}_{digest[:8].hex()}⟧", UUID(bytes=digest[16:32])


Rows = dict[str, tuple[UUID, str, str]]  # token -> (row id, kind, value)


def _add_row(rows: Rows, token: str, row: tuple[UUID, str, str]) -> None:
    known = rows.setdefault(token, row)
    if known[0] != row[0]:
        raise TokenCollision("two values of this text share a token")


def _token_in(tokens: dict[tuple[str, str], str], entity: Entity) -> str:
    return tokens[(entity.kind, entity.value)]


def _tokenize_job(
    spec: tuple[tuple[str, ...], tuple[str, ...], int],
    texts: Sequence[str | bytes],
    opaque: frozenset[str],
    token_key: bytes,
    allow: AllowList = EMPTY,
) -> list[tuple[Redaction, Rows]]:
    """In a scanning process: find, token and mask each of ``texts`` (the work
    proportional to their size) but the values ``allow`` keeps; the caller seals
    and stores the distinct values."""
    recognizer = scanning_recognizer(*spec)
    out = []
    for text in texts:
        entities = allow.filter(recognizer.find(text, opaque=opaque))
        plain = text if isinstance(text, str) else bytes(text).decode()
        rows: Rows = {}
        tokens: dict[tuple[str, str], str] = {}
        for entity in entities:
            if (entity.kind, entity.value) not in tokens:
                token, row_id = token_of(token_key, entity.kind, entity.value, spec[1])
                _add_row(rows, token, (row_id, entity.kind, entity.value))
                tokens[(entity.kind, entity.value)] = token
        refs = tuple(dict.fromkeys(TokenRef(tokens[(e.kind, e.value)], e.kind) for e in entities))
        masked = mask(plain, entities, functools.partial(_token_in, tokens))
        counts = dict(Counter(e.kind for e in entities))
        kept = opaque.intersection(tokens_in(plain))
        out.append((Redaction(masked, refs, counts, kept), rows))
    return out


async def require_reveal(tx: Conn, refusal: str) -> None:
    """Raise :class:`RevealForbidden` (``refusal``) unless ``tx``'s signed context
    may read originals: the database's own answer, since ``pii_reveal`` refuses
    every role but ``owner`` and ``system``. A refusal leaves ``tx`` aborted."""
    try:
        await tx.execute("SELECT count(*) FROM bastion.pii_reveal(ARRAY[]::text[])")
    except psycopg.errors.InsufficientPrivilege:
        raise RevealForbidden(refusal) from None


class PiiVault:
    """Tokenize text into the tenant's vault; reveal originals to those allowed.

    ``keys`` gives the tenant's data keys (and its KMS, for the token key);
    ``recognizer`` decides what is personal data. Texts beyond a kilobyte
    are scanned in ``scans`` (default: the process's ``screens`` pool),
    within the tenant's share (:mod:`bastion.safety.scanning`).
    """

    def __init__(
        self,
        keys: TenantKeys,
        recognizer: PiiRecognizer | None = None,
        *,
        scans: FairProcessPool | None = None,
        allow_lists: PiiAllowLists | None = None,
    ) -> None:
        self.keys = keys
        self.recognizer = recognizer or PiiRecognizer()
        self.scans = scans
        # Values each tenant keeps in clear (bastion.safety.pii_allow); none without.
        self.allow_lists = allow_lists
        self._token_keys: dict[UUID, tuple[float, bytes]] = {}

    # -- the token key ------------------------------------------------------
    # A random 256-bit key per tenant, wrapped under the tenant's KEK and kept
    # in pii_token_keys. Not HKDF from the data key: data keys rotate, and a
    # token must stay the same across a rotation or the index and the vault
    # would disagree about who is who. Not a plain keystore secret either: by
    # sharing the tenant's KEK it is destroyed with it (TenantKeys.shred), and
    # a database dump alone computes no token. A key of its own also keeps
    # HMAC and AES-GCM keys apart (NIST SP 800-57 part 1, 5.2: one key, one use).

    @staticmethod
    def _context(tenant_id: UUID) -> KeyContext:
        return KeyContext(tenant_id, "pii-token-key", 1)

    async def _token_key(self, tx: Conn, tenant_id: UUID) -> bytes:
        key = await self._existing_token_key(tx, tenant_id)
        if key is None:
            key, wrapped = self.keys.kms.generate_data_key(self._context(tenant_id))
            # Two first writers race on the primary key; the loser takes the winner's.
            cur = await tx.execute(
                "INSERT INTO bastion.pii_token_keys (tenant_id, wrapped) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING RETURNING tenant_id",
                (tenant_id, wrapped),
            )
            if await cur.fetchone() is None:
                return await self._token_key(tx, tenant_id)
            # Not cached yet: this transaction may still roll back, and a
            # cached key that was never stored would make tokens nobody keeps.
        return key

    def forget_tenant(self, tenant_id: UUID) -> None:
        """Drop the tenant's token key from memory (its data was shredded)."""
        self._token_keys.pop(tenant_id, None)

    def forget_announced(self, announced: str) -> None:
        """Drop the token key of the tenant a shred announcement names (the
        SHA-256 of its id; ``*`` or anything unexpected: every tenant's)."""
        for tenant_id in announced_tenants(announced, self._token_keys):
            self._token_keys.pop(tenant_id, None)

    def forget_all(self) -> None:
        """Drop every token key from memory (a shred may have gone unseen)."""
        self._token_keys.clear()

    def holds_key_of(self, tenant_id: UUID) -> bool:
        """Whether a token key of the tenant is in this process's memory."""
        return tenant_id in self._token_keys

    async def _existing_token_key(self, tx: Conn, tenant_id: UUID) -> bytes | None:
        """The tenant's token key, or None if it has none yet (nothing is written)."""
        cached = self._token_keys.get(tenant_id)
        if cached is not None and time.monotonic() - cached[0] < self.keys.cache_seconds:
            return cached[1]
        cur = await tx.execute(
            "SELECT wrapped FROM bastion.pii_token_keys WHERE tenant_id = %s", (tenant_id,)
        )
        row = await cur.fetchone()
        if row is None:
            return None
        try:
            key = self.keys.kms.unwrap(row["wrapped"], self._context(tenant_id))
        except KMSError:
            raise VaultKeyUnavailable("the tenant's token key does not unwrap") from None
        if self.keys.may_cache() and self.keys.cache_seconds > 0:
            self._token_keys[tenant_id] = (time.monotonic(), key)
        return key

    def _token(self, token_key: bytes, entity: Entity) -> tuple[str, UUID]:
        """The token of ``entity`` and the vault row id bound to its ciphertext."""
        return token_of(token_key, entity.kind, entity.value, self.recognizer.regions)

    # -- tokenize -----------------------------------------------------------

    async def tokenize(
        self,
        db: Database | Conn,
        tenant_id: UUID,
        text: str | bytes,
        *,
        user_id: UUID | None = None,
        role: str = "system",
    ) -> Redaction:
        """Replace the personal data in ``text`` with the tenant's tokens.

        ``db`` is the pool (a transaction of ``tenant_id`` as ``role`` is
        opened) or a connection already inside such a transaction, e.g. the
        caller's own. Idempotent: a token already in ``text`` is kept, and the
        same value gives the same token. The first value of a tenant needs a
        role that may create its data key (owner, contributor or system).
        Raises :class:`~bastion.safety.pii.PiiInputTooLarge`,
        :class:`~bastion.safety.pii.PiiInputNotText`, :class:`TokenCollision`,
        or, for a large text, :class:`~bastion.safety.scanning.ScanBusy` (429)
        and :class:`~bastion.safety.scanning.ScanUnavailable` (503).
        """
        return (await self.tokenize_many(db, tenant_id, [text], user_id=user_id, role=role))[0]

    async def tokenize_many(
        self,
        db: Database | Conn,
        tenant_id: UUID,
        texts: Sequence[str | bytes],
        *,
        user_id: UUID | None = None,
        role: str = "system",
    ) -> list[Redaction]:
        """:meth:`tokenize` each of ``texts`` (the messages of one prompt) in one transaction.

        ``max_chars`` of the recognizer bounds each text; a caller bounds
        their number. Nothing is written unless every text scans. Only the
        token-shaped strings that are tokens of this tenant's vault are left
        as they are (:meth:`known_tokens`); anything else is scanned.
        """
        # Read first: if the tenant's allow-list cannot be read, nothing is
        # scanned or written (PiiAllowListUnavailable, fail closed).
        allow = await self.allow_lists.for_tenant(tenant_id) if self.allow_lists else EMPTY
        shaped = {token for text in texts for token in _token_shaped(text)}
        known: frozenset[str] = frozenset()
        if shaped:
            async with self._tx(db, tenant_id, user_id, role) as tx:
                known = await self.known_tokens(tx, tenant_id, shaped)
        if sum(len(t) for t in texts) > INLINE_SCAN_CHARS and offloadable(self.recognizer):
            return await self._tokenize_offloaded(db, tenant_id, texts, known, user_id, role, allow)
        entities_each = await find_each(
            tenant_id, texts, recognizer=self.recognizer, opaque=known, pool=self.scans
        )
        found: list[tuple[str, list[Entity]]] = [
            (text if isinstance(text, str) else bytes(text).decode(), allow.filter(entities))
            for text, entities in zip(texts, entities_each, strict=True)
        ]
        every = [entity for _, entities in found for entity in entities]
        tokens: dict[Entity, str] = {}
        if every:
            async with self._tx(db, tenant_id, user_id, role) as tx:
                tokens = await self._store(tx, tenant_id, every)
        out = []
        for plain, entities in found:
            refs = tuple(dict.fromkeys(TokenRef(tokens[e], e.kind) for e in entities))
            counts = dict(Counter(e.kind for e in entities))
            kept = known.intersection(tokens_in(plain))
            out.append(Redaction(mask(plain, entities, tokens.__getitem__), refs, counts, kept))
        return out

    async def _tokenize_offloaded(
        self,
        db: Database | Conn,
        tenant_id: UUID,
        texts: Sequence[str | bytes],
        known: frozenset[str],
        user_id: UUID | None,
        role: str,
        allow: AllowList,
    ) -> list[Redaction]:
        """:meth:`tokenize_many` of large texts: scanning, tokens and masking (about
        1 ms per KiB) in a scanning process under the tenant's share; here only
        the distinct values are sealed and stored. The token key is made first
        if the tenant has none (a key row, written even if no value is found)."""
        async with self._tx(db, tenant_id, user_id, role) as tx:
            token_key = await self._token_key(tx, tenant_id)
        spec = (self.recognizer.kinds, self.recognizer.regions, self.recognizer.max_chars)
        done = await in_scanning_pool(
            self.scans, tenant_id, _tokenize_job, spec, list(texts), known, token_key, allow
        )
        rows: Rows = {}
        for _redaction, found in done:
            for token, row in found.items():
                _add_row(rows, token, row)
        if rows:
            async with self._tx(db, tenant_id, user_id, role) as tx:
                await self._insert(tx, tenant_id, rows)
        return [redaction for redaction, _found in done]

    @staticmethod
    async def known_tokens(tx: Conn, tenant_id: UUID, candidates: Iterable[str]) -> frozenset[str]:
        """Which of ``candidates`` are tokens in ``tenant_id``'s vault (in ``tx``, a
        transaction of that tenant, any role: reading the token column reveals
        nothing). Another tenant's token, or a value in token brackets, is not."""
        wanted = sorted({c for c in candidates if TOKEN_PATTERN.fullmatch(c)})
        if not wanted:
            return frozenset()
        cur = await tx.execute(
            "SELECT token FROM bastion.pii_vault WHERE tenant_id = %s AND token = ANY(%s)",
            (tenant_id, wanted),
        )
        return frozenset(row["token"] for row in await cur.fetchall())

    @staticmethod
    @contextlib.asynccontextmanager
    async def _tx(
        db: Database | Conn, tenant_id: UUID, user_id: UUID | None, role: str
    ) -> AsyncIterator[Conn]:
        if isinstance(db, Database):
            async with db.tenant_tx(tenant_id, user_id, role) as tx:
                yield tx
        else:
            yield db

    async def _store(
        self, tx: Conn, tenant_id: UUID, entities: Sequence[Entity]
    ) -> dict[Entity, str]:
        """Insert each distinct value once; return each entity's token."""
        token_key = await self._token_key(tx, tenant_id)
        rows: Rows = {}
        tokens: dict[Entity, str] = {}
        for entity in entities:
            token, row_id = self._token(token_key, entity)
            _add_row(rows, token, (row_id, entity.kind, entity.value))
            tokens[entity] = token
        await self._insert(tx, tenant_id, rows)
        return tokens

    async def _insert(self, tx: Conn, tenant_id: UUID, rows: Rows) -> None:
        """Seal and insert the values of ``rows`` not in the vault yet; raise
        :class:`TokenCollision` if a token is another value's."""
        version, data_key = await self.keys.current(tx, tenant_id)
        names = list(rows)
        sealed = []
        for i, token in enumerate(names):
            row_id, _kind, value = rows[token]
            sealed.append(seal(data_key, PURPOSE, tenant_id, row_id, value.encode()))
            if i % 256 == 255:
                await asyncio.sleep(0)  # thousands of values: let other requests in
        ids = [rows[t][0] for t in names]
        # One statement: add what is new, and count existing rows whose id
        # differs (a collision with an earlier value).
        cur = await tx.execute(
            "WITH input AS (SELECT * FROM unnest(%s::text[], %s::uuid[], %s::text[], "
            "%s::bytea[]) AS u(token, id, kind, ciphertext)), "
            "added AS (INSERT INTO bastion.pii_vault (tenant_id, token, kind, id, ciphertext, "
            "key_version) SELECT %s, token, kind, id, ciphertext, %s FROM input "
            "ON CONFLICT (tenant_id, token) DO NOTHING) "
            "SELECT count(*) AS collisions FROM bastion.pii_vault v JOIN input i "
            "ON v.token = i.token WHERE v.tenant_id = %s AND v.id <> i.id",
            (
                names,
                ids,
                [rows[t][1] for t in names],
                sealed,
                tenant_id,
                version,
                tenant_id,
            ),
        )
        result = await cur.fetchone()
        if result is not None and result["collisions"]:
            raise TokenCollision("a value's token is already taken by another value")

    async def tokenized_form(self, tx: Conn, tenant_id: UUID, text: str) -> str | None:
        """``text`` as :meth:`tokenize` would write it, computed without writing anything.

        For matching a caller's words (a title filter) against stored tokenized
        text, in a transaction of ``tenant_id`` of any role. None when ``text``
        holds personal data and the tenant has no token key yet: then no stored
        text can contain its tokens.
        """
        known = await self.known_tokens(tx, tenant_id, tokens_in(text))
        (entities,) = await find_each(
            tenant_id, [text], recognizer=self.recognizer, opaque=known, pool=self.scans
        )
        if not entities:
            return text
        token_key = await self._existing_token_key(tx, tenant_id)
        if token_key is None:
            return None
        return mask(text, entities, lambda entity: self._token(token_key, entity)[0])

    # -- detokenize ---------------------------------------------------------

    async def detokenize(
        self,
        db: Database,
        tenant_id: UUID,
        tokens: Sequence[str],
        *,
        user_id: UUID | None,
        role: str,
        reason: str,
    ) -> list[Revealed]:
        """Return the originals of ``tokens`` (all of them, or raise).

        Runs as ``role`` in ``tenant_id``; the database gives originals to
        ``owner`` and ``system`` only (:class:`RevealForbidden` otherwise).
        The caller checks ``pii:reveal`` first. One audit event (``pii.reveal``: who, which
        tokens, why) is written in the same transaction. Raises
        :class:`TokenMalformed`, or :class:`TokenNotFound` if any token is not
        in this tenant's vault (another tenant's included) — then nothing is
        revealed and nothing written.
        """
        wanted = list(dict.fromkeys(tokens))
        if not wanted or len(wanted) > MAX_REVEAL:
            raise TokenMalformed(f"give 1 to {MAX_REVEAL} tokens")
        for token in wanted:
            if TOKEN_PATTERN.fullmatch(token) is None:
                raise TokenMalformed("tokens look like ⟦EMAIL_0123456789abcdef⟧")
        if not reason.strip():
            raise TokenMalformed("a reason is required")
        async with db.tenant_tx(tenant_id, user_id, role) as tx:
            try:
                cur = await tx.execute(
                    "SELECT token, kind, id, ciphertext, key_version "
                    "FROM bastion.pii_reveal(%s::text[])",
                    (wanted,),
                )
            except psycopg.errors.InsufficientPrivilege:
                raise RevealForbidden("only owners may reveal personal data") from None
            rows = {row["token"]: row for row in await cur.fetchall()}
            missing = [t for t in wanted if t not in rows]
            if missing:
                raise TokenNotFound(f"{len(missing)} of the tokens are not in this tenant's vault")
            revealed = []
            for token in wanted:
                row = rows[token]
                try:
                    key = await self.keys.get(tx, tenant_id, row["key_version"])
                    value = open_sealed(key, PURPOSE, tenant_id, row["id"], row["ciphertext"])
                except (KeyUnavailable, DecryptionFailed):
                    # Shredded keys, or a row moved from another tenant: fail closed.
                    raise VaultKeyUnavailable("this token's original cannot be opened") from None
                revealed.append(Revealed(token, row["kind"], value.decode()))
            await audit.record(
                tx,
                actor=f"user:{user_id}" if user_id else role,
                action="pii.reveal",
                target=wanted[0] if len(wanted) == 1 else f"{len(wanted)} tokens",
                details={
                    "tokens": wanted,
                    "kinds": dict(Counter(r.kind for r in revealed)),
                    # The member's words: sealed, as the trail outlives a shred.
                    "reason": await sealed_note(tx, self.keys, tenant_id, reason[:500]),
                },
            )
        return revealed

    async def reveal_text(
        self,
        db: Database,
        tenant_id: UUID,
        text: str,
        *,
        user_id: UUID | None,
        role: str,
        reason: str,
    ) -> tuple[str, list[Revealed]]:
        """``text`` with every token in it replaced by its original (see :meth:`detokenize`)."""
        found = tokens_in(text)
        if not found:
            return text, []
        revealed = await self.detokenize(
            db, tenant_id, found, user_id=user_id, role=role, reason=reason
        )
        values = {r.token: r.value for r in revealed}
        return TOKEN_PATTERN.sub(lambda m: values[m.group()], text), revealed


async def rewrap_token_key(tx: Conn, kms: KMS, tenant_id: UUID) -> int:
    """Re-wrap the tenant's PII token key under its current KEK (after a KEK
    rotation); return 1 if it has one, else 0. The key itself, and so every
    token, stays the same. ``tx``: a transaction of the tenant. Raises
    :class:`VaultKeyUnavailable`."""
    context = PiiVault._context(tenant_id)
    cur = await tx.execute(
        "SELECT wrapped FROM bastion.pii_token_keys WHERE tenant_id = %s FOR UPDATE",
        (tenant_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return 0
    try:
        if isinstance(kms, RotatesKEKs):  # the plaintext stays in the backend
            rewrapped = kms.rewrap(row["wrapped"], context)
        else:
            rewrapped = kms.wrap(kms.unwrap(row["wrapped"], context), context)
    except KMSError:
        raise VaultKeyUnavailable("the tenant's token key does not unwrap") from None
    await tx.execute(
        "UPDATE bastion.pii_token_keys SET wrapped = %s WHERE tenant_id = %s",
        (rewrapped, tenant_id),
    )
    return 1
