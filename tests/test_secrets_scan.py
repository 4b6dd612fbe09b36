"""``bastion secrets scan`` (issue 17, item 7): provider formats and entropy in
files and git history, the allow-list comment, SARIF 2.1.0, exit codes, and
the secret never printed. Every sample is assembled at run time (string
concatenation), so this file holds no secret and the repository stays clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

_B64 = "Zq81kQ02mMab92LqPz7Tw1HxYcVb"
# rule id -> a line holding a sample secret of that format
SAMPLES = {
    "stripe-secret-key": 'STRIPE = "' + "sk_" + "live_" + _B64 + '"',
    "stripe-webhook-secret": "webhook: " + "wh" + "sec_" + _B64,
    "openai-api-key": "OPENAI=" + "sk-" + "proj-" + _B64 + "x9Y8",
    "anthropic-api-key": "key = '" + "sk-" + "ant-api03-" + _B64 * 3 + "'",
    "aws-access-key-id": "id: " + "AK" + "IA" + "Q3EGRJ5ZLP4WNXYT",
    "aws-secret-access-key": "aws_secret_access_key = "
    + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"
    + "z9Q8w7E6r5",
    "github-token": "token " + "gh" + "p_" + _B64 + "AbCdEfGh",
    "slack-token": "SLACK=" + "xo" + "xb-" + "123456789012-" + _B64,
    "google-api-key": "maps = '" + "AI" + "za" + "Sy" + _B64 + "abcde" + "'",
    "jwt": "Authorization: Bearer "
    + "ey"
    + "JhbGciOiJIUzI1NiJ9."
    + "ey"
    + "JzdWIiOiI0MiJ9."
    + _B64,
    "high-entropy-secret": 'client_secret = "' + "9fK2mQ7xLp3RtV8wZb1NcY4dHs6J" + '"',
}
PEM = (
    "-----BEGIN "
    + "PRIVATE KEY-----\n"
    + "\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7" + _B64] * 3)
    + "\n-----END "
    + "PRIVATE KEY-----\n"
)
SECRET_LIKE = [*SAMPLES.values(), PEM]


def _bastion(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", "secrets", "scan", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("BASTION_")},
    )


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        check=True,
        capture_output=True,
    )


def _write_samples(root: Path) -> None:
    (root / "app.env").write_text("\n".join(f"# {rule}\n{line}" for rule, line in SAMPLES.items()))
    (root / "deploy").mkdir()
    (root / "deploy" / "key.pem").write_text("config:\n" + PEM)


def _rules(sarif: dict[str, object]) -> list[str]:
    run = sarif["runs"][0]  # type: ignore[index]
    return sorted(r["ruleId"] for r in run["results"])  # type: ignore[index]


# OASIS SARIF 2.1.0's own schema (from Microsoft's sarif-sdk, MIT; see tests/data/README.md).
SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text())

# The parts of the SARIF 2.1.0 schema a consumer (GitHub code scanning) relies on.
SARIF_SHAPE = {
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "version": {"const": "2.1.0"},
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["tool", "results"],
                "properties": {
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name", "rules"],
                                "properties": {
                                    "rules": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "required": ["id", "shortDescription"],
                                        },
                                    }
                                },
                            }
                        },
                    },
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["ruleId", "message", "locations"],
                            "properties": {
                                "message": {"type": "object", "required": ["text"]},
                                "locations": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["physicalLocation"],
                                        "properties": {
                                            "physicalLocation": {
                                                "type": "object",
                                                "required": ["artifactLocation", "region"],
                                                "properties": {
                                                    "artifactLocation": {
                                                        "type": "object",
                                                        "required": ["uri"],
                                                    },
                                                    "region": {
                                                        "type": "object",
                                                        "required": ["startLine", "startColumn"],
                                                        "properties": {
                                                            "startLine": {
                                                                "type": "integer",
                                                                "minimum": 1,
                                                            },
                                                            "startColumn": {
                                                                "type": "integer",
                                                                "minimum": 1,
                                                            },
                                                        },
                                                    },
                                                },
                                            }
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_every_format_found_in_files_with_sarif(tmp_path: Path) -> None:
    _write_samples(tmp_path)
    result = _bastion(".", "--sarif", "out/scan.sarif", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    sarif = json.loads((tmp_path / "out" / "scan.sarif").read_text())
    jsonschema.validate(sarif, SARIF_SHAPE)
    jsonschema.Draft202012Validator(SARIF_SCHEMA).validate(sarif)
    assert _rules(sarif) == sorted([*SAMPLES, "private-key"])
    driver_rules = {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]}
    assert set(_rules(sarif)) <= driver_rules
    # Each location points at the secret: line and column of its first character.
    lines = (tmp_path / "app.env").read_text().split("\n")
    for res in sarif["runs"][0]["results"]:
        place = res["locations"][0]["physicalLocation"]
        if place["artifactLocation"]["uri"] == "deploy/key.pem":
            assert place["region"]["startLine"] == 2
            continue
        line = lines[place["region"]["startLine"] - 1]
        assert lines[place["region"]["startLine"] - 2] == f"# {res['ruleId']}"
        assert place["region"]["startColumn"] > line.find("=") if "=" in line else True
    _assert_never_shown(result, tmp_path / "out" / "scan.sarif")


def _assert_never_shown(result: subprocess.CompletedProcess[str], sarif: Path) -> None:
    shown = result.stdout + result.stderr + sarif.read_text()
    for line in SECRET_LIKE:
        for token in line.replace("'", " ").replace('"', " ").split():
            if len(token) >= 16:  # each secret's body (names and prefixes are shorter)
                assert token not in shown


def test_every_format_found_in_git_history(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _write_samples(repo)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "oops")
    # Removed again: the secrets live on only in history.
    (repo / "app.env").unlink()
    (repo / "deploy" / "key.pem").write_text("config:\n")
    _git(repo, "commit", "-qam", "remove")
    result = _bastion(str(repo), "--sarif", str(tmp_path / "h.sarif"), cwd=tmp_path)
    assert result.returncode == 1
    sarif = json.loads((tmp_path / "h.sarif").read_text())
    jsonschema.validate(sarif, SARIF_SHAPE)
    jsonschema.Draft202012Validator(SARIF_SCHEMA).validate(sarif)
    assert _rules(sarif) == sorted([*SAMPLES, "private-key"])
    commits = {r["properties"]["commit"] for r in sarif["runs"][0]["results"]}
    assert len(commits) == 1 and len(commits.pop()) == 40
    by_rule = {r["ruleId"]: r for r in sarif["runs"][0]["results"]}
    region = by_rule["private-key"]["locations"][0]["physicalLocation"]["region"]
    assert region["startLine"] == 2  # the line in the commit's version of the file
    _assert_never_shown(result, tmp_path / "h.sarif")
    # Without history the tree is clean.
    assert _bastion(str(repo), "--no-history", cwd=tmp_path).returncode == 0


def test_allow_list_comment_and_file(tmp_path: Path) -> None:
    line = SAMPLES["stripe-secret-key"]
    (tmp_path / "a.py").write_text(f"{line}  # bastion: allow-secret (Stripe's docs example)\n")
    assert _bastion(".", cwd=tmp_path).returncode == 0
    (tmp_path / "b.py").write_text(SAMPLES["github-token"] + "\n")
    found = _bastion(".", cwd=tmp_path)
    assert found.returncode == 1
    fingerprint = found.stdout.split("fingerprint ")[1].split()[0]
    (tmp_path / ".bastion-secrets-allow").write_text(f"{fingerprint}\n")
    no_reason = _bastion(".", cwd=tmp_path)
    assert no_reason.returncode == 1 and "expected 'FINGERPRINT reason'" in no_reason.stderr
    (tmp_path / ".bastion-secrets-allow").write_text(f"{fingerprint} a test fixture\n")
    assert _bastion(".", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("clean", [True, False])
def test_exit_codes(tmp_path: Path, clean: bool) -> None:
    (tmp_path / "settings.toml").write_text(
        'stripe_ref = "local://billing/stripe"\n' if clean else SAMPLES["openai-api-key"] + "\n"
    )
    result = _bastion("settings.toml", cwd=tmp_path)
    assert result.returncode == (0 if clean else 1)
    missing = _bastion("no-such-dir", cwd=tmp_path)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_this_repository_is_clean() -> None:
    """What `make lint` runs: the repo and its history hold no unallowed secret."""
    root = Path(__file__).resolve().parents[1]
    result = _bastion(".", cwd=root)
    assert result.returncode == 0, result.stdout
