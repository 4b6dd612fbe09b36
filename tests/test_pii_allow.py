"""Per-tenant PII allow-lists (issue 16, item 2) on the real database: a
tenant's allow-listed values stay in clear in the gateway's prompts and in
ingested documents, only for that tenant, matched on the normalised value;
a list that cannot be read refuses the scan and writes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import pytest

from bastion.db.pool import Database
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.safety.pii_allow import PiiAllowLists, PiiAllowListUnavailable, StaticAllowLists
from bastion.safety.vault import PiiVault, tokens_in
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from tests.conftest import DbHandles
from tests.test_vault import Tenant, _rows, _tenant, _vault_rows

pytestmark = pytest.mark.anyio

SUPPORT = "support@acme.example"
PROMPT = "Write to Support@ACME.example, not to jane.doe@example.com (+44 20 7946 0958)."


@pytest.fixture
async def pair(db: Database) -> tuple[Tenant, Tenant]:
    return await _tenant(db, "acme"), await _tenant(db, "globex")


def _vault(keystore: LocalKeystore, store: object, ttl: float = 5.0) -> PiiVault:
    return PiiVault(
        TenantKeys(LocalKMS(keystore)),
        allow_lists=PiiAllowLists(store, ttl_seconds=ttl),  # type: ignore[arg-type]
    )


async def test_an_allow_listed_value_stays_in_clear_and_nothing_else_does(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, b = pair
    vault = _vault(keystore, StaticAllowLists({a.id: [SUPPORT]}))
    texts = [PROMPT, "staff: SUPPORT@acme.example"]
    first, second = await vault.tokenize_many(db, a.id, texts)
    # Kept in its own spelling (the list matches the normalised value) ...
    assert "Support@ACME.example" in first.text and "SUPPORT@acme.example" in second.text
    # ... while every other value of the text is tokenized as ever.
    assert "jane.doe" not in first.text and "7946" not in first.text
    assert first.counts == {"email": 1, "phone": 1} and second.counts == {}
    assert (
        _vault_rows(database, a.id) == 2
    )  # jane's address and the phone: no row for the kept value
    # Another tenant's list is its own: globex has none, so the address is tokenized.
    other, _ = await vault.tokenize_many(db, b.id, texts)
    assert "acme.example" not in other.text.lower() and other.counts["email"] == 2


async def test_a_large_text_scanned_in_a_scanning_process_keeps_the_same_values(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    a, _ = pair
    vault = _vault(keystore, StaticAllowLists({a.id: [SUPPORT, "+44 20 7946 0958"]}))
    text = (PROMPT + " ") * 40  # beyond INLINE_SCAN_CHARS: the offloaded path
    [redaction] = await vault.tokenize_many(db, a.id, [text])
    assert redaction.text.count("Support@ACME.example") == 40
    assert redaction.text.count("+44 20 7946 0958") == 40  # normalised to E.164, kept
    assert "jane.doe" not in redaction.text and redaction.counts == {"email": 40}


class _Broken:
    async def values(self, tenant_id: UUID) -> Sequence[str]:
        raise OSError("the allow-list store is down")


async def test_a_list_that_cannot_be_read_refuses_and_writes_nothing(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    vault = _vault(keystore, _Broken())
    with pytest.raises(PiiAllowListUnavailable) as refused:
        await vault.tokenize_many(db, a.id, [PROMPT])
    assert refused.value.retry_after == 5 and "jane" not in str(refused.value)
    assert _vault_rows(database, a.id) == 0
    keys = _rows(database, "SELECT count(*) FROM bastion.pii_token_keys WHERE tenant_id = %s", a.id)
    assert keys[0][0] == 0


async def test_an_invalid_list_refuses_rather_than_guessing(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    vault = _vault(keystore, StaticAllowLists({a.id: ["x" * 321]}))
    with pytest.raises(PiiAllowListUnavailable):
        await vault.tokenize_many(db, a.id, [PROMPT])
    assert _vault_rows(database, a.id) == 0


async def test_a_change_reaches_the_vault_within_the_cache_time(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    a, _ = pair
    store = StaticAllowLists({a.id: [SUPPORT]})
    vault = _vault(keystore, store, ttl=3600)
    assert "Support@ACME" in (await vault.tokenize(db, a.id, PROMPT)).text
    store.replace(a.id, [])  # the owner takes the address off the list
    assert "Support@ACME" in (await vault.tokenize(db, a.id, PROMPT)).text  # cached
    assert vault.allow_lists is not None
    vault.allow_lists.forget(a.id)
    assert "acme.example" not in (await vault.tokenize(db, a.id, PROMPT)).text.lower()


async def test_ingestion_indexes_allow_listed_values_in_clear(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant], database: DbHandles
) -> None:
    a, _ = pair
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    kb.vault = _vault(keystore, StaticAllowLists({a.id: [SUPPORT]}))
    owner = Actor(a.id, a.owner, "owner")
    await kb.create_namespace(owner, "support")
    up = await kb.upload(
        owner, "support", title="t", body=PROMPT.encode(), content_type="text/plain"
    )
    assert (await kb.ingest(a.id, up.document.id)).status == "indexed"
    hits = await kb.search(owner, "support", query="write to support", k=1)
    text = hits[0].text
    assert "Support@ACME.example" in text and "jane.doe" not in text
    assert len(tokens_in(text)) == 2 and _vault_rows(database, a.id) == 2


async def test_the_tenants_table_reaches_the_ingestion_vault(
    db: Database, keystore: LocalKeystore, pair: tuple[Tenant, Tenant]
) -> None:
    """The processes' vaults read the tenant's own table (migration 0028): an
    owner's entry keeps the value in clear for that tenant only."""
    from bastion.knowledge.service import build_knowledge
    from bastion.safety.tenant_policies import SafetyPolicies
    from bastion.settings import Settings

    a, b = pair
    await SafetyPolicies(db).allow_pii(a.id, a.owner, [("email", SUPPORT)])
    kb = build_knowledge(Settings(), db, LocalKMS(keystore))
    assert "Support@ACME.example" in (await kb.vault.tokenize(db, a.id, PROMPT)).text
    assert "acme.example" not in (await kb.vault.tokenize(db, b.id, PROMPT)).text.lower()
