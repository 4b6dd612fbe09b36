"""Benchmark: gateway throughput with OpenTelemetry tracing on and off, side by
side (issue 19 target: <= 10% throughput lost with tracing on).

Two gateways, built in this process by the composition root exactly as
``bastion serve gateway`` builds them, each served by uvicorn on 127.0.0.1,
behind bench/mock_upstream.py. Every guardrail of the pipeline runs (token +
DPoP, Cedar, budget in PostgreSQL, cache, audit, PII stage, injection screen).
"on": every span recorded and handed to a ``BatchSpanProcessor`` whose exporter
drops them (what a collector costs is its own); "off": the default without an
OTLP endpoint — spans are not recorded, trace ids still propagate. Runs
alternate on/off/off/on... so that drift in the machine's load falls on both;
``wrk`` drives the load (fresh DPoP proofs per request, made before each run).

Run: .venv/bin/python bench/otel.py [--clients 16] [--seconds 5] [--rounds 3]
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
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

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
from bastion.compose import Overrides, build_gateway
from bastion.db.launcher import EmbeddedPostgres
from bastion.identity.dpop import DpopKey
from bastion.logs import configure_logging
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from wrk_dpop import THREADS, free_port, prepare


class DroppingExporter(SpanExporter):
    """Counts the spans it is handed and keeps none."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


async def _setup(settings: Settings) -> tuple[str, DpopKey]:
    """A tenant on the bench plan with an ample budget; a token and its DPoP key."""
    tenant, user = await bench_tenant(settings, "bench-otel")
    return access_token(open_keystore(settings), settings, tenant, user)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port, on_port, off_port = free_port(), free_port(), free_port()
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
    exporter = DroppingExporter()
    try:
        token, key = asyncio.run(_setup(settings))
        # Each at its own URL (the DPoP proofs' htu).
        traced = build_gateway(
            settings.model_copy(update={"gateway_public_url": f"http://127.0.0.1:{on_port}"}),
            Overrides(span_processor=BatchSpanProcessor(exporter)),
        )
        plain = build_gateway(
            settings.model_copy(update={"gateway_public_url": f"http://127.0.0.1:{off_port}"})
        )
        servers = [serve_in_thread(traced.app, on_port), serve_in_thread(plain.app, off_port)]
        asyncio.run(wait_ready(f"http://127.0.0.1:{upstream_port}/"))
        urls = {}
        for mode, port in (("on", on_port), ("off", off_port)):
            asyncio.run(wait_ready(f"http://127.0.0.1:{port}/healthz"))
            urls[mode] = f"http://127.0.0.1:{port}/v1/chat/completions"
        rps: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}

        def run(mode: str, seconds: int) -> dict[str, float]:
            url = urls[mode]
            prepare(
                home,
                method="POST",
                body=chat_body(),
                key=key,
                url=url,
                token=token,
                per_thread=int(3000 * seconds / THREADS) + args.clients,
            )
            cpu_before = time.process_time()  # this process only: not wrk
            result = wrk_run(
                home, url, args.clients, seconds, f"DPoP {token}", dpop=True, pid=os.getpid()
            )
            requests = max(result["rps"] * seconds, 1.0)
            result["cpu_ms"] = (time.process_time() - cpu_before) * 1000 / requests
            if result["errors"]:
                raise SystemExit(f"{result['errors']:.0f} requests failed ({mode})")
            return result

        for mode in ("on", "off"):  # a warm-up run each, not counted
            run(mode, 2)
        for round_ in range(args.rounds):
            for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                result = run(mode, args.seconds)
                rps.setdefault(mode, []).append(result["rps"])
                cpu.setdefault(mode, []).append(result["cpu_ms"])
                if os.environ.get("BENCH_VERBOSE_RUNS"):
                    print(mode, result["rps"], round(result["cpu_ms"], 2))
        on, off = statistics.median(rps["on"]), statistics.median(rps["off"])
        cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
        print(
            f"{args.clients} connections (wrk, {THREADS} threads), {args.seconds} s per run, "
            f"{args.rounds} runs per mode, alternating; medians; {exporter.spans:,} spans exported"
        )
        print(f"{'tracing':8} {'req/s':>8} {'CPU ms/req':>11}")
        print(f"{'on':8} {on:8,.0f} {cpu_on:11.2f}")
        print(f"{'off':8} {off:8,.0f} {cpu_off:11.2f}")
        print(
            f"on/off throughput {on / off:.3f} (loss {1 - on / off:.1%}); "
            f"CPU per request +{cpu_on / cpu_off - 1:.1%}"
        )
        rows = [
            row(
                "gateway req/s: tracing on / off",
                f"{on:,.0f} / {off:,.0f} (loss {1 - on / off:.1%})",
                "loss <= 10%",
            ),
            row(
                "gateway CPU ms/request: tracing on / off",
                f"{cpu_on:.2f} / {cpu_off:.2f} (+{cpu_on / cpu_off - 1:.1%})",
            ),
        ]
        record(
            "otel",
            rows,
            notes=f"{args.clients} connections, {args.seconds} s x {args.rounds} alternating "
            "runs per mode; medians; spans batched to an exporter that drops them; "
            "one 2-core machine shared with other engineers' work (loaded)",
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
