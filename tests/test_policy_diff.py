"""``bastion policy diff BASE HEAD``: a planted permission change is shown to the reviewer.

A throwaway git repository holds a copy of Bastion's policies and schema at the
same paths; each test commits a planted change and reads the diff the command
prints, as a reviewer of that pull request would.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.access.authorize import DEFAULT_POLICY_DIR, DEFAULT_SCHEMA_PATH
from bastion.cli import app

POLICIES = Path("src/bastion/access/policies")
SCHEMA = Path("src/bastion/access/schema.cedarschema")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_POLICY_DIR, tmp_path / POLICIES)
    shutil.copy(DEFAULT_SCHEMA_PATH, tmp_path / SCHEMA)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "base")
    return tmp_path


def _diff(repo: Path, *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(
        app, ["policy", "diff", "HEAD~1", "HEAD", "--repo", str(repo), *args]
    )
    return result.exit_code, result.stdout.splitlines()


def test_a_planted_grant_is_shown_and_fails_the_gate(repo: Path) -> None:
    (repo / POLICIES / "planted.cedar").write_text(
        '@id("planted.viewer-writes")\n'
        'permit (principal, action == Bastion::Action::"document:write", resource)\n'
        'when { principal.roles.contains("viewer") };\n'
    )
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "viewers may write")
    code, lines = _diff(repo, "--fail-on-gain")
    assert lines[:-1] == ["+ viewer gains document:write: — -> yes"]
    assert lines[-1] == "1 permission changes (1 gained) from HEAD~1 to HEAD"
    assert code == 1


def test_a_weakened_tenant_forbid_shows_cross_tenant_grants(repo: Path) -> None:
    tenancy = repo / POLICIES / "tenancy.cedar"
    text = tenancy.read_text()
    weakened = text.replace(
        "when { principal.tenant != resource.tenant };",
        "when { principal.tenant != resource.tenant"
        ' && action != Bastion::Action::"document:read" };',
        1,
    )
    assert weakened != text
    tenancy.write_text(weakened)
    _git(repo, "commit", "-q", "-am", "share documents")
    code, lines = _diff(repo)
    readers = ("owner", "auditor", "contributor", "viewer")  # who may read in their own tenant
    assert set(lines[:-1]) == {
        f"+ {role} gains document:read ON ANOTHER TENANT'S RESOURCE: — -> yes" for role in readers
    }
    assert code == 0  # informational without --fail-on-gain


def test_a_removed_permission_is_shown_as_a_loss(repo: Path) -> None:
    roles = repo / POLICIES / "roles.cedar"
    text = roles.read_text()
    without = text.replace('    Bastion::Action::"question:ask",\n', "", 1)
    assert without != text
    roles.write_text(without)
    _git(repo, "commit", "-q", "-am", "no more questions for someone")
    code, lines = _diff(repo, "--fail-on-gain")
    assert lines[:-1] and all(
        line.startswith("- ") and "question:ask" in line for line in lines[:-1]
    )
    assert code == 0  # losses never fail the gate


def test_no_change_prints_nothing_but_the_count(repo: Path) -> None:
    _git(repo, "commit", "-q", "--allow-empty", "-m", "nothing")
    code, lines = _diff(repo, "--fail-on-gain")
    assert (code, lines) == (0, ["0 permission changes (0 gained) from HEAD~1 to HEAD"])


def test_an_unknown_revision_is_a_clear_error(repo: Path) -> None:
    result = CliRunner().invoke(app, ["policy", "diff", "no-such-rev", "--repo", str(repo)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no-such-rev:")
