"""Benchmark: Bastion's gateway against LiteLLM's proxy, same mock upstream, same load.

Run: .venv/bin/python bench/gateway.py [--clients 32] [--seconds 10]
     [--litellm /path/to/venv/bin/litellm]

The upstream is bench/mock_upstream.py (a fixed completion with usage). Both
proxies run as one process on this machine. Load: ``wrk`` with 32 keep-alive
connections posting a chat completion. Bastion runs with every guardrail of
its pipeline on: token + DPoP proof (fresh per request, made before the run),
Cedar, budget reservation and settlement in PostgreSQL, the answer cache
consulted (temperature 1: never a hit), audit event, trace, log line.
LiteLLM runs with a master key, no database (its fastest setup).
Also: added p50 latency for one sequential client (proxy minus upstream
direct), and the proxies' RSS after the load.
Targets (issue 6): >= 20x LiteLLM's throughput, <= 1.5 ms added p50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _gateway_bench import (
    access_token,
    bench_tenant,
    chat_body,
    gateway_env,
    rss_mb,
    sequential_p50,
    wait_ready,
    wrk_run,
)
from _record import record_output
from bastion.db.launcher import EmbeddedPostgres
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from wrk_dpop import THREADS, free_port, prepare


async def run(clients: int, seconds: int, litellm: str | None) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port, gateway_port, litellm_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    env = {**os.environ, **gateway_env(home, upstream_url)}
    env["BASTION_GATEWAY_PORT"] = str(gateway_port)
    env.pop("DATABASE_URL", None)
    settings = Settings(home=home, gateway_port=gateway_port)
    procs: list[subprocess.Popen[bytes]] = []
    # BENCH_VERBOSE=1 shows the processes' logs.
    stderr = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    quiet = {"stdout": subprocess.DEVNULL, "stderr": stderr}
    try:
        tenant, user = await bench_tenant(settings, "bench-desk")
        token, key = access_token(open_keystore(settings), settings, tenant, user, minutes=15)
        procs.append(
            subprocess.Popen(
                [sys.executable, "bench/mock_upstream.py", str(upstream_port)], **quiet
            )
        )
        gateway = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "gateway"], env=env, **quiet
        )
        procs.append(gateway)
        await wait_ready(f"http://127.0.0.1:{upstream_port}/")
        await wait_ready(f"http://127.0.0.1:{gateway_port}/healthz")
        bastion_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        direct = await sequential_p50(f"{upstream_url}/chat/completions", None)
        proofs = [key.proof("POST", bastion_url, access_token=token) for _ in range(300)]
        via_bastion = await sequential_p50(
            bastion_url, {"Authorization": f"DPoP {token}"}, proofs=proofs
        )
        prepare(
            home,
            method="POST",
            body=chat_body(),
            key=key,
            url=bastion_url,
            token=token,
            per_thread=int(3000 * seconds / THREADS) + clients,
        )
        bastion = wrk_run(
            home,
            bastion_url,
            clients,
            seconds,
            f"DPoP {token}",
            dpop=True,
            pid=gateway.pid,
            db_pid=postmaster_pid(home),
        )
        bastion["rss"] = rss_mb(gateway.pid)
        bastion["added_p50"] = via_bastion - direct
        results = {"bastion": bastion}
        if litellm:
            config = home / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n"
                f"      model: openai/bench\n      api_base: {upstream_url}\n"
                "      api_key: sk-mock\n"
                "general_settings:\n  master_key: sk-bench\n"
            )
            proxy = subprocess.Popen(
                [
                    litellm,
                    "--config",
                    str(config),
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                **quiet,
            )
            procs.append(proxy)
            await wait_ready(f"http://127.0.0.1:{litellm_port}/health/liveliness")
            litellm_url = f"http://127.0.0.1:{litellm_port}/v1/chat/completions"
            auth = {"Authorization": "Bearer sk-bench"}
            via_litellm = await sequential_p50(litellm_url, auth)
            result = wrk_run(
                home, litellm_url, clients, seconds, "Bearer sk-bench", dpop=False, pid=proxy.pid
            )
            result["rss"] = rss_mb(proxy.pid)
            result["added_p50"] = via_litellm - direct
            results["litellm"] = result
        print(
            f"{clients} connections (wrk, {THREADS} threads), {seconds} s each; "
            f"upstream direct p50 {direct:.2f} ms (one client)"
        )
        print(
            f"{'proxy':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
            f"{'added p50 ms':>13} {'RSS MB':>8} {'CPU ms/req':>11} {'DB CPU ms/req':>14}"
        )
        for name, r in results.items():
            print(
                f"{name:10} {r['rps']:>9,.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} "
                f"{r['errors']:>8,.0f} {r['added_p50']:>13.2f} {r['rss']:>8.0f} "
                f"{r['cpu_ms']:>11.2f} {r['db_cpu_ms']:>14.2f}"
            )
        if "litellm" in results:
            print(
                f"throughput ratio bastion/litellm: "
                f"{results['bastion']['rps'] / results['litellm']['rps']:.2f}x"
            )
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


def postmaster_pid(home: Path) -> int:
    """The embedded PostgreSQL's postmaster (first line of postmaster.pid)."""
    return int(
        (EmbeddedPostgres(home / "postgres").data_dir / "postmaster.pid").read_text().split()[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--litellm",
        default=shutil.which("litellm"),
        help="the litellm CLI (its own venv: it is not a Bastion dependency)",
    )
    args = parser.parse_args()
    record_output("gateway")  # bench/results/gateway.json, for bench/report.py
    asyncio.run(run(args.clients, args.seconds, args.litellm))


if __name__ == "__main__":
    main()
