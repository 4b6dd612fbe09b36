"""Benchmark: knowledge-base ingestion throughput, end to end, per embedder.

Run: .venv/bin/python bench/ingest.py [--documents N] [--embedders minilm,hashing]

Each document goes through the whole pipeline the worker runs: decrypt the
upload, extract, redact, chunk (200 word-pieces, 40 overlap), embed, cache the
embeddings, encrypt each chunk, insert into the namespace's partition (HNSW
index maintained) and commit. Documents are synthetic support tickets of
about 25 chunks each. Reports chunks/s (median of the runs) per embedder, and
the latency of a text search in the last run's namespace (query embedding,
signed tenant context, RLS, k = 10, decryption of the hits).
Targets (issue 5): MiniLM >= 150 chunks/s, hashing >= 3,000 chunks/s.

``--pii paired`` (issue 16: ingestion loses <= 10% to the name tagger) runs
each embedder with the pattern kinds only and with every kind (the name,
address and place tagger too), alternating which goes first run by run so
that a shared machine's load hits both, and reports both medians and the loss.

``--concurrency N`` ingests N documents at once, as the worker's N ingest slots
do (``worker_ingest_concurrency``, default 2): a large text's scan runs in a
scanning process while the event loop chunks and embeds another document.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from _record import record, row

if TYPE_CHECKING:
    from bastion.knowledge.service import Actor, KnowledgeService
    from bastion.safety.pii import PiiRecognizer

# Bastion is imported inside the functions, not here: extraction runs in child
# processes that import this script again first (bastion.limited_process), as
# the worker's are not (its main module, bastion.__main__, is small).

WORDS = (
    "customer",
    "invoice",
    "refund",
    "charged",
    "twice",
    "export",
    "webhook",
    "retry",
    "password",
    "reset",
    "login",
    "account",
    "plan",
    "upgrade",
    "downgrade",
    "api",
    "rate",
    "limit",
    "error",
    "timeout",
    "dashboard",
    "report",
    "data",
    "delete",
    "request",
    "support",
    "agent",
    "ticket",
    "escalated",
    "resolved",
    "payment",
    "card",
    "bank",
    "transfer",
)


def ticket(rng: random.Random, n: int) -> str:
    """About 2,400 words (~15 chunks of 200 word-pieces) of support-ticket prose."""
    sentences = []
    for i in range(220):
        words = rng.choices(WORDS, k=rng.randint(8, 14))
        sentences.append(f"Ticket {n}.{i}: " + " ".join(words).capitalize() + ".")
    sentences.append(f"Contact: user{n}@example.com, +44 20 7946 {n % 10000:04d}.")
    return " ".join(sentences)


async def _search_latency(
    kb: KnowledgeService, who: Actor, rng: random.Random, queries: int = 100
) -> tuple[float, float]:
    """p50/p99 ms of a text search (embed the query, RLS, k=10, decrypt the hits)."""
    timings = []
    for _ in range(queries):
        query = " ".join(rng.choices(WORDS, k=6))
        started = time.perf_counter()
        hits = await kb.search(who, "bench", query=query, k=10)
        timings.append((time.perf_counter() - started) * 1000)
        assert len(hits) == 10
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.99) - 1]


def _cpu_seconds(home: Path) -> float:
    """CPU seconds used so far by this process, its live descendants (the
    scanning and extraction processes) and the database's processes: a run's
    cost whatever else the shared machine is doing."""
    import psutil

    me = psutil.Process()
    procs = {p.pid: p for p in (me, *me.children(recursive=True))}
    for proc in psutil.process_iter(["cmdline"]):
        if str(home) in " ".join(proc.info["cmdline"] or ()):
            procs.setdefault(proc.pid, proc)
    total = 0.0
    for proc in procs.values():
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def _warm_scanning_processes(recognizer: PiiRecognizer) -> None:
    """A scan in each of this process's scanning processes, at once (one tenant
    each: a tenant's scans run one at a time), so each loads ``recognizer``."""
    from bastion.offload import default_workers
    from bastion.safety.scanning import find_each

    text = "Warm up: Jan Kowalski, 12 Main Street, Springfield. " * 400
    await asyncio.gather(
        *(find_each(f"warm-{i}", [text], recognizer=recognizer) for i in range(default_workers()))
    )


async def _drain(kb: KnowledgeService, tenant_id: uuid.UUID, pending: list[uuid.UUID]) -> int:
    """One of the worker's ingest slots: the next pending document, until none; its chunks."""
    done = 0
    while pending:
        outcome = await kb.ingest(tenant_id, pending.pop())
        assert outcome.status == "indexed", outcome
        done += outcome.chunks
    return done


def _recognizer(pii: str) -> PiiRecognizer:
    """Every kind, or the pattern kinds only (no name tagger, issue 16)."""
    from bastion.safety.pii import KINDS, PiiRecognizer
    from bastion.safety.pii_patterns import DOB, MODEL_KINDS

    if pii == "patterns":
        return PiiRecognizer([k for k in KINDS if k not in (*MODEL_KINDS, DOB)])
    return PiiRecognizer()


async def run(
    documents: int, embedders: list[str], runs: int, pii: str = "all", concurrency: int = 1
) -> None:
    from bastion.db.launcher import EmbeddedPostgres
    from bastion.db.pool import Database
    from bastion.db.provision import Target, provision
    from bastion.knowledge.service import Actor, KnowledgeService
    from bastion.secrets.kms import LocalKMS
    from bastion.secrets.store import LocalKeystore
    from bastion.secrets.tenant_keys import TenantKeys
    from bastion.tenants.service import TenantService

    variants = ["patterns", "all"] if pii == "paired" else [pii]
    parent = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    parent.chmod(0o711)
    server = EmbeddedPostgres(parent / "pg")
    rng = random.Random(5)
    bodies = [ticket(rng, n).encode() for n in range(documents)]
    try:
        info = server.start()
        keystore = LocalKeystore(parent / "keys" / "keystore.bin", parent / "keys" / "master.key")
        creds = provision(Target(info.conninfo(), "bench", True, "bench"), keystore)
        async with Database(creds.conninfo, creds.context_key, max_size=4) as db:
            tenants = TenantService(db)
            results: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            searches: dict[str, tuple[float, float]] = {}
            for name in embedders:
                kb = KnowledgeService(db, TenantKeys(LocalKMS(keystore)), default_embedder=name)
                kb.embedders(name).embed(["warm up"])  # load the model outside the timing
                # The recognizers too: the name tagger's weights load once per
                # process, in this one and in every scanning process, before the
                # timing (a run that started a scanning process or loaded the
                # weights there would count a second of CPU no ingestion repeats).
                recognizers = {v: _recognizer(v) for v in variants}
                for recognizer in recognizers.values():
                    recognizer.find("warm up, Jan Kowalski")
                    await _warm_scanning_processes(recognizer)
                for run_no, variant in (
                    (n, v)
                    for n in range(runs)
                    # Alternate which goes first, so that drifting load hits both.
                    for v in (variants if n % 2 == 0 else variants[::-1])
                ):
                    kb.vault.recognizer = recognizers[variant]
                    key = f"{name}/{variant}" if len(variants) > 1 else name
                    tenant = await tenants.create_tenant(f"b-{uuid.uuid4().hex[:8]}", "bench")
                    owner = Actor(tenant.id, None, "system")
                    await kb.create_namespace(owner, "bench", name)
                    ids = [
                        (
                            await kb.upload(
                                owner,
                                "bench",
                                title=f"t{i}",
                                body=b,
                                content_type="text/plain",
                                enqueue=False,
                            )
                        ).document.id
                        for i, b in enumerate(bodies)
                    ]
                    cpu_before = _cpu_seconds(parent)
                    started = time.perf_counter()
                    pending = list(reversed(ids))
                    slots = [_drain(kb, tenant.id, pending) for _ in range(concurrency)]
                    chunks = sum(await asyncio.gather(*slots))
                    elapsed = time.perf_counter() - started
                    cpu_ms = 1000 * (_cpu_seconds(parent) - cpu_before) / chunks
                    results.setdefault(key, []).append(chunks / elapsed)
                    cpu.setdefault(key, []).append(cpu_ms)
                    if run_no == runs - 1:
                        searches[key] = await _search_latency(kb, owner, rng)
                    print(
                        f"{key:8} run {run_no + 1}: {len(ids)} documents, {chunks} chunks "
                        f"in {elapsed:.2f} s = {chunks / elapsed:,.0f} chunks/s, "
                        f"{cpu_ms:.2f} ms CPU per chunk",
                        flush=True,
                    )
        print()
        print(
            f"{'embedder':18} {'median chunks/s':>16} {'CPU ms/chunk':>13} "
            f"{'search p50 ms':>14} {'p99 ms':>8}"
        )
        for name, rates in results.items():
            p50, p99 = searches[name]
            print(
                f"{name:18} {statistics.median(rates):>16,.0f} "
                f"{statistics.median(cpu[name]):>13.2f} {p50:>14.2f} {p99:>8.2f}"
            )
        rows = [
            row(
                f"{name}: ingestion end to end ({concurrency} at once) / text search",
                f"{statistics.median(rates):,.0f} chunks/s, "
                f"{statistics.median(cpu[name]):.2f} ms CPU per chunk (all processes); "
                f"search p50 {searches[name][0]:.2f} ms, p99 {searches[name][1]:.2f} ms",
            )
            for name, rates in results.items()
        ]
        if len(variants) > 1:
            for name in embedders:
                before = statistics.median(results[f"{name}/patterns"])
                after = statistics.median(results[f"{name}/all"])
                loss = 1 - after / before
                # The same in CPU: the throughput a machine busy with ingestion
                # alone keeps (its cores are what the tagger's time is taken from).
                cpu_before = statistics.median(cpu[f"{name}/patterns"])
                cpu_after = statistics.median(cpu[f"{name}/all"])
                cpu_loss = 1 - cpu_before / cpu_after
                print(
                    f"{name}: the name tagger costs {loss:.1%} of ingestion throughput, "
                    f"{cpu_loss:.1%} in CPU per chunk ({cpu_before:.2f} -> {cpu_after:.2f} ms)"
                )
                rows.append(
                    row(
                        f"{name}: ingestion throughput lost to the name tagger (paired medians,"
                        f" {concurrency} at once)",
                        f"{loss:.1%} ({before:,.0f} -> {after:,.0f} chunks/s); in CPU per chunk, "
                        f"all processes: {cpu_loss:.1%} ({cpu_before:.2f} -> {cpu_after:.2f} ms)",
                    )
                )
        record("ingest_pii" if len(variants) > 1 else "ingest", rows)
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--embedders", default="minilm,hashing")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--pii",
        choices=("all", "patterns", "paired"),
        default="all",
        help="PII kinds scanned at ingestion: all, the pattern kinds without the name tagger,"
        " or both side by side (paired)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="documents ingested at once (the worker's default, worker_ingest_concurrency, is 2)",
    )
    args = parser.parse_args()
    asyncio.run(
        run(args.documents, args.embedders.split(","), args.runs, args.pii, args.concurrency)
    )


if __name__ == "__main__":
    main()
