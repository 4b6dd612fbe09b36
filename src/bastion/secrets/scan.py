"""``bastion secrets scan``: find secrets in files and in git history.

Formats and entropy come from :mod:`bastion.secret_formats`. A line holding
``bastion: allow-secret`` (in any comment syntax, with a reason) is skipped.
Findings carry a location, a redacted preview (the format's public prefix
only) and a fingerprint: a truncated SHA-256 of the value, enough to match the
same secret across files and commits, never the value. Results are written as
SARIF 2.1.0 (OASIS, "Static Analysis Results Interchange Format", sections
3.13 sarifLog, 3.19 tool, 3.27 result, 3.28 location).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.secret_formats import FORMATS, HIGH_ENTROPY, SecretFormat, find_secrets, redacted

ALLOW_MARKER = "bastion: allow-secret"
# Fingerprints allowed at the scanned root, each with its reason: for
# findings no comment can mark (JSON fixtures, commits already made).
ALLOW_FILE = ".bastion-secrets-allow"
# Directories never worth scanning when PATH is not a git work tree.
SKIP_DIRS = frozenset(
    {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
    | {".pytest_cache", ".hypothesis", ".grimp_cache", ".import_linter_cache", "build", "dist"}
)
MAX_FILE_BYTES = 2 << 20
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Finding:
    """One secret: where (file, 1-based line and column), what, and from which commit."""

    rule: SecretFormat
    path: str
    line: int
    column: int
    end_column: int
    preview: str
    fingerprint: str
    commit: str | None = None  # set for a finding in git history


def fingerprint(rule: SecretFormat, secret: str) -> str:
    """Match the same secret across findings; 64 bits, not the value."""
    digest = hashlib.sha256(f"bastion-secret-scan\0{rule.rule_id}\0{secret}".encode())
    return digest.hexdigest()[:16]


def scan_text(text: str, path: str, *, commit: str | None = None) -> Iterator[Finding]:
    """Yield the findings in ``text`` (a file's content) not allowed by a marker."""
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    for match in find_secrets(text):
        line_index = _line_of(starts, match.start)
        if ALLOW_MARKER in lines[line_index]:
            continue
        column = match.start - starts[line_index] + 1
        secret = text[match.start : match.end]
        first_line = secret.split("\n", 1)[0]
        yield Finding(
            rule=match.fmt,
            path=path,
            line=line_index + 1,
            column=column,
            end_column=column + len(first_line),
            preview=redacted(match.fmt, secret),
            fingerprint=fingerprint(match.fmt, secret),
            commit=commit,
        )


def _line_of(starts: list[int], offset: int) -> int:
    low, high = 0, len(starts) - 2
    while low < high:
        middle = (low + high + 1) // 2
        if starts[middle] <= offset:
            low = middle
        else:
            high = middle - 1
    return low


def read_text_file(path: Path) -> str | None:
    """The file's text, or None for a binary, unreadable or oversized file."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def _git_root(path: Path) -> Path | None:
    """The work tree's top directory if ``path`` is a git repository's top."""
    if not path.is_dir() or not (path / ".git").exists():
        return None
    return path


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(root), "-c", "core.quotePath=false", *args],
        capture_output=True,
        check=False,
        env={**os.environ, "GIT_PAGER": "cat", "GIT_CONFIG_NOSYSTEM": "1"},
    )
    if done.returncode != 0:
        raise OSError(f"git {args[0]} failed in {root}")
    return done.stdout.decode("utf-8", errors="replace")


def project_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Each file to scan under ``root``, with its path relative to ``root``.

    In a git work tree: the tracked files and the untracked ones not ignored
    (what could be committed); elsewhere every file outside SKIP_DIRS.
    """
    if root.is_file():
        yield root, root.name
        return
    if _git_root(root) is not None:
        listed = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
        for name in sorted(set(filter(None, listed.split("\0")))):
            if (root / name).is_file():
                yield root / name, name
        return
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        for name in sorted(names):
            full = Path(directory) / name
            yield full, full.relative_to(root).as_posix()


def scan_files(root: Path) -> Iterator[Finding]:
    for full, relative in project_files(root):
        text = read_text_file(full)
        if text is not None:
            yield from scan_text(text, relative)


_HUNK = re.compile(r"@@ -\d+(?:,\d+)? \+(\d+)(?:,\d+)? @@")


def scan_history(root: Path) -> Iterator[Finding]:
    """Findings in the lines every commit (on every ref) added.

    Each commit's added lines of a file are scanned together (a PEM block
    spans lines), at their line numbers in that commit's version of the file.
    """
    log = _git(
        root, "log", "-p", "--all", "-U0", "--no-color", "--no-ext-diff", "--no-renames",
        "--format=%x00commit %H",
    )  # fmt: skip
    for chunk in log.split("\0commit ")[1:]:
        commit, _, body = chunk.partition("\n")
        yield from _scan_patch(commit.strip(), body)


def _scan_patch(commit: str, patch: str) -> Iterator[Finding]:
    path: str | None = None
    added: dict[str, list[tuple[int, str]]] = {}
    line_number = 0
    for line in patch.split("\n"):
        if line.startswith("+++ "):
            target = line[4:]
            path = target[2:] if target.startswith("b/") else None
        elif line.startswith("@@"):
            hunk = _HUNK.match(line)
            line_number = int(hunk.group(1)) if hunk else 0
        elif line.startswith("+") and path is not None:
            added.setdefault(path, []).append((line_number, line[1:]))
            line_number += 1
    for file_path, numbered in added.items():
        # Lines joined in order; a gap between hunks is a blank line, so a
        # match cannot run across it, and offsets map back to the real line.
        text = "\n".join(content for _, content in numbered)
        for finding in scan_text(text, file_path, commit=commit):
            real_line = numbered[finding.line - 1][0]
            yield Finding(**{**finding.__dict__, "line": real_line})


def allowed_fingerprints(root: Path) -> set[str]:
    """The fingerprints ``root/.bastion-secrets-allow`` allows ("FINGERPRINT reason").

    Raises :class:`ValueError` for an entry without a reason.
    """
    allow = root / ALLOW_FILE if root.is_dir() else root.parent / ALLOW_FILE
    if not allow.is_file():
        return set()
    allowed = set()
    for number, line in enumerate(allow.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if not entry:
            continue
        fingerprint_, _, reason = entry.partition(" ")
        if not re.fullmatch(r"[0-9a-f]{16}", fingerprint_) or not reason.strip():
            raise ValueError(f"{ALLOW_FILE}:{number}: expected 'FINGERPRINT reason'")
        allowed.add(fingerprint_)
    return allowed


def scan(path: Path, *, history: bool = True) -> list[Finding]:
    """Scan ``path`` (a file or directory); with ``history``, a repository's log too.

    A secret found in history that is also in the files is reported once
    (the file); one found in several commits, once (its first appearance).
    """
    allowed = allowed_fingerprints(path)
    findings = [f for f in scan_files(path) if f.fingerprint not in allowed]
    if history and _git_root(path) is not None:
        seen = {f.fingerprint for f in findings} | allowed
        for finding in reversed(list(scan_history(path))):  # oldest commit first
            if finding.fingerprint not in seen:
                seen.add(finding.fingerprint)
                findings.append(finding)
    return findings


def sarif(findings: Iterable[Finding], root: Path, version: str) -> dict[str, Any]:
    """The findings as a SARIF 2.1.0 log; the secrets themselves are never in it."""
    rules = [*FORMATS, HIGH_ENTROPY]
    index = {rule.rule_id: i for i, rule in enumerate(rules)}
    results = []
    for finding in findings:
        where = f"commit {finding.commit[:12]}" if finding.commit else "the files"
        results.append(
            {
                "ruleId": finding.rule.rule_id,
                "ruleIndex": index[finding.rule.rule_id],
                "level": "error",
                "message": {
                    "text": f"{finding.rule.title} ({finding.preview}) in {where}: "
                    "rotate it, then remove it"
                },
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": finding.path, "uriBaseId": "SRCROOT"},
                            "region": {
                                "startLine": finding.line,
                                "startColumn": finding.column,
                                "endLine": finding.line,
                                "endColumn": finding.end_column,
                            },
                        }
                    }
                ],
                "partialFingerprints": {"secretFingerprint/v1": finding.fingerprint},
                "properties": {"commit": finding.commit} if finding.commit else {},
            }
        )
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "bastion secrets scan",
                        "version": version,
                        "informationUri": "https://bastion.dev/docs/operations",
                        "rules": [
                            {
                                "id": rule.rule_id,
                                "name": rule.rule_id.title().replace("-", ""),
                                "shortDescription": {"text": rule.title},
                                "defaultConfiguration": {"level": "error"},
                                "help": {
                                    "text": "Rotate the secret, remove it, and configure a "
                                    f"reference instead; a false positive takes a "
                                    f"'{ALLOW_MARKER}' comment with a reason on its line."
                                },
                            }
                            for rule in rules
                        ],
                    }
                },
                "originalUriBaseIds": {"SRCROOT": {"uri": root.resolve().as_uri() + "/"}},
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
