"""The input rules at the edge (``bastion/api/input_rules.py``), over real HTTP
against the api and the gateway the composition root builds.

- NUL and the other control characters are refused with 422
  ``validation-error`` on every route, in the path, the query string and any
  string of a JSON or form body, and nothing is written (one attack per route
  family that crashed before: a document title, ``model`` in questions, a
  search field, ``email`` in member add, ``reason`` in PII reveal and in plan
  change);
- a walk of every route of both apps (the route matrix's walk) sends NUL in
  every input each route declares: no 5xx, every answer 422;
- the same walk sends a unique marker in each input: no error answer, body or
  headers, ever carries it;
- ``402 no-budget`` says when to retry.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from bastion.api.declare import api_routes
from bastion.api.input_rules import RAW_BODY_PREFIXES
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_stack
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server

pytestmark = pytest.mark.anyio

VALIDATION = "https://bastion.dev/problems/validation-error"
REASON = "input rules: a reason long enough"
NUL = "a\x00b"
# What the walk sends besides NUL: each forbidden class once.
OTHER_CONTROLS = ("\x1b[31m", "\x7f", "\x9b", "\ud800")


@dataclass
class Stack:
    api_url: str
    api_app: FastAPI
    gateway_url: str
    gateway_app: FastAPI
    tenant: UUID
    owner: UUID
    tokens: list[str]
    document: UUID
    issue: Any  # the api's token issuer


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    seeded: dict[str, Any] = {}

    async def seed(db: Database, _identity: Any) -> None:
        tenants = TenantService(db)
        tenant = (await tenants.create_tenant(f"in-{uuid4().hex[:8]}", "input rules")).id
        owner = await tenants.add_member(tenant, "owner@rules.test", "owner")
        await tenants.add_member(tenant, "viewer@rules.test", "viewer")
        kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
        actor = Actor(tenant, None, "system")
        await kb.create_namespace(actor, "support")
        upload = await kb.upload(
            actor,
            "support",
            title="Refunds",
            body=b"Refunds go to the customer ada@example.org within 14 days.",
            content_type="text/plain",
            enqueue=False,
        )
        await kb.ingest(tenant, upload.document.id)
        redaction = await kb.vault.tokenize(db, tenant, "write to ada@example.org")
        seeded.update(
            tenant=tenant,
            owner=owner,
            document=upload.document.id,
            tokens=[ref.token for ref in redaction.tokens],
        )

    with api_stack(database, keystore, seed) as (api_url, api):

        def settings(url: str) -> Settings:
            return Settings(issuer=api_url, gateway_public_url=url, embedder="hashing")

        with gateway_server(database, keystore, settings) as (gateway_url, gateway):
            yield Stack(
                api_url,
                api.app,
                gateway_url,
                gateway.app,
                seeded["tenant"],
                seeded["owner"],
                seeded["tokens"],
                seeded["document"],
                api.identity.service.tokens,
            )


def _auth(stack: Stack, method: str, url: str) -> dict[str, str]:
    """A fresh owner's token with MFA, and its DPoP proof for ``method url``."""
    key = DpopKey.generate()
    token, _claims = stack.issue.issue_access(
        user_id=stack.owner,
        tenant_id=stack.tenant,
        roles=("owner",),
        amr=("pwd", "otp", "mfa"),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, access_token=token)}


def _written(database: DbHandles, tenant: UUID) -> dict[str, int]:
    """How many rows the tenant has in every table a refused request could touch."""
    tables = (
        "audit_events",
        "documents",
        "namespaces",
        "memberships",
        "role_requests",
        "plan_changes",
        "plan_requests",
        "pii_vault",
        "prompt_sampling",
    )
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        counts = {}
        for table in tables:
            row = conn.execute(
                f"SELECT count(*) FROM bastion.{table} WHERE tenant_id = %s", (tenant,)
            ).fetchone()
            assert row is not None
            counts[table] = int(row[0])
        row = conn.execute("SELECT count(*) FROM bastion.users").fetchone()
        assert row is not None
        counts["users"] = int(row[0])
    return counts


# -- one attack per route family that answered 500 ----------------------------------------

ATTACKS = {
    "upload-title": ("POST", "/knowledge/namespaces/support/documents", {"title": NUL}, None),
    "questions-model": (
        "POST",
        "/knowledge/namespaces/support/questions",
        None,
        {"question": "What about refunds?", "model": "bastion\x00local"},
    ),
    "search-title": (
        "POST",
        "/knowledge/namespaces/support/search",
        None,
        {"query": "refunds", "title": "Refunds\x00"},
    ),
    "member-email": (
        "POST",
        "/members",
        None,
        {"email": "viewer@rules.test\x00", "role": "viewer"},
    ),
    "reveal-reason": ("POST", "/pii/reveal", None, {"tokens": [], "reason": "audit \x00 reason"}),
    "plan-reason": ("PUT", "/billing/plan", None, {"plan": "pro", "reason": "upgrade\x00now"}),
}


@pytest.mark.parametrize("family", sorted(ATTACKS))
def test_nul_is_refused_with_422_and_nothing_written(
    stack: Stack, database: DbHandles, family: str
) -> None:
    method, tail, params, body = ATTACKS[family]
    if family == "reveal-reason":
        body = {**body, "tokens": stack.tokens}
    url = f"{stack.api_url}/tenants/{stack.tenant}{tail}"
    before = _written(database, stack.tenant)
    with httpx.Client(timeout=30) as http:
        answer = http.request(
            method,
            url,
            params=params,
            json=body,
            content=b"a document" if body is None else None,
            headers=_auth(stack, method, url),
        )
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["type"] == VALIDATION
    assert problem["errors"][0]["loc"] == ["query" if params else "body"]
    assert _written(database, stack.tenant) == before


def test_nul_in_a_chat_message_is_refused_by_the_gateway(stack: Stack, database: DbHandles) -> None:
    url = f"{stack.gateway_url}/v1/chat/completions"
    body = {"model": "bastion-local", "messages": [{"role": "user", "content": "hi\x00there"}]}
    before = _written(database, stack.tenant)
    with httpx.Client(timeout=30) as http:
        answer = http.post(url, json=body, headers=_auth(stack, "POST", url))
    assert answer.status_code == 422, answer.text
    assert answer.json()["type"] == VALIDATION
    assert _written(database, stack.tenant) == before


def test_a_nul_path_segment_and_other_controls_are_refused(stack: Stack) -> None:
    base = f"{stack.api_url}/tenants/{stack.tenant}/knowledge"
    with httpx.Client(timeout=30) as http:
        for control in ("\x00", *OTHER_CONTROLS):
            # (A surrogate's UTF-8 bytes in a URL are decoded as U+FFFD: harmless.)
            if control != "\ud800":
                url = f"{base}/namespaces/sup{quote(control, safe='')}port/documents"
                answer = http.get(url, headers=_auth(stack, "GET", url))
                assert (answer.status_code, answer.json()["type"]) == (422, VALIDATION), control
            # The JSON escapes of each control, in a body.
            url = f"{base}/namespaces/support/search"
            answer = http.post(
                url,
                content=json.dumps({"query": f"refunds{control}"}),  # \\uXXXX escapes
                headers={**_auth(stack, "POST", url), "Content-Type": "application/json"},
            )
            assert (answer.status_code, answer.json()["type"]) == (422, VALIDATION), control
        # Text stays text: tab, newlines, accents, emoji and zero-width joiners pass.
        answer = http.post(
            url,
            json={"query": "re\tfunds\r\n für 👩\u200d💻 \u202ehello"},
            headers=_auth(stack, "POST", url),
        )
        assert answer.status_code == 200, answer.text


def test_an_overlong_query_string_is_refused_with_414(stack: Stack) -> None:
    url = f"{stack.api_url}/tenants/{stack.tenant}/knowledge/namespaces"
    with httpx.Client(timeout=30) as http:
        answer = http.get(url, params={"q": "x" * 9000}, headers=_auth(stack, "GET", url))
    assert answer.status_code == 414
    assert answer.json()["type"] == "https://bastion.dev/problems/uri-too-long"


# -- walking every route ----------------------------------------------------------------

# A body each route accepts (method, path template); every string in it is probed.
BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/tenants/{tenant_id}/billing/plan"): {"plan": "pro", "reason": REASON},
    ("POST", "/me/mfa/totp/confirm"): {"code": "000000"},
    ("POST", "/me/password"): {"current_password": "not it at all", "new_password": "x" * 20},
    ("POST", "/tenants/{tenant_id}/members"): {"email": "viewer@rules.test", "role": "viewer"},
    ("POST", "/tenants/{tenant_id}/knowledge/namespaces"): {"name": "walked"},
    ("POST", "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/search"): {
        "query": "refunds",
        "title": "Refunds",
    },
    ("POST", "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/questions"): {
        "question": "What about refunds?",
        "model": "bastion-local",
    },
    ("POST", "/tenants/{tenant_id}/pii/reveal"): {"text": "see tok_x", "reason": REASON},
    ("POST", "/tenants/{tenant_id}/billing/checkout"): {"plan": "pro"},
    ("PUT", "/tenants/{tenant_id}/prompt-sampling"): {"rate": 0.5},
    ("POST", "/v1/chat/completions"): {
        "model": "bastion-local",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
    },
    ("POST", "/v1/embeddings"): {"model": "bastion-local", "input": "refunds"},
}
# The OAuth endpoints read forms (and /authorize its query) themselves.
FORMS: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/authorize"): {
        "tenant": "in-rules",
        "email": "owner@rules.test",
        "password": "not the password",
    },
    ("POST", "/authorize/mfa"): {"ticket": "t" * 20, "code": "000000"},
    ("POST", "/token"): {
        "grant_type": "authorization_code",
        "client_id": "bastion-cli",
        "code": "c" * 20,
        "redirect_uri": "http://127.0.0.1:9/callback",
        "code_verifier": "v" * 43,
    },
    ("POST", "/revoke"): {"token": "t" * 20, "client_id": "bastion-cli"},
    ("POST", "/logout"): {"refresh_token": "t" * 20, "client_id": "bastion-cli"},
}
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/authorize"): {
        "response_type": "code",
        "client_id": "bastion-cli",
        "redirect_uri": "http://127.0.0.1:9/callback",
        "state": "s" * 16,
        "code_challenge": "c" * 43,
        "code_challenge_method": "S256",
    },
}


@dataclass(frozen=True)
class Probe:
    method: str
    template: str
    where: str  # path:<name>, query:<name>, body:<json path>, form:<name>


def _path_values(stack: Stack) -> dict[str, str]:
    return {
        "tenant_id": str(stack.tenant),
        "namespace": "support",
        "document_id": str(stack.document),
        "receipt_id": str(uuid4()),
        "request_id": str(uuid4()),
        "user_id": str(uuid4()),
        "role": "viewer",
    }


def _declared_queries(route: APIRoute) -> dict[str, str]:
    found: dict[str, str] = {}
    stack_ = [route.dependant]
    while stack_:
        dependant = stack_.pop()
        for param in dependant.query_params:
            if param.field_info.annotation is str:
                found[param.alias] = REASON
        stack_.extend(dependant.dependencies)
    return found


def _string_paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield at
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _string_paths(item, (*at, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _string_paths(item, (*at, index))


def _replaced(value: Any, at: tuple[Any, ...], probe: str) -> Any:
    if not at:
        return probe
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[at[0]] = _replaced(value[at[0]], at[1:], probe) if len(at) > 1 else probe
    return copy


Request = tuple[Probe, str, dict[str, str], Any, dict[str, str] | None]


def _requests(stack: Stack, base: str, app: FastAPI, text: str) -> Iterator[Request]:
    """(probe, path, query, JSON body, form) for each input of each route, that
    input set to ``text`` and the others valid; plus an unknown query parameter
    and an unknown body member for every route."""
    values = _path_values(stack)
    for route in api_routes(app.routes):
        for method in sorted(route.methods or ()):
            key = (method, route.path)
            names = [part[1:-1] for part in route.path.split("/") if part.startswith("{")]
            query = {**QUERIES.get(key, {}), **_declared_queries(route)}
            body = BODIES.get(key)
            form = FORMS.get(key)
            raw = route.path.startswith(RAW_BODY_PREFIXES)  # signed bytes, not text
            if method in ("POST", "PUT") and body is None and form is None and not raw:
                body = {}

            def path(
                override: dict[str, str], names: list[str] = names, template: str = route.path
            ) -> str:
                filled = template
                for name in names:
                    raw = override.get(name, values.get(name, str(uuid4())))
                    encoded = quote(raw.encode("utf-8", "surrogatepass"), safe="")
                    filled = filled.replace("{" + name + "}", encoded)
                return filled

            for name in names:
                yield (
                    Probe(method, route.path, f"path:{name}"),
                    path({name: text}),
                    query,
                    body,
                    form,
                )
            for name in [*query, "unknown"]:
                probe = Probe(method, route.path, f"query:{name}")
                yield probe, path({}), {**query, name: text}, body, form
            if form is not None:
                for name in [*form, "unknown"]:
                    probe = Probe(method, route.path, f"form:{name}")
                    yield probe, path({}), query, None, {**form, name: text}
            if body is not None:
                for at in [*_string_paths(body), ("unknown",)]:
                    probe = Probe(method, route.path, f"body:{'.'.join(map(str, at))}")
                    yield probe, path({}), query, _replaced(body, at, text), None


def _send(
    http: httpx.Client, stack: Stack, base: str, request: Request
) -> tuple[Probe, httpx.Response]:
    probe, path, query, body, form = request
    url = f"{base}{path}"
    headers = _auth(stack, probe.method, url)
    if form is not None:
        answer = http.request(probe.method, url, params=query, data=form, headers=headers)
    else:
        answer = http.request(probe.method, url, params=query, json=body, headers=headers)
    return probe, answer


def _apps(stack: Stack) -> list[tuple[str, FastAPI]]:
    return [(stack.api_url, stack.api_app), (stack.gateway_url, stack.gateway_app)]


def test_every_input_of_every_route_refuses_nul(stack: Stack) -> None:
    failures, walked = [], set()
    with httpx.Client(timeout=30) as http:
        for base, app in _apps(stack):
            for request in _requests(stack, base, app, NUL):
                probe, answer = _send(http, stack, base, request)
                walked.add((probe.method, probe.template))
                problem = ""
                if answer.headers.get("content-type", "").startswith("application/problem+json"):
                    problem = answer.json().get("type", "")
                if (answer.status_code, problem) != (422, VALIDATION):
                    failures.append(f"{probe}: {answer.status_code} {problem}")
    assert failures == []
    routes = {
        (m, r.path) for _, app in _apps(stack) for r in api_routes(app.routes) for m in r.methods
    }
    assert walked == routes
    assert len(walked) > 40


def test_no_error_answer_echoes_the_input(stack: Stack) -> None:
    """A marker in each input, one at a time, twice (the second time meets what
    the first created: a namespace that exists, say): no error answer carries it."""
    marker = f"zq{secrets.token_hex(6)}"
    echoes, errors = [], 0
    with httpx.Client(timeout=30) as http:
        for _round in range(2):
            for base, app in _apps(stack):
                for request in _requests(stack, base, app, marker):
                    probe, answer = _send(http, stack, base, request)
                    # (501-503 are dependencies this stack does not run: the
                    # gateway behind questions, Stripe checkout.)
                    assert answer.status_code != 500, f"{probe}: {answer.text}"
                    if answer.status_code < 400:
                        continue
                    errors += 1
                    headers = "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
                    if marker in f"{answer.text}\n{headers}".casefold():
                        echoes.append(f"{probe}: {answer.status_code} {answer.text[:200]}")
    assert echoes == []
    assert errors > 50  # the walk met many refusals, not only successes


# -- 402 no-budget says when to retry --------------------------------------------------


def _next_month(now: datetime) -> datetime:
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def test_no_budget_says_when_to_retry(stack: Stack, database: DbHandles) -> None:
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("DELETE FROM bastion.budgets WHERE tenant_id = %s", (stack.tenant,))
    url = f"{stack.gateway_url}/v1/chat/completions"
    body = BODIES[("POST", "/v1/chat/completions")]
    with httpx.Client(timeout=30) as http:
        answer = http.post(url, json=body, headers=_auth(stack, "POST", url))
    assert answer.status_code == 402, answer.text
    assert answer.json()["type"] == "https://bastion.dev/problems/no-budget"
    now = datetime.now(UTC)
    expected = (_next_month(now) - now).total_seconds()
    retry_after = int(answer.headers["retry-after"])
    assert abs(retry_after - expected) < 30
    assert answer.json()["retry_after"] == retry_after
