"""Signed receipts (CHECKLIST P4): a receipt verifies with the published keys; a
changed one, one signed by an unknown or retired key, or one dressed up with
another algorithm does not. Keys rotate with overlap. Over real HTTP: the
JWK Set endpoint, the receipts routes (tenant-scoped, billing:read) and the
``bastion receipts verify`` command against the served key set."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from joserfc import jws
from joserfc.jwk import OctKey
from typer.testing import CliRunner

from bastion.billing.budgets import BudgetService
from bastion.billing.receipts import (
    KEYS_PATH,
    PaidInvoice,
    ReceiptInvalid,
    ReceiptKeys,
    ReceiptService,
    jwks_lookup,
    sign_receipt,
    verify_receipt,
)
from bastion.billing.receipts_cli import receipts_app
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from tests.billing_account_stack import BillingStack, billing_server, seed_tenants
from tests.conftest import DbHandles, short_tempdir

pytestmark = pytest.mark.anyio
TOKENS = (10, 20, 30)
INVOICE = PaidInvoice(
    invoice_id="in_1QxTest",
    customer_id="cus_Test1",
    amount_paid=4900,
    currency="EUR",
    paid_at=datetime(2026, 11, 1, 12, 0, tzinfo=UTC),
)


def _keystore() -> tuple[LocalKeystore, Path]:
    base = short_tempdir("bastion-rkeys-")
    return LocalKeystore(base / "keystore.bin", base / "master.key"), base


@pytest.fixture(scope="module")
def receipt_keys() -> Iterator[ReceiptKeys]:
    """Keys on a key ring of this module's own: nothing here touches other tests'."""
    keystore, base = _keystore()
    try:
        yield ReceiptKeys(keystore, publish_ahead=timedelta(0))
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def close_period_with_calls(
    db: Database, tenant: UUID, tokens: tuple[int, ...], *, held: int = 0
) -> list[Any]:
    """A budget period with settled calls (and ``held`` calls in flight), then ended."""
    budgets = BudgetService(db)
    start = datetime.now(UTC) - timedelta(hours=1)
    await budgets.set_budget(
        tenant,
        period_start=start,
        period_end=start + timedelta(hours=2),
        call_limit=100,
        token_limit=10_000,
    )
    reservations = []
    for used in tokens:
        reservation = await budgets.reserve(tenant, 50)
        await budgets.settle(reservation, used)
    failed = await budgets.reserve(tenant, 50)
    await budgets.release(failed)  # a failed call is no usage
    for _ in range(held):
        reservations.append(await budgets.reserve(tenant, 50))
    # The next period starts now: this one ends here.
    await budgets.set_budget(
        tenant,
        period_start=datetime.now(UTC),
        period_end=datetime.now(UTC) + timedelta(hours=1),
        call_limit=100,
        token_limit=10_000,
    )
    return reservations


@pytest.fixture(scope="module")
def stack(
    database: DbHandles, keystore: LocalKeystore, receipt_keys: ReceiptKeys
) -> Iterator[BillingStack]:
    async def seed(db: Database, stack: BillingStack) -> None:
        await seed_tenants(db, stack)
        await close_period_with_calls(db, stack.tenants["a"], TOKENS)
        assert len(await stack.receipts.close_usage_periods(stack.tenants["a"])) == 1
        await stack.receipts.issue_invoice(stack.tenants["a"], INVOICE)

    with billing_server(database, keystore, receipt_keys, seed) as running:
        yield running


def _receipts(stack: BillingStack, tenant: str = "a", role: str = "billing-admin") -> Any:
    path = f"/tenants/{stack.tenants[tenant]}/billing/receipts"
    answer = stack.call("GET", path, tenant=tenant, role=role)
    assert answer.status_code == 200, answer.text
    return answer.json()["receipts"]


def _published(stack: BillingStack) -> dict[str, Any]:
    answer = httpx.get(stack.url + KEYS_PATH, timeout=10)  # public: no token
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/jwk-set+json")
    keys: dict[str, Any] = answer.json()
    return keys


def _usage_receipt(stack: BillingStack) -> dict[str, Any]:
    (found,) = [r for r in _receipts(stack) if r["kind"] == "usage_period"]
    return dict(found)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# -- verifies ------------------------------------------------------------------------


def test_the_published_key_set_holds_only_public_ed25519_keys(stack: BillingStack) -> None:
    keys = _published(stack)["keys"]
    assert keys and all(k["kty"] == "OKP" and k["crv"] == "Ed25519" for k in keys)
    assert all("d" not in k and k["alg"] == "Ed25519" and k["use"] == "sig" for k in keys)


def test_a_usage_period_receipt_verifies_with_the_published_keys(
    stack: BillingStack, database: DbHandles
) -> None:
    found = _usage_receipt(stack)
    verified = verify_receipt(json.dumps(found["jws"]), jwks_lookup(_published(stack)))
    payload = verified.payload
    assert payload == found["receipt"]
    assert payload["tenant_id"] == str(stack.tenants["a"]) and payload["iss"] == stack.url
    assert payload["usage"] == {"calls": len(TOKENS), "tokens": sum(TOKENS)}
    # The digest is over exactly the period's settled records (the released call is not one).
    with psycopg.connect(database.superuser) as conn:
        rows = conn.execute(
            "SELECT id, calls_used, tokens_used FROM bastion.budget_reservations "
            "WHERE tenant_id = %s AND status = 'settled' ORDER BY id",
            (stack.tenants["a"],),
        ).fetchall()
    digest = hashlib.sha256(b"".join(f"{i}:{c}:{t}\n".encode() for i, c, t in rows)).hexdigest()
    assert payload["records_sha256"] == digest


def test_an_invoice_receipt_states_the_invoice(stack: BillingStack) -> None:
    (found,) = [r for r in _receipts(stack, role="auditor") if r["kind"] == "invoice"]
    payload = verify_receipt(json.dumps(found["jws"]), jwks_lookup(_published(stack))).payload
    assert payload["invoice"]["id"] == INVOICE.invoice_id
    assert payload["invoice"]["amount_paid"] == 4900 and payload["invoice"]["currency"] == "eur"


async def test_a_receipt_is_issued_once_per_invoice_and_per_period(
    stack: BillingStack, db: Database, receipt_keys: ReceiptKeys
) -> None:
    service = ReceiptService(db, receipt_keys, issuer=stack.url)
    before = {r["id"] for r in _receipts(stack)}
    again = await service.issue_invoice(stack.tenants["a"], INVOICE)  # a retried webhook
    assert str(again.id) in before
    assert await service.close_usage_periods(stack.tenants["a"]) == []
    assert {r["id"] for r in _receipts(stack)} == before


def test_the_cli_verifies_a_saved_receipt(stack: BillingStack, tmp_path: Path) -> None:
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(_usage_receipt(stack)["jws"]))
    result = CliRunner().invoke(
        receipts_app, ["verify", str(path), "--jwks", stack.url + KEYS_PATH]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["receipt"]["usage"]["tokens"] == sum(TOKENS)


def test_the_cli_refuses_a_changed_receipt(stack: BillingStack, tmp_path: Path) -> None:
    flattened = _usage_receipt(stack)["jws"]
    payload = json.loads(_unb64(flattened["payload"]))
    payload["usage"]["tokens"] = 6  # fewer tokens than were used
    flattened["payload"] = _b64(json.dumps(payload).encode())
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(flattened))
    result = CliRunner().invoke(
        receipts_app, ["verify", str(path), "--jwks", stack.url + KEYS_PATH]
    )
    assert result.exit_code == 1
    assert "does not verify: bad signature" in result.output


# -- refused -------------------------------------------------------------------------


def _flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


@pytest.mark.parametrize(
    "change",
    ["payload-byte", "signature-byte", "compact-payload", "header-typ", "header-kid"],
)
def test_a_changed_receipt_fails(stack: BillingStack, change: str) -> None:
    flattened = dict(_usage_receipt(stack)["jws"])
    keys = _published(stack)
    if change == "payload-byte":
        flattened["payload"] = _flip(flattened["payload"], 20)
    elif change == "signature-byte":
        flattened["signature"] = _flip(flattened["signature"], 5)
    elif change == "header-typ":
        header = json.loads(_unb64(flattened["protected"]))
        flattened["protected"] = _b64(json.dumps({**header, "typ": "JWT"}).encode())
    elif change == "header-kid":
        header = json.loads(_unb64(flattened["protected"]))
        flattened["protected"] = _b64(json.dumps({**header, "kid": "../../etc/passwd"}).encode())
    document = json.dumps(flattened)
    if change == "compact-payload":
        payload = json.loads(_unb64(flattened["payload"]))
        payload["tenant_id"] = str(stack.tenants["b"])
        document = ".".join(
            (flattened["protected"], _b64(json.dumps(payload).encode()), flattened["signature"])
        )
    with pytest.raises(ReceiptInvalid):
        verify_receipt(document, jwks_lookup(keys))


def test_a_receipt_signed_by_an_unknown_key_fails(stack: BillingStack) -> None:
    keystore, base = _keystore()
    try:
        forger = ReceiptKeys(keystore, publish_ahead=timedelta(0))
        genuine = _usage_receipt(stack)["receipt"]
        _kid, forged = sign_receipt(forger, {**genuine, "usage": {"calls": 0, "tokens": 0}})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    with pytest.raises(ReceiptInvalid, match="unknown or retired"):
        verify_receipt(forged, jwks_lookup(_published(stack)))


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_another_algorithm_with_a_published_kid_fails(stack: BillingStack, alg: str) -> None:
    """Algorithm confusion: an HMAC keyed with the public key, or no signature at all."""
    found = _usage_receipt(stack)
    published = _published(stack)["keys"][0]
    header = {"alg": alg, "kid": published["kid"], "typ": "bastion-receipt+jws"}
    payload = json.dumps({**found["receipt"], "usage": {"calls": 0, "tokens": 0}}).encode()
    if alg == "none":
        document = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}."
    else:
        secret = OctKey.import_key(_unb64(published["x"]))
        document = jws.serialize_compact(header, payload, secret, algorithms=[alg])
    with pytest.raises(ReceiptInvalid, match="not signed with Ed25519"):
        verify_receipt(document, jwks_lookup(_published(stack)))


@pytest.mark.parametrize(
    "document",
    ["", "{}", "[]", "not a jws", "a.b.c", '{"payload": 1}', "[" * 60000, "x" * 70000],
)
def test_garbage_is_refused_not_crashed_on(stack: BillingStack, document: str) -> None:
    with pytest.raises(ReceiptInvalid):
        verify_receipt(document, jwks_lookup(_published(stack)))


def test_rotation_overlaps_and_a_retired_key_stops_verifying() -> None:
    keystore, base = _keystore()
    now = [time.time()]
    try:
        keys = ReceiptKeys(keystore, publish_ahead=timedelta(minutes=5), clock=lambda: now[0])
        old_kid, old_receipt = sign_receipt(keys, {"kind": "invoice", "n": 1})
        new_kid = keys.rotate()
        # Published at once, but not signing until it has been published for 5 minutes.
        assert {k["kid"] for k in keys.jwks()["keys"]} == {old_kid, new_kid}
        assert keys.current()[0] == old_kid
        now[0] += 6 * 60
        kid, new_receipt = sign_receipt(keys, {"kind": "invoice", "n": 2})
        assert kid == new_kid
        for receipt in (old_receipt, new_receipt):  # the overlap: both verify
            verify_receipt(receipt, jwks_lookup(keys.jwks()))
            verify_receipt(receipt, keys.public_key)
        keys.retire(old_kid)
        assert [k["kid"] for k in keys.jwks()["keys"]] == [new_kid]
        for lookup in (jwks_lookup(keys.jwks()), keys.public_key):
            with pytest.raises(ReceiptInvalid, match="unknown or retired"):
                verify_receipt(old_receipt, lookup)
            verify_receipt(new_receipt, lookup)
        with pytest.raises(ValueError, match="only active"):
            keys.retire(new_kid)
        # Another process reading the same key ring agrees.
        other = ReceiptKeys(keystore, publish_ahead=timedelta(minutes=5), clock=lambda: now[0])
        assert other.public_key(old_kid) is None and other.current()[0] == new_kid
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- tenants and roles ------------------------------------------------------------------


def test_another_tenant_s_receipts_are_not_found(stack: BillingStack) -> None:
    a_ids = [r["id"] for r in _receipts(stack)]
    assert len(a_ids) == 2
    assert not set(a_ids) & {r["id"] for r in _receipts(stack, tenant="b")}
    b = stack.tenants["b"]
    for receipt_id in a_ids:
        answer = stack.call("GET", f"/tenants/{b}/billing/receipts/{receipt_id}", tenant="b")
        assert answer.status_code == 404 and "jws" not in answer.text
        # a's path with b's token: the path's tenant is not the token's.
        path = f"/tenants/{stack.tenants['a']}/billing/receipts/{receipt_id}"
        answer = stack.call("GET", path, as_tenant="b")
        assert answer.status_code == 404 and "jws" not in answer.text


@pytest.mark.parametrize("role", ["viewer", "contributor"])
def test_roles_without_billing_read_are_refused(stack: BillingStack, role: str) -> None:
    answer = stack.call("GET", f"/tenants/{stack.tenants['a']}/billing/receipts", role=role)
    assert answer.status_code == 403
    assert answer.json()["type"].endswith("/forbidden") and "jws" not in answer.text


async def test_a_period_with_a_call_in_flight_is_closed_only_once_it_settles(
    stack: BillingStack, db: Database, receipt_keys: ReceiptKeys
) -> None:
    tenant = stack.tenants["b"]
    service = ReceiptService(db, receipt_keys, issuer=stack.url)
    (in_flight,) = await close_period_with_calls(db, tenant, (5,), held=1)
    assert await service.close_usage_periods(tenant) == []
    await BudgetService(db).settle(in_flight, 7)
    (receipt,) = await service.close_usage_periods(tenant)
    assert receipt.payload["usage"] == {"calls": 2, "tokens": 12}
    verify_receipt(receipt.jws, jwks_lookup(_published(stack)))


async def test_a_paid_stripe_invoice_event_becomes_one_receipt(
    stack: BillingStack, db: Database, receipt_keys: ReceiptKeys
) -> None:
    """The billing service's invoice_paid_hook, inside the event's transaction."""
    from tests.stripe_double import event_object

    tenant = stack.tenants["b"]
    service = ReceiptService(db, receipt_keys, issuer=stack.url)
    invoice = {
        "id": "in_hook_0001",
        "object": "invoice",
        "customer": "cus_hook",
        "amount_paid": 1299,
        "currency": "usd",
        "status": "paid",
        "created": 1_790_000_000,
        "period_start": 1_787_000_000,
        "period_end": 1_790_000_000,
        "status_transitions": {"paid_at": 1_790_000_100},
    }
    event = event_object("invoice.paid", invoice, created=1_790_000_100)
    for _ in range(2):  # a redelivered event is applied once, but the hook is idempotent too
        async with db.tenant_tx(tenant, None, "system") as tx:
            await service.on_invoice_paid(tx, tenant, event)
    malformed = event_object(
        "invoice.paid", {**invoice, "id": "in_bad", "amount_paid": "12.99"}, created=1_790_000_200
    )
    async with db.tenant_tx(tenant, None, "system") as tx:
        await service.on_invoice_paid(tx, tenant, malformed)  # skipped, not raised
    found = [r for r in _receipts(stack, tenant="b") if r["kind"] == "invoice"]
    assert [r["subject"] for r in found] == ["stripe:in_hook_0001"]
    payload = verify_receipt(json.dumps(found[0]["jws"]), jwks_lookup(_published(stack))).payload
    assert payload["invoice"]["amount_paid"] == 1299
    assert payload["invoice"]["paid_at"] == "2026-09-21T14:15:00Z"


def test_the_cli_rotates_lists_and_retires_receipt_keys(tmp_path: Path) -> None:
    env = {
        "BASTION_KEYSTORE_FILE": str(tmp_path / "keys" / "keystore.bin"),
        "BASTION_MASTER_KEY_FILE": str(tmp_path / "keys" / "master.key"),
        "BASTION_HOME": str(tmp_path),
    }
    runner = CliRunner()
    first = runner.invoke(receipts_app, ["rotate-key"], env=env)  # the first key
    second = runner.invoke(receipts_app, ["rotate-key"], env=env)
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    old, new = first.stdout.strip(), second.stdout.strip()
    listed = json.loads(runner.invoke(receipts_app, ["keys"], env=env).stdout)
    assert [k["kid"] for k in listed["keys"]] == [old, new]
    assert all("d" not in k for k in listed["keys"])
    assert runner.invoke(receipts_app, ["retire-key", old], env=env).exit_code == 0
    listed = json.loads(runner.invoke(receipts_app, ["keys"], env=env).stdout)
    assert [k["kid"] for k in listed["keys"]] == [new]
    refused = runner.invoke(receipts_app, ["retire-key", new], env=env)
    assert refused.exit_code == 1 and "only active" in refused.output
    unknown = runner.invoke(receipts_app, ["retire-key", "no-such-kid"], env=env)
    assert unknown.exit_code == 1


def test_a_kid_that_begins_with_a_dash_is_taken_as_a_kid(tmp_path: Path) -> None:
    # base64url thumbprints begin with "-" one time in 64: click must not read one as an option
    env = {
        "BASTION_KEYSTORE_FILE": str(tmp_path / "keys" / "keystore.bin"),
        "BASTION_MASTER_KEY_FILE": str(tmp_path / "keys" / "master.key"),
        "BASTION_HOME": str(tmp_path),
    }
    runner = CliRunner()
    assert runner.invoke(receipts_app, ["rotate-key"], env=env).exit_code == 0
    result = runner.invoke(receipts_app, ["retire-key", "-Xq3dashed-kid"], env=env)
    assert result.exit_code == 1
    assert "no active receipt key" in result.output
