"""``bastion demo`` end to end: it starts what it needs, checks, reports, stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from bastion.db.launcher import EmbeddedPostgres
from tests.conftest import short_tempdir


def test_demo_passes_and_stops_what_it_started() -> None:
    home = short_tempdir("bastion-demo-")
    try:
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(BASTION_HOME=str(home), COLUMNS="160")
        result = subprocess.run(
            [sys.executable, "-m", "bastion", "demo"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "FAIL" not in result.stdout
        assert "checks passed" in result.stdout
        for phrase in (
            "acme-support viewer sees only own tickets",
            "injected set_config",
            "query with no tenant set",
        ):
            assert phrase in result.stdout
        assert EmbeddedPostgres(home / "postgres").status() is None
    finally:
        # The key ring, the master key and the audit checkpoints live beside the
        # home, never in it (docs/operations.md): remove them too.
        for path in (
            home,
            *(home.with_name(home.name + s) for s in ("-keys", "-master", "-audit")),
        ):
            shutil.rmtree(path, ignore_errors=True)
