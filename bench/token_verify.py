"""Benchmark: access-token + DPoP proof verification per second, on one core.

Run: .venv/bin/python bench/token_verify.py [--proofs N] [--runs N]

One DPoP-bound access token is issued; N fresh proofs per run (distinct jti,
with ``ath``) are made before timing. Each timed step is what a request costs:

    TokenVerifier.verify(token)
    DpopVerifier.verify(proof, method, url, access_token=token, expected_jkt=cnf.jkt)

Two variants, each the median of ``--runs`` runs:
  warm  the verifier's verified-token cache on (production default: a client
        presents one token on many requests)
  cold  the cache off: a full ES256 verification of the token every time
Target (issue): warm >= 3,000 verifications/s. The process is pinned to one CPU
where the platform allows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from _record import record, row
from bastion.identity.dpop import DpopKey, DpopVerifier, MemoryReplayCache
from bastion.identity.keys import SigningKeys
from bastion.identity.tokens import TokenIssuer, TokenVerifier
from bastion.secrets.store import LocalKeystore

ISSUER = "https://id.bastion.bench"
URL = "https://api.bastion.bench/v1/tenants/t/documents"
TARGET = 3000


def run(proofs: int, runs: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    try:
        keystore = LocalKeystore(home / "keys" / "keystore.bin", home / "keys" / "master.key")
        keys = SigningKeys(keystore)
        issuer = TokenIssuer(keys, issuer=ISSUER, audience=ISSUER)
        client = DpopKey.generate()
        token, claims = issuer.issue_access(
            user_id=uuid.uuid4(),
            tenant_id=uuid.uuid4(),
            roles=["member"],
            amr=["pwd", "otp"],
            jkt=client.thumbprint,
            scope="openid",
        )
        results: dict[str, list[float]] = {"warm": [], "cold": []}
        for _ in range(runs):
            for variant, cache_size in (("warm", 10_000), ("cold", 0)):
                verifier = TokenVerifier(
                    keys, issuer=ISSUER, audience=ISSUER, cache_size=cache_size
                )
                dpop = DpopVerifier(MemoryReplayCache())
                batch = [client.proof("GET", URL, access_token=token) for _ in range(proofs)]
                start = time.perf_counter()
                for proof in batch:
                    got = verifier.verify(token)
                    dpop.verify(
                        proof, method="GET", url=URL, access_token=token, expected_jkt=got.jkt
                    )
                elapsed = time.perf_counter() - start
                results[variant].append(proofs / elapsed)
        assert claims.jkt == client.thumbprint
        rows = []
        for variant, rates in results.items():
            median = statistics.median(rates)
            rows.append(
                row(
                    f"token + proof verifications, one core, {variant} (token seen before)"
                    if variant == "warm"
                    else f"token + proof verifications, one core, {variant} (token never seen)",
                    f"{median:,.0f}/s",
                    f"≥ {TARGET:,}/s",
                )
            )
            runs_text = ", ".join(f"{r:,.0f}" for r in rates)
            verdict = "meets" if median >= TARGET else "BELOW"
            print(
                f"{variant:5s} median {median:8,.0f} verifications/s "
                f"({verdict} target {TARGET:,}); runs: {runs_text}"
            )
        record("token_verify", rows)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proofs", type=int, default=2000, help="proofs per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per variant")
    args = parser.parse_args()
    run(args.proofs, args.runs)


if __name__ == "__main__":
    main()
