"""Hosted checkout (CHECKLIST P4), over real HTTP, with the official ``stripe``
client talking to a real HTTP double of Stripe: the billing-admin gets
Stripe's hosted page and Bastion stores only Stripe's ids. A request carrying
a card number — in any spelling — is refused, and the number is nowhere
afterwards: not in the database, not in the logs, not sent to Stripe."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
import structlog

from bastion.billing.checkout import CheckoutService, contains_card_number
from bastion.billing.receipts import ReceiptKeys
from bastion.db.pool import Database
from bastion.logs import configure_logging
from bastion.secrets import LocalKeystore
from tests.billing_account_stack import BillingStack, billing_server, seed_tenants
from tests.conftest import DbHandles, short_tempdir
from tests.stripe_double import StripeDouble, stripe_double

pytestmark = pytest.mark.anyio
PLATFORM = UUID(int=0)
PRICE = "price_pro_checkout_test"
SUCCESS = "https://app.example/billing/done?session={CHECKOUT_SESSION_ID}"
CANCEL = "https://app.example/billing"
SESSIONS = "/v1/checkout/sessions"


@dataclass
class Env:
    stack: BillingStack
    stripe: StripeDouble


@pytest.fixture(scope="module")
def env(database: DbHandles, keystore: LocalKeystore) -> Iterator[Env]:
    base = short_tempdir("bastion-ckeys-")
    keys = ReceiptKeys(LocalKeystore(base / "k.bin", base / "m.key"))

    async def seed(db: Database, stack: BillingStack) -> None:
        await seed_tenants(db, stack)
        # Plans are data: the platform says which Stripe price sells "pro".
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute(
                "UPDATE bastion.plans SET stripe_price_id = %s WHERE code = 'pro'", (PRICE,)
            )
            await tx.execute(
                "UPDATE bastion.plans SET stripe_price_id = %s WHERE code = 'enterprise'",
                (PRICE + "_ent",),
            )

    try:
        with stripe_double() as double:

            def checkout(db: Database) -> CheckoutService:
                return CheckoutService(db, double.client(), success_url=SUCCESS, cancel_url=CANCEL)

            with billing_server(database, keystore, keys, seed, checkout=checkout) as stack:
                yield Env(stack, double)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _path(env: Env, tenant: str = "a") -> str:
    return f"/tenants/{env.stack.tenants[tenant]}/billing/checkout"


def _stored(database: DbHandles, env: Env, tenant: str = "a") -> list[tuple[Any, ...]]:
    with psycopg.connect(database.superuser) as conn:
        return conn.execute(
            "SELECT session_id, customer_id, price_id FROM bastion.checkout_sessions "
            "WHERE tenant_id = %s ORDER BY created_at",
            (env.stack.tenants[tenant],),
        ).fetchall()


def _audit_count(database: DbHandles, env: Env, tenant: str = "a") -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s",
            (env.stack.tenants[tenant],),
        ).fetchone()
    assert row is not None
    return int(row[0])


# -- the hosted page ----------------------------------------------------------------------


def test_checkout_returns_stripe_s_hosted_page_and_stores_only_ids(
    env: Env, database: DbHandles
) -> None:
    before = len(env.stripe.calls("POST", SESSIONS))
    answer = env.stack.call("POST", _path(env), json={"plan": "pro"})
    assert answer.status_code == 201, answer.text
    body = answer.json()
    session = env.stripe.checkout_sessions[body["id"]]
    assert body["url"] == session["url"] and body["url"].startswith("https://checkout.stripe.com/")
    (sent,) = env.stripe.calls("POST", SESSIONS)[before:]
    assert sent.params["mode"] == "subscription"
    assert sent.params["line_items"] == [{"price": PRICE, "quantity": "1"}]
    assert sent.params["client_reference_id"] == str(env.stack.tenants["a"])
    assert (sent.params["success_url"], sent.params["cancel_url"]) == (SUCCESS, CANCEL)
    # Stored: Stripe's ids, nothing else (no amount, no card, no e-mail).
    assert (body["id"], None, PRICE) in _stored(database, env)
    with psycopg.connect(database.superuser) as conn:
        columns = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'bastion' AND table_name = 'checkout_sessions'"
            )
        ]
        audited = conn.execute(
            "SELECT count(*) FROM bastion.audit_events WHERE action = 'billing.checkout' "
            "AND target = %s",
            (body["id"],),
        ).fetchone()
    assert set(columns) == {
        "session_id",
        "tenant_id",
        "customer_id",
        "price_id",
        "created_by",
        "created_at",
    }
    assert audited == (1,)


def test_a_retry_with_the_same_idempotency_key_is_the_same_session(
    env: Env, database: DbHandles
) -> None:
    headers = {"Idempotency-Key": "checkout-retry-0001"}
    first = env.stack.call("POST", _path(env), json={"plan": "pro"}, headers=headers)
    again = env.stack.call("POST", _path(env), json={"plan": "pro"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert [row[0] for row in _stored(database, env)].count(first.json()["id"]) == 1


def test_the_same_idempotency_key_for_another_plan_is_refused(
    env: Env, database: DbHandles
) -> None:
    headers = {"Idempotency-Key": "checkout-reuse-0001"}
    first = env.stack.call("POST", _path(env), json={"plan": "pro"}, headers=headers)
    assert first.status_code == 201
    stored = _stored(database, env)
    other = env.stack.call("POST", _path(env), json={"plan": "enterprise"}, headers=headers)
    assert other.status_code == 409 and other.json()["type"].endswith("/idempotency-key-reused")
    assert _stored(database, env) == stored


def test_the_price_cannot_come_from_the_request(env: Env, database: DbHandles) -> None:
    before = (len(env.stripe.requests), len(_stored(database, env)))
    answer = env.stack.call("POST", _path(env), json={"plan": "pro", "price": "price_free_0"})
    assert answer.status_code == 422
    for plan in ("free", "no-such-plan"):  # not for sale / unknown
        answer = env.stack.call("POST", _path(env), json={"plan": plan})
        assert answer.status_code == 404 and answer.json()["type"].endswith("/plan-not-found")
    assert (len(env.stripe.requests), len(_stored(database, env))) == before


def test_an_inactive_plan_cannot_be_bought(env: Env, database: DbHandles) -> None:
    """A plan withdrawn from sale keeps its Stripe price, but no checkout sells it
    (issue 13: an inactive plan is never assignable, bought or not)."""
    code = f"legacy{uuid4().hex[:6]}"
    with psycopg.connect(database.superuser) as conn:
        conn.execute(
            "INSERT INTO bastion.plans (code, name, monthly_token_budget, monthly_call_budget, "
            "requests_per_minute, stripe_price_id, active) VALUES (%s, 'Legacy', 1, 1, 1, %s, "
            "false)",
            (code, f"price_{code}"),
        )
    before = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    answer = env.stack.call("POST", _path(env), json={"plan": code})
    assert answer.status_code == 404 and answer.json()["type"].endswith("/plan-not-found")
    after = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    assert after == before


@pytest.mark.parametrize(
    ("role", "mfa", "status"),
    [
        ("viewer", True, 403),
        ("auditor", True, 403),
        ("contributor", True, 403),
        ("billing-admin", False, 403),
    ],
)
def test_only_a_billing_admin_with_mfa_opens_a_checkout(
    env: Env, database: DbHandles, role: str, mfa: bool, status: int
) -> None:
    before = (len(env.stripe.requests), len(_stored(database, env)))
    answer = env.stack.call("POST", _path(env), json={"plan": "pro"}, role=role, mfa=mfa)
    assert answer.status_code == status
    assert (len(env.stripe.requests), len(_stored(database, env))) == before


def test_another_tenant_s_checkout_is_not_found(env: Env, database: DbHandles) -> None:
    before = (len(env.stripe.requests), len(_stored(database, env, "a")))
    answer = env.stack.call("POST", _path(env, "a"), json={"plan": "pro"}, as_tenant="b")
    assert answer.status_code == 404
    assert (len(env.stripe.requests), len(_stored(database, env, "a"))) == before


def test_stripe_down_is_503_and_nothing_is_stored(env: Env, database: DbHandles) -> None:
    before = len(_stored(database, env))
    env.stripe.fail_with = 500
    try:
        answer = env.stack.call("POST", _path(env), json={"plan": "pro"})
    finally:
        env.stripe.fail_with = None
    assert answer.status_code == 503
    assert answer.json()["type"].endswith("/payment-provider-unavailable")
    assert "sk_test" not in answer.text and "double" not in answer.text
    assert len(_stored(database, env)) == before


# -- card numbers -------------------------------------------------------------------------

PAN = "4242424242424242"


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Everything the processes log, at debug level, for the test's duration."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    captured = io.StringIO()
    configure_logging("debug", stream=captured)
    # As in a served process, where uvicorn starts after configure_logging with
    # access_log=False (Bastion's middleware logs each request, path only).
    access = logging.getLogger("uvicorn.access")
    access.handlers[:], access.propagate = [], False
    # The test's own HTTP client (the sender's side, not Bastion) logs its URLs.
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield captured
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, previous in quiet.items():
            logging.getLogger(name).setLevel(previous)


def _escaped(digits: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in digits)


# (name, pan, how it is sent)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "json-field": (PAN, {"json": {"plan": "pro", "note": PAN}}),
    "json-grouped": ("5555555555554444", {"json": {"plan": "pro", "card": "5555 5555 5555 4444"}}),
    "in-the-plan": ("4000056655665556", {"json": {"plan": "4000-0566-5566-5556"}}),
    "json-number": (PAN, {"content": '{"plan": "pro", "number": ' + PAN + "}"}),
    "json-escaped": (PAN, {"content": '{"plan": "pro", "n": "' + _escaped(PAN) + '"}'}),
    "nested": (
        "378282246310005",
        {"json": {"plan": "pro", "m": {"x": [{"y": "378282246310005"}]}}},
    ),
    "form": (
        PAN,
        {
            "content": "plan=pro&card=4242+4242+4242+4242",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
    ),
    "query": (PAN, {"json": {"plan": "pro"}, "params": {"card": PAN}}),
    "text": (
        PAN,
        {"content": f"my card is {PAN} exp 12/30", "headers": {"Content-Type": "text/plain"}},
    ),
}


def _database_text(database: DbHandles) -> str:
    """Every row of every table Bastion and its queue keep, as text."""
    out = []
    with psycopg.connect(database.superuser) as conn:
        tables = conn.execute(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname IN ('bastion', 'bastion_private', 'procrastinate')"
        ).fetchall()
        for schema, table in tables:
            for (row,) in conn.execute(f'SELECT t::text FROM "{schema}"."{table}" t'):
                out.append(row)
    return "\n".join(out)


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_card_number_is_refused_and_kept_nowhere(
    env: Env, database: DbHandles, logs: io.StringIO, case: str
) -> None:
    pan, request = CASES[case]
    before = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    answer = env.stack.call("POST", _path(env), **request)
    assert answer.status_code == 422, answer.text
    assert answer.json()["type"].endswith("/card-data-refused")
    assert pan not in _digits(answer.text)
    # Nothing written, nothing sent to Stripe.
    after = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    assert after == before
    # Not in the logs (the refusal itself is logged, without the number) ...
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    assert any(line["event"] == "card_number_refused" for line in lines)
    assert pan not in _digits(logs.getvalue())
    # ... and not anywhere in the database.
    assert pan not in _digits(_database_text(database))


def test_every_billing_route_refuses_card_numbers(
    env: Env, database: DbHandles, logs: io.StringIO
) -> None:
    # Every tenant billing route the composed api serves, as its OpenAPI document lists them.
    paths = httpx.get(env.stack.url + "/openapi.json", timeout=10).json()["paths"]
    routes = [
        (method.upper(), template)
        for template, operations in paths.items()
        if template.startswith("/tenants/{tenant_id}/billing/")
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    ]
    # The account routes (checkout, usage, receipts) and the subscription's (plan, plans, ...).
    assert {"/tenants/{tenant_id}/billing/checkout", "/tenants/{tenant_id}/billing/plan"} <= {
        template for _method, template in routes
    }
    before = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    for method, template in routes:
        path = template.replace("{tenant_id}", str(env.stack.tenants["a"]))
        path = re.sub(r"\{[^}]+\}", str(uuid4()), path)
        answer = env.stack.call(method, path, params={"pan": PAN})
        assert answer.status_code == 422, (method, template, answer.text)
        assert answer.json()["type"].endswith("/card-data-refused")
    after = (len(env.stripe.requests), len(_stored(database, env)), _audit_count(database, env))
    assert after == before
    assert PAN not in _digits(logs.getvalue())


def test_a_number_that_fails_luhn_is_not_a_card(env: Env) -> None:
    assert not contains_card_number(b'{"plan": "pro", "ref": "4242424242424241"}')
    answer = env.stack.call(
        "GET",
        f"/tenants/{env.stack.tenants['a']}/billing/usage",
        params={"ref": "4242424242424241"},
    )
    assert answer.status_code == 200
