"""Receipts signed and verified per second, one core (Ed25519 JWS through joserfc).

    .venv/bin/python bench/receipts.py [--seconds 3]

Signing goes through :func:`bastion.billing.receipts.sign_receipt` (key ring
lookup, canonical JSON, JWS); verifying through :func:`verify_receipt`
against the published JWK Set (header checks, kid lookup, signature, JSON).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from _record import record, row
from bastion.billing.receipts import ReceiptKeys, jwks_lookup, sign_receipt, verify_receipt
from bastion.secrets import LocalKeystore

PAYLOAD: dict[str, Any] = {
    "id": "0b9e6c1e-4a0f-4f65-9b59-8f3c8c1f0a11",
    "iss": "https://bastion.example",
    "iat": 1_790_000_000,
    "tenant_id": "6a1f8e44-2b1d-4c55-8e3a-0d7f4f1b2c3d",
    "kind": "usage_period",
    "period": {"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z"},
    "usage": {"calls": 123_456, "tokens": 98_765_432},
    "records_sha256": "0" * 64,
}


def _rate(work: Any, seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            work()
        done += 100
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bastion-bench-receipts-"))
    try:
        keys = ReceiptKeys(
            LocalKeystore(base / "k.bin", base / "m.key"), publish_ahead=timedelta(0)
        )
        _kid, document = sign_receipt(keys, PAYLOAD)
        lookup = jwks_lookup(keys.jwks())
        signed = _rate(lambda: sign_receipt(keys, PAYLOAD), args.seconds)
        verified = _rate(lambda: verify_receipt(document, lookup), args.seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"sign:   {signed:,.0f} receipts/s ({1e6 / signed:.0f} µs each)")
    print(f"verify: {verified:,.0f} receipts/s ({1e6 / verified:.0f} µs each)")
    record(
        "receipts",
        [
            row("sign, one core", f"{signed:,.0f} receipts/s ({1e6 / signed:.0f} µs each)"),
            row("verify, one core", f"{verified:,.0f} receipts/s ({1e6 / verified:.0f} µs each)"),
        ],
    )


if __name__ == "__main__":
    main()
