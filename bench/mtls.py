"""Benchmark: the cost of mTLS between Bastion's processes (issue 18).

Run: .venv/bin/python bench/mtls.py [--requests 3000] [--clients 8]

One uvicorn server per side, in this process's threads, serving the same
small ASGI app (a fixed JSON answer, standing in for the gateway's work) —
plain HTTP on one listener, and on the other the gateway's internal
listener as ``bastion serve gateway`` runs it: TLS 1.3 with an X.509-SVID
(:func:`bastion.serve.tls_config`) behind the SPIFFE-ID gate
(:class:`bastion.api.mtls.WorkloadGate`). The client is the api's: an httpx
client with the api's SVID, pinned to the gateway's ID, reusing connections.
Measured side by side in one run: throughput and p50 with keep-alive, the
added p50, a full handshake (a new connection per request), and the time a
certificate renewal takes (issue + load into the live contexts).
Target: connection reuse keeps the cost <= 5 % of a gateway call.

Then the real api -> gateway path (``--real``, the default): two ``bastion
serve gateway`` processes on one database, in front of the mock upstream
(bench/mock_upstream.py) — one with its internal mTLS listener, one with
internal mTLS off (plain HTTP, development on loopback) — and the api's own
gateway client: signed envelopes (:class:`bastion.safety.signing.EnvelopeSigner`)
posted by the httpx client compose builds for the api (its SVID, pinned to the
gateway's SPIFFE ID, one client reusing connections) against the client
compose builds for plain HTTP (the same transport, without TLS). Same load,
interleaved, in one run: throughput, p50, added p50.

The "new connection" figures use one client with keep-alive off on both
sides (an earlier version built a whole httpx client per request, which for
plain HTTP loaded the system CA bundle each time: ~20 ms that was not the
transport's, hence a plain figure above the mTLS one).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send

from _gateway_bench import bench_tenant, chat_body, cpu_seconds, gateway_env, wait_ready
from _record import record, row
from bastion.api.mtls import WorkloadGate
from bastion.compose import _gateway_client
from bastion.db.launcher import EmbeddedPostgres
from bastion.identity.workload import PeerVerifier, WorkloadCA, WorkloadTls, spiffe_id
from bastion.safety.signing import HEADER as ENVELOPE
from bastion.safety.signing import EnvelopeSigner
from bastion.secrets import LocalKeystore
from bastion.secrets.backends import open_keystore
from bastion.serve import server_options, tls_config
from bastion.settings import Settings
from wrk_dpop import free_port

TD = "bastion.internal"
# Pairs of sequential calls, plain next to mTLS: the added p50 (the mTLS
# median less the plain median) over the 2,700 after warm-up, with a bootstrap
# interval (300 pairs read anywhere from 2.7 to 8.8 % on the same build).
SEQUENTIAL_PAIRS = 3000
ROUNDS = 10


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"json")]}
    )
    await send({"type": "http.response.body", "body": b'{"choices":[]}'})


def _serve(config: uvicorn.Config) -> uvicorn.Server:
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server


async def _load(url: str, verify: Any, requests: int, clients: int) -> tuple[float, float]:
    """(requests per second, p50 ms) with ``clients`` keep-alive connections."""
    latencies: list[float] = []
    async with httpx.AsyncClient(verify=verify, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(c.get(url) for _ in range(clients)))  # connections open

        async def one() -> None:
            started = time.perf_counter()
            response = await c.get(url)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code

        started = time.perf_counter()
        for _ in range(requests // clients):
            await asyncio.gather(*(one() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


def _sequential_p50(url: str, verify: Any, requests: int) -> float:
    with httpx.Client(verify=verify) as client:
        client.get(url)
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            client.get(url)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _handshakes(url: str, verify: Any, count: int) -> float:
    """Median ms of a request on a new connection each time (one client,
    keep-alive off: the client's own set-up is not counted)."""
    times = []
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(verify=verify, limits=no_reuse) as client:
        client.get(url)
        for _ in range(count):
            started = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.status_code
    return statistics.median(times) * 1000


async def _envelopes(
    url: str, client: httpx.AsyncClient, sign: Any, requests: int, clients: int, warm: bool = True
) -> tuple[float, float]:
    """(requests per second, p50 ms) of ``requests`` signed envelopes, ``clients`` at a time."""
    latencies: list[float] = []

    async def one() -> None:
        body, header = sign()
        started = time.perf_counter()
        response = await client.post(
            url, content=body, headers={"Content-Type": "application/json", ENVELOPE: header}
        )
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, (response.status_code, response.text[:200])

    if warm:
        await asyncio.gather(*(one() for _ in range(clients)))  # connections open
        latencies.clear()
    started = time.perf_counter()
    for _ in range(requests // clients):
        await asyncio.gather(*(one() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, statistics.median(latencies) * 1000


def _added(pairs: list[tuple[float, float]]) -> float:
    """The added p50: the mTLS calls' median less the plain calls' median."""
    return statistics.median(m for _p, m in pairs) - statistics.median(p for p, _m in pairs)


def _bootstrap_share(pairs: list[tuple[float, float]], draws: int = 400) -> tuple[float, float]:
    """A 95 % bootstrap interval of the added p50 as a share of the plain p50,
    resampling the pairs (each plain call with the mTLS call next to it)."""
    rng = random.Random(18)
    shares = []
    for _ in range(draws):
        sample = rng.choices(pairs, k=len(pairs))
        shares.append(_added(sample) / statistics.median(p for p, _m in sample) * 100)
    shares.sort()
    return shares[int(draws * 0.025)], shares[int(draws * 0.975) - 1]


async def _real_path(requests: int, clients: int) -> dict[str, float]:
    """The api's gateway client against two real gateways (mTLS, plain): see the docstring."""
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-mtls-real-", dir="/tmp"))
    home.chmod(0o711)
    upstream, plain_port, mtls_port, internal_port = (free_port() for _ in range(4))
    upstream_url = f"http://127.0.0.1:{upstream}/v1"
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    base.update(gateway_env(home, upstream_url))
    settings = Settings(home=home)
    procs: list[subprocess.Popen[bytes]] = []
    # BENCH_VERBOSE=1 shows the processes' logs.
    stderr = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": stderr}
    try:
        tenant, user = await bench_tenant(settings, "bench-mtls")
        keystore = open_keystore(settings)
        ca = WorkloadCA(keystore, TD)
        ca.init()
        signer = EnvelopeSigner(keystore)
        body = chat_body().encode()
        signer.sign(tenant_id=tenant, user_id=user, body=body)  # the key exists before start

        def sign() -> tuple[bytes, str]:
            return body, signer.sign(
                tenant_id=tenant, user_id=user, body=body, action="question:ask"
            )

        procs.append(
            subprocess.Popen([sys.executable, "bench/mock_upstream.py", str(upstream)], **quiet)
        )
        gateway = [sys.executable, "-m", "bastion", "serve", "gateway"]
        procs.append(
            subprocess.Popen(
                gateway,
                env={
                    **base,
                    "BASTION_GATEWAY_PORT": str(mtls_port),
                    "BASTION_INTERNAL_MTLS": "1",
                    "BASTION_GATEWAY_INTERNAL_PORT": str(internal_port),
                },
                **quiet,
            )
        )
        procs.append(
            subprocess.Popen(
                gateway, env={**base, "BASTION_GATEWAY_PORT": str(plain_port)}, **quiet
            )
        )
        for port in (upstream, plain_port, mtls_port):
            await wait_ready(f"http://127.0.0.1:{port}/")
        for _ in range(300):  # the internal listener starts just after the public one
            try:
                socket.create_connection(("127.0.0.1", internal_port), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        # The api's client, built by compose (its SVID, pinned to the gateway's
        # ID, each request in one write: bastion.identity.workload_transport).
        api = WorkloadTls(ca, "api")
        mtls_url = f"https://127.0.0.1:{internal_port}/v1/chat/completions"
        plain_url = f"http://127.0.0.1:{plain_port}/v1/chat/completions"
        # Under load: short rounds, alternating, so the shared box's drift hits
        # both; the ratio is taken per pair of rounds, then its median.
        rounds: dict[str, list[tuple[float, float]]] = {"plain": [], "mtls": []}
        seq: dict[str, list[float]] = {"plain": [], "mtls": []}
        async with (
            _gateway_client(api, "gateway") as mtls,
            _gateway_client(None, "gateway") as plain,
        ):
            sides = {"plain": (plain_url, plain), "mtls": (mtls_url, mtls)}
            pids = {"plain": procs[2].pid, "mtls": procs[1].pid}
            # CPU per call, the gateway's and the caller's (this process: the
            # api's client; it signs the envelopes for both sides alike): steadier
            # than req/s when other work shares the machine.
            cpu = {k: [0.0, 0.0, 0] for k in sides}
            per_round: dict[str, list[float]] = {k: [] for k in sides}  # gateway CPU per call
            for i in range(ROUNDS):
                order = ("plain", "mtls") if i % 2 == 0 else ("mtls", "plain")
                for side in order:
                    url, client = sides[side]
                    server, caller = cpu_seconds(pids[side]), time.process_time()
                    rounds[side].append(await _envelopes(url, client, sign, requests, clients))
                    spent = cpu_seconds(pids[side]) - server
                    cpu[side][0] += spent
                    per_round[side].append(spent / (requests + clients))
                    cpu[side][1] += time.process_time() - caller
                    cpu[side][2] += requests + clients
            # One caller, request by request: each plain call is paired with
            # the mTLS call next to it (order alternating), so load shifts cancel.
            for i in range(SEQUENTIAL_PAIRS):
                order = ("plain", "mtls") if i % 2 == 0 else ("mtls", "plain")
                for side in order:
                    url, client = sides[side]
                    seq[side].append((await _envelopes(url, client, sign, 1, 1, warm=False))[1])
        skip = SEQUENTIAL_PAIRS // 10  # warm-up
        pairs = list(zip(seq["plain"][skip:], seq["mtls"][skip:], strict=True))
        return {
            "plain_rps": statistics.median(r[0] for r in rounds["plain"]),
            "mtls_rps": statistics.median(r[0] for r in rounds["mtls"]),
            "ratio": statistics.median(
                m[0] / p[0] for p, m in zip(rounds["plain"], rounds["mtls"], strict=True)
            ),
            "plain_p50": statistics.median(r[1] for r in rounds["plain"]),
            "mtls_p50": statistics.median(r[1] for r in rounds["mtls"]),
            "plain_seq": statistics.median(p for p, _m in pairs),
            "mtls_seq": statistics.median(m for _p, m in pairs),
            "added": _added(pairs),
            "paired": statistics.median(m - p for p, m in pairs),
            **dict(zip(("added_low", "added_high"), _bootstrap_share(pairs), strict=True)),
            **{f"{k}_server_cpu": v[0] * 1000 / v[2] for k, v in cpu.items()},
            # The gateway's CPU per call, mTLS over plain, per pair of rounds: the
            # median of the pairs is steadier than the sums when the load shifts.
            "server_cpu_ratio": statistics.median(
                m / p for p, m in zip(per_round["plain"], per_round["mtls"], strict=True) if p
            ),
            **{f"{k}_client_cpu": v[1] * 1000 / v[2] for k, v in cpu.items()},
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


def main(requests: int, clients: int, real: bool) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-mtls-"))
    ca = WorkloadCA(LocalKeystore(home / "keystore.bin", home / "master.key"), TD)
    ca.init()
    gateway, api = WorkloadTls(ca, "gateway"), WorkloadTls(ca, "api")
    gated = WorkloadGate(
        app,
        listener="gateway",
        routes=[],
        callers={},
        verifier=PeerVerifier(ca),
    )
    # The gate matches no routes here: admit the api on every path, as a
    # declared route would (the gate's route match is part of the cost).
    gated.route_of = lambda scope: "/v1/chat/completions"  # type: ignore[method-assign]
    gated.callers = {"/v1/chat/completions": frozenset({spiffe_id(TD, "api")})}
    plain_port, tls_port = free_port(), free_port()
    options = {**server_options(), "lifespan": "off", "log_level": "warning"}
    _serve(uvicorn.Config(app, host="127.0.0.1", port=plain_port, **options))
    _serve(
        tls_config(
            gated,
            gateway.server_context(),
            host="127.0.0.1",
            port=tls_port,
            **{"lifespan": "off", "log_level": "warning"},
        )
    )
    plain = f"http://127.0.0.1:{plain_port}/v1/chat/completions"
    mtls = f"https://127.0.0.1:{tls_port}/v1/chat/completions"
    pinned = api.client_context(expect=[spiffe_id(TD, "gateway")])

    # Interleaved, twice each, so drift on the shared box hits both sides.
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "mtls": []}
    for _ in range(2):
        runs["plain"].append(asyncio.run(_load(plain, True, requests, clients)))
        runs["mtls"].append(asyncio.run(_load(mtls, pinned, requests, clients)))
    rps = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    p50 = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    seq = {
        "plain": _sequential_p50(plain, True, 500),
        "mtls": _sequential_p50(mtls, pinned, 500),
    }
    handshake_plain = _handshakes(plain, True, 100)
    handshake_mtls = _handshakes(mtls, pinned, 100)
    renewals = []
    for _ in range(20):
        started = time.perf_counter()
        gateway.renew()
        renewals.append((time.perf_counter() - started) * 1000)
    renewal = statistics.median(renewals)

    added = seq["mtls"] - seq["plain"]
    print(
        f"keep-alive, {clients} clients: plain {rps['plain']:.0f} req/s p50 {p50['plain']:.2f} ms"
    )
    print(f"keep-alive, {clients} clients: mTLS  {rps['mtls']:.0f} req/s p50 {p50['mtls']:.2f} ms")
    print(f"throughput ratio mTLS/plain: {rps['mtls'] / rps['plain']:.3f}")
    print(
        f"sequential p50: plain {seq['plain']:.3f} ms, mTLS {seq['mtls']:.3f} ms, "
        f"added {added:.3f} ms"
    )
    print(
        f"new connection per request: plain {handshake_plain:.2f} ms, mTLS {handshake_mtls:.2f} ms"
    )
    print(f"renewal (issue + load into live contexts): {renewal:.2f} ms median of 20")
    real_rows = []
    if real:
        # The api runs under uvicorn's uvloop: its client's TLS is uvloop's too.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            r = runner.run(_real_path(requests // 10, clients))
        ratio = r["ratio"]
        added_real = r["added"]
        share = added_real / r["plain_seq"] * 100
        print(
            f"api -> gateway, {clients} at a time: plain {r['plain_rps']:.0f} req/s "
            f"p50 {r['plain_p50']:.2f} ms; "
            f"mTLS {r['mtls_rps']:.0f} req/s p50 {r['mtls_p50']:.2f} ms"
        )
        print(
            f"CPU per call: gateway {r['plain_server_cpu']:.2f} ms plain, "
            f"{r['mtls_server_cpu']:.2f} ms mTLS; api client {r['plain_client_cpu']:.2f} ms "
            f"plain, {r['mtls_client_cpu']:.2f} ms mTLS"
        )
        print(f"api -> gateway throughput ratio mTLS/plain: {ratio:.3f}")
        print(
            f"gateway CPU per call, mTLS/plain, median of paired rounds: "
            f"{r['server_cpu_ratio']:.3f}; load average {os.getloadavg()[0]:.1f}"
        )
        low, high = r["added_low"], r["added_high"]
        print(
            f"api -> gateway sequential p50: plain {r['plain_seq']:.2f} ms, mTLS "
            f"{r['mtls_seq']:.2f} ms, added {added_real:.3f} ms ({share:.1f} %, "
            f"95 % interval {low:.1f} to {high:.1f} %); median paired difference "
            f"{r['paired']:.3f} ms"
        )
        real_rows = [
            row(
                "api -> gateway, real path, throughput (mTLS, reused connections)",
                f"{r['mtls_rps']:.0f} req/s vs {r['plain_rps']:.0f} plain ({ratio * 100:.1f} %)",
                ">= 95 %",
            ),
            row(
                "api -> gateway, real path, added p50 (sequential)",
                f"{added_real:.3f} ms on {r['plain_seq']:.2f} ms ({share:.1f} %; "
                f"95 % interval {low:.1f} to {high:.1f} %)",
                "<= 5 %",
            ),
            row(
                f"api -> gateway, real path, p50 under load ({clients} at a time)",
                f"{r['mtls_p50']:.2f} ms mTLS vs {r['plain_p50']:.2f} ms plain",
            ),
            row(
                "api -> gateway, real path, CPU per call (gateway; api client)",
                f"{r['mtls_server_cpu']:.2f} vs {r['plain_server_cpu']:.2f} ms; "
                f"{r['mtls_client_cpu']:.2f} vs {r['plain_client_cpu']:.2f} ms (mTLS vs plain); "
                f"gateway mTLS/plain per paired round {r['server_cpu_ratio']:.3f}",
            ),
        ]
    record(
        "mtls",
        [
            row("throughput, keep-alive, plain", f"{rps['plain']:.0f} req/s"),
            row(
                "throughput, keep-alive, mTLS + SPIFFE gate",
                f"{rps['mtls']:.0f} req/s ({rps['mtls'] / rps['plain'] * 100:.1f} % of plain)",
            ),
            row("added p50, sequential keep-alive", f"{added:.3f} ms", "<= 5 % of a gateway call"),
            row(
                "request on a new connection (handshake)",
                f"{handshake_mtls:.2f} ms mTLS vs {handshake_plain:.2f} ms plain",
            ),
            row("certificate renewal (issue + swap into live contexts)", f"{renewal:.2f} ms"),
            *real_rows,
        ],
        notes=(
            "Trivial app rows: the transport's and the gate's cost alone, an upper bound. "
            "Real-path rows: the api's gateway client posting signed envelopes to two "
            "`bastion serve gateway` processes (mTLS internal listener vs plain), one "
            "database, the mock upstream; envelopes signed in the bench process for both. "
            "New-connection rows: one client, keep-alive off, both sides. Shared, loaded "
            "2-core box (several engineers' test runs); both sides in one run, interleaved."
        ),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--no-real", dest="real", action="store_false", help="skip the real api -> gateway path"
    )
    args = parser.parse_args()
    main(args.requests, args.clients, args.real)
