"""Prometheus metrics (issue 19 item 3) behind workload identity (issue 18).

The api, the gateway and the worker as the composition root builds them, on
the test's database and a key ring of the module's own with a real workload
CA: each public app served by uvicorn on 127.0.0.1 (it runs the lifespan: the
worker's queue, the gateway's ledger), each internal listener by uvicorn over
TLS 1.3 with client certificates. Real X.509-SVIDs call them with httpx.

What is proven: the scraper's SPIFFE ID reads ``/metrics`` of every process;
every other workload and a client without a certificate are refused, on the
wire and in ``bastion.workload_refusals`` with the ID they presented; the
public listeners have no ``/metrics``; requests are counted by route template
and spend by model, and no label carries a tenant id, a user id, an e-mail
address or a prompt; ``bastion ca issue scraper --out`` hands a scraper an
SVID that works, and never into ``BASTION_HOME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import anyio
import httpx
import psycopg
import pytest
import uvicorn
from typer.testing import CliRunner

from bastion.api.mtls import flat_routes, handshake_observer
from bastion.billing.budgets import BudgetService
from bastion.compose import INTERNAL_CALLERS, PROCESSES, Overrides, build_process
from bastion.db.pool import Database
from bastion.identity.dpop import DpopKey
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer
from bastion.identity.workload import Svid, WorkloadCA, _load_chain, spiffe_id
from bastion.secrets import LocalKeystore
from bastion.serve import server_options, tls_config
from bastion.settings import ModelRoute, Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir
from tests.http_server import bound_socket, running_server
from tests.provider_double import API_KEY, USAGE, DoubleState, provider_double

TD = "bastion.internal"
SCRAPER = spiffe_id(TD, "scraper")
ISSUER = "https://api.bastion.test"
PRICE_PROMPT, PRICE_COMPLETION = 2_500_000, 10_000_000  # micro-USD per million tokens
USAGE_COST = -(
    -(USAGE["prompt_tokens"] * PRICE_PROMPT + USAGE["completion_tokens"] * PRICE_COMPLETION)
    // 1_000_000
)
EMAIL = "metrics-victim@tenant.test"


@dataclass
class Process:
    public: str
    internal: str
    built: Any


@dataclass
class Stack:
    ring: LocalKeystore
    ca: WorkloadCA
    home: Path
    processes: dict[str, Process]
    tenant: UUID
    user: UUID


@contextlib.contextmanager
def _serving_pair(
    build: Callable[[str], Any], internal: Callable[[], uvicorn.Config]
) -> Iterator[tuple[str, str]]:
    """The public app and its internal mTLS listener in one thread and one event
    loop, as ``bastion serve`` runs them (:func:`bastion.serve.serve_with_internal`):
    what a scrape reads (the worker's queue) lives in the public app's loop."""
    public_sock, inner_sock = bound_socket(), bound_socket()
    url = f"http://127.0.0.1:{public_sock.getsockname()[1]}"
    public = uvicorn.Server(uvicorn.Config(build(url), **server_options()))
    inner = uvicorn.Server(internal())

    async def run() -> None:
        first = asyncio.ensure_future(public.serve(sockets=[public_sock]))
        while not public.started and not first.done():
            await asyncio.sleep(0.01)
        await asyncio.gather(first, inner.serve(sockets=[inner_sock]))

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not (public.started and inner.started):
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield url, f"https://127.0.0.1:{inner_sock.getsockname()[1]}"
    finally:
        public.should_exit = inner.should_exit = True
        thread.join(timeout=10)
        public_sock.close()
        inner_sock.close()


@pytest.fixture(scope="module")
def stack(database: DbHandles, keystore: LocalKeystore) -> Iterator[Stack]:
    home = short_tempdir("bastion-metrics-")
    ring = LocalKeystore(home / "keys" / "keystore.bin", home / "keys" / "master.key")
    for name in keystore.list():  # the database roles' passwords, as `bastion db start` left them
        if name.startswith("db/"):
            ring.set(name, keystore.current(name)[1])
    ring.set("providers/double", API_KEY.encode())
    ca = WorkloadCA(ring, TD)
    ca.init()
    env = {
        "BASTION_HOME": str(home / "home"),
        **database.superuser_env(ring),  # the worker's queue signs in with these
        "BASTION_KEYSTORE_FILE": str(ring.path),
        "BASTION_MASTER_KEY_FILE": str(ring.master_key_file),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        base = Settings(embedder="hashing", issuer=ISSUER)
    seeded: dict[str, UUID] = {}

    async def seed(db: Database) -> None:
        tenants = TenantService(db)
        seeded["tenant"] = (await tenants.create_tenant(f"m-{uuid4().hex[:8]}", "metrics")).id
        seeded["user"] = await tenants.add_member(seeded["tenant"], EMAIL, "contributor")
        start = datetime.now(UTC) - timedelta(minutes=1)
        await BudgetService(db).set_budget(
            seeded["tenant"],
            period_start=start,
            period_end=start + timedelta(hours=1),
            call_limit=100,
            token_limit=10**9,
        )

    with contextlib.ExitStack() as stack, running_server(provider_double(DoubleState())) as up:
        processes: dict[str, Process] = {}
        for process in PROCESSES:
            built: list[Any] = []

            def build(url: str, process: str = process, built: list[Any] = built) -> Any:
                settings = base.model_copy(
                    update={
                        "gateway_public_url": url,
                        "gateway_models": [
                            ModelRoute(
                                name="upstream",
                                provider="openai_compatible",
                                base_url=f"{up}/v1",
                                api_key_ref="local://providers/double",
                                micro_usd_per_mtok_prompt=PRICE_PROMPT,
                                micro_usd_per_mtok_completion=PRICE_COMPLETION,
                            )
                        ],
                    }
                )
                overrides = Overrides(
                    database=Database(database.app, database.context_key, max_size=4),
                    keystore=ring,
                    workload_ca=ca,
                    without_plan_gate=True,
                    on_start=seed if process == "gateway" else None,
                )
                built.append(build_process(process, settings, overrides))
                return built[0].app

            def internal_config(built: list[Any] = built, process: str = process) -> Any:
                gate = built[0].internal
                context = built[0].tls.server_context(handshake_observer(process, gate.record))
                return tls_config(gate, context, lifespan="off")

            public, internal = stack.enter_context(_serving_pair(build, internal_config))
            processes[process] = Process(public, internal, built[0])
        yield Stack(ring, ca, home, processes, seeded["tenant"], seeded["user"])


def _client(ca: WorkloadCA, svid: Svid | None) -> httpx.Client:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    context.load_verify_locations(cadata=ca.root_pem())
    if svid is not None:
        _load_chain(context, svid)
    return httpx.Client(verify=context, timeout=10)


def _scrape(stack: Stack, process: str) -> str:
    with _client(stack.ca, stack.ca.issue("scraper")) as client:
        response = client.get(stack.processes[process].internal + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition ``text``, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return None


def _last_refusal(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM bastion.workload_refusals").fetchone()
    assert row is not None
    return int(row[0])


def _refusals(database: DbHandles, since: int, want: int) -> list[tuple[str, str, str, Any]]:
    """The refusals recorded after ``since`` (handshake refusals are written
    by a task: wait up to 5 s for ``want`` of them)."""
    deadline = time.monotonic() + 5
    while True:
        with psycopg.connect(database.superuser) as conn:
            rows = conn.execute(
                "SELECT listener, route, reason, presented_id FROM bastion.workload_refusals "
                "WHERE id > %s ORDER BY id",
                (since,),
            ).fetchall()
        if len(rows) >= want or time.monotonic() > deadline:
            return [tuple(row) for row in rows]  # type: ignore[misc]
        time.sleep(0.05)


# -- who reads /metrics ---------------------------------------------------------------------


def test_the_scraper_reads_the_metrics_of_every_process(stack: Stack) -> None:
    texts = {process: _scrape(stack, process) for process in PROCESSES}
    for text in texts.values():
        assert "# TYPE bastion_http_requests_total counter" in text
        assert "# TYPE bastion_http_request_duration_seconds histogram" in text
        assert "# TYPE bastion_detector_firings_total counter" in text
    # Read on scrape in the worker: the queue by status, each key kind's age.
    worker = texts["worker"]
    for queue in ("billing", "ingest", "tools"):
        assert _sample(worker, "bastion_queue_jobs", queue=queue, status="todo") is not None
    jwt_age = _sample(worker, "bastion_key_rotation_age_seconds", kind="jwt")
    assert jwt_age is not None and 0 <= jwt_age < 3600
    assert "bastion_metrics_probe_failures_total{" not in worker


def test_every_other_identity_is_refused_metrics_and_recorded(
    stack: Stack, database: DbHandles
) -> None:
    since = _last_refusal(database)
    expected = []
    for process in PROCESSES:
        url = stack.processes[process].internal + "/metrics"
        for workload in PROCESSES:
            with _client(stack.ca, stack.ca.issue(workload)) as client:
                response = client.get(url)
            assert response.status_code == 403, (process, workload)
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            assert body["type"].endswith("/workload-refused")
            assert body["reason"] == "spiffe-id-not-allowed"
            assert "bastion_" not in response.text
            expected.append((process, "/metrics", "spiffe-id-not-allowed", spiffe_id(TD, workload)))
        with _client(stack.ca, None) as client, pytest.raises(httpx.TransportError):
            client.get(url)  # no certificate: refused in the handshake
        expected.append((process, "", "no-client-certificate", None))
    rows = _refusals(database, since, len(expected))
    assert sorted(rows, key=repr) == sorted(expected, key=repr)


def test_public_listeners_serve_no_metrics(stack: Stack) -> None:
    for process in PROCESSES:
        response = httpx.get(stack.processes[process].public + "/metrics", timeout=10)
        assert response.status_code == 404, process
        assert response.headers["content-type"] == "application/problem+json"
        assert "bastion_http" not in response.text


def test_every_internal_route_admits_only_its_declared_ids(stack: Stack) -> None:
    """The walk of issue 18, on all three internal listeners: a route no
    caller is declared for is refused to every workload. Declared routes are
    tried with every identity; an undeclared one with the scraper (admitted
    elsewhere on the listener) and one workload in turn (one request less per
    route and workload keeps the walk short; each is refused the same way)."""
    workloads = [spiffe_id(TD, w) for w in PROCESSES]
    peers = {identity: stack.ca.issue(identity.rsplit("/", 1)[1]) for identity in workloads}
    peers[SCRAPER] = stack.ca.issue("scraper")
    clients = {identity: _client(stack.ca, svid) for identity, svid in peers.items()}
    try:
        for process in PROCESSES:
            gate = stack.processes[process].built.internal
            routes = [r for r in flat_routes(gate.routes) if hasattr(r, "path")]
            assert {"/metrics", "/healthz", "/readyz"} <= {r.path for r in routes}
            declared = INTERNAL_CALLERS[process]
            for index, route in enumerate(routes):
                allowed = {spiffe_id(TD, w) for w in declared.get(route.path, ())}
                if route.path in ("/metrics", "/healthz", "/readyz"):
                    allowed.add(SCRAPER)
                method = sorted(getattr(route, "methods", None) or {"GET"})[0]
                path = re.sub(r"\{[^}]+\}", str(uuid4()), route.path)
                tried = (
                    list(clients)
                    if route.path in declared
                    else [SCRAPER, workloads[index % len(workloads)]]
                )
                for identity in tried:
                    client = clients[identity]
                    url = stack.processes[process].internal + path
                    response = client.request(method, url)
                    refused = (
                        response.status_code == 403
                        and response.headers.get("content-type") == "application/problem+json"
                        and response.json()["type"].endswith("/workload-refused")
                    )
                    assert refused is (identity not in allowed), (process, route.path, identity)
    finally:
        for client in clients.values():
            client.close()


# -- what is counted, and what never is in a label -------------------------------------------


def test_api_requests_are_counted_by_route_template_with_no_ids_or_emails(stack: Stack) -> None:
    api = stack.processes["api"].public
    tenant = str(stack.tenant)
    before = _scrape(stack, "api")
    labels = {"route": "/tenants/{tenant_id}/audit", "method": "GET", "status_class": "4xx"}
    count = _sample(before, "bastion_http_requests_total", **labels) or 0
    for _ in range(3):
        assert httpx.get(f"{api}/tenants/{tenant}/audit", timeout=10).status_code == 401
    assert httpx.get(f"{api}/no/such/{EMAIL}", timeout=10).status_code == 404
    text = _scrape(stack, "api")
    assert _sample(text, "bastion_http_requests_total", **labels) == count + 3
    unmatched = {"route": "<unmatched>", "method": "GET", "status_class": "4xx"}
    assert (_sample(text, "bastion_http_requests_total", **unmatched) or 0) >= 1
    timed = {"route": "/tenants/{tenant_id}/audit", "method": "GET"}
    assert (_sample(text, "bastion_http_request_duration_seconds_count", **timed) or 0) >= 3
    for value in (tenant, EMAIL, "no/such"):
        assert value not in text


def test_gateway_spend_is_counted_by_model_never_by_tenant(stack: Stack) -> None:
    gateway = stack.processes["gateway"].public
    before = _sample(
        _scrape(stack, "gateway"), "bastion_budget_spend_micro_usd_total", model="upstream"
    )
    key = DpopKey.generate()
    token, _ = TokenIssuer(
        SigningKeys(stack.ring), issuer=ISSUER, audience=ISSUER, lifetime=timedelta(minutes=5)
    ).issue_access(
        user_id=stack.user,
        tenant_id=stack.tenant,
        roles=("contributor",),
        amr=("pwd",),
        jkt=key.thumbprint,
        auth_time=int(time.time()),
    )
    prompt = f"my diagnosis is confidential {uuid4()}"
    url = f"{gateway}/v1/chat/completions"
    response = httpx.post(
        url,
        json={"model": "upstream", "messages": [{"role": "user", "content": prompt}]},
        headers={
            "Authorization": f"DPoP {token}",
            "DPoP": key.proof("POST", url, access_token=token),
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text
    text = _scrape(stack, "gateway")
    spent = _sample(text, "bastion_budget_spend_micro_usd_total", model="upstream")
    assert spent == (before or 0) + USAGE_COST
    labels = {"route": "/v1/chat/completions", "method": "POST", "status_class": "2xx"}
    assert (_sample(text, "bastion_http_requests_total", **labels) or 0) >= 1
    for value in (str(stack.tenant), str(stack.user), EMAIL, prompt):
        assert value not in text


def test_detector_firings_are_counted_by_rule() -> None:
    from bastion.telemetry.metrics import Metrics

    metrics = Metrics("worker")
    metrics.detector_fired("spend-anomaly")
    metrics.detector_fired("spend-anomaly")
    text = anyio.run(metrics.scrape).decode()
    assert _sample(text, "bastion_detector_firings_total", rule="spend-anomaly") == 2
    # A registry per process: another instance shares no count.
    assert "spend-anomaly" not in anyio.run(Metrics("worker").scrape).decode()


# -- the scraper's SVID ----------------------------------------------------------------------


def test_ca_issue_scraper_writes_an_svid_that_reads_metrics_never_into_home(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bastion.identity.cli import ca_app

    env = {
        "BASTION_HOME": str(stack.home / "home"),
        "BASTION_KEYSTORE_FILE": str(stack.ring.path),
        "BASTION_MASTER_KEY_FILE": str(stack.ring.master_key_file),
    }
    runner = CliRunner()
    inside = stack.home / "home" / "scraper"
    refused = runner.invoke(ca_app, ["issue", "scraper", "--out", str(inside)], env=env)
    assert refused.exit_code == 2 and not inside.exists()
    out = stack.home / "scraper"
    not_scraper = runner.invoke(ca_app, ["issue", "gateway", "--out", str(out)], env=env)
    assert not_scraper.exit_code == 2 and not out.exists()
    issued = runner.invoke(ca_app, ["issue", "scraper", "--out", str(out)], env=env)
    assert issued.exit_code == 0, issued.output
    assert (out / "svid.key").stat().st_mode & 0o077 == 0
    context = ssl.create_default_context(cafile=str(out / "bundle.pem"))
    context.check_hostname = False
    context.load_cert_chain(out / "svid.pem", out / "svid.key")
    with httpx.Client(verify=context, timeout=10) as client:
        response = client.get(stack.processes["worker"].internal + "/metrics")
    assert response.status_code == 200 and "bastion_queue_jobs" in response.text
