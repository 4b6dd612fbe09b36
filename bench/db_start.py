"""Benchmark: cold start (initdb + start) and warm start of the embedded server.

Run: .venv/bin/python bench/db_start.py [--rounds N]
Targets (issue 2): cold <= 2 s, warm <= 0.3 s. Prints medians of N rounds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _record import record, row
from bastion.db.launcher import EmbeddedPostgres


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    cold, initdb, warm, stop = [], [], [], []
    for _ in range(rounds):
        parent = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
        parent.chmod(0o711)
        server = EmbeddedPostgres(parent / "pg")
        try:
            t0 = time.perf_counter()
            server.initdb()
            t1 = time.perf_counter()
            server.start()
            t2 = time.perf_counter()
            cold.append(t2 - t0)
            initdb.append(t1 - t0)
            for _ in range(3):
                t3 = time.perf_counter()
                server.stop()
                t4 = time.perf_counter()
                server.start()
                warm.append(time.perf_counter() - t4)
                stop.append(t4 - t3)
        finally:
            server.stop()
            shutil.rmtree(parent, ignore_errors=True)

    def ms(values: list[float]) -> str:
        median, low, high = statistics.median(values), min(values), max(values)
        return f"median {median * 1e3:7.1f} ms  (min {low * 1e3:.1f}, max {high * 1e3:.1f})"

    print(f"cold start (initdb + start): {ms(cold)}   target <= 2000 ms")
    print(f"  of which initdb:           {ms(initdb)}")
    print(f"warm start (existing data):  {ms(warm)}   target <= 300 ms")
    print(f"stop (fast shutdown):        {ms(stop)}")
    record(
        "db_start",
        [
            row("cold start (initdb + start)", ms(cold), "≤ 2,000 ms"),
            row("of which initdb", ms(initdb)),
            row("warm start (existing data)", ms(warm), "≤ 300 ms"),
            row("stop (fast shutdown)", ms(stop)),
        ],
    )


if __name__ == "__main__":
    main()
