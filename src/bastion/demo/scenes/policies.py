"""Cedar decisions for the scenario's people, from the policies in the repo."""

from __future__ import annotations

from bastion.access.authorize import Authorizer, Resource, Subject
from bastion.demo.common import DemoTenant, Report


def check_policies(report: Report, tenants: list[DemoTenant]) -> None:
    """Cedar decisions for the scenario's people, from the policies in the repo."""
    acme, globex = tenants
    authorizer = Authorizer()

    def decide(role: str, action: str, tenant: DemoTenant, *, mfa: bool = False) -> bool:
        subject = Subject(acme.users[role], acme.id, frozenset({role}), mfa)
        resource_type = {"document": "Document", "plan": "Plan"}[action.split(":")[0]]
        return authorizer.authorize(subject, action, Resource(resource_type, "x", tenant.id))

    for role, action, tenant, mfa, expect in (
        ("viewer", "document:write", acme, False, False),
        ("contributor", "document:write", acme, False, True),
        ("owner", "document:read", globex, True, False),
        ("billing-admin", "plan:change", acme, False, False),
        ("billing-admin", "plan:change", acme, True, True),
    ):
        decision = decide(role, action, tenant, mfa=mfa)
        where = "own tenant" if tenant is acme else f"{globex.slug}"
        report.check(
            "policy",
            f"{role}{' with MFA' if mfa else ''}: {action} ({where})",
            decision == expect,
            f"Cedar says {'Allow' if decision else 'Deny'}",
        )
