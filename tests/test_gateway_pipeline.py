"""The gateway's pipeline keeps each call's state in its own call context
(issue 24, item 5): what one call found — the screen's verdicts, personal data
in its answer — is audited with that call and never with the next one, also
when several calls run one after another in the same task (an in-process
caller, a batch). And the shared DPoP replay check is handed the proof the
verifier accepted, explicitly.

Real PostgreSQL (audit events, budget), the real call ledger, screen and PII
scanner; the model provider is a scripted in-process one, so each call's answer
is known."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion.billing.budgets import BudgetService
from bastion.db.pool import Database
from bastion.gateway.ledger import CallLedger
from bastion.gateway.providers import Completion, Message, StreamItem, Usage
from bastion.gateway.routing import ModelRouter, Target
from bastion.gateway.service import Caller, GatewayService
from bastion.identity.dpop import DpopKey, DpopVerifier, MemoryReplayCache
from bastion.identity.errors import InvalidDpopProof
from bastion.identity.replay import SharedReplayStore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

pytestmark = pytest.mark.anyio
MODEL = "scripted"
PII_ANSWER = "Write to jane.roe@example.org or call +44 20 7946 0958. Done."
CLEAN_ANSWER = "The refund was issued on the fifth of March."
STREAMED_PII = "Ask mary.major@example.net. Thanks."
# A user turn the screen sanitizes (smuggled Unicode tag characters): one verdict.
SMUGGLED = "Hi" + "".join(chr(0xE0000 + ord(c)) for c in "psst")


class ScriptedProvider:
    """Answers each call with the next scripted text (plain or streamed)."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)

    async def complete(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        return Completion(self.answers.pop(0), "stop", Usage(5, 5))

    async def stream(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamItem]:
        for word in self.answers.pop(0).split(" "):
            yield word + " "
        yield Usage(5, 5)

    async def embed(self, model: str, inputs: Sequence[str]) -> tuple[list[list[float]], Usage]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


async def _tenant(db: Database) -> tuple[UUID, UUID]:
    tenants = TenantService(db)
    suffix = uuid4().hex[:8]
    tenant = (await tenants.create_tenant(f"pipe-{suffix}", "pipeline")).id
    user = await tenants.add_member(tenant, f"user-{suffix}@pipe.test", "contributor")
    start = datetime.now(UTC) - timedelta(minutes=1)
    await BudgetService(db).set_budget(
        tenant,
        period_start=start,
        period_end=start + timedelta(hours=1),
        call_limit=100,
        token_limit=10**6,
    )
    return tenant, user


def _invocations(database: DbHandles, tenant: UUID) -> list[dict[str, Any]]:
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT details FROM bastion.audit_events"
            " WHERE tenant_id = %s AND action = 'model.invoke' ORDER BY seq",
            (tenant,),
        ).fetchall()
    return [details for (details,) in rows]


async def test_calls_in_one_task_each_audit_only_their_own_findings(
    db: Database, database: DbHandles
) -> None:
    provider = ScriptedProvider([PII_ANSWER, CLEAN_ANSWER, STREAMED_PII])
    ledger = CallLedger(db, BudgetService(db), lease_calls=4, lease_seconds=5)
    service = GatewayService(ledger, {MODEL: ModelRouter([Target("only", provider)])})
    tenant, user = await _tenant(db)
    caller = Caller(tenant, user, frozenset({"contributor"}))
    ledger.start()
    try:
        # 1: a sanitized user turn, an answer with an address and a phone number.
        first, _ = await service.chat(
            caller, MODEL, [{"role": "user", "content": SMUGGLED}], max_tokens=32, temperature=1
        )
        assert "jane.roe@example.org" not in first.text
        # 2: no user turn to screen, a clean answer — in the same task.
        second, _ = await service.chat(
            caller,
            MODEL,
            [{"role": "system", "content": "Answer briefly."}],
            max_tokens=32,
            temperature=1,
        )
        assert second.text == CLEAN_ANSWER
        # 3: streamed, one address in the answer — still the same task.
        head, rest = await service.chat_stream(
            caller, MODEL, [{"role": "user", "content": "Who?"}], max_tokens=32, temperature=1
        )
        streamed = [head, *[item async for item in rest]]
        await rest.aclose()
        assert "mary.major@example.net" not in "".join(i for i in streamed if isinstance(i, str))
    finally:
        await ledger.aclose()  # flushes the audit events
    one, two, three = _invocations(database, tenant)
    assert [e["decision"] for e in (one, two, three)] == ["answered"] * 3
    assert [v["decision"] for v in one["screen"]] == ["sanitize"]
    assert one["pii_out"] == {"email": 1, "phone": 1}
    # What call 1 found is not call 2's: no verdict, nothing found in its answer.
    assert two["pii_out"] == {}
    assert two["screen"] == []
    # Nor the stream's: one address, its own.
    assert three["pii_out"] == {"email": 1}
    assert [v["decision"] for v in three["screen"]] == ["allow"]


async def test_the_shared_replay_check_gets_the_proof_the_verifier_accepted(
    db: Database,
) -> None:
    """Two processes (a verifier each, with its own memory) on one database: the
    proof the first accepted, handed to the shared store explicitly, is refused
    by the second; a proof it refuses is handed to nobody."""
    url = "https://gateway.bastion.test/v1/models"
    key = DpopKey.generate()
    proof = key.proof("GET", url, access_token="token")
    store = SharedReplayStore(db)
    here, there = DpopVerifier(MemoryReplayCache()), DpopVerifier(MemoryReplayCache())
    accepted = here.accept(proof, method="GET", url=url, access_token="token")
    assert accepted.jkt == key.thumbprint
    assert accepted.replay_key.startswith(f"{key.thumbprint}:")
    assert time.time() < accepted.expires_at <= time.time() + 61
    assert await store.first_use("dpop", accepted.replay_key, accepted.expires_at)
    # The other process's memory has not seen it; the store has.
    again = there.accept(proof, method="GET", url=url, access_token="token")
    assert again == accepted
    assert not await store.first_use("dpop", again.replay_key, again.expires_at)
    # This process refuses the replay itself, before any store is asked.
    with pytest.raises(InvalidDpopProof, match="replayed"):
        here.accept(proof, method="GET", url=url, access_token="token")
