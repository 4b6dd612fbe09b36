"""Benchmark: gateway throughput with the prompt-injection screen (rules, decoding
and the learned classifier) on and off, side by side (issue 15 target: <= 10%
throughput lost with the classifier on).

One gateway, built in this process by the composition root exactly as
``bastion serve gateway`` builds it, served by uvicorn on 127.0.0.1, behind it
bench/mock_upstream.py. Every guardrail of the pipeline runs (token + DPoP,
Cedar, budget in PostgreSQL, cache, audit, PII stage); between runs only the
service's prompt hooks change: the default (the injection screen) or none.
A third arm runs the rules and decoding with the learned tier's vote
switched off (``rules``): the target's own words are "throughput loses <= 10%
with the classifier on", so the classifier's share (on against rules) is
printed beside the whole screen's (on against off). The arms rotate from
round to round so that drift in the machine's load falls on each; ``wrk``
drives the load (fresh DPoP proofs per request, made before each run). Two
prompts: a short question, and a 1 KB user turn (a pasted ticket). The screen
never blocks either (both are benign): what is measured is its cost. Each
round's arms are paired losses; their median and spread are printed. Beside
them, the screen's own CPU per prompt, timed in this process, over the
gateway's CPU per request with the screen off: the loss a CPU-bound gateway
must show, which load on a shared machine blurs less than req/s.

Run: .venv/bin/python bench/gateway_screen.py [--clients 16] [--seconds 5] [--rounds 3]
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
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gateway_bench import (
    QUESTION,
    access_token,
    bench_tenant,
    chat_body,
    gateway_env,
    wait_ready,
    wrk_run,
)
from _record import record, row
from bastion.compose import build_gateway
from bastion.db.launcher import EmbeddedPostgres
from bastion.gateway.hooks import DEFAULT_HOOKS, HookRun, PromptHook
from bastion.gateway.providers import Message
from bastion.identity.dpop import DpopKey
from bastion.logs import configure_logging
from bastion.safety.injection import Finding, engine, screen
from bastion.secrets.backends import open_keystore
from bastion.settings import Settings
from wrk_dpop import THREADS, free_port, prepare

TICKET = (
    "Hello, our March invoice INV-2291 shows the Pro plan twice and the card was charged "
    "for both seats on the same day. We downgraded to Starter in February, so the second "
    "charge should not be there at all. Could you check the billing history, refund the "
    "double charge to the card on file and confirm when it will show on the statement? "
    "Our finance team closes the month on Friday, so a date would help a lot. We also "
    "noticed the VAT line uses the old address in Lyon; the new one is on the account "
    "since January. Please update future invoices too. Thanks, and sorry for the long "
    "message: this is the third time the renewal went wrong and the team is getting "
    "nervous about the annual contract that is due in June. Could somebody from billing "
    "call us back this week? Mornings work best for our side. Kind regards, the ops desk"
)
PROMPTS = {
    "short question": QUESTION,
    "1 KB ticket": TICKET,
}


MODES = ("on", "rules", "off")  # the whole screen; without the classifier's vote; none
_VOTE = engine._classifier_vote


def _no_vote(_visible: str, _found: list[Finding], _reads: list[int]) -> list[Finding]:
    return []


def _screen_cpu_ms(prompt: str, calls: int = 2000) -> float:
    """Median CPU milliseconds of one screen of ``prompt`` (five batches)."""
    batches = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(calls // 5):
            screen(prompt, "user")
        batches.append((time.process_time() - started) * 1e3 / (calls // 5))
    return statistics.median(batches)


def _timed(hook: PromptHook, spent: list[float]) -> PromptHook:
    """``hook``, its CPU per call (the serving thread's) appended to ``spent``:
    what the screen costs inside a loaded gateway, where it shares the caches
    with the rest of the request (about twice its cost alone, measured)."""

    def run(messages: Sequence[Message], hook_run: HookRun) -> list[Message]:
        started = time.thread_time()
        try:
            return hook(messages, hook_run)
        finally:
            spent.append((time.thread_time() - started) * 1e3)

    return run


async def _setup(settings: Settings) -> tuple[str, DpopKey]:
    """A tenant on the bench plan with an ample budget; a token and its DPoP key."""
    tenant, user = await bench_tenant(settings, "bench-screen")
    return access_token(open_keystore(settings), settings, tenant, user)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    home.chmod(0o711)
    upstream_port, gateway_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    os.environ.update(gateway_env(home, upstream_url))
    os.environ["BASTION_GATEWAY_PORT"] = str(gateway_port)
    os.environ.pop("DATABASE_URL", None)
    settings = Settings()
    configure_logging("warning")  # as `bastion serve` does with BASTION_LOG_LEVEL
    upstream = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "mock_upstream.py"), str(upstream_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server: uvicorn.Server | None = None
    try:
        token, key = asyncio.run(_setup(settings))
        gateway = build_gateway(settings)
        server = uvicorn.Server(
            uvicorn.Config(gateway.app, host="127.0.0.1", port=gateway_port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        asyncio.run(wait_ready(f"http://127.0.0.1:{upstream_port}/"))
        asyncio.run(wait_ready(f"http://127.0.0.1:{gateway_port}/healthz"))
        url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        rps: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        inside: dict[str, list[float]] = {}  # the screen's CPU per call, in the gateway
        for prompt_name, prompt in PROMPTS.items():
            # A warm-up run, not counted: the first run after start-up pays for it.
            prepare(
                home,
                method="POST",
                body=chat_body(prompt),
                key=key,
                url=url,
                token=token,
                per_thread=int(3000 * 2 / THREADS) + args.clients,
            )
            wrk_run(home, url, args.clients, 2, f"DPoP {token}", dpop=True, pid=os.getpid())
            for round_ in range(args.rounds):
                for mode in MODES[round_ % 3 :] + MODES[: round_ % 3]:
                    spent = inside.setdefault(f"{prompt_name} {mode}", [])
                    hooks = tuple(_timed(hook, spent) for hook in DEFAULT_HOOKS)
                    gateway.service.hooks = hooks if mode != "off" else ()
                    # setattr: a module's function, swapped for the bench (mypy refuses "=").
                    vote = _no_vote if mode == "rules" else _VOTE
                    setattr(engine, "_classifier_vote", vote)  # noqa: B010
                    prepare(
                        home,
                        method="POST",
                        body=chat_body(prompt),
                        key=key,
                        url=url,
                        token=token,
                        per_thread=int(3000 * args.seconds / THREADS) + args.clients,
                    )
                    cpu_before = time.process_time()  # this process only: not wrk
                    result = wrk_run(
                        home,
                        url,
                        args.clients,
                        args.seconds,
                        f"DPoP {token}",
                        dpop=True,
                        pid=os.getpid(),
                    )
                    requests = max(result["rps"] * args.seconds, 1.0)
                    result["cpu_ms"] = (time.process_time() - cpu_before) * 1000 / requests
                    if result["errors"]:
                        raise SystemExit(f"{result['errors']:.0f} requests failed ({mode})")
                    rps.setdefault((prompt_name, mode), []).append(result["rps"])
                    if os.environ.get("BENCH_VERBOSE_RUNS"):
                        print(prompt_name, mode, result["rps"], round(result["cpu_ms"], 2))
                    cpu.setdefault((prompt_name, mode), []).append(result["cpu_ms"])
            setattr(engine, "_classifier_vote", _VOTE)  # noqa: B010 (the screen timed below)
        print(
            f"{args.clients} connections (wrk, {THREADS} threads), {args.seconds} s per run, "
            f"{args.rounds} runs per cell, rotating; medians"
        )
        print(f"{'prompt':16} {'arm':7} {'req/s':>8} {'CPU ms/req':>11}")
        rows = []
        for prompt_name in PROMPTS:
            median = {mode: statistics.median(rps[(prompt_name, mode)]) for mode in MODES}
            cpu_ms = {mode: statistics.median(cpu[(prompt_name, mode)]) for mode in MODES}
            for mode in MODES:
                print(f"{prompt_name:16} {mode:7} {median[mode]:8,.0f} {cpu_ms[mode]:11.2f}")
            for arm, base, label in (
                ("on", "off", "screen on / off"),
                ("on", "rules", "classifier on / off (rules on)"),
            ):
                # Each round's arms ran back to back: their ratio is one paired
                # measurement of the loss, and the spread of those is the noise.
                losses = sorted(
                    1 - a / b
                    for a, b in zip(rps[(prompt_name, arm)], rps[(prompt_name, base)], strict=True)
                )
                spread = f"{losses[0]:+.1%} .. {losses[-1]:+.1%}"
                ratio = median[arm] / median[base]
                print(
                    f"{'':16} {label}: throughput {ratio:.3f} (loss {1 - ratio:.1%}; "
                    f"paired per round: median {statistics.median(losses):.1%}, {spread}); "
                    f"CPU per request +{cpu_ms[arm] / cpu_ms[base] - 1:.1%}"
                )
                rows.append(
                    row(
                        f"gateway req/s, {prompt_name}: {label}",
                        f"{median[arm]:,.0f} / {median[base]:,.0f} (loss {1 - ratio:.1%}; "
                        f"paired rounds: median {statistics.median(losses):.1%}, {spread})",
                        "loss <= 10%",
                    )
                )
            rows.append(
                row(
                    f"gateway CPU ms/request, {prompt_name}: screen on / rules only / off",
                    " / ".join(f"{cpu_ms[mode]:.2f}" for mode in MODES),
                )
            )
            # The screen's own CPU per prompt, timed here between the runs: with
            # the gateway's CPU per request (off), the loss a CPU-bound gateway
            # must show — an estimate that load on a shared machine blurs less.
            screen_ms = _screen_cpu_ms(PROMPTS[prompt_name])
            cpu_off = cpu_ms["off"]
            expected = screen_ms / (cpu_off + screen_ms)
            print(
                f"{'':16} screen alone {screen_ms:.3f} ms CPU per prompt: expected loss "
                f"{expected:.1%} at {cpu_off:.2f} ms CPU per request"
            )
            in_gateway = statistics.median(inside[f"{prompt_name} on"])
            rules_in_gateway = statistics.median(inside[f"{prompt_name} rules"])
            expected_inside = in_gateway / (cpu_off + in_gateway)
            print(
                f"{'':16} screen in the gateway {in_gateway:.3f} ms CPU per prompt, "
                f"{rules_in_gateway:.3f} without the classifier (medians of "
                f"{len(inside[f'{prompt_name} on'])} calls): expected loss {expected_inside:.1%}"
            )
            rows.append(
                row(
                    f"screen CPU per prompt, {prompt_name}: alone / in the gateway (expected loss)",
                    f"{screen_ms:.3f} / {in_gateway:.3f} ms ({expected:.1%} / "
                    f"{expected_inside:.1%} of {cpu_off:.2f} ms per request); "
                    f"in the gateway without the classifier {rules_in_gateway:.3f} ms",
                    "loss <= 10%",
                )
            )
        record(
            "gateway_screen",
            rows,
            notes=f"{args.clients} connections, {args.seconds} s x {args.rounds} rotating "
            "runs per cell (on, rules only, off); medians; one machine shared with other work",
        )
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(1)
        upstream.terminate()
        upstream.wait(10)
        EmbeddedPostgres(home / "postgres").stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
