"""Benchmark: the cost of the Prometheus metrics on the gateway's hot path (issue
19 item 3; target: <= 3% throughput lost with metrics on).

Two gateways built in this process by the composition root exactly as
``bastion serve gateway`` builds them — one with ``metrics_enabled`` (the
request-counting middleware outermost, the spend counter in the service), one
without — each served by uvicorn on 127.0.0.1, both in front of
bench/mock_upstream.py and on the same database. Every guardrail of the
pipeline runs (token + DPoP, Cedar, budget in PostgreSQL, cache, audit, PII
stage). Runs alternate on/off/off/on... so that drift in the machine's load
falls on both; ``wrk`` drives the load (fresh DPoP proofs per request, made
before each run). Also: the middleware's own cost per request, timed alone
(one labelled counter and one histogram observation).

Run: .venv/bin/python bench/metrics.py [--clients 16] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gateway_bench import (
    access_token,
    bench_tenant,
    chat_body,
    gateway_env,
    serve_in_thread,
    wait_ready,
    wrk_run,
)
from _record import record, row
from bastion.compose import build_gateway
from bastion.db.launcher import EmbeddedPostgres
from bastion.logs import configure_logging
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from bastion.telemetry.metrics import Metrics
from wrk_dpop import THREADS, free_port, prepare


def _observe_us(count: int = 200_000) -> float:
    """Microseconds one request's metrics take (counter + histogram), alone."""
    metrics = Metrics("bench")
    started = time.perf_counter()
    for _ in range(count):
        metrics.observe_request("/v1/chat/completions", "POST", 200, 0.004)
    return (time.perf_counter() - started) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port = free_port()
    ports = {"on": free_port(), "off": free_port()}
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    os.environ.update(gateway_env(home, upstream_url))
    os.environ.pop("DATABASE_URL", None)
    settings = Settings()
    configure_logging("warning")  # as `bastion serve` does with BASTION_LOG_LEVEL
    upstream = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "mock_upstream.py"), str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers: list[uvicorn.Server] = []
    try:
        tenant, user = asyncio.run(bench_tenant(settings, "bench-metrics"))
        token, key = access_token(open_keystore(settings), settings, tenant, user)
        urls = {}
        for mode, port in ports.items():
            public = f"http://127.0.0.1:{port}"
            gateway = build_gateway(
                settings.model_copy(
                    update={"metrics_enabled": mode == "on", "gateway_public_url": public}
                )
            )
            assert (gateway.metrics is not None) is (mode == "on")
            servers.append(serve_in_thread(gateway.app, port))
            asyncio.run(wait_ready(f"{public}/healthz"))
            urls[mode] = f"{public}/v1/chat/completions"
        asyncio.run(wait_ready(f"http://127.0.0.1:{upstream_port}/"))

        def run(mode: str, seconds: int) -> dict[str, float]:
            prepare(
                home,
                method="POST",
                body=chat_body(),
                key=key,
                url=urls[mode],
                token=token,
                per_thread=int(3000 * seconds / THREADS) + args.clients,
            )
            return wrk_run(
                home, urls[mode], args.clients, seconds, f"DPoP {token}", dpop=True, pid=os.getpid()
            )

        for mode in ports:  # warm-up runs, not counted
            run(mode, 2)
        rps: dict[str, list[float]] = {"on": [], "off": []}
        p50: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                result = run(mode, args.seconds)
                if result["errors"]:
                    raise SystemExit(f"{result['errors']:.0f} requests failed ({mode})")
                rps[mode].append(result["rps"])
                p50[mode].append(result["p50"])
                cpu[mode].append(result["cpu_ms"])
                print(f"run {round_ + 1} {mode:3} {result['rps']:8,.0f} req/s")
        on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
        p50_on, p50_off = statistics.median(p50["on"]), statistics.median(p50["off"])
        cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
        alone = _observe_us()
        share = alone / (cpu_off * 1000)  # of the CPU a request takes without metrics
        print(
            f"{args.clients} connections (wrk, {THREADS} threads), {args.seconds} s per run, "
            f"{args.rounds} runs per side, alternating; medians; a shared, loaded 2-core machine"
        )
        print(f"{'metrics':8} {'req/s':>8} {'p50 ms':>8}")
        print(f"{'on':8} {on:8,.0f} {p50_on:8.2f}")
        print(f"{'off':8} {off:8,.0f} {p50_off:8.2f}")
        print(f"on/off throughput {on / off:.3f} (loss {1 - on / off:.1%})")
        print(f"CPU ms per request: on {cpu_on:.2f}, off {cpu_off:.2f}")
        print(f"one request's metrics alone: {alone:.2f} us ({share:.2%} of a request's CPU)")
        spread = {m: (min(v), max(v)) for m, v in rps.items()}
        print(f"run-to-run range req/s: on {spread['on']}, off {spread['off']}")
        record(
            "metrics",
            [
                row(
                    "gateway req/s, metrics on / off",
                    f"{on:,.0f} / {off:,.0f} (loss {1 - on / off:.1%})",
                    "loss <= 3%",
                ),
                row("gateway p50 ms, metrics on / off", f"{p50_on:.2f} / {p50_off:.2f}"),
                row("gateway CPU ms/request, metrics on / off", f"{cpu_on:.2f} / {cpu_off:.2f}"),
                row(
                    "one request's metrics (counter + histogram), alone",
                    f"{alone:.2f} us = {share:.2%} of a request's CPU",
                    "<= 3%",
                ),
            ],
            notes=f"{args.clients} connections, {args.seconds} s x {args.rounds} alternating "
            "runs per side; medians; one machine shared with other work "
            f"(run-to-run req/s: on {min(rps['on']):,.0f}-{max(rps['on']):,.0f}, "
            f"off {min(rps['off']):,.0f}-{max(rps['off']):,.0f})",
        )
    finally:
        for server in servers:
            server.should_exit = True
        time.sleep(1)
        upstream.terminate()
        upstream.wait(10)
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
