"""Every route of the api and of the gateway, for every role, with MFA or not,
own or other tenant, over real HTTP: against the decision the Cedar policies
give, and (api) against a leak oracle.

The apps are the ones the composition root (:mod:`bastion.compose`) builds for
``bastion serve``, and the routes come from their own routers, so a new route
is walked as soon as it exists; one that declares no action cannot even be
built, and one slipped in after the build fails the walk.

The leak oracle (CHECKLIST M3: raw personal data leaves only through
``pii:reveal``). Each tenant's data holds planted personal data — an e-mail
address, a phone number, an IBAN, a card number and a key-shaped secret — in a
document uploaded and indexed and one still pending, in a document title, in
the vault, in a member's e-mail address, in audit details and in a plan
change's reason, and a plain marker word of its own. Every GET is called with
the real ids of both tenants' objects, and the routes that read through a body
(search, questions, reveal) with bodies that reach the data; the model behind
the questions repeats its whole context. No answer, body or headers, may carry
the other tenant's marker or values; the own tenant's raw values reach only a
caller holding ``pii:reveal`` (an owner with MFA), and each such answer wrote a
``pii.reveal`` audit event in the tenant.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from fastapi import APIRouter, FastAPI, Request

from bastion.access.authorize import ROLES, Authorizer, Resource, Subject
from bastion.api.declare import PUBLIC, UndeclaredRoute, api_routes, declared_action
from bastion.billing.receipts import PaidInvoice, ReceiptKeys, ReceiptService
from bastion.compose import Identity, Overrides, build_api, build_gateway
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.passwords import PasswordService
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.api_stack import api_server, api_settings
from tests.conftest import DbHandles
from tests.gateway_stack import gateway_server
from tests.http_server import running_server

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse battery staple 42"
DENIED_TYPES = ("/forbidden", "/mfa-required", "/not-found")
REASON = "route matrix: the leak oracle reads it"
SIDES = ("own", "other")

# A body each route accepts, so that an allowed call gets past validation
# (keyed by the path's last segment, or the whole path).
BODIES: dict[str, Any] = {
    "members": {"email": "nobody@matrix.test", "role": "viewer"},
    "/me/mfa/totp/confirm": {"code": "000000"},
    "/me/password": {"current_password": PASSWORD, "new_password": "short"},
    "search": {"query": "refund for the customer's ticket", "k": 100},
    "questions": {"question": "What did the customer ask for?", "k": 20},
}
# The data routes the oracle must have seen answer with the own tenant's data
# (else it proved nothing about them).
DATA_ROUTES = frozenset(
    {
        ("GET", "/tenants/{tenant_id}/members"),
        ("GET", "/tenants/{tenant_id}/audit"),
        ("GET", "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/documents"),
        ("GET", "/tenants/{tenant_id}/knowledge/documents/{document_id}"),
        ("GET", "/tenants/{tenant_id}/knowledge/documents/{document_id}/text"),
        ("GET", "/tenants/{tenant_id}/knowledge/documents/{document_id}/content"),
        ("POST", "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/search"),
        ("POST", "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/questions"),
        ("POST", "/tenants/{tenant_id}/pii/reveal"),
        ("GET", "/tenants/{tenant_id}/billing/receipts"),
        ("GET", "/tenants/{tenant_id}/billing/receipts/{receipt_id}"),
        ("GET", "/tenants/{tenant_id}/billing/plan-changes"),
    }
)


@dataclass(frozen=True)
class Planted:
    """What one tenant's data holds, and where."""

    marker: str  # a plain word only this tenant's data holds (not personal data)
    personal: tuple[tuple[str, str], ...]  # (kind, raw value) of every planted value
    tokens: tuple[str, ...]  # the vault tokens of the document's values
    namespace: UUID
    documents: tuple[UUID, ...]  # indexed, pending
    receipt: UUID

    def witnesses(self) -> tuple[str, ...]:
        """Strings that show an answer reached this tenant's data (none personal)."""
        ids = (*map(str, self.documents), str(self.receipt))
        return (self.marker, *self.tokens, *ids)


def _personal_data(tag: str, phone: str, iban: str, card: str) -> dict[str, str]:
    """One tenant's planted values; the key-shaped secret is assembled at run
    time (so that secret scanners do not flag the suite)."""
    return {
        "member": f"{tag}.member@{tag}-corp.example",
        "email": f"{tag}.customer@example.org",
        "title": f"{tag}.title@example.org",
        "reason": f"{tag}.asker@example.org",
        "phone": phone,
        "iban": iban,
        "card": card,
        "secret": "AKIA" + secrets.token_hex(8).upper(),
    }


PLANTS = {
    "own": ("+44 20 7946 0958", "GB82 WEST 1234 5698 7654 32", "4242 4242 4242 4242"),
    "other": ("+1 415 555 0142", "DE89 3704 0044 0532 0130 00", "3782 822463 10005"),
}


@dataclass
class Api:
    url: str
    app: FastAPI
    identity: Identity
    tenants: dict[str, UUID]
    users: dict[str, UUID]
    planted: dict[str, Planted] = field(default_factory=dict)


def _echoing_model() -> FastAPI:
    """The gateway with the worst model behind it: its answer repeats, word
    for word, every retrieved document of its prompt (the ``[doc:…]`` lines)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        prompt = (await request.json())["messages"][0]["content"]
        context = [line for line in prompt.splitlines() if line.startswith("[doc:")]
        return {"choices": [{"message": {"role": "assistant", "content": "\n".join(context)}}]}

    return app


@pytest.fixture(scope="module")
def api(database: DbHandles, keystore: LocalKeystore) -> Iterator[Api]:
    tenants: dict[str, UUID] = {}
    users: dict[str, UUID] = {}
    planted: dict[str, Planted] = {}

    async def seed(db: Database, identity: Identity) -> None:
        service = TenantService(db)
        for name in SIDES:
            tenants[name] = (await service.create_tenant(f"m-{uuid4().hex[:8]}", name)).id
        for role in ROLES:
            users[role] = await service.add_member(tenants["own"], f"{role}@matrix.test", role)
            async with db.tenant_tx(tenants["own"], None, "system") as tx:
                await PasswordService().set_password(tx, users[role], PASSWORD)
        for name in SIDES:
            planted[name] = await _plant(db, keystore, database, identity, tenants[name], name)

    with (
        running_server(_echoing_model()) as gateway,
        api_server(database, keystore, seed, gateway_url=gateway) as (url, app, identity),
    ):
        yield Api(url, app, identity, tenants, users, planted)


async def _plant(
    db: Database,
    keystore: LocalKeystore,
    database: DbHandles,
    identity: Identity,
    tenant: UUID,
    side: str,
) -> Planted:
    """Put personal data everywhere the api stores a tenant's data."""
    marker = f"zq{secrets.token_hex(6)}"
    values = _personal_data(marker, *PLANTS[side])
    operator = Actor(tenant, None, "system")
    kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
    await TenantService(db).add_member(tenant, values["member"], "viewer")
    namespace = await kb.create_namespace(operator, "support")
    body = (
        f"Ticket {marker}: refund for the customer. Write to {values['email']} or call "
        f"{values['phone']}. Pay back to IBAN {values['iban']}; the card was {values['card']}. "
        f"They pasted their key {values['secret']} by mistake."
    )
    title = f"Refund for {values['title']} ({values['phone']})"
    documents = []
    for ingest in (True, False):
        upload = await kb.upload(
            operator,
            "support",
            title=title,
            body=body.encode(),
            content_type="text/plain",
            enqueue=False,
        )
        documents.append(upload.document.id)
        if ingest:
            assert (await kb.ingest(tenant, upload.document.id)).status == "indexed"
    redaction = await kb.vault.tokenize(db, tenant, body)
    # The recognizer must find every planted value, or the oracle tests the recognizer.
    assert not [v for k, v in values.items() if k != "member" and v in redaction.text]
    tokens = tuple(ref.token for ref in redaction.tokens)
    # A reveal whose reason names someone: personal data in audit details.
    await kb.vault.detokenize(
        db, tenant, tokens[:1], user_id=None, role="system", reason=f"asked by {values['reason']}"
    )
    receipt = await ReceiptService(
        db, ReceiptKeys(keystore), issuer="https://matrix.test"
    ).issue_invoice(
        tenant,
        PaidInvoice(
            invoice_id=f"in_{marker}",
            customer_id=f"cus_{marker}",
            amount_paid=4900,
            currency="eur",
            paid_at=datetime.now(UTC),
        ),
    )
    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO bastion.plan_changes (tenant_id, actor, to_plan, reason, source) "
            "VALUES (%s, 'operator', 'free', %s, 'operator')",
            (tenant, f"{marker}: requested by {values['reason']}, {values['phone']}"),
        )
    return Planted(
        marker,
        tuple(values.items()),
        tokens,
        namespace.id,
        tuple(documents),
        receipt.id,
    )


# -- walking every route --------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    action: str  # PUBLIC for the routes that need no caller
    resource_type: str | None


@dataclass(frozen=True)
class Call:
    route: Route
    role: str | None  # None: anonymous (public routes)
    mfa: bool
    side: str  # the tenant the path names
    objects: str  # whose ids and bodies the request carries
    path: str
    params: dict[str, str] | None
    body: Any


@dataclass(frozen=True)
class Exchange:
    call: Call
    status: int
    problem_type: str
    text: str  # body and headers
    reveals: int  # pii.reveal audit events the call wrote in the own tenant


def _routes(app: FastAPI) -> list[Route]:
    """Every route of the app: its action and, for guarded ones, the resource type."""
    routes = []
    for route in api_routes(app.routes):
        found = declared_action(route)
        assert found is not None, f"{route.path} declares no action"
        resource_type = None
        if found != PUBLIC:
            guards = [
                d.call for d in route.dependant.dependencies if hasattr(d.call, "bastion_action")
            ]
            assert len(guards) == 1, f"{route.path} should have exactly one guard"
            resource_type = guards[0].resource_type  # type: ignore[union-attr]
        routes.extend(
            Route(method, route.path, found, resource_type)
            for method in sorted(route.methods or ())
        )
    return routes


def _object_variants(route: Route) -> tuple[str, ...]:
    """Whose objects a request names: both tenants' where it reads them."""
    names_objects = any(
        part in route.template for part in ("{document_id}", "{receipt_id}", "{namespace}")
    )
    if route.template.endswith("/pii/reveal") or (names_objects and _reads(route)):
        return ("own", "own-pending", "other") if "{document_id}" in route.template else SIDES
    return ("own",)


def _reads(route: Route) -> bool:
    return route.method == "GET" or route.template.endswith(("/search", "/questions", "/reveal"))


def _request(api: Api, route: Route, side: str, objects: str) -> tuple[str, Any, Any]:
    """(path, query, body) of a request to ``route``: real ids and bodies where it reads."""
    seeded = api.planted[objects.split("-")[0]]
    document = seeded.documents[1 if objects.endswith("pending") else 0]
    real = _reads(route)  # nothing is changed with the seeded objects' ids
    path = (
        route.template.replace("{tenant_id}", str(api.tenants[side]))
        .replace("{request_id}", str(uuid4()))
        .replace("{user_id}", str(uuid4()))
        .replace("{role}", "viewer")
        .replace("{namespace}", str(seeded.namespace))
        .replace("{document_id}", str(document if real else uuid4()))
        .replace("{receipt_id}", str(seeded.receipt if real else uuid4()))
    )
    params = {"reason": REASON} if route.template.endswith("/content") else None
    body = BODIES.get(path.rsplit("/", 1)[-1], BODIES.get(path))
    if route.template.endswith("/pii/reveal"):
        body = {"tokens": list(seeded.tokens), "reason": REASON}
    return path, params, body


def _calls(api: Api) -> Iterator[Call]:
    for route in _routes(api.app):
        sides = SIDES if "{tenant_id}" in route.template else ("own",)
        callers: list[tuple[str | None, bool]] = (
            [(None, False)]
            if route.action == PUBLIC
            else [(role, mfa) for role in ROLES for mfa in (False, True)]
        )
        for role, mfa in callers:
            for side in sides:
                for objects in _object_variants(route):
                    path, params, body = _request(api, route, side, objects)
                    yield Call(route, role, mfa, side, objects, path, params, body)


def _headers(api: Api, call: Call, url: str) -> dict[str, str]:
    """A fresh token of the call's role in the own tenant (the token is always good)."""
    if call.role is None:
        return {}
    key = DpopKey.generate()
    token, _claims = api.identity.service.tokens.issue_access(
        user_id=api.users[call.role],
        tenant_id=api.tenants["own"],
        roles=(call.role,),
        amr=("pwd", "otp", "mfa") if call.mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return {
        "Authorization": f"DPoP {token}",
        "DPoP": key.proof(call.route.method, url, access_token=token),
    }


def _reveal_events(conn: psycopg.Connection[Any], tenant: UUID) -> int:
    row = conn.execute(
        "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s AND action = 'pii.reveal'",
        (tenant,),
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(scope="module")
def walk(api: Api, database: DbHandles) -> list[Exchange]:
    """Every call of :func:`_calls`, made over HTTP, with what it answered and wrote."""
    exchanges = []
    with (
        httpx.Client(timeout=30) as http,
        psycopg.connect(database.superuser, autocommit=True) as conn,
    ):
        for call in _calls(api):
            url = f"{api.url}{call.path}"
            before = _reveal_events(conn, api.tenants["own"])
            answer = http.request(
                call.route.method,
                url,
                params=call.params,
                json=call.body,
                headers=_headers(api, call, url),
            )
            if call.role is not None:
                assert answer.status_code != 401, answer.text  # the token is always good
            problem = ""
            if answer.headers.get("content-type", "").startswith("application/problem+json"):
                problem = str(answer.json().get("type", ""))
            headers = "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
            exchanges.append(
                Exchange(
                    call,
                    answer.status_code,
                    problem,
                    f"{answer.text}\n{headers}",
                    _reveal_events(conn, api.tenants["own"]) - before,
                )
            )
    return exchanges


def test_every_route_is_walked(api: Api, walk: list[Exchange]) -> None:
    walked = {(e.call.route.method, e.call.route.template) for e in walk}
    assert ("GET", "/tenants/{tenant_id}/members") in walked
    assert ("GET", "/userinfo") in walked
    assert walked >= DATA_ROUTES
    assert walked == {(r.method, r.template) for r in _routes(api.app)}


async def test_route_matrix(api: Api, walk: list[Exchange]) -> None:
    authorizer = Authorizer()
    failures = []
    seen = {True: 0, False: 0}
    for exchange in walk:
        call = exchange.call
        if exchange.status >= 500:
            failures.append(f"{call.route.method} {call.path}: {exchange.status}")
        if call.role is None:
            continue
        if call.objects == "other":
            # Another tenant's ids are not found, whatever the decision.
            if exchange.status < 400:
                failures.append(f"{call.route.method} {call.path}: {exchange.status}")
            continue
        denied = exchange.status in (403, 404) and exchange.problem_type.endswith(DENIED_TYPES)
        expected = call.side == "own" and _allowed(
            authorizer,
            api,
            call.role,
            call.mfa,
            call.route.action,
            call.route.resource_type or "",
        )
        seen[not denied] += 1
        if (not denied) != expected:
            failures.append(
                f"{call.route.method} {call.route.template} as {call.role} mfa={call.mfa} "
                f"{call.side} ({call.objects}'s ids): expected {'allow' if expected else 'deny'}"
            )
    assert failures == []
    assert seen[True] > 10 and seen[False] > 10  # both kinds of decision were exercised


# -- the leak oracle ----------------------------------------------------------------------

_SEPARATORS = re.compile(r"[\s\-.()]")


def _spellings(kind: str, value: str) -> set[str]:
    """The forms a raw value may take in an answer: as planted, without
    separators (E.164, a compact IBAN), and the digits of a number alone."""
    forms = {value.casefold(), _SEPARATORS.sub("", value).casefold()}
    digits = re.sub(r"\D", "", value)
    if kind in ("phone", "iban", "card") and len(digits) >= 9:
        forms.add(digits)
    return forms


def _raw_values(planted: Planted) -> set[str]:
    return {form for kind, value in planted.personal for form in _spellings(kind, value)}


def _found(text: str, needles: set[str]) -> list[str]:
    plain = text.casefold()
    compact = _SEPARATORS.sub("", plain)
    digits = re.sub(r"\D", "", plain)
    return sorted(n for n in needles if n in plain or n in compact or (n.isdigit() and n in digits))


def test_no_route_leaks_raw_personal_data(api: Api, walk: list[Exchange]) -> None:
    authorizer = Authorizer()
    own, other = api.planted["own"], api.planted["other"]
    own_raw = _raw_values(own)
    foreign = _raw_values(other) | {other.marker.casefold()}
    leaks, unaudited = [], []
    reached: set[tuple[str, str]] = set()
    raw_reads = 0
    for exchange in walk:
        call = exchange.call
        where = (
            f"{call.route.method} {call.route.template} as {call.role} mfa={call.mfa} "
            f"{call.side} path, {call.objects}'s ids"
        )
        if found := _found(exchange.text, foreign):
            leaks.append(f"{where}: the other tenant's {found}")
        raw = _found(exchange.text, own_raw)
        revealer = call.role is not None and _allowed(
            authorizer, api, call.role, call.mfa, "pii:reveal", "PiiVault"
        )
        if raw and not (revealer and call.side == "own"):
            leaks.append(f"{where}: raw {raw}")
        elif raw:
            raw_reads += 1
            if exchange.reveals < 1:
                unaudited.append(where)
        if exchange.status == 200 and any(w in exchange.text for w in own.witnesses()):
            reached.add((call.route.method, call.route.template))
    assert (leaks, unaudited) == ([], [])
    # The oracle reached the data: every data route answered with the own
    # tenant's data, and raw reads (owner with MFA) were seen and audited.
    assert sorted(DATA_ROUTES - reached) == []
    assert raw_reads >= 2


async def test_members_see_each_other_s_e_mail_masked(api: Api) -> None:
    own = api.planted["own"]
    planted = dict(own.personal)["member"]
    caller = Caller(api, api.users["viewer"], ("viewer",), mfa=False)
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await caller(http, "GET", f"/tenants/{api.tenants['own']}/members")
    assert answer.status_code == 200
    emails = {m["email"] for m in answer.json()["members"]}
    assert "viewer@matrix.test" in emails  # one's own address, in full
    assert f"{own.marker[0]}***@{planted.split('@')[1]}" in emails
    assert planted not in answer.text and own.marker + "." not in answer.text


def _allowed(
    authorizer: Authorizer, api: Api, role: str, mfa: bool, action: str, resource_type: str
) -> bool:
    user, tenant = api.users[role], api.tenants["own"]
    owner = user if resource_type == "Account" else None
    subject = Subject(user, tenant, frozenset({role}), mfa)
    return authorizer.authorize(
        subject, action, Resource(resource_type, str(tenant), tenant, owner)
    )


# -- two-person approval of admin roles, and revocation ---------------------------------


class Caller:
    """A member of the own tenant with a minted token (MFA or not)."""

    def __init__(
        self,
        api: Api,
        user_id: UUID,
        roles: tuple[str, ...],
        *,
        mfa: bool,
        tenant: str = "own",
        age: int = 0,  # seconds since the sign-in
    ) -> None:
        self.api, self.key = api, DpopKey.generate()
        self.token, _ = api.identity.service.tokens.issue_access(
            user_id=user_id,
            tenant_id=api.tenants[tenant],
            roles=roles,
            amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
            jkt=self.key.thumbprint,
            auth_time=int(time.time()) - age,
        )

    async def __call__(
        self, http: httpx.AsyncClient, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        url = f"{self.api.url}{path}"
        return await http.request(
            method,
            url,
            json=body,
            headers={
                "Authorization": f"DPoP {self.token}",
                "DPoP": self.key.proof(method, url, access_token=self.token),
            },
        )


async def _member(db: Database, api: Api, role: str, tenant: str = "own") -> tuple[UUID, str]:
    email = f"{role}-{uuid4().hex[:6]}@matrix.test"
    return await TenantService(db).add_member(api.tenants[tenant], email, role), email


async def _roles_of(db: Database, api: Api, user_id: UUID) -> set[str]:
    return set(await db.member_roles(api.tenants["own"], user_id))


async def test_admin_role_needs_a_second_owner(api: Api, db: Database) -> None:
    first_id, _ = await _member(db, api, "owner")
    second_id, _ = await _member(db, api, "owner")
    target_id, target_email = await _member(db, api, "contributor")
    first = Caller(api, first_id, ("owner",), mfa=True)
    second = Caller(api, second_id, ("owner",), mfa=True)
    base = f"/tenants/{api.tenants['own']}"
    async with httpx.AsyncClient(timeout=10) as http:
        asked = await first(
            http, "POST", f"{base}/members", {"email": target_email, "role": "billing-admin"}
        )
        assert asked.status_code == 202 and asked.json()["status"] == "pending"
        assert await _roles_of(db, api, target_id) == {"contributor"}  # not yet
        request = asked.json()["request_id"]

        own = await first(http, "POST", f"{base}/role-requests/{request}/approve")
        assert own.status_code == 403 and own.json()["reason"] == "self-approval"
        assert await _roles_of(db, api, target_id) == {"contributor"}

        approved = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert approved.status_code == 200
        assert await _roles_of(db, api, target_id) == {"contributor", "billing-admin"}

        again = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert again.status_code == 409 and again.json()["reason"] == "decided"

        # Viewer and contributor need no second owner.
        plain_id, plain_email = await _member(db, api, "viewer")
        direct = await first(
            http, "POST", f"{base}/members", {"email": plain_email, "role": "contributor"}
        )
        assert direct.status_code == 200
        assert await _roles_of(db, api, plain_id) == {"viewer", "contributor"}


async def test_refused_approvals_write_nothing(api: Api, db: Database, database: DbHandles) -> None:
    import psycopg

    requester_id, _ = await _member(db, api, "owner")
    target_id, target_email = await _member(db, api, "viewer")
    requester = Caller(api, requester_id, ("owner",), mfa=True)
    base = f"/tenants/{api.tenants['own']}"
    async with httpx.AsyncClient(timeout=10) as http:
        asked = await requester(
            http, "POST", f"{base}/members", {"email": target_email, "role": "auditor"}
        )
        request = asked.json()["request_id"]
        # A lower role (billing-admin, with MFA) may not approve.
        billing_id, _ = await _member(db, api, "billing-admin")
        lower = Caller(api, billing_id, ("billing-admin",), mfa=True)
        refused = await lower(http, "POST", f"{base}/role-requests/{request}/approve")
        assert refused.status_code == 403 and refused.json()["type"].endswith("/forbidden")
        # An owner without MFA is asked to step up.
        weak_id, _ = await _member(db, api, "owner")
        weak = Caller(api, weak_id, ("owner",), mfa=False)
        step_up = await weak(http, "POST", f"{base}/role-requests/{request}/approve")
        assert step_up.status_code == 403 and step_up.json()["type"].endswith("/mfa-required")
        # An owner of another tenant: on their own path RLS hides the request, on
        # ours the tenant does not match; both are 404.
        stranger_id, _ = await _member(db, api, "owner", tenant="other")
        stranger = Caller(api, stranger_id, ("owner",), mfa=True, tenant="other")
        theirs = await stranger(
            http, "POST", f"/tenants/{api.tenants['other']}/role-requests/{request}/approve"
        )
        assert theirs.status_code == 404
        ours = await stranger(http, "POST", f"{base}/role-requests/{request}/approve")
        assert ours.status_code == 404
        # Expired requests cannot be approved.
        with psycopg.connect(database.superuser, autocommit=True) as conn:
            conn.execute(
                "UPDATE bastion.role_requests SET expires_at = now() - interval '1 s' "
                "WHERE id = %s",
                (request,),
            )
        second_id, _ = await _member(db, api, "owner")
        second = Caller(api, second_id, ("owner",), mfa=True)
        expired = await second(http, "POST", f"{base}/role-requests/{request}/approve")
        assert expired.status_code == 409 and expired.json()["reason"] == "expired"
    assert await _roles_of(db, api, target_id) == {"viewer"}
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT status, decided_by FROM bastion.role_requests WHERE id = %s", (request,)
        ).fetchone()
    assert row == ("pending", None)


async def test_revoked_role_stops_on_the_next_request(api: Api, db: Database) -> None:
    owner_id, _ = await _member(db, api, "owner")
    holder_id, _ = await _member(db, api, "viewer")
    owner = Caller(api, owner_id, ("owner",), mfa=True)
    holder = Caller(api, holder_id, ("viewer",), mfa=False)  # token says viewer, 15 min
    members = f"/tenants/{api.tenants['own']}/members"
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await holder(http, "GET", members)).status_code == 200
        revoked = await owner(http, "DELETE", f"{members}/{holder_id}/roles/viewer")
        assert revoked.status_code == 204
        after = await holder(http, "GET", members)
        assert after.status_code == 403
        assert after.json()["type"].endswith("/forbidden")


async def test_role_changes_need_a_fresh_sign_in(api: Api, db: Database) -> None:
    owner_id, _ = await _member(db, api, "owner")
    _target_id, target_email = await _member(db, api, "viewer")
    stale = Caller(api, owner_id, ("owner",), mfa=True, age=3600)  # signed in an hour ago
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await stale(
            http,
            "POST",
            f"/tenants/{api.tenants['own']}/members",
            {"email": target_email, "role": "auditor"},
        )
    assert answer.status_code == 403
    assert answer.json()["type"].endswith("/mfa-required")
    assert "max_age" in answer.headers["www-authenticate"]


# -- the gateway, as the composition root builds it ----------------------------------------

# A body each gateway route accepts (keyed by the route's path).
GATEWAY_BODIES: dict[str, Any] = {
    "/v1/chat/completions": {
        "model": "bastion-local",
        "messages": [{"role": "user", "content": "What did the customer ask for?"}],
        "max_tokens": 16,
    },
    "/v1/embeddings": {"model": "bastion-local", "input": "refund for the customer"},
}


@dataclass
class Served:
    url: str
    app: FastAPI


def _test_overrides(database: DbHandles, keystore: LocalKeystore) -> Overrides:
    return Overrides(
        database=Database(database.app, database.context_key, max_size=4), keystore=keystore
    )


@pytest.fixture(scope="module")
def gateway(api: Api, database: DbHandles, keystore: LocalKeystore) -> Iterator[Served]:
    """The gateway ``bastion serve gateway`` runs, trusting the api's tokens."""

    def settings(url: str) -> Settings:
        return Settings(issuer=api.url, gateway_public_url=url, embedder="hashing")

    with gateway_server(database, keystore, settings) as (url, composed):
        yield Served(url, composed.app)


def test_gateway_route_matrix(api: Api, gateway: Served) -> None:
    """Every gateway route, anonymous where public, else as every role with MFA
    or not: Cedar's decision is the gateway's, and nothing answers 5xx."""
    authorizer = Authorizer()
    failures = []
    seen = {True: 0, False: 0}
    walked = set()
    with httpx.Client(timeout=30) as http:
        for route in _routes(gateway.app):
            walked.add((route.method, route.template))
            callers: list[tuple[str | None, bool]] = (
                [(None, False)]
                if route.action == PUBLIC
                else [(role, mfa) for role in ROLES for mfa in (False, True)]
            )
            for role, mfa in callers:
                body = GATEWAY_BODIES.get(route.template)
                call = Call(route, role, mfa, "own", "own", route.template, None, body)
                url = f"{gateway.url}{route.template}"
                answer = http.request(
                    route.method, url, json=body, headers=_headers(api, call, url)
                )
                outcome = f"{route.method} {route.template} as {role} mfa={mfa}: "
                if answer.status_code >= 500:
                    failures.append(f"{outcome}{answer.status_code}")
                if role is None:
                    continue
                assert answer.status_code != 401, answer.text  # the token is always good
                problem = ""
                if answer.headers.get("content-type", "").startswith("application/problem+json"):
                    problem = str(answer.json().get("type", ""))
                denied = answer.status_code in (403, 404) and problem.endswith(DENIED_TYPES)
                expected = _allowed(
                    authorizer, api, role, mfa, route.action, route.resource_type or ""
                )
                seen[not denied] += 1
                if (not denied) != expected:
                    failures.append(f"{outcome}expected {'allow' if expected else 'deny'}")
    assert failures == []
    assert walked >= {
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/readyz"),
    }
    assert seen[True] > 0 and seen[False] > 0  # both kinds of decision were exercised


def _undeclared_router() -> APIRouter:
    """A route that names no action: neither a guard nor ``PUBLIC_ROUTE``."""
    router = APIRouter()

    @router.get("/planted")
    async def planted() -> dict[str, str]:
        return {"planted": "yes"}

    return router


@pytest.mark.parametrize("build", [build_api, build_gateway], ids=["api", "gateway"])
def test_compose_refuses_an_undeclared_route(
    build: Callable[[Settings, Overrides], Any], database: DbHandles, keystore: LocalKeystore
) -> None:
    """A route planted through the composition root's overrides: the app is not built."""
    overrides = replace(_test_overrides(database, keystore), routers=(_undeclared_router(),))
    with pytest.raises(UndeclaredRoute, match="GET /planted"):
        build(api_settings("http://127.0.0.1:9", "http://127.0.0.1:9"), overrides)


@pytest.mark.parametrize("build", [build_api, build_gateway], ids=["api", "gateway"])
def test_the_matrix_fails_on_a_route_added_after_the_build(
    build: Callable[[Settings, Overrides], Any], database: DbHandles, keystore: LocalKeystore
) -> None:
    """A route slipped into a built app (past the build's check): the walk fails."""
    app: FastAPI = build(
        api_settings("http://127.0.0.1:9", "http://127.0.0.1:9"),
        _test_overrides(database, keystore),
    ).app
    assert _routes(app)  # the app as built walks
    app.include_router(_undeclared_router())
    with pytest.raises(AssertionError, match="/planted declares no action"):
        _routes(app)
