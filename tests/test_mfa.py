"""TOTP (RFC 6238) and recovery codes against the real database and real AES-GCM.

Codes are computed here with pyotp from the secret the enrolment returns; the
service's clock is pinned so no test depends on where a 30-second step ends.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from uuid import UUID, uuid4

import pyotp
import pytest

from bastion.access import ADMIN_ROLES
from bastion.db.pool import Database
from bastion.identity import mfa as mfa_module
from bastion.identity.errors import LastFactorRequired, MfaError
from bastion.identity.mfa import MfaService, mfa_required
from bastion.secrets.store import LocalKeystore
from bastion.tenants.service import TenantService

pytestmark = pytest.mark.anyio

STEP = 30
T0 = 1_900_000_000 // STEP  # a fixed time step for the pinned clock


class Clock:
    """Stands in for the ``time`` module inside bastion.identity.mfa."""

    def __init__(self) -> None:
        self.step = T0

    def time(self) -> float:
        return self.step * STEP + 7.5


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(mfa_module, "time", fake)
    return fake


@dataclass
class Member:
    tenant: UUID
    user: UUID
    email: str


async def new_member(db: Database) -> Member:
    svc = TenantService(db)
    suffix = uuid4().hex[:8]
    tenant = await svc.create_tenant(f"mfa-{suffix}", "MFA")
    email = f"dana-{suffix}@example.test"
    return Member(tenant.id, await svc.add_member(tenant.id, email, "owner"), email)


@pytest.fixture
async def member(db: Database) -> Member:
    return await new_member(db)


def code_at(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).generate_otp(step)


async def enrolled(db: Database, svc: MfaService, m: Member, clock: Clock) -> tuple[str, list[str]]:
    """Enrol and confirm ``m`` at ``clock.step``; return the secret and recovery codes."""
    async with db.tenant_tx(m.tenant, None, "system") as tx:
        secret, _uri = await svc.enroll(tx, m.user, m.email)
    async with db.tenant_tx(m.tenant, None, "system") as tx:
        codes = await svc.confirm(tx, m.user, code_at(secret, clock.step))
    return secret, codes


async def test_enrol_confirm_verify(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        secret, uri = await svc.enroll(tx, member.user, member.email)
        assert not await svc.has_factor(tx, member.user)  # not before confirmation
        assert not await svc.verify(tx, member.user, code_at(secret, clock.step))
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert uri.startswith("otpauth://totp/Bastion:")
    assert f"secret={secret}" in uri and "issuer=Bastion" in uri
    assert pyotp.parse_uri(uri).secret == secret

    async with db.tenant_tx(member.tenant, None, "system") as tx:
        codes = await svc.confirm(tx, member.user, code_at(secret, clock.step))
        assert await svc.has_factor(tx, member.user)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){3}", c) for c in codes)

    clock.step += 2
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, code_at(secret, clock.step))


async def test_wrong_codes_are_refused(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        secret, _ = await svc.enroll(tx, member.user, member.email)
    valid = {code_at(secret, clock.step + d) for d in (-1, 0, 1)}
    wrong = next(
        code_at(secret, s)
        for s in range(clock.step - 20, clock.step - 2)
        if code_at(secret, s) not in valid
    )
    with pytest.raises(MfaError):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.confirm(tx, member.user, wrong)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.has_factor(tx, member.user)
        await svc.confirm(tx, member.user, code_at(secret, clock.step))
    clock.step += 5
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        for bad in (
            code_at(secret, clock.step - 2),
            code_at(secret, clock.step + 2),
            "",
            "abcdef",
            "1234567",
            "12345",
        ):
            if bad in {code_at(secret, clock.step + d) for d in (-1, 0, 1)}:
                continue  # a collision with a valid code; vanishingly rare
            assert not await svc.verify(tx, member.user, bad), bad
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, code_at(secret, clock.step))


async def test_a_time_step_is_accepted_once(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    secret, _ = await enrolled(db, svc, member, clock)
    confirm_code = code_at(secret, clock.step)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        # The code used to confirm cannot be replayed to log in.
        assert not await svc.verify(tx, member.user, confirm_code)
    clock.step += 3
    now = code_at(secret, clock.step)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, now)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.verify(tx, member.user, now)  # replay of the same step
        assert not await svc.verify(tx, member.user, code_at(secret, clock.step - 1))  # older
        # The next step (a clock running ahead) is within the ±1 window and fresh.
        assert await svc.verify(tx, member.user, code_at(secret, clock.step + 1))
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.verify(tx, member.user, now)
        row = await (
            await tx.execute(
                "SELECT last_timestep FROM bastion.mfa_totp WHERE user_id = %s", (member.user,)
            )
        ).fetchone()
    assert row is not None and row["last_timestep"] == clock.step + 1


async def test_recovery_codes_work_once(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    _secret, codes = await enrolled(db, svc, member, clock)
    other = await new_member(db)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.use_recovery_code(tx, other.user, codes[0])  # not theirs
        assert await svc.use_recovery_code(tx, member.user, codes[0])
        assert not await svc.use_recovery_code(tx, member.user, codes[0])  # spent
        # Case, dashes and spaces do not matter.
        assert await svc.use_recovery_code(tx, member.user, codes[1].lower().replace("-", " "))
        assert not await svc.use_recovery_code(tx, member.user, codes[1])
        assert not await svc.use_recovery_code(tx, member.user, "AAAA-BBBB-CCCC-DDDD")
        assert await svc.recovery_codes_left(tx, member.user) == 8
        stored = await (
            await tx.execute(
                "SELECT code_hash FROM bastion.recovery_codes WHERE user_id = %s", (member.user,)
            )
        ).fetchall()
    blob = b"".join(bytes(r["code_hash"]) for r in stored)
    assert len(stored) == 10
    for code in codes:
        assert code.encode() not in blob and code.replace("-", "").encode() not in blob


async def test_new_confirmation_replaces_recovery_codes(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    _secret, old_codes = await enrolled(db, svc, member, clock)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.remove(tx, member.user, holds_admin_role=False)
    clock.step += 1
    _secret, new_codes = await enrolled(db, svc, member, clock)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.use_recovery_code(tx, member.user, old_codes[0])
        assert await svc.use_recovery_code(tx, member.user, new_codes[0])


async def test_secret_is_sealed_and_bound_to_the_user(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    secret, _ = await enrolled(db, svc, member, clock)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        row = await (
            await tx.execute(
                "SELECT secret_sealed FROM bastion.mfa_totp WHERE user_id = %s", (member.user,)
            )
        ).fetchone()
    assert row is not None
    sealed = bytes(row["secret_sealed"])
    raw = base64.b32decode(secret)
    assert len(sealed) == 12 + len(secret) + 16  # nonce || ciphertext || GCM tag
    for needle in (secret.encode(), secret.lower().encode(), raw, secret.encode("utf-16-le")):
        assert needle not in sealed

    # The same sealed bytes on another user's row do not open (AAD = user id).
    victim = await new_member(db)
    async with db.tenant_tx(victim.tenant, None, "system") as tx:
        await tx.execute(
            "INSERT INTO bastion.mfa_totp (user_id, secret_sealed, confirmed_at) "
            "VALUES (%s, %s, now())",
            (victim.user, sealed),
        )
    with pytest.raises(MfaError):
        async with db.tenant_tx(victim.tenant, None, "system") as tx:
            await svc.verify(tx, victim.user, code_at(secret, clock.step + 1))


async def test_enrolment_rules(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore, issuer="Acme Corp")
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        first, uri = await svc.enroll(tx, member.user, member.email)
        second, _ = await svc.enroll(tx, member.user, member.email)  # replaces the first
    assert first != second
    assert pyotp.parse_uri(uri).issuer == "Acme Corp"
    if code_at(first, clock.step) != code_at(second, clock.step):
        with pytest.raises(MfaError):
            async with db.tenant_tx(member.tenant, None, "system") as tx:
                await svc.confirm(tx, member.user, code_at(first, clock.step))
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.confirm(tx, member.user, code_at(second, clock.step))
    with pytest.raises(MfaError):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.enroll(tx, member.user, member.email)  # a confirmed factor exists
    with pytest.raises(MfaError):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.confirm(tx, member.user, code_at(second, clock.step + 1))  # nothing pending
    clock.step += 1
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, code_at(second, clock.step))


async def test_admin_cannot_remove_last_factor(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    secret, codes = await enrolled(db, svc, member, clock)
    with pytest.raises(LastFactorRequired):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.remove(tx, member.user, holds_admin_role=True)
    clock.step += 1
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.has_factor(tx, member.user)
        assert await svc.verify(tx, member.user, code_at(secret, clock.step))
        assert await svc.recovery_codes_left(tx, member.user) == 10

    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.remove(tx, member.user, holds_admin_role=False)
    clock.step += 1
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.has_factor(tx, member.user)
        assert not await svc.verify(tx, member.user, code_at(secret, clock.step))
        assert not await svc.use_recovery_code(tx, member.user, codes[0])


async def test_factor_rows_are_private_to_the_user(
    db: Database, keystore: LocalKeystore, member: Member, clock: Clock
) -> None:
    svc = MfaService(keystore)
    await enrolled(db, svc, member, clock)
    colleague = await TenantService(db).add_member(
        member.tenant, f"eve-{uuid4().hex[:6]}@example.test", "owner"
    )
    async with db.tenant_tx(member.tenant, colleague, "owner") as tx:
        assert not await svc.has_factor(tx, member.user)
        await svc.remove(tx, member.user, holds_admin_role=False)  # touches nothing
    async with db.tenant_tx(member.tenant, member.user, "owner") as tx:
        assert await svc.has_factor(tx, member.user)


def test_mfa_required_for_each_role() -> None:
    expected = {
        "owner": True,
        "billing-admin": True,
        "auditor": True,
        "contributor": False,
        "viewer": False,
    }
    for role, required in expected.items():
        assert mfa_required([role]) is required, role
        assert mfa_required({role, "viewer"}) is required, role
    assert mfa_required(["viewer", "owner"]) is True
    assert mfa_required([]) is False
    assert mfa_required("owner") is True  # a lone string is one role, not letters
    assert mfa_required("auditors") is False
    assert frozenset({"owner", "billing-admin", "auditor"}) == ADMIN_ROLES
