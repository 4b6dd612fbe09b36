"""The permission matrix and the expected-decision table, both asked of Cedar.

:func:`permission_matrix` renders who may do what by asking an
:class:`~bastion.access.authorize.Authorizer` one question per (action, role,
MFA) — it is generated from the policies, never written by hand.
:func:`run_decision_table` checks the policies against ``policy_tests.json``,
the expected decisions written from the rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from bastion.access.authorize import PACKAGE_DIR, ROLES, Authorizer, Resource, Subject

DEFAULT_TABLE_PATH = PACKAGE_DIR / "policy_tests.json"

YES = "yes"
MFA = "MFA"
NO = "—"

# Fixed ids: the caller, another user, the caller's tenant and another tenant.
_USER = UUID("00000000-0000-4000-8000-000000000001")
_OTHER_USER = UUID("00000000-0000-4000-8000-000000000002")
_TENANT = UUID("00000000-0000-4000-8000-0000000000a1")
_OTHER_TENANT = UUID("00000000-0000-4000-8000-0000000000b2")


def sample_subject(roles: Iterable[str], mfa: bool) -> Subject:
    """A caller of the sample tenant with ``roles``."""
    return Subject(user_id=_USER, tenant_id=_TENANT, roles=frozenset(roles), mfa=mfa)


def sample_resource(
    authorizer: Authorizer,
    action: str,
    *,
    same_tenant: bool = True,
    own_account: bool = True,
) -> Resource:
    """A resource ``action`` applies to (its first type in the schema).

    In the sample caller's tenant unless ``same_tenant`` is false; for a type
    with an ``owner`` (``Account``), owned by the caller unless ``own_account``
    is false. An unknown action gets a ``Document``.
    """
    types = authorizer.resource_types(action)
    kind = types[0] if types else "Document"
    owner = None
    if authorizer.has_owner(kind):
        owner = _USER if own_account else _OTHER_USER
    return Resource(
        type=kind,
        id=f"sample-{kind.lower()}",
        tenant_id=_TENANT if same_tenant else _OTHER_TENANT,
        owner=owner,
    )


def cell(authorizer: Authorizer, role: str, action: str) -> str:
    """The cell for ``role`` doing ``action``: "yes", "MFA" (only with MFA) or "—"."""
    resource = sample_resource(authorizer, action)
    if authorizer.authorize(sample_subject([role], mfa=False), action, resource):
        return YES
    if authorizer.authorize(sample_subject([role], mfa=True), action, resource):
        return MFA
    return NO


def matrix_cells(authorizer: Authorizer, roles: Sequence[str] = ROLES) -> dict[str, dict[str, str]]:
    """action -> role -> cell, for every action the schema declares."""
    return {
        action: {role: cell(authorizer, role, action) for role in roles}
        for action in authorizer.actions
    }


def permission_matrix(authorizer: Authorizer, roles: Sequence[str] = ROLES) -> str:
    """A Markdown table: rows = actions, columns = roles (own tenant, own account)."""
    cells = matrix_cells(authorizer, roles)
    lines = [
        "| action | " + " | ".join(roles) + " |",
        "|---|" + "|".join(":---:" for _ in roles) + "|",
    ]
    for action, row in cells.items():
        lines.append(f"| `{action}` | " + " | ".join(row[role] for role in roles) + " |")
    lines.append("")
    lines.append(
        f'"{YES}": allowed; "{MFA}": allowed only after MFA; "{NO}": denied. '
        "Any other tenant's resources: always denied."
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class TableRow:
    """One expected decision of ``policy_tests.json``."""

    roles: frozenset[str]
    mfa: bool
    action: str
    same_tenant: bool
    own_account: bool
    expect_allow: bool
    number: int

    def describe(self) -> str:
        roles = ",".join(sorted(self.roles)) or "(none)"
        where = "own tenant" if self.same_tenant else "other tenant"
        own = "" if self.own_account else ", not own account"
        mfa = "mfa" if self.mfa else "no mfa"
        expect = "allow" if self.expect_allow else "deny"
        return f"row {self.number}: {roles} ({mfa}) {self.action} [{where}{own}] expected {expect}"


class TableError(ValueError):
    """``policy_tests.json`` is unreadable or malformed."""


def _row(number: int, raw: Mapping[str, Any]) -> TableRow:
    roles_value = raw.get("roles", raw.get("role"))
    roles = [roles_value] if isinstance(roles_value, str) else roles_value
    expect = raw.get("expect")
    if (
        not isinstance(roles, list)
        or not all(isinstance(role, str) for role in roles)
        or not isinstance(raw.get("action"), str)
        or expect not in ("allow", "deny")
    ):
        raise TableError(f"row {number}: needs roles, action and expect allow|deny: {raw}")
    return TableRow(
        roles=frozenset(roles),
        mfa=bool(raw.get("mfa", False)),
        action=raw["action"],
        same_tenant=bool(raw.get("same_tenant", True)),
        own_account=bool(raw.get("own_account", True)),
        expect_allow=expect == "allow",
        number=number,
    )


def load_decision_table(path: Path = DEFAULT_TABLE_PATH) -> list[TableRow]:
    """The rows of a decision table file (``{"rows": [...]}`` or a bare list)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: {exc}") from exc
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise TableError(f"{path}: expected a list of rows")
    return [_row(number, raw) for number, raw in enumerate(rows, start=1)]


def decide(authorizer: Authorizer, row: TableRow) -> bool:
    """The policies' decision for ``row``."""
    resource = sample_resource(
        authorizer, row.action, same_tenant=row.same_tenant, own_account=row.own_account
    )
    return authorizer.authorize(sample_subject(row.roles, row.mfa), row.action, resource)


def run_decision_table(authorizer: Authorizer, rows: Iterable[TableRow]) -> list[TableRow]:
    """The rows whose decision differs from the expected one."""
    return [row for row in rows if decide(authorizer, row) != row.expect_allow]


# --------------------------------------------------------------------------- diff


@dataclass(frozen=True)
class PermissionChange:
    """``role`` on ``action`` went from ``before`` to ``after`` (cells of the matrix).

    ``other_tenant`` marks a decision on another tenant's resource, which must
    always be denied: any change there is shown as a cross-tenant grant.
    """

    role: str
    action: str
    before: str
    after: str
    other_tenant: bool = False

    @property
    def gained(self) -> bool:
        rank = {NO: 0, MFA: 1, YES: 2}
        return rank[self.after] > rank[self.before]

    def describe(self) -> str:
        where = " ON ANOTHER TENANT'S RESOURCE" if self.other_tenant else ""
        sign = "+" if self.gained else "-"
        verb = "gains" if self.gained else "loses"
        return f"{sign} {self.role} {verb} {self.action}{where}: {self.before} -> {self.after}"


def _cross_tenant(authorizer: Authorizer, role: str, action: str) -> str:
    resource = sample_resource(authorizer, action, same_tenant=False)
    return YES if authorizer.authorize(sample_subject([role], mfa=True), action, resource) else NO


def permission_changes(
    base: Authorizer, head: Authorizer, roles: Sequence[str] = ROLES
) -> list[PermissionChange]:
    """Who gains or loses which permission from ``base`` to ``head``, for a reviewer.

    Compares the matrices cell by cell (an action only one side declares counts
    as denied on the other), and the cross-tenant decisions, which both sides
    must deny.
    """
    before, after = matrix_cells(base, roles), matrix_cells(head, roles)
    changes = []
    for action in sorted(before.keys() | after.keys()):
        for role in roles:
            old = before.get(action, {}).get(role, NO)
            new = after.get(action, {}).get(role, NO)
            if old != new:
                changes.append(PermissionChange(role, action, old, new))
            old_x = _cross_tenant(base, role, action) if action in before else NO
            new_x = _cross_tenant(head, role, action) if action in after else NO
            if old_x != new_x:
                changes.append(PermissionChange(role, action, old_x, new_x, other_tenant=True))
    return changes
