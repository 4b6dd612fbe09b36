"""The project's own pipeline (issue 21, item 4), checked statically: no docker
daemon or GitHub runner is needed. The workflow passes ``bastion check repo``
and grants least permissions, the Dockerfile builds a non-root image from a
pinned base with no secret, and CODEOWNERS gates the security-relevant paths."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bastion.check.repo import check_repository

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def _workflow() -> dict[Any, Any]:
    document = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(document, dict)
    return document


def test_the_workflow_passes_bastion_check_repo(tmp_path: Path) -> None:
    shutil.copytree(ROOT / ".github", tmp_path / ".github")
    assert check_repository(tmp_path, history=False) == []


def test_every_job_holds_the_least_permissions_and_every_action_is_pinned() -> None:
    document = _workflow()
    assert document["permissions"] == {}  # nothing unless a job asks
    allowed = {"contents": "read", "id-token": "write"}
    for name, job in document["jobs"].items():
        permissions = job["permissions"]
        assert permissions.get("contents") == "read", name
        assert set(permissions.items()) <= set(allowed.items()), name
        # Only the release job, which signs keyless with Sigstore, gets an OIDC token.
        assert ("id-token" in permissions) == (name == "release"), name
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step
                assert step.get("with", {}).get("persist-credentials", False) is False
    text = WORKFLOW.read_text()
    for uses in re.findall(r"uses: (\S+)", text):
        assert re.search(re.escape(uses) + r" # v\d+\.\d+\.\d+", text), uses


def test_the_workflow_runs_every_step_the_issue_names() -> None:
    text = WORKFLOW.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("lint", "ci-tests", "ci-sast", "ci-audit", "ci-check", "ci-release"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "sigstore sign" in text and "sigstore verify github" in text
    assert 'bastion policy diff "origin/$BASE_REF" HEAD' in text
    # `make test` runs every test: the parallel part and, alone, the serial one.
    test_recipe = re.search(r"^test: lint\n((?:\t.*\n)+)", makefile, re.M)
    assert test_recipe is not None
    assert test_recipe.group(1).splitlines() == [
        '\t$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial"',
        "\t$(BIN)/pytest -q -m serial",
    ]
    release = (ROOT / ".ci" / "release").read_text()
    for step in (
        'cyclonedx-py" environment',
        'cyclonedx-py" requirements',
        "docker build",
        "release sign ",
        "release sign-digest",
        "release verify",
    ):
        assert step in release


def _stages(dockerfile: str) -> list[list[str]]:
    stages: list[list[str]] = []
    logical = re.sub(r"\\\n", " ", dockerfile)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_the_dockerfile_builds_a_slim_non_root_image_from_a_pinned_base() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.11-slim-\w+@sha256:[0-9a-f]{64}", base.group(1))
    stages = _stages(dockerfile)
    assert len(stages) == 2 and all(
        s[0] == "FROM ${PYTHON_IMAGE} AS " + n
        for s, n in zip(stages, ("builder", "runtime"), strict=True)
    )
    runtime = stages[-1]
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d{3,}:[1-9]\d{3,}", users[-1])  # numeric, not root
    assert any(line.startswith("COPY --from=builder /opt/bastion") for line in runtime)
    assert not any("pip wheel" in line or "COPY src" in line for line in runtime)  # built before
    for line in (line for stage in stages for line in stage):
        instruction = line.split()[0].upper()
        assert instruction not in {"ADD", "HEALTHCHECK"}, line
        if instruction in {"ENV", "ARG"}:
            assert not re.search(r"(?i)secret|password|token|api_key|private", line), line
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # deny by default: no .env, .git, build output or keys
    assert "**/.env" in ignore


def test_codeowners_gates_policies_schema_migrations_and_deploy() -> None:
    owners = {
        line.split()[0]: line.split()[1:]
        for line in (ROOT / ".github" / "CODEOWNERS").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in (
        "/src/bastion/access/policies/",
        "/src/bastion/access/schema.cedarschema",
        "/src/bastion/db/migrations/",
        "/deploy/",
    ):
        assert owners.get(path) and all(o.startswith("@") for o in owners[path]), path


def test_the_column_spliced_into_the_customer_binding_sql_is_checked_even_under_python_O() -> None:
    """A bandit finding fixed (B101 next to B608): the check that guarded the
    column name composed into SQL was an assert, which ``python -O`` strips."""
    probe = (
        "import asyncio\n"
        "from bastion.billing.service import BillingService\n"
        "service = BillingService.__new__(BillingService)\n"
        "try:\n"
        "    asyncio.run(service._bind(None, 'plan_code = NULL --', 'x', actor='t'))\n"
        "except ValueError:\n"
        "    print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-O", "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "refused", done.stderr[-500:]
