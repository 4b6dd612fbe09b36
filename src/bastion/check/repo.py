"""``bastion check repo``: what a generated app's repository most often gets wrong.

Secrets in the files or the git history (:mod:`bastion.secrets.scan`, with its
allow-list), committed ``.env`` files, secrets handed to the browser through a
public env prefix, dangerous defaults in code, and GitHub Actions workflows
open to the known attacks (GitHub's "Security hardening for GitHub Actions":
untrusted input in ``run:``, ``pull_request_target`` running the PR's code,
actions not pinned to a commit, write-all tokens).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from bastion.check.findings import Finding, Rule
from bastion.secrets.scan import project_files, read_text_file, scan

RULES = {
    r.id: r
    for r in (
        Rule(
            "secret-in-repo",
            "error",
            "A secret is in a file or in the git history",
            "Revoke it at its provider, then remove it (history too) and load it by reference.",
        ),
        Rule(
            "env-file-committed",
            "error",
            "An .env file is tracked by git",
            "git rm --cached it, add it to .gitignore, keep an .env.example without values.",
        ),
        Rule(
            "secret-exposed-to-client",
            "error",
            "A secret-looking variable has a prefix that bundlers ship to the browser",
            "Keep it server-side: drop the NEXT_PUBLIC_/VITE_/REACT_APP_/EXPO_PUBLIC_ prefix.",
        ),
        Rule(
            "tls-verification-disabled",
            "error",
            "TLS certificate verification is turned off",
            "Turn verification back on and trust the right CA instead.",
        ),
        Rule(
            "cors-any-origin-with-credentials",
            "error",
            "CORS allows any origin together with credentials",
            "List the app's origins explicitly.",
        ),
        Rule(
            "debug-enabled",
            "warning",
            "A debug mode is switched on in code",
            "Drive debug from configuration that defaults to off.",
        ),
        Rule(
            "workflow-untrusted-input-in-run",
            "error",
            "A workflow interpolates attacker-controlled event data into a shell step",
            "Pass it through env: and quote the variable in the script.",
        ),
        Rule(
            "workflow-pr-target-checkout",
            "error",
            "pull_request_target checks out and runs the pull request's code with secrets",
            "Use pull_request, or never check out the head ref under pull_request_target.",
        ),
        Rule(
            "workflow-unpinned-action",
            "warning",
            "A third-party action is referenced by a movable tag, not a commit",
            "Pin it to a full 40-character commit SHA (keep the tag in a comment).",
        ),
        Rule(
            "workflow-write-all",
            "warning",
            "A workflow grants the token write-all permissions",
            "Declare the least permissions each job needs.",
        ),
    )
}

_ENV_FILE = re.compile(r"(^|/)\.env(\.[\w.-]+)?$")
_ENV_TEMPLATE = re.compile(r"\.(example|sample|template|dist)$")
_PUBLIC_SECRET = re.compile(
    r"\b(NEXT_PUBLIC|VITE|REACT_APP|EXPO_PUBLIC|PUBLIC|NUXT_PUBLIC|GATSBY)_"
    r"\w*(SECRET|SERVICE_ROLE|PRIVATE|PASSWORD|WEBHOOK|STRIPE_SK|OPENAI_API_KEY)\w*"
)
# CERT_NON[E]: spelled so this file does not flag itself.
_TLS_OFF = re.compile(
    r"\bverify\s*=\s*False\b|_create_unverified_context\s*\(|CERT_NON[E]\b"
    r"|rejectUnauthorized\s*:\s*false|NODE_TLS_REJECT_UNAUTHORIZED\s*[=:]\s*['\"]?0"
    r"|InsecureSkipVerify\s*:\s*true"
)
_CORS_ANY = re.compile(r"allow_origins\s*=\s*\[\s*['\"]\*['\"]\s*\]|origin\s*:\s*['\"]\*['\"]")
_CORS_CREDENTIALS = re.compile(r"allow_credentials\s*=\s*True|credentials\s*:\s*true")
_DEBUG = re.compile(
    r"^\s*DEBUG\s*=\s*True\b|\.run\([^)]*debug\s*=\s*True|^\s*FLASK_DEBUG\s*=\s*1\b", re.M
)
_CODE = (
    ".py",
    ".js",
    ".jsx",
    ".ts",
    ".tsx",
    ".mjs",
    ".cjs",
    ".go",
    ".env",
    ".toml",
    ".yml",
    ".yaml",
)
_UNTRUSTED = re.compile(
    r"\$\{\{\s*github\.(head_ref|event\.(issue|pull_request|comment|review|review_comment"
    r"|discussion|head_commit|commits|pages)[\w.\[\]*]*\.(title|body|message|name|email|ref|label"
    r"|page_name|default_branch))\s*\}\}"
)
_PINNED = re.compile(r"@[0-9a-f]{40}$")


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _finding(rule: str, path: str, line: int, message: str) -> Finding:
    return Finding(RULES[rule], f"{path}:{line}", message, path=path, line=line)


def _secrets(root: Path, history: bool) -> Iterator[Finding]:
    for f in scan(root, history=history):
        where = f"{f.path} (commit {f.commit[:12]})" if f.commit else f.path
        # The preview is already masked by the scanner; the value never leaves it.
        yield Finding(
            RULES["secret-in-repo"],
            f"{where}:{f.line}",
            f"{f.rule.rule_id} at column {f.column}",
            path=f.path,
            line=f.line,
        )


def _code(relative: str, text: str) -> Iterator[Finding]:
    name = PurePosixPath(relative).name
    if not (relative.endswith(_CODE) or name.startswith(".env")):
        return
    for pattern, rule, message in (
        (_PUBLIC_SECRET, "secret-exposed-to-client", "shipped to the browser by its prefix"),
        (_TLS_OFF, "tls-verification-disabled", "certificate verification off"),
        (_DEBUG, "debug-enabled", "debug on"),
    ):
        for match in pattern.finditer(text):
            yield _finding(rule, relative, _line(text, match.start()), message)
    cors = _CORS_ANY.search(text)
    if cors and _CORS_CREDENTIALS.search(text):
        yield _finding(
            "cors-any-origin-with-credentials",
            relative,
            _line(text, cors.start()),
            "any origin, with cookies",
        )


def _steps(document: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    jobs = document.get("jobs") or {}
    for job in jobs.values() if isinstance(jobs, dict) else ():
        for step in job.get("steps") or () if isinstance(job, dict) else ():
            if isinstance(step, dict):
                yield step


def _triggers(document: dict[Any, Any]) -> set[str]:
    # YAML 1.1 reads the key `on` as True.
    on = document.get("on", document.get(True))
    if isinstance(on, str):
        return {on}
    return set(on) if isinstance(on, list | dict) else set()


def _permissions(document: dict[Any, Any]) -> Iterable[object]:
    yield document.get("permissions")
    jobs = document.get("jobs") or {}
    for job in jobs.values() if isinstance(jobs, dict) else ():
        if isinstance(job, dict):
            yield job.get("permissions")


def _workflow(relative: str, text: str) -> Iterator[Finding]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(document, dict):
        return
    for match in _UNTRUSTED.finditer(text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        block = text[line_start : match.start()]
        # Only a run: script executes it; with: and env: values are data.
        if "run:" in block or not re.match(r"\s*[\w-]+\s*:", block):
            yield _finding(
                "workflow-untrusted-input-in-run",
                relative,
                _line(text, match.start()),
                f"{match.group(1)} reaches the shell",
            )
    if "pull_request_target" in _triggers(document):
        for step in _steps(document):
            ref = str((step.get("with") or {}).get("ref", ""))
            if str(step.get("uses", "")).startswith("actions/checkout") and (
                "pull_request.head" in ref or "head_ref" in ref
            ):
                at = text.find(ref)
                yield _finding(
                    "workflow-pr-target-checkout",
                    relative,
                    _line(text, max(at, 0)),
                    "the PR's code runs with the base repository's secrets",
                )
    for step in _steps(document):
        uses = str(step.get("uses", ""))
        if uses and not uses.startswith(("./", "docker://")) and not _PINNED.search(uses):
            yield _finding(
                "workflow-unpinned-action",
                relative,
                _line(text, max(text.find(uses), 0)),
                f"{uses} can change under you",
            )
    if any(p == "write-all" for p in _permissions(document)):
        yield _finding(
            "workflow-write-all", relative, _line(text, text.find("write-all")), "write-all"
        )


def check_repository(root: Path, *, history: bool = True) -> list[Finding]:
    """Return every finding of the lints in :data:`RULES` under ``root``.

    In a git work tree, the files checked are the tracked ones and the
    untracked ones not ignored (what could be committed); ``history`` also
    scans every commit for secrets.
    """
    findings = list(_secrets(root, history))
    for full, relative in project_files(root):
        if _ENV_FILE.search(relative) and not _ENV_TEMPLATE.search(relative):
            findings.append(_finding("env-file-committed", relative, 1, "could be committed"))
        text = read_text_file(full)
        if text is None:
            continue
        findings.extend(_code(relative, text))
        if relative.startswith(".github/workflows/") and relative.endswith((".yml", ".yaml")):
            findings.extend(_workflow(relative, text))
    return findings
