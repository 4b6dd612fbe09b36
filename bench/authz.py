"""Benchmark: Cedar authorization decisions, on one core.

Run: .venv/bin/python bench/authz.py [--decisions N] [--runs N]

single  ``Authorizer.authorize`` for one request: p50/p99 over ``--decisions``
        decisions, each a fresh user, tenant and document id (the roles, MFA
        flag, action and resource type cycle through a realistic mix).
filter  ``Authorizer.filter`` of 1,000 documents (half in another tenant):
        median of ``--runs`` runs.

Two variants of each:
  memo  the production default: decisions memoised on (roles, mfa, action,
        resource type, same tenant, own account) per loaded policy set, which
        Cedar's semantics make exact (ids only compare for equality); Cedar
        runs once per distinct key
  cedar the memo off: every decision is a cedarpy call (filter: one
        ``is_authorized_batch`` of 1,000 requests)
Targets (issue): single p50 <= 20 us; filter of 1,000 <= 5 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from _record import record, row
from bastion.access import ROLES, Authorizer, Resource, Subject

SINGLE_TARGET_US = 20.0
FILTER_TARGET_MS = 5.0
MIX = [
    ("document:read", "Document"),
    ("document:write", "Document"),
    ("question:ask", "Question"),
    ("member:list", "Member"),
    ("key:rotate", "Key"),
    ("account:read", "Account"),
]


def _requests(count: int) -> list[tuple[Subject, str, Resource]]:
    requests = []
    for n in range(count):
        tenant = uuid.uuid4()
        user = uuid.uuid4()
        subject = Subject(user, tenant, frozenset({ROLES[n % len(ROLES)]}), n % 3 != 0)
        action, kind = MIX[n % len(MIX)]
        owner = user if kind == "Account" else None
        requests.append((subject, action, Resource(kind, str(uuid.uuid4()), tenant, owner)))
    return requests


def _single(authorizer: Authorizer, decisions: int) -> tuple[float, float]:
    requests = _requests(decisions)
    for subject, action, resource in requests[:200]:  # warm up
        authorizer.authorize(subject, action, resource)
    timings = []
    clock = time.perf_counter_ns
    for subject, action, resource in requests:
        start = clock()
        authorizer.authorize(subject, action, resource)
        timings.append(clock() - start)
    timings.sort()
    return timings[len(timings) // 2] / 1000, timings[int(len(timings) * 0.99)] / 1000


def _filter(authorizer: Authorizer, runs: int) -> tuple[float, int]:
    subject = Subject(uuid.uuid4(), uuid.uuid4(), frozenset({"viewer"}), False)
    elsewhere = uuid.uuid4()
    resources = [
        Resource("Document", f"doc-{n}", subject.tenant_id if n % 2 else elsewhere)
        for n in range(1000)
    ]
    kept = len(authorizer.filter(subject, "document:read", resources))  # warm up
    timings = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        authorizer.filter(subject, "document:read", resources)
        timings.append(time.perf_counter_ns() - start)
    return statistics.median(timings) / 1e6, kept


def run(decisions: int, runs: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rows = []
    for variant, memo in (("memo", True), ("cedar", False)):
        authorizer = Authorizer(decision_cache=memo)
        p50, p99 = _single(authorizer, decisions)
        rows.append(
            row(
                f"one decision, {variant}",
                f"p50 {p50:.1f} µs, p99 {p99:.1f} µs",
                f"p50 ≤ {SINGLE_TARGET_US:.0f} µs",
            )
        )
        verdict = "ok" if p50 <= SINGLE_TARGET_US else "MISSED"
        print(
            f"single  {variant:5s}  p50 {p50:8.1f} us  p99 {p99:8.1f} us  "
            f"({decisions} decisions; target p50 <= {SINGLE_TARGET_US:.0f} us: {verdict})"
        )
        median, kept = _filter(authorizer, runs)
        verdict = "ok" if median <= FILTER_TARGET_MS else "MISSED"
        print(
            f"filter  {variant:5s}  median {median:8.2f} ms  (1,000 resources, {kept} kept, "
            f"{runs} runs; target <= {FILTER_TARGET_MS:.0f} ms: {verdict})"
        )
        rows.append(
            row(
                f"filter 1,000 resources, {variant}",
                f"median {median:.2f} ms",
                f"≤ {FILTER_TARGET_MS:.0f} ms",
            )
        )
    record("authz", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    run(args.decisions, args.runs)


if __name__ == "__main__":
    main()
