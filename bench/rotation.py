"""The cost of rotating every key under load (issue 17, item 5): p50/p99 of the
requests during the rotations against steady state, side by side in one run.

It runs the suite's load test (``tests/test_key_rotation.py::
test_every_rotation_under_load_fails_no_request``: the real api with DPoP
requests and the api's signed envelopes to the gateway, the gateway through
the official openai client, Stripe-signed webhook deliveries, on the embedded
PostgreSQL) with a longer steady phase, and records what it measured. The
test itself fails on any non-2xx answer, so a recorded run had none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record, row

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_key_rotation.py::test_every_rotation_under_load_fails_no_request"


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bastion-bench-rotation-") as tmp:
        report = Path(tmp) / "rotation.json"
        env = {
            **os.environ,
            "BASTION_ROTATION_REPORT": str(report),
            "BASTION_ROTATION_STEADY_SECONDS": "12",
        }
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
            cwd=ROOT,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            sys.exit("the rotation load test failed: no figures recorded")
        figures = json.loads(report.read_text())
    steady, during = figures["steady"], figures["during"]
    ratio = during["p99_ms"] / steady["p99_ms"] if steady["p99_ms"] else float("nan")
    rows = [
        row(
            "steady state: requests, p50 / p99",
            f"{steady['requests']}, {steady['p50_ms']:.0f} / {steady['p99_ms']:.0f} ms",
        ),
        row(
            "during every rotation: requests, p50 / p99",
            f"{during['requests']}, {during['p50_ms']:.0f} / {during['p99_ms']:.0f} ms",
        ),
        row("p99 during rotation / steady", f"{ratio:.2f}x"),
        row("non-2xx answers", str(steady["failed"] + during["failed"]), "0"),
    ]
    for r in rows:
        print(f"{r['figure']}: {r['result']}")
    record(
        "rotation",
        rows,
        notes="api (DPoP + signed envelopes to the gateway), gateway (openai client) and "
        "Stripe webhooks, 2 clients each, while jwt, envelope, tool, webhook, receipt, kek "
        "and db-password rotate one after another; a shared, loaded 2-core machine.",
    )


if __name__ == "__main__":
    main()
