"""One owner per table (issue 24, item 7).

Every SQL string in ``src/bastion`` that names a ``bastion.<table>`` after
FROM, JOIN, INTO, UPDATE or TABLE must sit in that table's owning domain;
other domains call the owner's functions (inside their own transaction when
they need one). The map below is the one source; docs/architecture.md shows
the same table and this test checks that they agree. Migrations are exempt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src"
MIGRATIONS = SOURCE / "bastion" / "db" / "migrations"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# relation -> the package that owns it (set-returning functions marked "()").
OWNERS: dict[str, str] = {
    # identity: people, their credentials, sign-ins and sessions
    "users": "bastion.identity",
    "credentials": "bastion.identity",
    "password_history": "bastion.identity",
    "mfa_totp": "bastion.identity",
    "recovery_codes": "bastion.identity",
    "login_throttle": "bastion.identity",
    "oauth_clients": "bastion.identity",
    "auth_codes": "bastion.identity",
    "refresh_families": "bastion.identity",
    "refresh_tokens": "bastion.identity",
    "workload_refusals": "bastion.identity",
    # tenants: the tenants and who belongs to them in which role
    "tenants": "bastion.tenants",
    "memberships": "bastion.tenants",
    # access: two-person approval of admin-grade roles; incident lockdowns and session cut-offs
    "role_requests": "bastion.access",
    "tenant_lockdowns": "bastion.access",
    "session_cutoffs": "bastion.access",
    "access_restrictions()": "bastion.access",
    # knowledge: documents and what is derived from them
    "namespaces": "bastion.knowledge",
    "documents": "bastion.knowledge",
    "chunks": "bastion.knowledge",
    "embedding_cache": "bastion.knowledge",
    # audit: the append-only trail
    "audit_events": "bastion.audit",
    "audit_heads": "bastion.audit",
    "audit_checkpoints": "bastion.audit",
    "audit_tenant_checkpoints": "bastion.audit",
    # secrets: per-tenant data keys
    "data_keys": "bastion.secrets",
    # safety: the PII vault, tool runs and their egress allow-lists
    "pii_vault": "bastion.safety",
    "pii_token_keys": "bastion.safety",
    "pii_reveal()": "bastion.safety",
    "tool_call_runs": "bastion.safety",
    "egress_policies": "bastion.safety",
    "egress_allow_entries": "bastion.safety",
    "screen_policies": "bastion.safety",
    "pii_allow_entries": "bastion.safety",
    # gateway: opt-in prompt sampling
    "prompt_sampling": "bastion.gateway",
    "prompt_sampling_consents": "bastion.gateway",
    # billing: plans, budgets, payments, metering, webhooks
    "plans": "bastion.billing",
    "plan_changes": "bastion.billing",
    "plan_requests": "bastion.billing",
    "subscriptions": "bastion.billing",
    "budgets": "bastion.billing",
    "budget_reservations": "bastion.billing",
    "checkout_sessions": "bastion.billing",
    "receipts": "bastion.billing",
    "meter_reports": "bastion.billing",
    "usage_periods_due()": "bastion.billing",
    "audit_heads_all()": "bastion.audit",
    # detectors: their read position in the trail and their firings
    "detector_cursors": "bastion.detectors",
    "detector_firings": "bastion.detectors",
    "detector_batch()": "bastion.detectors",
    "detector_history()": "bastion.detectors",
    "detector_spend_hours()": "bastion.detectors",
    "stripe_charges": "bastion.billing",
    "adyen_payments": "bastion.billing",
    "webhook_events": "bastion.billing",
    "webhook_control": "bastion.billing",
    # incident: the runbook's switches (read elsewhere only through migration
    # 0034's functions: spend_frozen, tools_disabled, served_cached)
    "incident_controls": "bastion.incident",
    "incident_cached_routes": "bastion.incident",
}

# Modules allowed raw statements on tables they do not own, and why.
EXEMPT: dict[str, str] = {
    # The demo's probes show the database refusing statements no service sends.
    "bastion.demo.probes": "the demo's RLS and append-only probes",
}

_REFERENCE = re.compile(
    r"\b(FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:ONLY\s+)?bastion\.([a-z_][a-z0-9_]*)(\()?",
    re.IGNORECASE,
)
_CREATED = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?bastion\.([a-z_][a-z0-9_]*)")


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants (prose, not SQL)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def references(path: Path) -> list[tuple[int, str]]:
    """``(line, relation)`` for every table or set-returning function a SQL
    string of ``path`` names; functions end in ``()``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    prose = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            for match in _REFERENCE.finditer(node.value):
                keyword, name, call = match.groups()
                if call and keyword.upper() in ("FROM", "JOIN"):  # a set-returning function
                    name += "()"
                found.append((node.lineno, name))
    return found


def violations(source_root: Path) -> list[str]:
    """Every reference outside its owner, and every reference to an unowned relation."""
    problems = []
    for path in sorted(source_root.rglob("*.py")):
        if MIGRATIONS in path.parents:
            continue
        module = ".".join(path.relative_to(source_root).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        if module in EXEMPT:
            continue
        for line, name in references(path):
            owner = OWNERS.get(name)
            where = f"{path.relative_to(source_root)}:{line}"
            if owner is None:
                problems.append(f"{where}: bastion.{name} has no owner in the map")
            elif module != owner and not module.startswith(owner + "."):
                problems.append(f"{where}: bastion.{name} belongs to {owner}")
    return problems


def test_every_table_is_used_only_by_its_owner() -> None:
    assert violations(SOURCE) == []


def test_the_map_names_every_table_of_the_migrations() -> None:
    created = set()
    for path in MIGRATIONS.rglob("*.py"):
        created |= set(_CREATED.findall(path.read_text()))
    tables = {name for name in OWNERS if not name.endswith("()")}
    assert created == tables


def test_the_architecture_page_shows_the_same_map() -> None:
    rows = re.findall(
        r"^\| `bastion\.([a-z_0-9]+(?:\(\))?)` \| `(bastion\.[a-z_.]+)` \|",
        ARCHITECTURE.read_text(),
        re.MULTILINE,
    )
    assert dict(rows) == OWNERS
    assert len(rows) == len(OWNERS)  # no relation listed twice


def test_a_planted_violation_is_caught(tmp_path: Path) -> None:
    """The checker itself: a domain writing another's table fails; the owner's
    own statement, a docstring that mentions a table, and an exempt module pass."""
    (tmp_path / "bastion" / "access").mkdir(parents=True)
    (tmp_path / "bastion" / "identity").mkdir(parents=True)
    (tmp_path / "bastion" / "demo").mkdir(parents=True)
    (tmp_path / "bastion" / "access" / "planted.py").write_text(
        '"""Reads from bastion.users in prose only."""\n'
        "async def grant(tx):\n"
        '    await tx.execute("INSERT INTO bastion.memberships (user_id) VALUES (%s)", (1,))\n'
        '    await tx.execute("SELECT count(*) FROM bastion.pii_reveal(ARRAY[]::text[])")\n'
        '    await tx.execute(f"select id from bastion.made_up where x = {1}")\n'
    )
    (tmp_path / "bastion" / "identity" / "users.py").write_text(
        'Q = "SELECT id FROM bastion.users WHERE email = %s"\n'
    )
    (tmp_path / "bastion" / "demo" / "probes.py").write_text(
        'Q = "DELETE FROM bastion.audit_events"\n'
    )
    assert violations(tmp_path) == [
        "bastion/access/planted.py:3: bastion.memberships belongs to bastion.tenants",
        "bastion/access/planted.py:4: bastion.pii_reveal() belongs to bastion.safety",
        "bastion/access/planted.py:5: bastion.made_up has no owner in the map",
    ]
