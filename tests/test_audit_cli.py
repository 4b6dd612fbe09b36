"""``bastion audit verify|export|checkpoint`` run as real processes on a test database.

The operator's view of the chain: ``checkpoint`` signs and exports to the
sink directory, ``verify`` exits 0 on an intact trail and 2 (with a JSON
report naming the finding) once the database superuser has rewritten an
event with triggers off, and ``export`` writes one JSON line per event with
the hashes the database holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest

from bastion import audit
from bastion.audit.chain import ChainRow, link_holds
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles, short_tempdir

pytestmark = pytest.mark.anyio


def _bastion(
    database: DbHandles, keystore: LocalKeystore, sink: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BASTION_HOME": str(short_tempdir("bastion-cli-")),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_AUDIT_CHECKPOINT_DIR": str(sink),
        "BASTION_LOG_LEVEL": "warning",
    }
    return subprocess.run(
        [sys.executable, "-m", "bastion", "audit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _tenant(db: Database, events: int) -> UUID:
    tenant = (await TenantService(db).create_tenant(f"acli-{uuid4().hex[:8]}", "cli")).id
    async with db.tenant_tx(tenant, None, "system") as tx:
        for i in range(events):
            await audit.record(
                tx, actor="user:1", action="doc.write", target=f"doc:{i}", details={"n": i}
            )
    return tenant


async def test_verify_exits_0_when_intact_and_2_when_the_superuser_rewrote_an_event(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    tenant = await _tenant(db, 4)
    sink = short_tempdir("bastion-audit-sink-")
    signed = _bastion(database, keystore, sink, "checkpoint")
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("checkpoint ")
    assert sorted(p.name for p in sink.glob("checkpoint-*.json"))

    intact = _bastion(database, keystore, sink, "verify")
    assert intact.returncode == 0, intact.stdout + intact.stderr
    report = json.loads(intact.stdout)
    assert report["intact"] is True and report["findings"] == [] and report["events"] >= 5

    with psycopg.connect(database.superuser, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # triggers off
        conn.execute(
            "UPDATE bastion.audit_events SET target = 'doc:forged' "
            "WHERE tenant_id = %s AND seq = 3",
            (tenant,),
        )
    tampered = _bastion(database, keystore, sink, "verify", "--tenant", str(tenant))
    assert tampered.returncode == 2, tampered.stdout + tampered.stderr
    report = json.loads(tampered.stdout)
    assert report["intact"] is False
    assert [(f["kind"], f["seq"]) for f in report["findings"]] == [("altered", 3)]
    # The whole database: the same finding, still exit 2.
    assert _bastion(database, keystore, sink, "verify").returncode == 2


async def test_export_writes_one_json_line_per_event_with_its_hashes(
    db: Database, database: DbHandles, keystore: LocalKeystore
) -> None:
    tenant = await _tenant(db, 3)
    sink = short_tempdir("bastion-audit-sink-")
    out = short_tempdir("bastion-export-") / "events.jsonl"
    done = _bastion(database, keystore, sink, "export", "--tenant", str(tenant), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    with psycopg.connect(database.superuser) as conn:
        stored = conn.execute(
            "SELECT seq, action, target, encode(prev_hash, 'hex'), encode(hash, 'hex') "
            "FROM bastion.audit_events WHERE tenant_id = %s ORDER BY seq",
            (tenant,),
        ).fetchall()
    assert [(r["seq"], r["action"], r["target"], r["prev_hash"], r["hash"]) for r in records] == [
        tuple(row) for row in stored
    ]
    assert done.stderr.strip().endswith(f"exported {len(stored)} events")
    # Each line carries what a SIEM needs to recheck its link on its own.
    for r in records:
        assert r["tenant_id"] == str(tenant)
        row = ChainRow(
            r["seq"],
            r["at_us"],
            r["actor"],
            r["action"],
            r["target"],
            r["details"],
            r["request_id"],
            bytes.fromhex(r["prev_hash"]),
            bytes.fromhex(r["hash"]),
        )
        assert link_holds(str(tenant), row)
    # To stdout by default: the same lines.
    streamed = _bastion(database, keystore, sink, "export", "--tenant", str(tenant))
    assert streamed.returncode == 0 and streamed.stdout.splitlines() == lines
