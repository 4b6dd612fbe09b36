"""Benchmark: the audit hash chain — verifying a large trail, and what the chain costs a write.

Run: .venv/bin/python bench/audit_chain.py [--events N] [--tenants N] [--commits N]

On a throwaway embedded PostgreSQL, provisioned as in production:
  verify   ``N`` events (default 1,000,000) over ``--tenants`` tenants, written
           through the real insert trigger (so every link is real) by set-based
           ``INSERT ... SELECT generate_series`` as the superuser, in batches;
           one signed checkpoint; then the timed part only: the code behind
           ``bastion audit verify`` (:func:`bastion.audit.verify.verify_trail`,
           the app role reading every tenant's trail in pages and checking every
           link in Python) against the exported checkpoints. Target ≤ 10 s.
  commit   the chain's added cost per event at commit: one event per transaction
           through ``Database.tenant_tx`` + ``audit.record`` (as the app writes
           them), with the insert trigger hashing (as migrated) and with a copy
           of it that only assigns ``seq`` (the trigger before migration 0031),
           swapped in by ``CREATE OR REPLACE`` round by round so machine noise
           hits both alike. Medians; target: on - off ≤ 0.2 ms. Also the
           trigger's server-side cost per row in a set-based insert (which
           sends no JCS text: the database serialises ``details`` itself).
Measured on a shared, loaded 2-core machine: figures are upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _record import record, row  # noqa: E402
from bastion import audit  # noqa: E402
from bastion.audit.checkpoints import (  # noqa: E402
    AuditKeys,
    Checkpointer,
    DirectorySink,
    read_history,
)
from bastion.audit.verify import verify_trail  # noqa: E402
from bastion.db.launcher import EmbeddedPostgres  # noqa: E402
from bastion.db.pool import Database  # noqa: E402
from bastion.db.provision import Target, provision  # noqa: E402
from bastion.secrets.store import LocalKeystore  # noqa: E402

BATCH = 500
# The insert trigger without the chain: seq only, as before migration 0031.
WITHOUT_CHAIN = """
CREATE OR REPLACE FUNCTION bastion_private.audit_assign_seq() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.at := now();
    INSERT INTO bastion.audit_heads AS h (tenant_id, seq) VALUES (NEW.tenant_id, 1)
    ON CONFLICT (tenant_id) DO UPDATE SET seq = h.seq + 1
    RETURNING h.seq INTO NEW.seq;
    NEW.details_jcs := NULL;  -- the writer's JCS text (0038), unused without a chain
    RETURN NEW;
END $$
"""
INSERT_BATCH = (
    "INSERT INTO bastion.audit_events (tenant_id, actor, action, target, details, request_id) "
    "SELECT %s, 'user:' || (g %% 50), 'document.write', 'doc:' || g, "
    "jsonb_build_object('bytes', g * 7, 'namespace', 'support', 'ok', true), "
    "'req-' || g FROM generate_series(1, %s) AS g"
)


def _chain_trigger(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    found = conn.execute(
        "SELECT pg_get_functiondef('bastion_private.audit_assign_seq()'::regprocedure)"
    ).fetchone()
    assert found is not None
    return str(found[0])


def _tenants(
    conn: psycopg.Connection[tuple[object, ...]], count: int, prefix: str
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    for i, tenant in enumerate(ids):
        conn.execute(
            "INSERT INTO bastion.tenants (id, slug, name) VALUES (%s, %s, 'bench')",
            (tenant, f"{prefix}-{i}"),
        )
    return ids


def _fill(
    conn: psycopg.Connection[tuple[object, ...]], tenants: list[uuid.UUID], events: int
) -> float:
    """Write ``events`` chained events over ``tenants``; return the seconds it took."""
    started = time.perf_counter()
    per_tenant = events // len(tenants)
    # The trigger (as the tables' owner) needs a tenant context to move a head;
    # the superuser filling a throwaway database lifts that for the fill only.
    conn.execute("ALTER TABLE bastion.audit_heads NO FORCE ROW LEVEL SECURITY")
    for tenant in tenants:
        left = per_tenant
        while left > 0:
            step = min(BATCH, left)
            with conn.transaction():
                conn.execute(INSERT_BATCH, (tenant, step))
            left -= step
    conn.execute("ALTER TABLE bastion.audit_heads FORCE ROW LEVEL SECURITY")
    return time.perf_counter() - started


async def _verify(
    db: Database, keystore: LocalKeystore, sink: DirectorySink, events: int
) -> list[float]:
    keys = AuditKeys(keystore)
    assert await Checkpointer(db, keys, sink).run_once(force=True) is not None
    timings: list[float] = []
    for _ in range(3):
        started = time.perf_counter()
        history = read_history(sink, keys.public_key)
        report = await verify_trail(db, history)
        timings.append(time.perf_counter() - started)
        assert report.intact, report.as_dict()
        assert report.events >= events, report.events
    return timings


async def _commits(
    db: Database,
    admin: psycopg.Connection[tuple[object, ...]],
    tenant: uuid.UUID,
    with_chain: str,
    commits: int,
    rounds: int,
) -> dict[str, list[float]]:
    """One event per transaction, interleaved round by round: ``on`` (the
    chain, as migrated) and ``off`` (no chain): their difference is its cost."""
    variants = {"on": with_chain, "off": WITHOUT_CHAIN}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for variant, definition in variants.items():
                admin.execute(definition)
                for i in range(commits):
                    started = time.perf_counter()
                    async with db.tenant_tx(tenant, None, "system") as tx:
                        await audit.record(
                            tx,
                            actor="user:1",
                            action="document.write",
                            target=f"doc:{i}",
                            details={"bytes": i, "namespace": "support"},
                            request_id=f"req-{i}",
                        )
                    samples[variant].append(time.perf_counter() - started)
    finally:
        admin.execute(with_chain)
    return samples


def _per_row(
    admin: psycopg.Connection[tuple[object, ...]], tenant: uuid.UUID, with_chain: str, rounds: int
) -> dict[str, list[float]]:
    """Server-side trigger cost per row: a set-based insert of 500 events, on and off."""
    rows = 500
    samples: dict[str, list[float]] = {"on": [], "off": []}
    admin.execute("ALTER TABLE bastion.audit_heads NO FORCE ROW LEVEL SECURITY")
    for _ in range(rounds):
        for variant, definition in (("on", with_chain), ("off", WITHOUT_CHAIN)):
            admin.execute(definition)
            started = time.perf_counter()
            with admin.transaction():
                admin.execute(INSERT_BATCH, (tenant, rows))
            samples[variant].append((time.perf_counter() - started) / rows)
    admin.execute(with_chain)
    return samples


async def run(events: int, tenants: int, commits: int, rounds: int) -> None:
    parent = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    parent.chmod(0o711)
    server = EmbeddedPostgres(parent / "pg")
    try:
        info = server.start()
        keystore = LocalKeystore(parent / "keys" / "keystore.bin", parent / "keys" / "master.key")
        target = Target(info.conninfo(), "bench", True, "bench")
        creds = provision(target, keystore)
        sink = DirectorySink(parent / "audit-sink")
        with psycopg.connect(target.admin_conninfo_on_db(), autocommit=True) as admin:
            with_chain = _chain_trigger(admin)
            print(f"writing {events:,} chained events over {tenants} tenants ...", flush=True)
            filled = _fill(admin, _tenants(admin, tenants, "verify"), events)
            print(f"  written in {filled:.1f} s ({events / filled:,.0f} events/s, set-based)")
            admin.execute("VACUUM ANALYZE bastion.audit_events")
            (commit_tenant,) = _tenants(admin, 1, "commit")
            async with Database(creds.conninfo, creds.context_key, min_size=1, max_size=1) as db:
                verify_s = await _verify(db, keystore, sink, events)
                print(
                    f"verify: {events:,} events, median {statistics.median(verify_s):.2f} s "
                    f"(runs: {', '.join(f'{t:.2f}' for t in verify_s)})"
                )
                commit = await _commits(db, admin, commit_tenant, with_chain, commits, rounds)
            per_row = _per_row(admin, commit_tenant, with_chain, rounds)
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)

    on, off = (statistics.median(commit[v]) * 1e3 for v in ("on", "off"))
    row_on, row_off = (statistics.median(per_row[v]) * 1e3 for v in ("on", "off"))
    verify_median = statistics.median(verify_s)
    print(f"commit, one event per transaction ({commits} x {rounds} rounds each, interleaved):")
    print(f"  chain on   median {on:.3f} ms")
    print(f"  chain off  median {off:.3f} ms")
    print(f"  added      {on - off:+.3f} ms per event  (ratio {on / off:.2f})")
    print("trigger, server side per row in a set-based insert:")
    print(f"  chain on {row_on:.4f} ms  off {row_off:.4f} ms  added {row_on - row_off:+.4f} ms")
    scale = f"{events:,} events"
    if events < 1_000_000:
        scale += f" (1 M extrapolated: {verify_median * 1_000_000 / events:.1f} s)"
    record(
        "audit_chain",
        [
            row(f"audit verify, {scale}", f"{verify_median:.2f} s", "≤ 10 s for 1 M"),
            row("verify throughput", f"{events / verify_median:,.0f} events/s"),
            row(
                "chain's added cost per event at commit (median, on - off)",
                f"{on - off:+.3f} ms ({on:.3f} vs {off:.3f} ms)",
                "≤ 0.2 ms",
            ),
            row(
                "trigger cost per row, set-based insert (on - off)",
                f"{row_on - row_off:+.4f} ms ({row_on:.4f} vs {row_off:.4f} ms)",
            ),
        ],
        notes="Shared, loaded 2-core machine (other engineers' test runs alongside): "
        "figures are upper bounds. On/off measured side by side in one run, interleaved.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--commits", type=int, default=200, help="per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.events, args.tenants, args.commits, args.rounds))


if __name__ == "__main__":
    main()
