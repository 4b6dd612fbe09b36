"""The PII vault on the real database: deterministic per-tenant tokens,
ciphertext at rest, reveal only for revealing roles and only in the tenant,
audit, idempotence, collisions, crypto-shredding and bad input."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.audit.notes import open_note
from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.safety.pii import PiiInputNotText, PiiInputTooLarge, PiiRecognizer
from bastion.safety.vault import (
    PiiVault,
    RevealForbidden,
    TokenCollision,
    TokenMalformed,
    TokenNotFound,
    VaultKeyUnavailable,
    tokens_in,
)
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio

TEXT = (
    "Customer Jane.Doe@Example.com (phone +44 20 7946 0958) paid with 4242 4242 4242 4242; "
    "write back to jane.doe@example.com. Key sk-proj-abcdefghijklmnopqrstuvwx1234."
)


@dataclass
class Tenant:
    id: UUID
    owner: UUID
    contributor: UUID
    viewer: UUID


async def _tenant(db: Database, name: str) -> Tenant:
    service = TenantService(db)
    tenant = await service.create_tenant(f"{name}-{uuid4().hex[:8]}", name)
    users = {
        role: await service.add_member(tenant.id, f"{role}-{uuid4().hex[:6]}@{name}.test", role)
        for role in ("owner", "contributor", "viewer")
    }
    return Tenant(tenant.id, users["owner"], users["contributor"], users["viewer"])


@pytest.fixture
async def vault(keystore: LocalKeystore) -> AsyncIterator[PiiVault]:
    yield PiiVault(TenantKeys(LocalKMS(keystore)))


@pytest.fixture
async def pair(db: Database) -> tuple[Tenant, Tenant]:
    return await _tenant(db, "acme"), await _tenant(db, "globex")


def _rows(database: DbHandles, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(sql, args).fetchall()


def _reveals(database: DbHandles, tenant: UUID) -> int:
    return _rows(
        database,
        "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s AND action = 'pii.reveal'",
        tenant,
    )[0][0]


def _vault_rows(database: DbHandles, tenant: UUID) -> int:
    return _rows(database, "SELECT count(*) FROM bastion.pii_vault WHERE tenant_id = %s", tenant)[
        0
    ][0]


async def test_tokens_are_deterministic_within_a_tenant(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    first = await vault.tokenize(db, a.id, TEXT)
    again = await vault.tokenize(db, a.id, TEXT)
    assert first.text == again.text
    # Two spellings of one address share a token; four distinct values, five mentions.
    assert first.entities == 5 and len(first.tokens) == 4
    assert first.counts == {"email": 2, "phone": 1, "card": 1, "secret": 1}
    assert "jane" not in first.text.lower() and "4242 4242" not in first.text
    emails = [t for t in tokens_in(first.text) if t.startswith("⟦EMAIL_")]
    assert len(emails) == 1 and first.text.count(emails[0]) == 2
    assert _vault_rows(database, a.id) == 4


async def test_the_same_value_gets_unrelated_tokens_in_two_tenants(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant]
) -> None:
    a, b = pair
    in_a = tokens_in((await vault.tokenize(db, a.id, "mail ann@example.com")).text)
    in_b = tokens_in((await vault.tokenize(db, b.id, "mail ann@example.com")).text)
    assert len(in_a) == len(in_b) == 1 and in_a != in_b


async def test_the_messages_of_a_prompt_share_one_transaction(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    system, user, clean = await vault.tokenize_many(
        db,
        a.id,
        ["Agent for ann@example.com.", "I am ann@example.com, card 4242424242424242", "hi"],
    )
    assert tokens_in(system.text)[0] == tokens_in(user.text)[0]
    assert user.counts == {"email": 1, "card": 1} and clean.text == "hi" and clean.tokens == ()
    assert _vault_rows(database, a.id) == 2
    with pytest.raises(PiiInputNotText):
        await vault.tokenize_many(db, a.id, ["mail new@example.com", b"\xff"])
    assert _vault_rows(database, a.id) == 2  # all or nothing


async def test_only_ciphertext_and_wrapped_keys_at_rest(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    await vault.tokenize(db, a.id, "card 4242 4242 4242 4242, mail zed@example.com")
    blobs = b"".join(
        bytes(r[0])
        for r in _rows(
            database, "SELECT ciphertext FROM bastion.pii_vault WHERE tenant_id = %s", a.id
        )
    )
    assert blobs and b"4242" not in blobs and b"zed@" not in blobs
    (wrapped,) = _rows(
        database, "SELECT wrapped FROM bastion.pii_token_keys WHERE tenant_id = %s", a.id
    )[0]
    assert len(bytes(wrapped)) > 32  # a wrapped blob, not a bare key


async def test_tokenizing_twice_changes_nothing(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    once = await vault.tokenize(db, a.id, TEXT)
    rows = _vault_rows(database, a.id)
    twice = await vault.tokenize(db, a.id, once.text)
    assert twice.text == once.text and twice.tokens == () and twice.entities == 0
    assert _vault_rows(database, a.id) == rows


async def test_owner_reveals_and_it_is_audited(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    redaction = await vault.tokenize(db, a.id, TEXT)
    restored, revealed = await vault.reveal_text(
        db, a.id, redaction.text, user_id=a.owner, role="owner", reason="customer asked for a copy"
    )
    assert {r.kind for r in revealed} == {"email", "phone", "card", "secret"}
    # The first spelling seen is the one kept for the shared token.
    assert restored == TEXT.replace("jane.doe@example.com", "Jane.Doe@Example.com")
    (actor, target, details) = _rows(
        database,
        "SELECT actor, target, details FROM bastion.audit_events "
        "WHERE tenant_id = %s AND action = 'pii.reveal'",
        a.id,
    )[0]
    assert actor == f"user:{a.owner}" and target == "4 tokens"
    # The reason is sealed under the tenant's data key (the trail outlives a shred).
    assert "customer asked" not in str(details)
    async with db.tenant_tx(a.id, a.owner, "owner") as tx:
        assert await open_note(tx, vault.keys, a.id, details["reason"]) == (
            "customer asked for a copy"
        )
    assert sorted(details["tokens"]) == sorted(t.token for t in redaction.tokens)
    # The card's digits as written or run together (a random id may hold "4242").
    assert "4242 4242" not in str(details) and "42424242" not in str(details)
    assert "jane" not in str(details).lower()


@pytest.mark.parametrize("role", ["viewer", "contributor", "auditor", "billing-admin"])
async def test_other_roles_cannot_read_the_vault_even_without_cedar(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles, role: str
) -> None:
    a, _ = pair
    tokens = tokens_in((await vault.tokenize(db, a.id, "mail bo@example.com")).text)
    with pytest.raises(RevealForbidden):
        await vault.detokenize(db, a.id, tokens, user_id=a.viewer, role=role, reason="curious")
    assert _reveals(database, a.id) == 0
    # Nor by hand: the app role has no SELECT on the ciphertext column at all.
    for as_role in (role, "owner"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with db.tenant_tx(a.id, a.owner, as_role) as tx:
                await tx.execute("SELECT ciphertext FROM bastion.pii_vault")


async def test_any_role_may_tokenize_but_not_reveal(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    await vault.tokenize(db, a.id, "mail first@example.com")  # creates the tenant's keys
    as_viewer = await vault.tokenize(
        db, a.id, "mail viewer-typed@example.com", user_id=a.viewer, role="viewer"
    )
    again = await vault.tokenize(
        db, a.id, "mail viewer-typed@example.com", user_id=a.viewer, role="viewer"
    )
    assert again.text == as_viewer.text and _vault_rows(database, a.id) == 2
    tokens = [t.token for t in as_viewer.tokens]
    with pytest.raises(RevealForbidden):
        await vault.detokenize(db, a.id, tokens, user_id=a.viewer, role="viewer", reason="mine?")
    revealed = await vault.detokenize(
        db, a.id, tokens, user_id=a.owner, role="owner", reason="checking the viewer's entry"
    )
    assert [r.value for r in revealed] == ["viewer-typed@example.com"]


async def test_another_tenants_token_is_not_found_and_nothing_is_written(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, b = pair
    theirs = tokens_in((await vault.tokenize(db, b.id, "mail secret-b@example.com")).text)
    mine = tokens_in((await vault.tokenize(db, a.id, "mail mine@example.com")).text)
    with pytest.raises(TokenNotFound) as refused:
        await vault.detokenize(
            db, a.id, mine + theirs, user_id=a.owner, role="owner", reason="cross-tenant try"
        )
    assert "secret-b" not in str(refused.value.detail)
    assert _reveals(database, a.id) == 0 and _reveals(database, b.id) == 0


async def test_rls_keeps_vault_rows_in_their_tenant(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, b = pair
    await vault.tokenize(db, b.id, "mail only-b@example.com")
    async with db.tenant_tx(a.id, a.owner, "owner") as tx:
        cur = await tx.execute(
            "SELECT count(*) AS n FROM bastion.pii_vault WHERE tenant_id = %s", (b.id,)
        )
        assert (await cur.fetchone()) == {"n": 0}
        cur = await tx.execute("SELECT count(*) AS n FROM bastion.pii_token_keys")
        row = await cur.fetchone()
        assert row is not None and row["n"] <= 1  # its own key at most
    before = _vault_rows(database, b.id)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(a.id, a.owner, "owner") as tx:
            await tx.execute(
                "INSERT INTO bastion.pii_vault (tenant_id, token, kind, id, ciphertext, "
                "key_version) VALUES (%s, '⟦EMAIL_0123456789abcdef⟧', 'email', %s, '\\x00', 1)",
                (b.id, uuid4()),
            )
    assert _vault_rows(database, b.id) == before
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with db.tenant_tx(a.id, a.owner, "owner") as tx:
            await tx.execute("DELETE FROM bastion.pii_vault")
    assert _vault_rows(database, b.id) == before


async def test_tokenize_joins_the_callers_transaction(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    with pytest.raises(RuntimeError):
        async with db.tenant_tx(a.id, None, "system") as tx:
            redaction = await vault.tokenize(tx, a.id, "mail rolled@example.com")
            assert redaction.tokens
            raise RuntimeError("the caller fails later")
    assert _vault_rows(database, a.id) == 0


async def test_a_collision_is_refused_not_aliased(
    db: Database,
    vault: PiiVault,
    pair: tuple[Tenant, Tenant],
    database: DbHandles,
    keystore: LocalKeystore,
) -> None:
    a, _ = pair
    await vault.tokenize(db, a.id, "mail first@example.com")
    # Plant, as the superuser, another value's row under the token that
    # second@example.com will get (as if two values shared 64 bits of HMAC).
    async with db.tenant_tx(a.id, None, "system") as tx:
        key = await vault._token_key(tx, a.id)
    digest = hmac.new(key, b"email\x00second@example.com", hashlib.sha256).digest()
    token = f"⟦EMAIL_{digest[:8].hex()}⟧"
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "INSERT INTO bastion.pii_vault (tenant_id, token, kind, id, ciphertext, key_version) "
            "VALUES (%s, %s, 'email', %s, '\\x00', 1)",
            (a.id, token, uuid4()),
        )
    with pytest.raises(TokenCollision):
        await vault.tokenize(db, a.id, "mail second@example.com")


async def test_shredded_tenant_reveals_nothing(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    a, _ = pair
    keys = TenantKeys(LocalKMS(keystore))
    tokens = tokens_in((await PiiVault(keys).tokenize(db, a.id, "mail gone@example.com")).text)
    async with db.tenant_tx(a.id, None, "system") as tx:
        await keys.shred(tx, a.id)
    with pytest.raises(VaultKeyUnavailable):
        await PiiVault(TenantKeys(LocalKMS(keystore))).detokenize(
            db, a.id, tokens, user_id=a.owner, role="owner", reason="after the shred"
        )


async def test_bad_input_is_refused_and_writes_nothing(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    with pytest.raises(PiiInputNotText):
        await vault.tokenize(db, a.id, b"mail x@example.com \xff\xfe")
    with pytest.raises(PiiInputTooLarge):
        await vault.tokenize(db, a.id, "x@example.com " * 800_000)  # 11 MB
    assert _vault_rows(database, a.id) == 0
    for tokens in ([], ["not-a-token"], ["⟦email_0⟧"]):
        with pytest.raises(TokenMalformed):
            await vault.detokenize(db, a.id, tokens, user_id=a.owner, role="owner", reason="x y z")
    with pytest.raises(TokenMalformed):
        await vault.detokenize(
            db, a.id, ["⟦EMAIL_0123456789abcdef⟧"], user_id=a.owner, role="owner", reason="  "
        )
    assert _reveals(database, a.id) == 0


async def test_ingest_stores_tokens_and_the_vault_reveals_them(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    a, _ = pair
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    owner = Actor(a.id, a.owner, "owner")
    await kb.create_namespace(owner, "support")
    ticket = "Refund for a double charge. Contact ann.lee@example.com or +44 20 7946 0958."
    up = await kb.upload(
        Actor(a.id, a.contributor, "contributor"),
        "support",
        title="t",
        body=ticket.encode(),
        content_type="text/plain",
    )
    assert (await kb.ingest(a.id, up.document.id)).status == "indexed"
    info = await kb.document(owner, up.document.id)
    assert info.redactions == {"email": 1, "phone": 1}
    hits = await kb.search(owner, "support", query="refund double charge", k=1)
    text = hits[0].text
    assert "ann.lee" not in text and "7946" not in text and "⟦EMAIL_" in text
    restored, _ = await kb.vault.reveal_text(
        db, a.id, text, user_id=a.owner, role="owner", reason="support follow-up"
    )
    assert restored == ticket


async def test_a_document_too_large_to_scan_fails_with_a_reason(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    kb.vault = PiiVault(kb.keys, PiiRecognizer(max_chars=100))  # a tiny bound, same path
    owner = Actor(a.id, a.owner, "owner")
    await kb.create_namespace(owner, "support")
    up = await kb.upload(
        owner,
        "support",
        title="big",
        body=("x@example.com " * 20).encode(),
        content_type="text/plain",
    )
    outcome = await kb.ingest(a.id, up.document.id)
    assert outcome.status == "failed" and outcome.reason == "pii-scan-refused"
    info = await kb.document(owner, up.document.id)
    assert info.status == "failed" and info.failure_reason == "pii-scan-refused"
    assert _vault_rows(database, a.id) == 0
    chunks = _rows(
        database, "SELECT count(*) FROM bastion.chunks WHERE document_id = %s", up.document.id
    )
    assert chunks[0][0] == 0  # nothing unredacted was indexed


# -- what is a token is the vault's to say, not the text's shape (issue 23, finding 10) ---------

WRAPPED = {
    "card": "⟦CARD_4111111111111111⟧",  # token-shaped: sixteen hex digits
    "email": "⟦EMAIL_carol@example.com⟧",
    "iban": "⟦IBAN_DE89370400440532013000⟧",
}
RAW = ("4111111111111111", "carol@example.com", "DE89370400440532013000")


def _plant_token(database: DbHandles, tenant: UUID, token: str) -> None:
    """A row of ``tenant``'s vault under ``token``, whatever text it spells."""
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "INSERT INTO bastion.pii_vault (tenant_id, token, kind, id, ciphertext, key_version) "
            "VALUES (%s, %s, 'card', %s, '\\x00', 1)",
            (tenant, token, uuid4()),
        )


async def test_only_real_tokens_of_the_tenant_are_left_unscanned(
    db: Database, vault: PiiVault, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    """A value wrapped in token brackets is scanned and tokenized; a real token of
    this tenant stays as it is; a real token of another tenant is no token here —
    scanned (a planted one that spells a card number is redacted) and never revealed."""
    a, b = pair
    (own,) = tokens_in((await vault.tokenize(db, a.id, "mail ann@example.com")).text)
    (theirs,) = tokens_in((await vault.tokenize(db, b.id, "mail bob@example.com")).text)
    _plant_token(database, b.id, WRAPPED["card"])  # B's "token" is a card number to A
    text = f"pay {WRAPPED['card']}, write {WRAPPED['email']}, wire {WRAPPED['iban']}; "
    text += f"ours {own}, theirs {theirs}"
    done = await vault.tokenize(db, a.id, text)
    assert not any(value in done.text for value in RAW), done.text
    assert done.counts == {"card": 1, "email": 1, "iban": 1}
    assert own in done.text and done.kept == frozenset({own})
    assert theirs in done.text and theirs not in done.kept  # nothing in it to redact
    with pytest.raises(TokenNotFound):
        await vault.detokenize(db, a.id, [theirs], user_id=a.owner, role="owner", reason="x")
    # In B's own text its planted row is a token of B's: left as it is.
    in_b = await vault.tokenize(db, b.id, f"see {WRAPPED['card']}")
    assert in_b.text == f"see {WRAPPED['card']}" and in_b.kept == frozenset({WRAPPED["card"]})
    # A's tokenized text is stable: tokenized again, nothing changes.
    again = await vault.tokenize(db, a.id, done.text)
    assert again.text == done.text and again.entities == 0


async def test_ingest_scans_what_only_looks_like_a_token(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    a, _ = pair
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    owner = Actor(a.id, a.owner, "owner")
    await kb.create_namespace(owner, "wrapped")
    ticket = "Refund: card {card}, mail {email}, account {iban}.".format(**WRAPPED)
    up = await kb.upload(
        Actor(a.id, a.contributor, "contributor"),
        "wrapped",
        title="t",
        body=ticket.encode(),
        content_type="text/plain",
    )
    assert (await kb.ingest(a.id, up.document.id)).status == "indexed"
    assert (await kb.document(owner, up.document.id)).redactions == {
        "card": 1,
        "email": 1,
        "iban": 1,
    }
    hits = await kb.search(owner, "wrapped", query="refund card mail account", k=1)
    assert not any(value in hits[0].text for value in RAW), hits[0].text
