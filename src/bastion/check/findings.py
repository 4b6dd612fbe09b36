"""What a check finds, the accepted-findings file, and the three output formats.

SARIF follows OASIS SARIF 2.1.0 (sections cited by number): a ``sarifLog``
(3.13) with one ``run`` (3.14) whose ``tool.driver`` (3.18, 3.19) lists every
rule (3.49 reportingDescriptor) and whose ``results`` (3.27) point at the
object found with a logical location (3.33), or a file with a physical one
(3.29). An accepted finding stays in the log with an external suppression
(3.35) carrying its justification, so a reviewer sees what was waived and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Level = Literal["error", "warning", "note"]
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


@dataclass(frozen=True)
class Rule:
    """One lint: a stable id, its level, what it means and how to fix it."""

    id: str
    level: Level
    summary: str
    fix: str


@dataclass(frozen=True)
class Finding:
    """``rule`` fired on ``subject`` (``schema.table``, ``role``, ``path:line``…)."""

    rule: Rule
    subject: str
    message: str
    path: str | None = None
    line: int | None = None
    accepted: str | None = field(default=None, compare=False)


class AcceptedFileError(ValueError):
    """The accepted-findings file has a line without a rule, subject or reason."""


def read_accepted(path: Path) -> dict[tuple[str, str], str]:
    """Return ``{(rule id, subject): reason}`` from an accepted-findings file.

    One finding per line: ``RULE SUBJECT  # reason``. The reason is required,
    because a waiver nobody can explain is a finding nobody fixed. Blank lines
    and lines starting with ``#`` are ignored.
    """
    accepted: dict[tuple[str, str], str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entry, _, reason = line.partition("#")
        parts = entry.split()
        if len(parts) != 2 or not reason.strip():
            raise AcceptedFileError(f"{path.name}:{number}: expected 'RULE SUBJECT  # reason'")
        accepted[(parts[0], parts[1])] = reason.strip()
    return accepted


def apply_accepted(
    findings: Iterable[Finding], accepted: dict[tuple[str, str], str]
) -> list[Finding]:
    """Mark the findings ``accepted`` lists; the rest stay open."""
    out = []
    for f in findings:
        reason = accepted.get((f.rule.id, f.subject))
        out.append(
            f if reason is None else Finding(f.rule, f.subject, f.message, f.path, f.line, reason)
        )
    return out


def failing(findings: Iterable[Finding], fail_on: Level) -> list[Finding]:
    """The open findings at ``fail_on`` or worse (error > warning > note)."""
    rank = {"note": 0, "warning": 1, "error": 2}
    return [f for f in findings if f.accepted is None and rank[f.rule.level] >= rank[fail_on]]


def as_json(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    return [
        {
            "rule": f.rule.id,
            "level": f.rule.level,
            "subject": f.subject,
            "message": f.message,
            **({"path": f.path, "line": f.line} if f.path else {}),
            **({"accepted": f.accepted} if f.accepted else {}),
        }
        for f in findings
    ]


def as_text(findings: Sequence[Finding]) -> str:
    lines = []
    for f in findings:
        where = f"{f.path}:{f.line}" if f.path else f.subject
        state = f" (accepted: {f.accepted})" if f.accepted else ""
        lines.append(f"{f.rule.level:7} {f.rule.id:34} {where}: {f.message}{state}")
    return "\n".join(lines)


def as_sarif(
    findings: Sequence[Finding], rules: Iterable[Rule], *, tool: str, version: str
) -> dict[str, Any]:
    """Return the findings as a SARIF 2.1.0 log (see the module docstring)."""
    catalogue = sorted({r.id: r for r in rules}.values(), key=lambda r: r.id)
    index = {r.id: i for i, r in enumerate(catalogue)}
    results = []
    for f in findings:
        result: dict[str, Any] = {
            "ruleId": f.rule.id,
            "ruleIndex": index[f.rule.id],
            "level": f.rule.level,
            "message": {"text": f.message},
        }
        if f.path:
            region = {"startLine": f.line} if f.line else {}
            result["locations"] = [
                {"physicalLocation": {"artifactLocation": {"uri": f.path}, "region": region}}
                if region
                else {"physicalLocation": {"artifactLocation": {"uri": f.path}}}
            ]
        else:
            result["locations"] = [{"logicalLocations": [{"fullyQualifiedName": f.subject}]}]
        if f.accepted:
            result["suppressions"] = [{"kind": "external", "justification": f.accepted}]
        results.append(result)
    driver = {
        "name": tool,
        "version": version,
        "rules": [
            {
                "id": r.id,
                "shortDescription": {"text": r.summary},
                "help": {"text": r.fix},
                "defaultConfiguration": {"level": r.level},
            }
            for r in catalogue
        ],
    }
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{"tool": {"driver": driver}, "results": results}],
    }


def dumps(document: object) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
