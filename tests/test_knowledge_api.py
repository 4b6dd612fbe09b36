"""Cross-tenant retrieval over real HTTP: whatever tenant A sends, it never gets
tenant B's chunks — B's namespace id, B's tenant id in the path, the body or
the query, SQL in filter values, B's document ids, or an embedding equal to
B's chunk. Each attack is its own test, and each checks that A's own search
still works (so an empty answer is a refusal, not a broken search)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.knowledge.extract import extracted_length
from bastion.knowledge.service import Actor, KnowledgeService
from bastion.offload import FairProcessPool, shared_pool
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.api_stack import api_server
from tests.conftest import DbHandles
from tests.offload_jobs import wait_for_file

pytestmark = pytest.mark.anyio

SHARED = (
    "Refund for a double charge: the customer was billed twice for the Pro plan in "
    "November and asks for the duplicate payment back. Contact: {email}."
)


@dataclass
class Side:
    tenant: UUID
    users: dict[str, UUID]
    namespace: UUID
    document: UUID


@dataclass
class Stack:
    url: str
    identity: Identity
    a: Side
    b: Side


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    sides: dict[str, Side] = {}

    async def seed(db: Database, _identity: Identity) -> None:
        tenants = TenantService(db)
        kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder="hashing")
        for name in ("a", "b"):
            tenant = (await tenants.create_tenant(f"kb-{name}-{uuid4().hex[:6]}", name)).id
            users = {
                role: await tenants.add_member(tenant, f"{role}-{name}@kb.test", role)
                for role in ("owner", "contributor", "viewer")
            }
            ns = await kb.create_namespace(Actor(tenant, users["owner"], "owner"), "support")
            writer = Actor(tenant, users["contributor"], "contributor")
            up = await kb.upload(
                writer,
                "support",
                title=f"refund-{name}",
                body=SHARED.format(email=f"{name}@customer.test").encode(),
                content_type="text/plain",
            )
            assert (await kb.ingest(tenant, up.document.id)).status == "indexed"
            sides[name] = Side(tenant, users, ns.id, up.document.id)

    with api_server(database, keystore, seed) as (url, _app, identity):
        yield Stack(url, identity, sides["a"], sides["b"])


def _headers(
    stack: Stack, side: Side, role: str, method: str, url: str, *, mfa: bool = False
) -> dict[str, str]:
    key = DpopKey.generate()
    token, _ = stack.identity.service.tokens.issue_access(
        user_id=side.users[role],
        tenant_id=side.tenant,
        roles=(role,),
        amr=("pwd", "otp", "mfa") if mfa else ("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    return {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, access_token=token)}


def _call(
    stack: Stack,
    method: str,
    path: str,
    *,
    side: Side | None = None,
    role: str = "viewer",
    mfa: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    url = f"{stack.url}{path}"
    headers = {
        **_headers(stack, side or stack.a, role, method, url, mfa=mfa),
        **kwargs.pop("headers", {}),
    }
    return httpx.request(method, url, headers=headers, timeout=10, **kwargs)


def _search(stack: Stack, body: dict[str, Any], *, namespace: str = "support", tenant: Any = None):
    path = f"/tenants/{tenant or stack.a.tenant}/knowledge/namespaces/{namespace}/search"
    return _call(stack, "POST", path, json=body)


def _documents(response: httpx.Response) -> set[str]:
    return {hit["document_id"] for hit in response.json().get("hits", [])}


def _assert_own_search_works(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund double charge", "k": 5})
    assert answer.status_code == 200
    assert _documents(answer) == {str(stack.a.document)}
    assert "a@customer.test" not in answer.text and "⟦EMAIL_" in answer.text


def test_plain_search_returns_only_own_redacted_chunks(stack: Stack) -> None:
    _assert_own_search_works(stack)


def test_namespace_id_of_b_is_not_found(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund"}, namespace=str(stack.b.namespace))
    assert answer.status_code == 404
    assert answer.json()["type"].endswith("/namespace-not-found")
    assert str(stack.b.document) not in answer.text
    _assert_own_search_works(stack)


def test_tenant_id_of_b_in_the_path_is_not_found(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund"}, tenant=stack.b.tenant)
    assert answer.status_code == 404 and str(stack.b.document) not in answer.text
    _assert_own_search_works(stack)


def test_tenant_id_in_the_body_is_refused(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund", "tenant_id": str(stack.b.tenant)})
    assert answer.status_code == 422
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert str(stack.b.tenant) not in answer.text
    _assert_own_search_works(stack)


def test_tenant_id_in_the_query_string_changes_nothing(stack: Stack) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/search"
    answer = _call(
        stack, "POST", path, params={"tenant_id": str(stack.b.tenant)}, json={"query": "refund"}
    )
    assert answer.status_code == 200
    assert _documents(answer) == {str(stack.a.document)}


@pytest.mark.parametrize(
    "title",
    ["refund-b", "x' OR '1'='1", "refund-a' UNION SELECT * FROM bastion.chunks --", "%"],
)
def test_sql_in_a_filter_value_is_just_a_value(stack: Stack, title: str) -> None:
    answer = _search(stack, {"query": "refund", "title": title, "k": 10})
    assert answer.status_code == 200
    assert _documents(answer) == set()
    _assert_own_search_works(stack)


def test_sql_in_a_document_id_filter_is_refused(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund", "document_ids": ["1) OR (1=1"]})
    assert answer.status_code == 422
    _assert_own_search_works(stack)


def test_document_ids_of_b_in_the_filter_find_nothing(stack: Stack) -> None:
    answer = _search(stack, {"query": "refund", "document_ids": [str(stack.b.document)]})
    assert answer.status_code == 200 and _documents(answer) == set()


def test_an_embedding_equal_to_b_s_chunk_returns_only_a_s(
    stack: Stack, database: DbHandles
) -> None:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT embedding::text FROM bastion.chunks WHERE document_id = %s LIMIT 1",
            (stack.b.document,),
        ).fetchone()
    assert row is not None
    embedding = [float(x) for x in row[0].strip("[]").split(",")]
    answer = _search(stack, {"embedding": embedding, "k": 10})
    assert answer.status_code == 200
    assert _documents(answer) == {str(stack.a.document)}
    assert "b@customer.test" not in answer.text


def test_b_s_document_cannot_be_read_or_deleted_by_a(stack: Stack, database: DbHandles) -> None:
    base = f"/tenants/{stack.a.tenant}/knowledge/documents/{stack.b.document}"
    for method, path, role in (
        ("GET", base, "viewer"),
        ("GET", f"{base}/text", "viewer"),
        ("GET", f"{base}/content?reason=reading+the+neighbours", "owner"),
        ("DELETE", base, "contributor"),
    ):
        answer = _call(stack, method, path, role=role, mfa=role == "owner")
        assert answer.status_code == 404, (method, path, answer.text)
        assert "customer.test" not in answer.text
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.chunks WHERE document_id = %s", (stack.b.document,)
        ).fetchone()
    assert row is not None and row[0] > 0


def test_upload_into_b_s_namespace_is_refused_and_writes_nothing(
    stack: Stack, database: DbHandles
) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/{stack.b.namespace}/documents"
    before = _count_documents(database)
    answer = _call(
        stack, "POST", path, role="contributor", params={"title": "x"}, content=b"planted text"
    )
    assert answer.status_code == 404
    assert _count_documents(database) == before


def _count_documents(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute("SELECT count(*) FROM bastion.documents").fetchone()
    assert row is not None
    return int(row[0])


def test_viewer_cannot_upload(stack: Stack, database: DbHandles) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    before = _count_documents(database)
    answer = _call(stack, "POST", path, role="viewer", params={"title": "x"}, content=b"text")
    assert answer.status_code == 403
    assert _count_documents(database) == before


def test_upload_then_list_get_and_idempotent_retry(stack: Stack, database: DbHandles) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    key = {"Idempotency-Key": f"retry-{uuid4()}", "Content-Type": "text/markdown"}
    first = _call(
        stack,
        "POST",
        path,
        role="contributor",
        params={"title": "md"},
        content=b"# Hi",
        headers=key,
    )
    again = _call(
        stack,
        "POST",
        path,
        role="contributor",
        params={"title": "md"},
        content=b"# Hi",
        headers=key,
    )
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and first.json()["status"] == "pending"
    changed = _call(
        stack,
        "POST",
        path,
        role="contributor",
        params={"title": "md"},
        content=b"# Other",
        headers=key,
    )
    assert changed.status_code == 409
    listed = _call(stack, "GET", path)
    assert first.json()["id"] in {d["id"] for d in listed.json()["documents"]}
    text = _call(
        stack, "GET", f"/tenants/{stack.a.tenant}/knowledge/documents/{first.json()['id']}/text"
    )
    assert text.status_code == 200 and text.text == "# Hi"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "reason"),
    [
        (b"", "text/plain", 422, "empty"),
        (b"\x00\x01\x00junk" * 40, "text/plain", 422, "binary"),
        (b"\xff\xfe\xfa", "text/plain; charset=utf-8", 422, "encoding"),
        (b"MZ\x90\x00", "application/octet-stream", 415, "unsupported-type"),
        # One meaning: a charset named twice is not guessed at.
        (b"caf\xc3\xa9", "text/plain; charset=utf-8; charset=latin-1", 422, "encoding"),
        # Large enough to be checked in the parser processes: the same refusals.
        (b"<b></b>" * 20_000, "text/html", 422, "empty"),
        (b"text\x00" * 20_000, "text/plain", 422, "binary"),
    ],
    ids=[
        "empty",
        "binary",
        "encoding",
        "type",
        "two-charsets",
        "pooled-empty",
        "pooled-binary",
    ],
)
def test_bad_uploads_get_problem_json(
    stack: Stack, database: DbHandles, content: bytes, content_type: str, status: int, reason: str
) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    before = _count_documents(database)
    answer = _call(
        stack,
        "POST",
        path,
        role="contributor",
        params={"title": "bad"},
        content=content,
        headers={"Content-Type": content_type},
    )
    assert answer.status_code == status
    problem = answer.json()
    assert problem["type"].endswith("/upload-refused") and problem["reason"] == reason
    assert _count_documents(database) == before


def _count_tenant_documents(database: DbHandles, tenant: UUID) -> tuple[int, int]:
    """(documents, document.upload audit events) of ``tenant``."""
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM bastion.documents WHERE tenant_id = %s), "
            "(SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s "
            " AND action = 'document.upload')",
            (tenant, tenant),
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_html_upload_flood_does_not_stall_other_tenants(stack: Stack, database: DbHandles) -> None:
    """Issue 23 A3: tenant A keeps uploading 1 MiB of HTML that parses to nothing
    (about 1.2 s of CPU each, then refused as empty); tenant B is not slowed down.

    During the flood every one of B's requests (/healthz and an authenticated
    listing) is answered within 500 ms (steady state on this 2-core box: a few
    ms to 40 ms, more when it is loaded), and B's own 64 KiB HTML upload, which
    needs a parser process too, is accepted within 1 s: A never holds more
    than its share of the parser processes. Nothing of A's is written. Before
    the fix each of A's uploads froze the api's event loop for 1.2 s.
    """
    pool = shared_pool()  # the api's (it runs in this process)
    # The pool's processes are running, as after any first use.
    asyncio.run(_run_in_every_worker(pool))
    path_a = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    path_b = f"/tenants/{stack.b.tenant}/knowledge/namespaces/support/documents"
    bomb = b"<b></b>" * ((1 << 20) // 7)
    before_a = _count_tenant_documents(database, stack.a.tenant)
    victim: list[float] = []
    answers: list[httpx.Response] = []
    loads: list[tuple[int, int]] = []
    upload_b: list[tuple[int, float]] = []
    attack_until = time.monotonic() + 1.5

    def attacker() -> None:
        while time.monotonic() < attack_until:
            answer = _call(
                stack,
                "POST",
                path_a,
                role="contributor",
                params={"title": "bomb"},
                content=bomb,
                headers={"Content-Type": "text/html"},
            )
            answers.append(answer)

    def upload_of_b() -> None:
        time.sleep(0.3)  # the flood is under way
        headers = {
            **_headers(stack, stack.b, "contributor", "POST", stack.url + path_b),
            "Content-Type": "text/html",
        }
        body = b"<p>Tenant B's own page.</p>" * 2400
        started = time.perf_counter()
        answer = httpx.post(
            stack.url + path_b, params={"title": "b-flood"}, content=body, headers=headers
        )
        upload_b.append((answer.status_code, time.perf_counter() - started))

    def victim_loop() -> None:
        listing = f"{stack.url}/tenants/{stack.b.tenant}/knowledge/namespaces"
        with httpx.Client(timeout=2) as http:
            while time.monotonic() < attack_until:
                loads.append(pool.load(stack.a.tenant))
                for url, headers in (
                    (f"{stack.url}/healthz", {}),
                    (listing, _headers(stack, stack.b, "viewer", "GET", listing)),
                ):
                    started = time.perf_counter()  # the answer's wait, not the proof's signing
                    try:
                        ok = http.get(url, headers=headers).status_code == 200
                    except httpx.TimeoutException:
                        ok = False
                    victim.append(time.perf_counter() - started if ok else float("inf"))
                time.sleep(0.02)

    threads = [threading.Thread(target=attacker) for _ in range(2)]
    threads += [threading.Thread(target=victim_loop), threading.Thread(target=upload_of_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    victim.sort()
    assert victim and victim[-1] < 0.5, (
        f"B waited up to {victim[-1]:.3f}s (p50 {victim[len(victim) // 2]:.3f}s)"
    )
    assert len(victim) >= 10  # B kept asking throughout
    assert upload_b and upload_b[0][0] == 202 and upload_b[0][1] < 1.0, upload_b
    assert max(running for running, _ in loads) <= pool.per_tenant
    assert max(waiting for _, waiting in loads) <= pool.queue_per_tenant
    assert answers and {answer.status_code for answer in answers} == {422}
    assert {answer.json()["reason"] for answer in answers} == {"empty"}
    assert _count_tenant_documents(database, stack.a.tenant) == before_a


def test_upload_past_the_tenant_s_share_of_parsers_is_429_and_writes_nothing(
    stack: Stack, database: DbHandles, tmp_path: Path
) -> None:
    """A tenant whose share of the parser processes is busy and whose queue is
    full gets 429 ``busy`` with Retry-After at once, without its body being
    parsed or stored; another tenant's upload goes through meanwhile."""
    pool = shared_pool()  # the api's (it runs in this process)
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    before_a = _count_tenant_documents(database, stack.a.tenant)
    release = tmp_path / "release"
    holding = threading.Thread(
        target=asyncio.run, args=(_hold_share(pool, stack.a.tenant, release),)
    )
    holding.start()
    try:
        deadline = time.monotonic() + 10
        while sum(pool.load(stack.a.tenant)) < pool.per_tenant + pool.queue_per_tenant:
            assert time.monotonic() < deadline, pool.load(stack.a.tenant)
            time.sleep(0.01)
        started = time.perf_counter()
        answer = _call(
            stack,
            "POST",
            path,
            role="contributor",
            params={"title": "one too many"},
            content=b"<p>x</p>" * 10_000,
            headers={"Content-Type": "text/html"},
        )
        took = time.perf_counter() - started
        other = _call(
            stack,
            "POST",
            f"/tenants/{stack.b.tenant}/knowledge/namespaces/support/documents",
            side=stack.b,
            role="contributor",
            params={"title": "b-meanwhile"},
            content=b"<p>B meanwhile.</p>" * 4000,
            headers={"Content-Type": "text/html"},
        )
    finally:
        release.touch()
        holding.join(30)
    assert answer.status_code == 429 and took < 0.5
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith("/busy") and int(answer.headers["Retry-After"]) >= 1
    assert _count_tenant_documents(database, stack.a.tenant) == before_a
    assert other.status_code == 202


async def _hold_share(pool: FairProcessPool, tenant: UUID, release: Path) -> None:
    """Keep ``tenant``'s share of ``pool`` running and its queue full until
    ``release`` exists."""
    jobs = [
        pool.run(tenant, wait_for_file, str(release), 20.0)
        for _ in range(pool.per_tenant + pool.queue_per_tenant)
    ]
    assert all(await asyncio.gather(*jobs))


async def _run_in_every_worker(pool: FairProcessPool) -> None:
    jobs = [
        pool.run(f"warm-{i}", extracted_length, b"warm", "text/plain") for i in range(pool.workers)
    ]
    assert await asyncio.gather(*jobs) == [4] * pool.workers


def test_oversized_upload_is_413(stack: Stack, database: DbHandles) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    before = _count_documents(database)
    answer = _call(
        stack, "POST", path, role="contributor", params={"title": "big"}, content=b"a" * (2 << 20)
    )
    assert answer.status_code == 413
    assert _count_documents(database) == before


# -- personal data: readers see tokens; originals need pii:reveal ------------------------

CONTENT_REASON = "the customer asked for a copy of the ticket"


def _content_path(side: Side) -> str:
    return f"/tenants/{side.tenant}/knowledge/documents/{side.document}/content"


def _reveal_events(database: DbHandles, tenant: UUID) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'pii.reveal'",
            (tenant,),
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("role", "mfa", "slug"),
    [
        ("viewer", False, "forbidden"),
        ("viewer", True, "forbidden"),
        ("contributor", True, "forbidden"),
        ("owner", False, "mfa-required"),
    ],
)
def test_original_is_refused_without_pii_reveal(
    stack: Stack, database: DbHandles, role: str, mfa: bool, slug: str
) -> None:
    before = _reveal_events(database, stack.a.tenant)
    answer = _call(
        stack,
        "GET",
        _content_path(stack.a),
        role=role,
        mfa=mfa,
        params={"reason": CONTENT_REASON},
    )
    assert answer.status_code == 403
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith(f"/{slug}")
    assert "customer.test" not in answer.text
    assert _reveal_events(database, stack.a.tenant) == before  # nothing written


def test_owner_with_mfa_reads_the_original_and_it_is_audited(
    stack: Stack, database: DbHandles
) -> None:
    before = _reveal_events(database, stack.a.tenant)
    answer = _call(
        stack,
        "GET",
        _content_path(stack.a),
        role="owner",
        mfa=True,
        params={"reason": CONTENT_REASON},
    )
    assert answer.status_code == 200, answer.text
    assert answer.content == SHARED.format(email="a@customer.test").encode()
    assert answer.headers["cache-control"] == "no-store"
    assert _reveal_events(database, stack.a.tenant) == before + 1
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT actor, target, details FROM bastion.audit_events "
            "WHERE tenant_id = %s AND action = 'pii.reveal' ORDER BY seq DESC LIMIT 1",
            (stack.a.tenant,),
        ).fetchone()
    assert row is not None
    assert row[0] == f"user:{stack.a.users['owner']}"
    assert row[1] == f"document:{stack.a.document}"
    # Sealed under the tenant's data key (tests/test_knowledge.py opens one).
    assert CONTENT_REASON not in str(row[2]) and set(row[2]["reason"]) == {
        "sealed",
        "key_version",
        "id",
    }


@pytest.mark.parametrize(
    ("params", "slug"),
    [
        ({}, "validation-error"),
        ({"reason": "why"}, "validation-error"),
        ({"reason": " " * 12}, "reveal-reason-required"),
    ],
    ids=["none", "short", "blank"],
)
def test_original_without_a_reason_is_refused(
    stack: Stack, database: DbHandles, params: dict[str, str], slug: str
) -> None:
    before = _reveal_events(database, stack.a.tenant)
    answer = _call(stack, "GET", _content_path(stack.a), role="owner", mfa=True, params=params)
    assert answer.status_code == 422
    assert answer.json()["type"].endswith(f"/{slug}")
    assert "customer.test" not in answer.text
    assert _reveal_events(database, stack.a.tenant) == before


@pytest.mark.parametrize("role", ["viewer", "contributor", "owner"])
def test_every_reader_gets_the_text_with_tokens(stack: Stack, role: str) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/documents/{stack.a.document}/text"
    answer = _call(stack, "GET", path, role=role)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "Refund for a double charge" in answer.text and "⟦EMAIL_" in answer.text
    assert "customer.test" not in answer.text


def test_a_title_with_personal_data_is_stored_and_shown_tokenized(
    stack: Stack, database: DbHandles
) -> None:
    path = f"/tenants/{stack.a.tenant}/knowledge/namespaces/support/documents"
    title = "Call +44 20 7946 0958 about carol@customer.test"
    answer = _call(
        stack, "POST", path, role="contributor", params={"title": title}, content=b"Call back."
    )
    assert answer.status_code == 202
    shown = answer.json()["title"]
    assert shown.startswith("Call ⟦PHONE_") and "⟦EMAIL_" in shown
    listed = _call(stack, "GET", path).text
    for raw in ("carol@customer.test", "7946 0958", "442079460958"):
        assert raw not in answer.text and raw not in listed
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(
            "SELECT title, title_ciphertext FROM bastion.documents WHERE id = %s",
            (answer.json()["id"],),
        ).fetchone()
    # Stored only sealed (migration 0025): no form of the title in clear.
    assert row is not None and row[0] is None
    for raw in ("carol@customer.test", "7946 0958", "Call"):
        assert raw.encode() not in bytes(row[1])
