"""Benchmark: a tenant-scoped point select through ``tenant_tx`` (signed context,
RLS) against the same select without RLS, on the same pool, in one run.

Run: .venv/bin/python bench/rls_select.py [--rows N] [--iterations N]

Three variants, interleaved round by round so machine noise hits all alike:
  rls_tx    tenant_tx(...) + SELECT ... WHERE id = $1 on bastion.documents (RLS, FORCE)
  plain_tx  BEGIN + the same SELECT on an identical table without RLS + COMMIT
  bare      the same SELECT without RLS, autocommit (one round trip)
Target (issue 2): rls_tx / plain_tx <= 1.3. Prints medians and ratios.
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

import psycopg

from _record import record, row
from bastion.db.launcher import EmbeddedPostgres
from bastion.db.pool import Database
from bastion.db.provision import Target, provision
from bastion.secrets.store import LocalKeystore


async def run(rows: int, iterations: int) -> None:
    parent = Path(tempfile.mkdtemp(prefix="bastion-bench-", dir="/tmp"))
    parent.chmod(0o711)
    server = EmbeddedPostgres(parent / "pg")
    try:
        info = server.start()
        keystore = LocalKeystore(parent / "keys" / "keystore.bin", parent / "keys" / "master.key")
        target = Target(info.conninfo(), "bench", True, "bench")
        creds = provision(target, keystore)
        tenants = [uuid.uuid4() for _ in range(2)]
        # Seeding as the superuser, which RLS does not apply to.
        with psycopg.connect(target.admin_conninfo_on_db(), autocommit=True) as conn:
            for i, tenant in enumerate(tenants):
                conn.execute(
                    "INSERT INTO bastion.tenants (id, slug, name) VALUES (%s, %s, 'bench')",
                    (tenant, f"bench-{i}"),
                )
                conn.execute(
                    "INSERT INTO bastion.documents (tenant_id, title) "
                    "SELECT %s, 'ticket ' || g || repeat('x', 200) FROM generate_series(1, %s) g",
                    (tenant, rows),
                )
            conn.execute("CREATE SCHEMA bench")
            conn.execute("CREATE TABLE bench.documents AS SELECT * FROM bastion.documents")
            conn.execute("ALTER TABLE bench.documents ADD PRIMARY KEY (id)")
            conn.execute("GRANT USAGE ON SCHEMA bench TO bastion_app")
            conn.execute("GRANT SELECT ON bench.documents TO bastion_app")
            conn.execute("ANALYZE")
            ids = [
                (r[0], r[1])
                for r in conn.execute(
                    "SELECT id, tenant_id FROM bastion.documents WHERE tenant_id = %s",
                    (tenants[0],),
                ).fetchall()
            ]
        db = Database(creds.conninfo, creds.context_key, min_size=1, max_size=1)
        await db.open()
        query = "SELECT id, title FROM {} WHERE id = %s"
        rls_q, plain_q = query.format("bastion.documents"), query.format("bench.documents")

        async def rls_tx(doc: uuid.UUID, tenant: uuid.UUID) -> None:
            async with db.tenant_tx(tenant, None, "viewer") as tx:
                row = await (await tx.execute(rls_q, (doc,))).fetchone()
                assert row is not None

        async def plain_tx(doc: uuid.UUID, _tenant: uuid.UUID) -> None:
            async with db.pool.connection() as conn, conn.transaction():
                row = await (await conn.execute(plain_q, (doc,))).fetchone()
                assert row is not None

        async def bare(doc: uuid.UUID, _tenant: uuid.UUID) -> None:
            async with db.pool.connection() as conn:
                row = await (await conn.execute(plain_q, (doc,))).fetchone()
                assert row is not None

        variants = {"rls_tx": rls_tx, "plain_tx": plain_tx, "bare": bare}
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for fn in variants.values():  # warm-up: prepared statements, caches
            for doc, tenant in ids[:200]:
                await fn(doc, tenant)
        for _ in range(iterations):
            doc, tenant = random.choice(ids)
            for name in random.sample(list(variants), len(variants)):
                t0 = time.perf_counter()
                await variants[name](doc, tenant)
                samples[name].append(time.perf_counter() - t0)
        await db.close()
        medians = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
        print(
            f"{rows} rows per tenant x 2 tenants, {iterations} selects per variant, one connection"
        )
        for name, value in medians.items():
            p99 = statistics.quantiles(samples[name], n=100)[98] * 1e6
            print(f"  {name:9s} median {value:7.1f} us   p99 {p99:7.1f} us")
        ratio = medians["rls_tx"] / medians["plain_tx"]
        print(f"  ratio rls_tx / plain_tx = {ratio:.2f}  (target <= 1.3)")
        print(f"  ratio rls_tx / bare     = {medians['rls_tx'] / medians['bare']:.2f}")
        record(
            "rls_select",
            [
                *(
                    row(f"point select, {name}", f"median {value:.1f} µs")
                    for name, value in medians.items()
                ),
                row("ratio rls_tx / plain_tx", f"{ratio:.2f}x", "≤ 1.3x"),
            ],
            notes=f"{rows} rows per tenant x 2 tenants, {iterations} selects per variant, "
            "one connection. rls_tx: tenant_tx (signed context, RLS); plain_tx: the same "
            "select in a plain transaction; bare: no transaction.",
        )
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.iterations))


if __name__ == "__main__":
    main()
