"""``bastion check repo``: every lint fires on a crafted bad project, stays silent on
a good one and on Bastion's own repository, and its SARIF is valid SARIF 2.1.0.

The bad project's risky lines are assembled at run time, so this file itself
stays clean for the repository's own check.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
from typer.testing import CliRunner, Result

from bastion.check.repo import RULES
from bastion.cli import app

SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text())
ROOT = Path(__file__).parents[1]
OFF = "Fal" + "se"  # assembled: see the module docstring
PR = "github.event.pull_request"
CREDENTIALS = "allow_credentials=" + "True"
PUBLIC = "NEXT_" + "PUBLIC_"

BAD = {
    "app/settings.py": f"DEBUG = True\nimport httpx\nhttpx.get('https://x', verify={OFF})\n",
    "app/main.py": (
        "from fastapi.middleware.cors import CORSMiddleware\n"
        f"app.add_middleware(CORSMiddleware, allow_origins=['*'], {CREDENTIALS})\n"
    ),
    "web/.env.local": f"{PUBLIC}SUPABASE_SERVICE_ROLE_KEY=ref-only\n",
    "web/.env.example": "NEXT_PUBLIC_SITE_URL=\n",
    ".github/workflows/triage.yml": (
        "on: pull_request_target\n"
        "permissions: write-all\n"
        "jobs:\n"
        "  triage:\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "        with:\n"
        f"          ref: ${{{{ {PR}.head.sha }}}}\n"
        f'      - run: echo "${{{{ {PR}.title }}}}"\n'
    ),
    "deploy/key.txt": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc" + "\n",
}
EXPECTED = {
    ("debug-enabled", "app/settings.py:1"),
    ("tls-verification-disabled", "app/settings.py:3"),
    ("cors-any-origin-with-credentials", "app/main.py:2"),
    ("env-file-committed", "web/.env.local:1"),
    ("secret-exposed-to-client", "web/.env.local:1"),
    ("workflow-pr-target-checkout", ".github/workflows/triage.yml:9"),
    ("workflow-untrusted-input-in-run", ".github/workflows/triage.yml:10"),
    ("workflow-unpinned-action", ".github/workflows/triage.yml:7"),
    ("workflow-write-all", ".github/workflows/triage.yml:2"),
    ("secret-in-repo", "deploy/key.txt:1"),
}

GOOD_WORKFLOW = (
    "on: pull_request\n"
    "permissions:\n  contents: read\n"
    "jobs:\n"
    "  test:\n"
    "    runs-on: ubuntu-latest\n"
    "    steps:\n"
    "      - uses: actions/checkout@" + "0" * 40 + "  # v4\n"
    "      - env:\n"
    f"          TITLE: ${{{{ {PR}.title }}}}\n"
    '        run: echo "$TITLE"\n'
)


def _project(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def _check(path: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["check", "repo", str(path), *args])


def test_every_lint_fires_on_a_crafted_bad_project(tmp_path: Path) -> None:
    result = _check(_project(tmp_path, BAD), "--format", "json")
    assert result.exit_code == 1, result.output
    found = {(f["rule"], f["subject"]) for f in json.loads(result.stdout)}
    assert found == EXPECTED, (found - EXPECTED, EXPECTED - found)
    assert {rule for rule, _ in EXPECTED} == set(RULES)  # no lint left untested
    assert "4eC39Hq" not in result.output  # the secret itself is never printed


def test_a_good_project_passes(tmp_path: Path) -> None:
    good = {
        ".github/workflows/test.yml": GOOD_WORKFLOW,
        "app/settings.py": "DEBUG = False\n",
        ".env.example": "DATABASE_URL=\n",
    }
    result = _check(_project(tmp_path, good))
    assert result.exit_code == 0, result.output


def test_the_sarif_log_is_valid_sarif_2_1_0(tmp_path: Path) -> None:
    out = tmp_path / "repo.sarif"
    result = _check(_project(tmp_path / "p", BAD), "--format", "sarif", "--out", str(out))
    assert result.exit_code == 1
    log = json.loads(out.read_text())
    jsonschema.Draft202012Validator(SARIF_SCHEMA).validate(log)
    places = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in log["runs"][0]["results"]
    }
    assert places == {subject.split(":")[0] for _, subject in EXPECTED}


def test_bastions_own_repository_passes() -> None:
    result = _check(ROOT, "--no-history")
    assert result.exit_code == 0, result.output
