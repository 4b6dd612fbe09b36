"""Password storage and policy against the real database and real argon2id.

Most tests use a cheap argon2id hasher so the history tests stay fast; the
production parameters are checked on their own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from uuid import UUID, uuid4

import pytest
from argon2 import PasswordHasher, Type

from bastion.db.pool import Database
from bastion.identity.errors import IdentityError, PasswordChanged, PasswordReused, WeakPassword
from bastion.identity.passwords import DEFAULT_HASHER, PasswordService
from bastion.tenants.service import TenantService

pytestmark = pytest.mark.anyio

FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID)


@dataclass
class Member:
    tenant: UUID
    user: UUID
    email: str


@pytest.fixture
async def member(db: Database) -> Member:
    svc = TenantService(db)
    suffix = uuid4().hex[:8]
    tenant = await svc.create_tenant(f"pw-{suffix}", "Passwords")
    email = f"carol.danvers-{suffix}@example.test"
    user = await svc.add_member(tenant.id, email, "contributor")
    return Member(tenant.id, user, email)


def strong() -> str:
    return f"Orbit-{secrets.token_urlsafe(12)}-lantern"


async def counts(db: Database, m: Member) -> tuple[int, int]:
    async with db.tenant_tx(m.tenant, None, "system") as tx:
        row = await (
            await tx.execute(
                "SELECT (SELECT count(*) FROM bastion.credentials WHERE user_id = %(u)s) AS c, "
                "(SELECT count(*) FROM bastion.password_history WHERE user_id = %(u)s) AS h",
                {"u": m.user},
            )
        ).fetchone()
    assert row is not None
    return int(row["c"]), int(row["h"])


async def stored_hash(db: Database, m: Member) -> str:
    async with db.tenant_tx(m.tenant, None, "system") as tx:
        row = await (
            await tx.execute(
                "SELECT password_hash FROM bastion.credentials WHERE user_id = %s", (m.user,)
            )
        ).fetchone()
    assert row is not None
    return str(row["password_hash"])


async def test_hash_is_argon2id_with_production_parameters(db: Database, member: Member) -> None:
    svc = PasswordService()
    password = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, password)
    stored = await stored_hash(db, member)
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=1$")
    assert password not in stored
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, password)
        assert not await svc.verify(tx, member.user, password + "x")


async def test_weak_common_short_and_long_passwords_write_nothing(
    db: Database, member: Member
) -> None:
    svc = PasswordService(hasher=FAST)
    first = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, first)
    before = await counts(db, member)
    assert before == (1, 0)
    refused = [
        "Sh0rt!pw",  # 8 characters
        "x" * 5 + "Q7!" * 85,  # 260 characters
        "password1234",  # on the built-in list (and zxcvbn's)
        "PASSWORD1234",  # the list is case-insensitive
        "aaaaaaaaaaaaaaaa",  # long enough, trivially guessable
        "qwertyuiopasdfgh",  # keyboard walk
        member.email,  # the user's own e-mail
    ]
    for password in refused:
        with pytest.raises(WeakPassword) as info:
            async with db.tenant_tx(member.tenant, None, "system") as tx:
                await svc.set_password(
                    tx, member.user, password, user_inputs=[member.email, "Carol Danvers"]
                )
        assert password not in str(info.value)
    assert await counts(db, member) == before
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, first)  # the old password still holds


async def test_user_inputs_make_a_password_weak(db: Database, member: Member) -> None:
    svc = PasswordService(hasher=FAST)
    personal = "zephyrinaquorble!"  # rates 4 on its own
    email = "zephyrinaquorble@example.test"
    with pytest.raises(WeakPassword):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.set_password(tx, member.user, personal, user_inputs=[email, "Z. Q."])
    assert await counts(db, member) == (0, 0)
    # Without the personal context the same password is acceptable.
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, personal, user_inputs=[member.email])
    assert await counts(db, member) == (1, 0)


async def test_current_and_last_ten_refused_eleventh_oldest_allowed(
    db: Database, member: Member
) -> None:
    svc = PasswordService(hasher=FAST, history=10)
    passwords = [strong() for _ in range(12)]  # p0 .. p11; p11 is current
    for password in passwords:
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.set_password(tx, member.user, password)
    assert await counts(db, member) == (1, 10)  # history trimmed to 10 rows
    current_hash = await stored_hash(db, member)
    for password in passwords[1:]:  # the current one and the 10 before it
        with pytest.raises(PasswordReused) as info:
            async with db.tenant_tx(member.tenant, None, "system") as tx:
                await svc.set_password(tx, member.user, password)
        assert password not in str(info.value)
    assert await counts(db, member) == (1, 10)
    assert await stored_hash(db, member) == current_hash
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, passwords[0])  # 11th-oldest: allowed
        assert await svc.verify(tx, member.user, passwords[0])
        assert not await svc.verify(tx, member.user, passwords[11])
    assert await counts(db, member) == (1, 10)
    # p11 went into the history, p1 fell out of it.
    with pytest.raises(PasswordReused):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.set_password(tx, member.user, passwords[11])
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, passwords[1])


async def test_a_change_prepared_against_a_password_changed_meanwhile_is_refused(
    db: Database, member: Member
) -> None:
    """Two changes checked concurrently against the same history (the hashing runs
    outside any transaction): the second to be stored is refused, nothing of it
    written, so neither slips a reused password past the other's check."""
    svc = PasswordService(hasher=FAST, history=10)
    first, second, third = strong(), strong(), strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, first)
        current, previous = await svc.known_hashes(tx, member.user)
    # Both to "second": each checked against a history that does not hold it yet.
    racing = [await svc.prepare(member.user, second, current, previous) for _ in range(2)]
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.store(tx, racing[0])
    before = (await counts(db, member), await stored_hash(db, member))
    with pytest.raises(PasswordChanged):
        async with db.tenant_tx(member.tenant, None, "system") as tx:
            await svc.store(tx, racing[1])
    assert (await counts(db, member), await stored_hash(db, member)) == before
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, second)
        await svc.set_password(tx, member.user, third)


async def test_verify_false_for_wrong_password_and_unknown_user(
    db: Database, member: Member
) -> None:
    svc = PasswordService(hasher=FAST)
    password = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await svc.verify(tx, member.user, password)  # no credentials yet
        await svc.set_password(tx, member.user, password)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await svc.verify(tx, member.user, password)
        assert not await svc.verify(tx, member.user, password.upper())
        assert not await svc.verify(tx, member.user, "")
        assert not await svc.verify(tx, uuid4(), password)  # no such user
    assert svc._dummy_hash is not None and svc._dummy_hash.startswith("$argon2id$")


async def test_other_users_cannot_read_or_set_credentials(db: Database, member: Member) -> None:
    svc = PasswordService(hasher=FAST)
    password = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, password)
    intruder = await TenantService(db).add_member(
        member.tenant, f"mallory-{uuid4().hex[:6]}@example.test", "owner"
    )
    async with db.tenant_tx(member.tenant, intruder, "owner") as tx:
        # RLS hides the row: to the intruder the victim has no password at all.
        assert not await svc.verify(tx, member.user, password)
    async with db.tenant_tx(member.tenant, member.user, "contributor") as tx:
        assert await svc.verify(tx, member.user, password)  # the user themself


async def test_old_parameters_are_rehashed_on_login(db: Database, member: Member) -> None:
    password = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await PasswordService(hasher=FAST).set_password(tx, member.user, password)
    assert "$m=1024,t=1," in await stored_hash(db, member)
    stronger = PasswordHasher(time_cost=2, memory_cost=2048, parallelism=1, type=Type.ID)
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert not await PasswordService(hasher=stronger).verify(tx, member.user, "nope" * 4)
    assert "$m=1024,t=1," in await stored_hash(db, member)  # no rehash on a failure
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        assert await PasswordService(hasher=stronger).verify(tx, member.user, password)
    rehashed = await stored_hash(db, member)
    assert "$m=2048,t=2," in rehashed
    assert stronger.verify(rehashed, password)


async def test_no_password_text_in_any_exception(db: Database, member: Member) -> None:
    svc = PasswordService(hasher=FAST, history=2)
    good = strong()
    async with db.tenant_tx(member.tenant, None, "system") as tx:
        await svc.set_password(tx, member.user, good)
    attempts = ["tiny", "Password1234", "abcabcabcabcabc", good]
    for password in attempts:
        with pytest.raises(IdentityError) as info:
            async with db.tenant_tx(member.tenant, None, "system") as tx:
                await svc.set_password(tx, member.user, password)
        text = f"{info.value!s} {info.value!r} {info.value.args!r}"
        assert password not in text
        assert password.lower() not in text.lower()


def test_default_hasher_follows_rfc_9106() -> None:
    assert DEFAULT_HASHER.type is Type.ID
    assert DEFAULT_HASHER.memory_cost == 64 * 1024
    assert DEFAULT_HASHER.time_cost == 3
    assert DEFAULT_HASHER.salt_len >= 16
