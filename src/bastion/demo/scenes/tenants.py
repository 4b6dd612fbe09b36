"""The cast: two support-desk tenants, a user in every role, and their tickets."""

from __future__ import annotations

from bastion.db.pool import Database
from bastion.demo import probes
from bastion.demo.common import DemoTenant
from bastion.tenants.service import MEMBER_ROLES, TenantService

TENANTS = {
    "acme-support": (
        "Acme Support Desk",
        [
            ("Router keeps rebooting", "Customer reports the X200 router reboots every hour."),
            ("Refund for order 1042", "Double charge on the March invoice; refund requested."),
            ("Cannot reset password", "Reset e-mail never arrives; spam folder checked."),
        ],
    ),
    "globex-support": (
        "Globex Support Desk",
        [
            ("Dashboard shows stale data", "Numbers on the sales dashboard lag by a day."),
            ("API rate limit too low", "Batch import hits 429 after 100 requests."),
        ],
    ),
}


async def seed(db: Database) -> list[DemoTenant]:
    service = TenantService(db)
    tenants = []
    for slug, (name, tickets) in TENANTS.items():
        tenant = await service.create_tenant(slug, name, actor="demo")
        domain = slug.split("-")[0]
        users = {
            role: await service.add_member(
                tenant.id, f"{role.replace('-', '.')}@{domain}.example", role, actor="demo"
            )
            for role in MEMBER_ROLES
        }
        ids = await probes.seed_tickets(
            db, tenant.id, users["contributor"], [title for title, _body in tickets]
        )
        tenants.append(DemoTenant(tenant.id, slug, name, users, ids))
    return tenants
