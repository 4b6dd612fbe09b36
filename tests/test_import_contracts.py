"""The import contracts of pyproject.toml hold, and they catch a planted violation.

`lint-imports` is import-linter's command (what `make lint` runs). The planted
runs copy src/bastion to a temporary tree, add one forbidden import and check
the same contracts against that copy (it comes first on PYTHONPATH).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run lint-imports with the repository's contracts on the package in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "NO_COLOR": "1"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml"), *extra],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _planted(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of src/ where ``module`` (a path under bastion/) also has ``line``;
    a module ``line`` imports that does not exist yet is created (empty)."""
    tree = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "bastion", tree / "bastion")
    target = tree / "bastion" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    imported = tree / (line.split()[1].replace(".", "/") + ".py")
    if not imported.exists():
        imported.write_text('"""Planted."""\n')
    return tree


def test_the_real_tree_keeps_every_contract() -> None:
    result = _lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "reported"),
    [
        # A domain service reaching for the web framework.
        (
            "knowledge/service.py",
            "import fastapi  # noqa",
            "framework-free",
            "bastion.knowledge is not allowed to import fastapi",
        ),
        # The database layer importing a domain.
        (
            "db/pool.py",
            "import bastion.billing.service  # noqa",
            "layers",
            "bastion.db is not allowed to import bastion.billing",
        ),
        # Access control reaching back into identity, which builds on it: a cycle.
        (
            "access/authorize.py",
            "import bastion.identity.mfa  # noqa",
            "no-cycles",
            "No cycles are allowed in bastion",
        ),
        # A domain reaching past another domain's public surface, into a module
        # that domain keeps to itself (the knowledge base's chunker).
        (
            "gateway/service.py",
            "import bastion.knowledge.chunks  # noqa",
            "surface-knowledge",
            "bastion.gateway.service -> bastion.knowledge.chunks",
        ),
        # ...and a newly added module is private until its domain lists it.
        (
            "billing/plans.py",
            "import bastion.safety.new_detector  # noqa",
            "surface-safety",
            "bastion.billing.plans -> bastion.safety.new_detector",
        ),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, reported: str
) -> None:
    result = _lint_imports(_planted(tmp_path, module, line), "--contract", contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 broken" in result.stdout
    assert reported in " ".join(result.stdout.split())


def test_context_variables_hold_only_logging_and_tracing_context() -> None:
    """Per-call state travels in explicit objects (the gateway's CallContext, the
    hooks' HookRun); a ContextVar is left only for what logs and traces read."""
    allowed = {"telemetry/tracing.py"}
    found = {
        str(path.relative_to(ROOT / "src" / "bastion"))
        for path in (ROOT / "src" / "bastion").rglob("*.py")
        if "ContextVar(" in path.read_text(encoding="utf-8")
    }
    assert found <= allowed, sorted(found - allowed)
