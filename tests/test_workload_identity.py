"""Workload identity (issue 18): the gateway's internal listener over mTLS.

A real uvicorn server serves the gateway the composition root builds behind
its TLS 1.3 listener and SPIFFE-ID gate; real X.509-SVIDs from the workload
CA (on a key ring of the test's own) call it with httpx. Each refusal is
checked on the wire and in ``bastion.workload_refusals`` with the ID that was
presented.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization

from bastion.api.mtls import flat_routes
from bastion.compose import GATEWAY_INTERNAL_CALLERS, Gateway, Overrides, build_gateway
from bastion.db.pool import Database
from bastion.identity.workload import (
    INTERMEDIATE_SECRET,
    SVID_LIFETIME,
    Svid,
    WorkloadCA,
    WorkloadError,
    _load_chain,
    spiffe_id,
)
from bastion.secrets import LocalKeystore
from bastion.serve import server_options, tls_config
from bastion.settings import Settings
from tests.conftest import DbHandles, short_tempdir
from tests.http_server import bound_socket

TD = "bastion.internal"
API = spiffe_id(TD, "api")
WORKER = spiffe_id(TD, "worker")
SCRAPER = "spiffe://bastion.internal/bastion/scraper"


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    base = short_tempdir("bastion-wl-")
    yield base


@pytest.fixture(scope="module")
def ring(home: Path) -> LocalKeystore:
    return LocalKeystore(home / "keystore.bin", home / "master.key")


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def ca(ring: LocalKeystore, clock: Clock) -> WorkloadCA:
    authority = WorkloadCA(ring, TD, clock=clock)
    assert authority.init() is True
    assert authority.init() is False  # idempotent
    return authority


def _serve(config: uvicorn.Config, sock: Any) -> Iterator[uvicorn.Server]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture(scope="module")
def stack(
    database: DbHandles, ring: LocalKeystore, ca: WorkloadCA
) -> Iterator[tuple[Gateway, str, str]]:
    """The composed gateway: (gateway, internal mTLS URL, public plain URL)."""
    settings = Settings(embedder="hashing", workload_scrapers=[SCRAPER])
    gateway = build_gateway(
        settings,
        Overrides(
            database=Database(database.app, database.context_key, max_size=4),
            keystore=ring,
            models={},
            workload_ca=ca,
            without_plan_gate=True,
        ),
    )
    assert gateway.internal is not None and gateway.tls is not None
    from bastion.api.mtls import handshake_observer

    internal_sock, public_sock = bound_socket(), bound_socket()
    context = gateway.tls.server_context(handshake_observer("gateway", gateway.internal.record))
    internal = _serve(tls_config(gateway.internal, context), internal_sock)
    public = _serve(
        uvicorn.Config(gateway.app, **{**server_options(), "lifespan": "off"}), public_sock
    )
    with _both(internal, public):
        yield (
            gateway,
            f"https://127.0.0.1:{internal_sock.getsockname()[1]}",
            f"http://127.0.0.1:{public_sock.getsockname()[1]}",
        )


class _both:
    def __init__(self, *servers: Iterator[uvicorn.Server]) -> None:
        self.servers = servers

    def __enter__(self) -> None:
        for server in self.servers:
            next(server)

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            next(server, None)


def _client(ca: WorkloadCA, svid: Svid | None) -> httpx.Client:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.root_pem())
    if svid is not None:
        _load_chain(context, svid)
    return httpx.Client(verify=context, timeout=10)


def _refusals(database: DbHandles, since: int) -> list[dict[str, Any]]:
    with psycopg.connect(database.superuser, row_factory=psycopg.rows.dict_row) as conn:
        rows = conn.execute(
            "SELECT id, listener, route, reason, presented_id FROM bastion.workload_refusals "
            "WHERE id > %s ORDER BY id",
            (since,),
        ).fetchall()
    return [dict(row) for row in rows]


def _last_id(database: DbHandles) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM bastion.workload_refusals").fetchone()
    assert row is not None
    return int(row[0])


def _wait_refusals(database: DbHandles, since: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while not (rows := _refusals(database, since)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return rows


def _chat() -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _assert_gate_refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"].endswith("/workload-refused")
    assert body["reason"] == reason


# -- the CA ---------------------------------------------------------------------------


def test_svids_are_spiffe_ids_valid_at_most_an_hour(ca: WorkloadCA) -> None:
    svid = ca.issue("gateway")
    assert svid.spiffe_id == "spiffe://bastion.internal/bastion/gateway"
    assert svid.not_after - svid.not_before <= SVID_LIFETIME + timedelta(seconds=30)
    with pytest.raises(WorkloadError):
        ca.issue("gateway", lifetime=timedelta(hours=2))
    with pytest.raises(WorkloadError):
        ca.issue("intruder")


def test_no_private_key_on_disk_in_bastion_home(
    home: Path, ca: WorkloadCA, ring: LocalKeystore, stack: tuple[Gateway, str, str]
) -> None:
    gateway, _internal, _public = stack
    assert gateway.tls is not None
    keys = [gateway.tls.svid.key, ca.root().key]
    secrets = [k.private_numbers().private_value.to_bytes(32, "big") for k in keys] + [
        k.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for k in keys
    ]
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files  # the key ring itself is there
    for path in files:
        data = path.read_bytes()
        assert b"PRIVATE KEY" not in data, path
        for secret in secrets:
            assert secret not in data, path


# -- admitted, and the route walk -------------------------------------------------


def test_every_internal_route_admits_only_its_declared_ids(
    ca: WorkloadCA, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    gateway, internal, _public = stack
    routes = [r for r in flat_routes(gateway.app.routes) if hasattr(r, "path")]
    assert {"/v1/chat/completions", "/healthz", "/openapi.json"} <= {r.path for r in routes}
    peers = {
        API: ca.issue("api"),
        WORKER: ca.issue("worker"),
        SCRAPER: ca.issue("scraper"),
    }
    for route in routes:
        declared = set(GATEWAY_INTERNAL_CALLERS.get(route.path, ("<undeclared>",)))
        allowed = {spiffe_id(TD, w) for w in declared if w != "<undeclared>"}
        if route.path in ("/healthz", "/readyz"):
            allowed.add(SCRAPER)
        method = sorted(getattr(route, "methods", None) or {"GET"})[0]
        for identity, svid in peers.items():
            with _client(ca, svid) as client:
                response = client.request(method, internal + route.path)
            refused = (
                response.status_code == 403
                and response.headers.get("content-type") == "application/problem+json"
                and response.json()["type"].endswith("/workload-refused")
            )
            assert refused is (identity not in allowed), (route.path, identity)
            if route.path not in GATEWAY_INTERNAL_CALLERS:
                assert response.json()["reason"] == "route-not-declared"


# -- refusals --------------------------------------------------------------------------


def test_no_client_certificate_is_refused_in_the_handshake(
    ca: WorkloadCA, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    _gateway, internal, _public = stack
    since = _last_id(database)
    with _client(ca, None) as client, pytest.raises(httpx.TransportError):
        client.post(internal + "/v1/chat/completions", json=_chat())
    rows = _wait_refusals(database, since)
    assert [(r["reason"], r["presented_id"]) for r in rows] == [("no-client-certificate", None)]


def test_certificate_of_another_ca_is_refused_in_the_handshake(
    ca: WorkloadCA, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    _gateway, internal, _public = stack
    base = short_tempdir("bastion-other-ca-")
    other = WorkloadCA(LocalKeystore(base / "k.bin", base / "m.key"), TD)
    other.init()
    since = _last_id(database)
    with _client(ca, other.issue("api")) as client, pytest.raises(httpx.TransportError):
        client.post(internal + "/v1/chat/completions", json=_chat())
    rows = _wait_refusals(database, since)
    assert len(rows) == 1 and rows[0]["reason"] == "untrusted-certificate"


def test_wrong_spiffe_id_for_the_route_is_refused_and_recorded(
    ca: WorkloadCA, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    _gateway, internal, _public = stack
    since = _last_id(database)
    with _client(ca, ca.issue("worker")) as client:
        response = client.post(internal + "/v1/chat/completions", json=_chat())
    _assert_gate_refused(response, "spiffe-id-not-allowed")
    rows = _refusals(database, since)
    assert [(r["route"], r["reason"], r["presented_id"]) for r in rows] == [
        ("/v1/chat/completions", "spiffe-id-not-allowed", WORKER)
    ]


def test_expired_certificate_is_refused_and_recorded(
    ca: WorkloadCA, clock: Clock, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    _gateway, internal, _public = stack
    clock.offset = -timedelta(hours=2)
    try:
        expired = ca.issue("api")
    finally:
        clock.offset = timedelta(0)
    since = _last_id(database)
    with _client(ca, expired) as client:
        response = client.post(internal + "/v1/chat/completions", json=_chat())
    _assert_gate_refused(response, "certificate-expired")
    rows = _refusals(database, since)
    assert [(r["reason"], r["presented_id"]) for r in rows] == [("certificate-expired", API)]


def test_leaf_of_a_retired_intermediate_is_refused_and_recorded(
    ca: WorkloadCA, ring: LocalKeystore, stack: tuple[Gateway, str, str], database: DbHandles
) -> None:
    gateway, internal, _public = stack
    old = ring.current_version(INTERMEDIATE_SECRET)
    leaf = ca.issue("api")
    ca.rotate_intermediate()
    assert gateway.internal is not None
    with _client(ca, leaf) as client:  # overlap: still trusted until retired
        assert client.get(internal + "/v1/models").status_code != 403
    ca.retire_intermediate(old)
    gateway.internal.verifier._read_at = -float("inf")  # not wait the 5 s refresh
    since = _last_id(database)
    with _client(ca, leaf) as client:
        response = client.get(internal + "/v1/models")
    _assert_gate_refused(response, "issuer-not-trusted")
    rows = _refusals(database, since)
    assert [(r["reason"], r["presented_id"]) for r in rows] == [("issuer-not-trusted", API)]
    with _client(ca, ca.issue("api")) as client:  # the new intermediate's leaves pass
        assert client.get(internal + "/v1/models").status_code != 403


def test_envelope_is_taken_only_over_mtls_from_the_api(
    stack: tuple[Gateway, str, str],
) -> None:
    _gateway, _internal, public = stack
    response = httpx.post(
        public + "/v1/chat/completions",
        json=_chat(),
        headers={"Bastion-Envelope": "e30.AAAA"},
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["type"].endswith("/envelope-refused")
    assert response.json()["reason"] == "not-from-api"


# -- renewal --------------------------------------------------------------------------


def test_renewal_and_intermediate_rotation_under_load_fail_no_request(
    ca: WorkloadCA, stack: tuple[Gateway, str, str]
) -> None:
    gateway, internal, _public = stack
    assert gateway.tls is not None
    statuses: list[int | str] = []
    stop = threading.Event()

    def load() -> None:
        with _client(ca, ca.issue("api")) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.get(internal + "/v1/models").status_code)
                except httpx.HTTPError as error:
                    statuses.append(type(error).__name__)

    workers = [threading.Thread(target=load) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(0.3)
        before = gateway.tls.svid.cert.serial_number
        started = time.perf_counter()
        gateway.tls.renew()
        renewal = time.perf_counter() - started
        ca.rotate_intermediate()
        gateway.tls.renew()
        time.sleep(0.3)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=10)
    assert gateway.tls.svid.cert.serial_number != before
    assert renewal < 5  # generous: a shared, loaded box
    assert len(statuses) > 10
    # Admitted by the gate every time (401: no user token, past the gate).
    assert set(statuses) == {401}, {s for s in statuses if s != 401}
    # A new connection sees the renewed certificate, and a peer renewed by the
    # new intermediate right after the rotation is admitted at once.
    with (
        _client(ca, ca.issue("api")) as client,
        client.stream("GET", internal + "/v1/models") as response,
    ):
        assert response.status_code == 401
        stream = response.extensions["network_stream"]
        der = stream.get_extra_info("ssl_object").getpeercert(True)
    from cryptography import x509

    assert x509.load_der_x509_certificate(der).serial_number == gateway.tls.svid.cert.serial_number


def test_renewal_is_due_at_half_life(ca: WorkloadCA) -> None:
    from bastion.identity.workload import WorkloadTls

    tls = WorkloadTls(ca, "worker")
    half = tls.svid.not_before + (tls.svid.not_after - tls.svid.not_before) / 2
    assert tls.renew_due() == half
    asyncio.run(asyncio.sleep(0))


# -- the api's client pins the gateway's ID (G2) ----------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_api_refuses_a_worker_certificate_posing_as_the_gateway(
    ca: WorkloadCA, stack: tuple[Gateway, str, str], host: str
) -> None:
    """Any Bastion workload chains to the root: the api's client must also
    check the server's SPIFFE ID, before a byte of the envelope leaves. It
    checks that ID, not the host name: in a cluster the api dials the gateway's
    Service name, which the SVID (no DNS name) does not carry."""
    from bastion.compose import _gateway_client
    from bastion.identity.workload import WorkloadTls

    _gateway, internal, _public = stack
    received: list[str] = []

    async def impostor(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        received.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    posing = WorkloadTls(ca, "worker")  # a real SVID of this CA, the wrong ID
    sock = bound_socket()
    api = WorkloadTls(ca, "api")

    async def call(base: str) -> int:
        async with _gateway_client(api, "gateway") as client:
            response = await client.post(
                base + "/v1/chat/completions",
                json=_chat(),
                headers={"Bastion-Envelope": "e30.AAAA"},
            )
            return int(response.status_code)

    with _both(_serve(tls_config(impostor, posing.server_context(), lifespan="off"), sock)):
        with pytest.raises(
            httpx.ConnectError, match=r"not spiffe://bastion\.internal/bastion/gateway"
        ):
            asyncio.run(call(f"https://{host}:{sock.getsockname()[1]}"))
        assert received == []  # refused in the handshake: no request was sent
        # The same client reaches the real gateway by that name (past the
        # gate: the fake envelope is what it refuses, 401).
        assert asyncio.run(call(internal.replace("127.0.0.1", host))) == 401


def test_gateway_internal_url_names_a_peer_not_a_bind_address() -> None:
    """api_host is where the api binds; 0.0.0.0 or :: is no address to call.
    In a cluster the deploy names the gateway's Service (gateway_internal_host)."""
    any_v4, any_v6 = "0.0.0.0", "::"  # noqa: S104 - bind addresses under test
    # A wildcard bind needs its public URLs (test_settings_public_urls.py).
    public = {"issuer": "https://api.example.com", "gateway_public_url": "https://gw.example.com"}
    assert Settings().gateway_internal_url == "https://127.0.0.1:8703"
    assert Settings(api_host=any_v4, **public).gateway_internal_url == "https://127.0.0.1:8703"
    assert Settings(api_host=any_v6, **public).gateway_internal_url == "https://[::1]:8703"
    assert Settings(api_host="10.1.2.3").gateway_internal_url == "https://10.1.2.3:8703"
    service = "bastion-gateway.bastion-prod.svc"
    named = Settings(
        api_host=any_v4, gateway_internal_host=service, gateway_internal_port=9703, **public
    )
    assert named.gateway_internal_url == f"https://{service}:9703"
    for bad in ("evil.example/path", "host name", "user@host", "-lead", ""):
        with pytest.raises(ValueError, match="gateway_internal_host"):
            Settings(gateway_internal_host=bad)


def test_plain_http_between_processes_only_in_dev_mode_on_loopback() -> None:
    from bastion.settings import PlainInternalHttpRefused

    assert Settings().internal_mtls is True  # the default
    with pytest.raises(PlainInternalHttpRefused):
        Settings(internal_mtls=False)
    with pytest.raises(PlainInternalHttpRefused):
        Settings(internal_mtls=False, dev_mode=True, api_host="0.0.0.0")  # noqa: S104
    assert Settings(internal_mtls=False, dev_mode=True, api_host="127.0.0.1").internal_mtls is False


def test_bastion_serve_gateway_serves_its_internal_listener_over_mtls(
    database: DbHandles,
    ring: LocalKeystore,
    ca: WorkloadCA,
    home: Path,
    keystore: LocalKeystore,
    tmp_path: Path,
) -> None:
    """``bastion serve gateway`` (the default settings: mTLS on) starts the
    internal listener next to the public one; a scraper's SVID reads its
    readiness, a worker's is refused the chat route, plain HTTP gets nothing."""
    from tests.served import free_port, serving_process

    # The child signs in with the database's secrets (its roles' passwords, the
    # tenant-context key), which the session's key ring holds: one key ring
    # with those and this module's CA, as `bastion db start` + `bastion ca init`
    # leave it.
    for name in keystore.list():
        if name.startswith("db/"):
            ring.set(name, keystore.current(name)[1])
    port, public_port = free_port(), free_port()
    internal = f"https://127.0.0.1:{port}"
    # Outside development mode the public listener serves HTTPS too: a
    # certificate from files (`bastion ca issue server`), outside the home.
    https = tmp_path
    server_cert = ca.issue_server(["localhost"], ["127.0.0.1"])
    (https / "tls.crt").write_bytes(server_cert.chain_pem())
    (https / "tls.key").write_bytes(server_cert.key_pem())
    extra = {
        "BASTION_INTERNAL_MTLS": "1",
        "BASTION_DEV_MODE": "0",
        "BASTION_GATEWAY_INTERNAL_PORT": str(port),
        "BASTION_WORKLOAD_SCRAPERS": f'["{SCRAPER}"]',
        "BASTION_PUBLIC_TLS_CERT_FILE": str(https / "tls.crt"),
        "BASTION_PUBLIC_TLS_KEY_FILE": str(https / "tls.key"),
    }
    since = _last_id(database)
    with serving_process(
        "gateway", database, ring, home, extra, wait_ready=False, port=public_port
    ):
        with _client(ca, ca.issue("scraper")) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    ready = client.get(internal + "/readyz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "no internal listener"
                    time.sleep(0.1)
            assert ready.status_code == 200
            # The public listener: HTTPS, its name checked against the certificate.
            trust = ssl.create_default_context(cadata=ca.root_pem())
            public = httpx.get(f"https://127.0.0.1:{public_port}/readyz", verify=trust, timeout=5)
            assert public.status_code == 200
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{public_port}/readyz", timeout=5)
            # ... and its metrics, served on this listener only (tests/test_metrics.py).
            scraped = client.get(internal + "/metrics")
            assert scraped.status_code == 200 and "bastion_http_requests_total" in scraped.text
        with _client(ca, ca.issue("worker")) as client:
            refused = client.post(internal + "/v1/chat/completions", json=_chat())
        _assert_gate_refused(refused, "spiffe-id-not-allowed")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    rows = _refusals(database, since)
    assert ("/v1/chat/completions", "spiffe-id-not-allowed", WORKER) in [
        (r["route"], r["reason"], r["presented_id"]) for r in rows
    ]
