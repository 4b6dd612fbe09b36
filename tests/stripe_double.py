"""A test double of Stripe: a real HTTP server on 127.0.0.1 speaking Stripe's REST API.

Tests reach it through the official ``stripe`` library, with the API base
pointed at it::

    with stripe_double() as double:
        client = double.client()            # stripe.StripeClient on double.url
        double.subscriptions["sub_1"] = {...}
        double.add_event(event)             # listed by GET /v1/events
        ...
        double.requests                     # every request received, in order

What it serves (Stripe's shapes: form-encoded bodies, ``{"object": "list"}``
pages, ``{"error": {...}}`` bodies):

* ``GET /v1/events`` (newest first; ``limit``, ``starting_after``, ``type``,
  ``created[gte]``), ``GET /v1/events/{id}``;
* ``GET /v1/subscriptions/{id}``, ``GET /v1/charges/{id}``;
* ``POST /v1/checkout/sessions``, ``GET /v1/checkout/sessions/{id}``;
* ``POST /v1/billing/meter_events``.

POSTs honour ``Idempotency-Key`` as Stripe does: the same key and the same
parameters replay the first response (with ``Idempotent-Replayed: true``); the
same key with other parameters is a 400 ``idempotency_error``.

It also builds signed webhook deliveries (:func:`signed`) with the library's
own construction ``t=<unix>,v1=HMAC-SHA256(secret, f"{t}.{payload}")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import stripe
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.billing.plans import Plan, PlanCatalogue
from bastion.compose import Overrides, build_api
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from tests.conftest import DbHandles
from tests.http_server import running_server, serving

API_KEY = "sk_test_double_0123456789"
_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):010d}{int(time.time() * 1000) % 100000:05d}"


def signed(payload: str, secret: str, timestamp: int | None = None) -> str:
    """Return the ``Stripe-Signature`` header for ``payload`` (Stripe's own scheme)."""
    return stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp)


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracketed form encoding (``a[b][0][c]=v``) into nested values."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+|\[\]", key)
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    if converted and all(k.isdigit() for k in converted):
        return [converted[k] for k in sorted(converted, key=int)]
    return converted


@dataclass
class Recorded:
    method: str
    path: str
    params: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StripeDouble:
    """What the double holds; tests read and change it directly."""

    url: str = ""
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    checkout_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    # Idempotency-Key -> (params, status, body)
    idempotency: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = field(default_factory=dict)
    # When set, every request gets this status (an outage).
    fail_with: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self) -> stripe.StripeClient:
        """The official client, pointed at this double."""
        return stripe.StripeClient(
            API_KEY,
            base_addresses={"api": self.url},
            max_network_retries=0,
            http_client=stripe.HTTPXClient(allow_sync_methods=True),
        )

    def add_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def build_app(state: StripeDouble) -> Starlette:
    async def record(request: Request) -> tuple[dict[str, Any], JSONResponse | None]:
        if request.method == "POST":
            params = decode_form(list((await request.form()).multi_items()))  # type: ignore[arg-type]
        else:
            params = decode_form(list(request.query_params.multi_items()))
        with state.lock:
            state.requests.append(
                Recorded(request.method, request.url.path, params, dict(request.headers))
            )
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return params, _error(401, "Invalid API Key provided", "authentication_error")
        if state.fail_with is not None:
            return params, _error(state.fail_with, "double told to fail", "api_error")
        return params, None

    def idempotent(request: Request, params: dict[str, Any], make: Any) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        with state.lock:
            if key is not None and key in state.idempotency:
                first, status, body = state.idempotency[key]
                if first != params:
                    return _error(
                        400,
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.",
                        "idempotency_error",
                    )
                return JSONResponse(
                    body, status_code=status, headers={"Idempotent-Replayed": "true"}
                )
            status, body = make()
            if key is not None:
                state.idempotency[key] = (params, status, body)
        return JSONResponse(body, status_code=status)

    async def list_events(request: Request) -> Response:
        params, refused = await record(request)
        if refused is not None:
            return refused
        limit = max(1, min(100, int(params.get("limit", 10))))
        with state.lock:
            newest_first = list(reversed(state.events))
        if "type" in params:
            newest_first = [e for e in newest_first if e.get("type") == params["type"]]
        gte = (
            params.get("created", {}).get("gte")
            if isinstance(params.get("created"), dict)
            else None
        )
        if gte is not None:
            newest_first = [e for e in newest_first if e.get("created", 0) >= int(gte)]
        after = params.get("starting_after")
        if after:
            ids = [e["id"] for e in newest_first]
            if after not in ids:
                return _error(400, f"No such event: '{after}'")
            newest_first = newest_first[ids.index(after) + 1 :]
        page = newest_first[:limit]
        return JSONResponse(
            {
                "object": "list",
                "url": "/v1/events",
                "has_more": len(newest_first) > limit,
                "data": page,
            }
        )

    async def get_event(request: Request) -> Response:
        _, refused = await record(request)
        if refused is not None:
            return refused
        wanted = request.path_params["id"]
        with state.lock:
            found = next((e for e in state.events if e["id"] == wanted), None)
        return JSONResponse(found) if found else _error(404, f"No such event: '{wanted}'")

    async def get_subscription(request: Request) -> Response:
        _, refused = await record(request)
        if refused is not None:
            return refused
        wanted = request.path_params["id"]
        with state.lock:
            found = state.subscriptions.get(wanted)
        if found is None:
            return _error(404, f"No such subscription: '{wanted}'")
        return JSONResponse(found)

    async def get_charge(request: Request) -> Response:
        _, refused = await record(request)
        if refused is not None:
            return refused
        wanted = request.path_params["id"]
        with state.lock:
            found = state.charges.get(wanted)
        return JSONResponse(found) if found else _error(404, f"No such charge: '{wanted}'")

    async def create_checkout_session(request: Request) -> Response:
        params, refused = await record(request)
        if refused is not None:
            return refused

        def make() -> tuple[int, dict[str, Any]]:
            if params.get("mode") not in ("payment", "setup", "subscription"):
                return 400, {"error": {"type": "invalid_request_error", "message": "mode"}}
            session_id = new_id("cs_test")
            session = {
                "id": session_id,
                "object": "checkout.session",
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
                "mode": params["mode"],
                "status": "open",
                "payment_status": "unpaid",
                "customer": params.get("customer"),
                "customer_email": params.get("customer_email"),
                "client_reference_id": params.get("client_reference_id"),
                "metadata": params.get("metadata", {}),
                "line_items": params.get("line_items", []),
                "success_url": params.get("success_url"),
                "cancel_url": params.get("cancel_url"),
                "subscription": None,
                "created": int(time.time()),
                "livemode": False,
            }
            state.checkout_sessions[session_id] = session
            return 200, session

        return idempotent(request, params, make)

    async def get_checkout_session(request: Request) -> Response:
        _, refused = await record(request)
        if refused is not None:
            return refused
        found = state.checkout_sessions.get(request.path_params["id"])
        return JSONResponse(found) if found else _error(404, "No such checkout.session")

    async def create_meter_event(request: Request) -> Response:
        params, refused = await record(request)
        if refused is not None:
            return refused

        def make() -> tuple[int, dict[str, Any]]:
            identifier = params.get("identifier") or new_id("mev")
            if not params.get("event_name") or not isinstance(params.get("payload"), dict):
                return 400, {"error": {"type": "invalid_request_error", "message": "payload"}}
            # Stripe dedupes meter events by identifier too (24 h window).
            if any(m["identifier"] == identifier for m in state.meter_events):
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "duplicate_meter_event",
                        "message": "An event with identifier already exists.",
                    }
                }
            event = {
                "object": "billing.meter_event",
                "event_name": params["event_name"],
                "identifier": identifier,
                "payload": params["payload"],
                "timestamp": int(params.get("timestamp", time.time())),
                "created": int(time.time()),
                "livemode": False,
            }
            state.meter_events.append(event)
            return 200, event

        return idempotent(request, params, make)

    return Starlette(
        routes=[
            Route("/v1/events", list_events, methods=["GET"]),
            Route("/v1/events/{id}", get_event, methods=["GET"]),
            Route("/v1/subscriptions/{id}", get_subscription, methods=["GET"]),
            Route("/v1/charges/{id}", get_charge, methods=["GET"]),
            Route("/v1/checkout/sessions", create_checkout_session, methods=["POST"]),
            Route("/v1/checkout/sessions/{id}", get_checkout_session, methods=["GET"]),
            Route("/v1/billing/meter_events", create_meter_event, methods=["POST"]),
        ]
    )


@contextlib.contextmanager
def stripe_double() -> Iterator[StripeDouble]:
    """Serve a fresh double on a free loopback port for the block."""
    state = StripeDouble()
    with running_server(build_app(state)) as url:
        state.url = url
        yield state


# -- Stripe-shaped objects for tests ------------------------------------------------------


# What each test price bills a month, as the catalogue's plans cost (migration
# 0015; ``tiny`` is free): a subscription's price object carries it.
PRICE_AMOUNTS = {"price_free": 0, "price_pro": 4900, "price_ent": 99900, "price_tiny": 0}


def price_object(
    price: str,
    amount: int | None = None,
    *,
    currency: str = "usd",
    interval: str = "month",
    interval_count: int = 1,
) -> dict[str, Any]:
    """A Stripe price: recurring, licensed, per unit; ``amount`` defaults to the test
    price's (:data:`PRICE_AMOUNTS`), and a price it does not know carries none."""
    amount = PRICE_AMOUNTS.get(price) if amount is None else amount
    found: dict[str, Any] = {"id": price, "object": "price"}
    if amount is not None:
        found.update(
            type="recurring",
            billing_scheme="per_unit",
            unit_amount=amount,
            currency=currency,
            recurring={
                "interval": interval,
                "interval_count": interval_count,
                "usage_type": "licensed",
            },
        )
    return found


def subscription_object(
    sub_id: str,
    customer: str,
    price: str,
    *,
    status: str = "active",
    period_start: int | None = None,
    period_end: int | None = None,
    created: int | None = None,
    amount: int | None = None,
) -> dict[str, Any]:
    start = period_start if period_start is not None else int(time.time()) - 3600
    end = period_end if period_end is not None else start + 30 * 86400
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": customer,
        "status": status,
        "cancel_at_period_end": False,
        "created": created if created is not None else start,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{sub_id}",
                    "object": "subscription_item",
                    "price": price_object(price, amount),
                    "quantity": 1,
                    "current_period_start": start,
                    "current_period_end": end,
                }
            ],
        },
        "livemode": False,
    }


def event_object(
    event_type: str, obj: dict[str, Any], *, created: int, event_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": event_id or new_id("evt"),
        "object": "event",
        "api_version": "2025-09-30.clover",
        "created": created,
        "type": event_type,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "data": {"object": obj},
    }


def to_json(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


# -- Bastion's side: the api's webhook endpoints on a test database ----------------------


@contextlib.contextmanager
def webhook_api(
    database: DbHandles,
    keystore: LocalKeystore,
    *,
    stripe_ref: str,
    adyen_ref: str = "local://billing/test-adyen-unused",
    pool_size: int = 8,
) -> Iterator[str]:
    """Serve the api as compose builds it (``POST /webhooks/stripe`` and
    ``/webhooks/adyen`` among its routes) over real HTTP on ``database``, with
    these webhook secrets; yield the base URL."""

    def build(url: str) -> FastAPI:
        settings = Settings(
            issuer=url,
            embedder="hashing",
            stripe_webhook_secret_ref=stripe_ref,
            adyen_hmac_key_ref=adyen_ref,
            internal_mtls=False,  # calls no gateway; plain is development on loopback
            dev_mode=True,
        )
        overrides = Overrides(
            database=Database(database.app, database.context_key, max_size=pool_size),
            keystore=keystore,
        )
        return build_api(settings, overrides).app

    with serving(build) as url:
        yield url


TEST_PRICES = {"free": "price_free", "pro": "price_pro", "enterprise": "price_ent"}


async def price_plans(db: Database) -> None:
    """Give the default plans Stripe prices, and add ``tiny`` (3 calls a month)."""
    catalogue = PlanCatalogue(db)
    for plan in await catalogue.list():
        if plan.code in TEST_PRICES:
            await catalogue.put(
                dataclasses.replace(plan, stripe_price_id=TEST_PRICES[plan.code]), actor="test"
            )
    await catalogue.put(
        Plan(
            code="tiny",
            name="Tiny",
            rank=-1,
            monthly_token_budget=10_000,
            monthly_call_budget=3,
            requests_per_minute=5,
            models_allowed=("bastion-local",),
            overage_policy="block",
            stripe_price_id="price_tiny",
        ),
        actor="test",
    )
