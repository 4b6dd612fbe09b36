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
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import Receive, Scope, Send

from _record import record, row
from bastion.api.mtls import WorkloadGate
from bastion.identity.workload import PeerVerifier, WorkloadCA, WorkloadTls, spiffe_id
from bastion.secrets import LocalKeystore
from bastion.serve import server_options, tls_config
from wrk_dpop import free_port

TD = "bastion.internal"


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
    """Median ms of a request on a new connection each time."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with httpx.Client(verify=verify) as client:
            client.get(url)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(requests: int, clients: int) -> None:
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
        ],
        notes=(
            "A trivial app on both listeners: the ratio is the transport's and the gate's "
            "cost alone, an upper bound on its share of a real gateway call. Shared, loaded "
            "2-core box; both sides in one run, interleaved."
        ),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    main(args.requests, args.clients)
