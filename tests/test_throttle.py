"""Throttling of password and code checks, against the real database and over
real HTTP: failures count, successes do not; key spaces no typed input can
name; X-Forwarded-For believed only from trusted proxies; others' failures
slow a user down by at most ``max_delay`` and never lock them out.

The HTTP tests run two api apps on one database: ``direct`` (no trusted
proxy: the socket peer, 127.0.0.1, is the client) and ``proxied`` (127.0.0.1
is a trusted proxy, so each test picks its clients' addresses through
X-Forwarded-For and does not share a counter with another test).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID, uuid4

import anyio
import httpx
import psycopg
import pyotp
import pytest
from argon2 import PasswordHasher, Type
from fastapi import FastAPI

from bastion.api.middleware import forwarded_client
from bastion.compose import Identity, Overrides, build_api
from bastion.db.pool import Database
from bastion.identity.client import login
from bastion.identity.errors import Throttled
from bastion.identity.passwords import PasswordService
from bastion.identity.service import CLI_CLIENT_ID, CLI_REDIRECT_URI, s256
from bastion.identity.throttle import Kind, LoginThrottle, Reservation, client_network
from bastion.secrets import LocalKeystore
from bastion.settings import Settings
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles
from tests.http_server import serving

pytestmark = [pytest.mark.anyio, pytest.mark.serial]  # timing bounds: see Makefile `test`

PLATFORM = UUID(int=0)
PASSWORD = "correct horse battery staple 42"
# The HTTP stacks' bound on any check's wait (settings.login_max_delay_seconds).
MAX_DELAY = 1.0
# What a sign-in itself may take on a loaded 2-core test machine.
SLACK = 2.5
# Cheap argon2id: the hash parameters are not under test here, throughput is.
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID)
KEY_FORMAT = re.compile(
    r"(login-account|login-account-address|address|mfa-user|password-change-user):[0-9a-f]{64}"
)


def fresh_ip() -> str:
    """A documentation-range IPv6 /64 of this test alone (the module's database is shared)."""
    n = uuid4().int
    return f"2001:db8:{n % 65536:x}:{(n >> 16) % 65536:x}::1"


def fresh_v4() -> str:
    """A random address in 100.64.0.0/10 (no test shares one by chance)."""
    return str(ipaddress.IPv4Address(0x64400000 + secrets.randbelow(1 << 22)))


def fresh_account() -> str:
    return f"user-{uuid4().hex[:10]}@example.test"


def new_throttle(**overrides: object) -> LoginThrottle:
    return LoginThrottle(b"k" * 32, **overrides)  # type: ignore[arg-type]


async def reserve(
    db: Database, throttle: LoginThrottle, account: str, ip: str, tenant: str = "acme"
) -> Reservation | int:
    """Reserve one login check in its own transaction; the reservation, or the
    ``retry_after`` of the refusal."""
    try:
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            return await throttle.login(tx, tenant, account, ip)
    except Throttled as exc:
        return exc.retry_after


async def fail(db: Database, throttle: LoginThrottle, account: str, ip: str) -> int | None:
    """One failed check: None if it was allowed, else retry_after."""
    outcome = await reserve(db, throttle, account, ip)
    return outcome if isinstance(outcome, int) else None


async def rows(db: Database, *keys: str) -> dict[str, dict[str, object]]:
    """The stored counters of ``keys`` (as the system role: no other sees them)."""
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        found = await (
            await tx.execute(
                "SELECT key, attempts, locked_until FROM bastion.login_throttle "
                "WHERE key = ANY(%s)",
                (list(keys),),
            )
        ).fetchall()
    return {row["key"]: dict(row) for row in found}


# -- the counters, against the database ------------------------------------------------


async def test_sixth_failure_from_one_address_is_refused_for_that_address_only(
    db: Database,
) -> None:
    throttle = new_throttle()
    account, ip = fresh_account(), fresh_ip()
    results = [await fail(db, throttle, account, ip) for _ in range(7)]
    assert results[:5] == [None] * 5
    assert results[5] is not None and 0 < results[5] <= 15 * 60
    assert results[6] is not None and results[6] > 0
    # The refused attempts were not counted; the lock is stored, for this address.
    pair = throttle.account_address_key("acme", account, ip)
    stored = await rows(db, pair)
    assert stored[pair]["attempts"] == 5 and stored[pair]["locked_until"] is not None
    # Another address is not refused: at most slowed down (bounded).
    elsewhere = await reserve(db, throttle, account, fresh_ip())
    assert isinstance(elsewhere, Reservation) and elsewhere.delay <= throttle.max_delay


async def test_throttled_message_carries_nothing_of_the_account(db: Database) -> None:
    throttle = new_throttle(pair_limit=1)
    account, ip = fresh_account(), fresh_ip()
    assert await fail(db, throttle, account, ip) is None
    with pytest.raises(Throttled) as info:
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await throttle.login(tx, "acme", account, ip)
    assert account not in str(info.value) and ip not in str(info.value)


async def test_unknown_account_is_throttled_like_an_existing_one(db: Database) -> None:
    suffix = uuid4().hex[:8]
    svc = TenantService(db)
    tenant = await svc.create_tenant(f"th-{suffix}", "Throttle")
    existing = f"real-{suffix}@example.test"
    await svc.add_member(tenant.id, existing, "viewer")
    missing = f"ghost-{suffix}@example.test"
    throttle = new_throttle()
    seen = {}
    for account in (existing, missing):
        ip = fresh_ip()
        results = [await fail(db, throttle, account, ip) for _ in range(6)]
        seen[account] = [r is None for r in results]
    assert seen[existing] == seen[missing] == [True] * 5 + [False]


async def test_keys_are_code_chosen_kinds_over_an_hmac_of_the_typed_parts() -> None:
    throttle, other = new_throttle(), LoginThrottle(b"o" * 32)
    victim = uuid4()
    base = fresh_account()
    # Normalised: case and surrounding spaces of the e-mail do not matter.
    assert throttle.account_key("acme", f"  {base.upper()} ") == throttle.account_key("acme", base)
    keys = {
        throttle.account_key("acme", base),
        throttle.account_key("globex", base),
        throttle.account_address_key("acme", base, "192.0.2.1"),
        throttle.address_key("192.0.2.1"),
        throttle.user_key(Kind.MFA_USER, victim),
        throttle.user_key(Kind.PASSWORD_CHANGE_USER, victim),
    }
    # A typed name that spells another kind's key stays in the login-account kind.
    for typed in (f"mfa:{victim}", f"mfa-user:{victim}", f"pwchange:{victim}", str(victim)):
        key = throttle.account_key("acme", typed)
        assert key.startswith("login-account:") and key not in keys
        keys.add(key)
    assert len(keys) == 10 and all(KEY_FORMAT.fullmatch(key) for key in keys)
    assert all(base not in key and "192.0.2.1" not in key for key in keys)
    # The parts are encoded unambiguously: moving a separator changes the key.
    assert throttle.account_key("a", "b@c") != throttle.account_key("a\x00b", "@c")
    # Another deployment's key gives other keys (the table is no dictionary).
    assert other.account_key("acme", base) != throttle.account_key("acme", base)
    with pytest.raises(ValueError):
        throttle.user_key(Kind.ADDRESS, victim)


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_network("2001:db8:1:2::1") == client_network("2001:db8:1:2:ffff::9")
    assert client_network("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:3::1") != client_network("2001:db8:1:2::1")
    assert client_network("::ffff:192.0.2.7") == client_network("192.0.2.7") == "192.0.2.7"
    assert client_network(" unknown ") == "unknown"


async def test_success_ends_the_run_and_gives_back_its_place(db: Database) -> None:
    throttle = new_throttle()
    account, ip = fresh_account(), fresh_ip()
    for _ in range(4):
        assert await fail(db, throttle, account, ip) is None
    # The fifth reservation reaches the limit and sets the lock; its success lifts it.
    fifth = await reserve(db, throttle, account, ip)
    assert isinstance(fifth, Reservation) and fifth.locked
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await throttle.succeeded(tx, fifth)
    pair = throttle.account_address_key("acme", account, ip)
    acct, addr = throttle.account_key("acme", account), throttle.address_key(ip)
    stored = await rows(db, pair, acct, addr)
    assert stored[pair]["attempts"] == 0 and stored[pair]["locked_until"] is None
    # The delay counters keep the four failures, not the success.
    assert stored[acct]["attempts"] == 4 and stored[addr]["attempts"] == 4
    results = [await fail(db, throttle, account, ip) for _ in range(6)]
    assert results[:5] == [None] * 5 and results[5] is not None


async def test_counter_resets_when_window_and_lockout_have_passed(db: Database) -> None:
    throttle = new_throttle()
    account, ip = fresh_account(), fresh_ip()
    for _ in range(5):
        await fail(db, throttle, account, ip)
    assert await fail(db, throttle, account, ip) is not None
    # Let the lockout and the window end, as if 16 minutes had passed.
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        await tx.execute(
            "UPDATE bastion.login_throttle SET locked_until = now() - interval '1 second', "
            "window_start = now() - interval '16 minutes' WHERE key = %s",
            (throttle.account_address_key("acme", account, ip),),
        )
    results = [await fail(db, throttle, account, ip) for _ in range(6)]
    assert results[:5] == [None] * 5 and results[5] is not None


async def test_failures_from_one_address_slow_it_down_up_to_the_cap_and_never_lock(
    db: Database,
) -> None:
    throttle = new_throttle(address_free=3, max_delay=timedelta(seconds=2))
    ip = fresh_ip()
    delays = []
    for _ in range(12):  # twelve accounts, one guess each: credential stuffing
        outcome = await reserve(db, throttle, fresh_account(), ip)
        assert isinstance(outcome, Reservation)
        delays.append(outcome.delay)
    assert delays[:3] == [0.0] * 3
    assert delays[3:7] == [0.5, 1.0, 2.0, 2.0]
    assert set(delays[7:]) == {2.0}
    # Another address is not slowed down by them.
    clean = await reserve(db, throttle, fresh_account(), fresh_ip())
    assert isinstance(clean, Reservation) and clean.delay == 0.0


async def test_throttle_rows_are_out_of_reach_without_system_role(db: Database) -> None:
    throttle = new_throttle()
    assert await fail(db, throttle, fresh_account(), fresh_ip()) is None
    async with db.tenant_tx(PLATFORM, None, "owner") as tx:
        seen = await (await tx.execute("SELECT key FROM bastion.login_throttle")).fetchall()
        cur = await tx.execute("DELETE FROM bastion.login_throttle")
    assert seen == [] and cur.rowcount == 0


async def _parallel(
    database: DbHandles, throttle: LoginThrottle, account: str, addresses: list[str]
) -> tuple[list[Reservation], list[int]]:
    """Reserve one check per address, all at once; the reservations and refusals."""
    allowed: list[Reservation] = []
    refused: list[int] = []
    async with Database(database.app, database.context_key, min_size=20, max_size=20) as big:
        start = anyio.Event()

        async def one(ip: str) -> None:
            await start.wait()
            try:
                async with big.tenant_tx(PLATFORM, None, "system") as tx:
                    reservation = await throttle.login(tx, "acme", account, ip)
                    # Hold the reservation a moment, as a password check would.
                    await anyio.sleep(0.01)
            except Throttled as exc:
                refused.append(exc.retry_after)
            else:
                allowed.append(reservation)

        async with anyio.create_task_group() as tg:
            for ip in addresses:
                tg.start_soon(one, ip)
            await anyio.sleep(0.05)  # every task is waiting on the same event
            start.set()
    return allowed, refused


async def test_fifty_parallel_guesses_from_one_address_get_five_checks(
    database: DbHandles,
) -> None:
    throttle = new_throttle()
    allowed, refused = await _parallel(database, throttle, fresh_account(), [fresh_ip()] * 50)
    assert len(allowed) == 5 and len(refused) == 45
    assert all(retry_after > 0 for retry_after in refused)


async def test_fifty_parallel_guesses_from_fifty_addresses_are_slowed_not_refused(
    database: DbHandles,
) -> None:
    throttle = new_throttle()
    allowed, refused = await _parallel(
        database, throttle, fresh_account(), [fresh_ip() for _ in range(50)]
    )
    assert refused == [] and len(allowed) == 50
    # They saw each other's reservations: all but the first five wait, none beyond the cap.
    delays = sorted(reservation.delay for reservation in allowed)
    assert delays[:5] == [0.0] * 5
    assert delays[5] == 0.5 and delays[-1] == throttle.max_delay == 4.0


# -- X-Forwarded-For ---------------------------------------------------------------------

TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ffff::/48")]


@pytest.mark.parametrize(
    ("peer", "header", "client"),
    [
        # No trusted peer: the header, whatever it says, is ignored.
        ("192.0.2.1", ["203.0.113.9"], "192.0.2.1"),
        ("192.0.2.1", ["10.0.0.1, 203.0.113.9"], "192.0.2.1"),
        # From a trusted proxy: the rightmost untrusted hop; a client's own
        # entries further left are never reached.
        ("10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
        ("10.0.0.1", ["198.51.100.66, 203.0.113.9"], "203.0.113.9"),
        ("10.0.0.1", ["198.51.100.66", "203.0.113.9, 10.0.0.2"], "203.0.113.9"),
        ("10.0.0.1", ["203.0.113.9:4711, 10.9.9.9"], "203.0.113.9"),
        ("2001:db8:ffff::1", ["[2001:db8:1::5]:443"], "2001:db8:1::5"),
        ("::ffff:10.0.0.1", ["203.0.113.9"], "203.0.113.9"),
        # Garbage or "unknown" stops at the last trusted hop; all trusted: the leftmost.
        ("10.0.0.1", ["203.0.113.9, garbage"], "10.0.0.1"),
        ("10.0.0.1", ["203.0.113.9, unknown, 10.0.0.3"], "10.0.0.3"),
        ("10.0.0.1", ["10.0.0.7, 10.0.0.3"], "10.0.0.7"),
        ("10.0.0.1", [], "10.0.0.1"),
    ],
)
def test_forwarded_client_reads_right_to_left_through_trusted_proxies_only(
    peer: str, header: list[str], client: str
) -> None:
    assert forwarded_client(peer, header, TRUSTED) == client
    assert forwarded_client(peer, header, []) == peer


# -- over real HTTP ------------------------------------------------------------------------


@dataclass
class Stack:
    url: str
    identity: Identity
    tenant: UUID
    slug: str


@contextlib.contextmanager
def _serve(
    database: DbHandles, keystore: LocalKeystore, trusted: list[str], tenant: list[UUID]
) -> Iterator[Stack]:
    """The api (as compose builds it) on ``database``; its tenant is created once."""
    built: list[Identity] = []

    def build(url: str) -> FastAPI:
        db = Database(database.app, database.context_key, max_size=8)
        settings = Settings(
            issuer=url,
            login_max_delay_seconds=MAX_DELAY,
            trusted_proxies=[ipaddress.ip_network(network) for network in trusted],
            internal_mtls=False,  # calls no gateway; plain is development on loopback
            dev_mode=True,
        )

        async def on_start(db: Database) -> None:
            if not tenant:
                created = await TenantService(db).create_tenant("throttle-http", "Throttle")
                tenant.append(created.id)

        overrides = Overrides(
            database=db,
            keystore=keystore,
            passwords=PasswordService(hasher=FAST),
            on_start=on_start,
        )
        api = build_api(settings, overrides)
        built.append(api.identity)
        return api.app

    with serving(build) as url:
        yield Stack(url, built[0], tenant[0], "throttle-http")


@pytest.fixture(scope="module")
def stacks(database: DbHandles, keystore: LocalKeystore) -> Iterator[tuple[Stack, Stack]]:
    """(direct, proxied): the same api without and with 127.0.0.1 as a trusted proxy."""
    tenant: list[UUID] = []
    with (
        _serve(database, keystore, [], tenant) as direct,
        _serve(database, keystore, ["127.0.0.1/32"], tenant) as proxied,
    ):
        yield direct, proxied


@pytest.fixture
def direct(stacks: tuple[Stack, Stack]) -> Stack:
    return stacks[0]


@pytest.fixture
def proxied(stacks: tuple[Stack, Stack]) -> Stack:
    return stacks[1]


async def _member(db: Database, stack: Stack, role: str = "viewer") -> tuple[str, UUID]:
    email = f"m-{uuid4().hex[:10]}@example.test"
    user_id = await TenantService(db).add_member(stack.tenant, email, role)
    async with db.tenant_tx(stack.tenant, None, "system") as tx:
        await PasswordService(hasher=FAST).set_password(tx, user_id, PASSWORD)
    return email, user_id


async def _sign_in(
    http: httpx.AsyncClient,
    stack: Stack,
    email: str,
    password: str = PASSWORD,
    client: str | None = None,
) -> httpx.Response:
    """POST the sign-in form (through the proxy as ``client`` when given)."""
    params = {
        "response_type": "code",
        "client_id": CLI_CLIENT_ID,
        "redirect_uri": CLI_REDIRECT_URI,
        "scope": "openid",
        "state": "st",
        "code_challenge": s256(secrets.token_urlsafe(48)),
        "code_challenge_method": "S256",
        "tenant": stack.slug,
        "email": email,
        "password": password,
    }
    headers = {"X-Forwarded-For": client} if client else {}
    return await http.post(f"{stack.url}/authorize", data=params, headers=headers)


async def _audit(db: Database, tenant: UUID, action: str) -> list[dict[str, object]]:
    async with db.tenant_tx(tenant, None, "system") as tx:
        found = await (
            await tx.execute(
                "SELECT target, details FROM bastion.audit_events WHERE action = %s", (action,)
            )
        ).fetchall()
    return [dict(row) for row in found]


async def _codes(db: Database, tenant: UUID, user_id: UUID) -> int:
    async with db.tenant_tx(tenant, None, "system") as tx:
        row = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.auth_codes WHERE user_id = %s", (user_id,)
            )
        ).fetchone()
    assert row is not None
    return int(row["n"])


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
        yield client


async def test_sixty_successful_sign_ins_from_one_address_lock_no_one_out(
    proxied: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    # Behind a proxy everyone may share one address: successes must not count.
    shared = fresh_v4()
    busy, _ = await _member(db, proxied)
    other, other_id = await _member(db, proxied)
    for _ in range(60):
        assert (await _sign_in(http, proxied, busy, client=shared)).status_code == 303
    started = time.monotonic()
    answer = await _sign_in(http, proxied, other, client=shared)
    assert answer.status_code == 303, answer.text
    assert time.monotonic() - started < SLACK  # not even slowed down
    assert await _codes(db, proxied.tenant, other_id) == 1
    address = proxied.identity.service.throttle.address_key(shared)
    assert (await rows(db, address))[address]["attempts"] == 0


async def test_typed_names_of_other_key_spaces_do_not_touch_the_victims_counters(
    proxied: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    victim_email, victim = await _member(db, proxied, "contributor")
    async with db.tenant_tx(proxied.tenant, None, "system") as tx:
        mfa = proxied.identity.service.mfa
        secret, _uri = await mfa.enroll(tx, victim, victim_email)
        await mfa.confirm(tx, victim, pyotp.TOTP(secret).at(time.time() - 30))
    # An anonymous stranger names the victim's MFA and password-change counters
    # as e-mails, more often than any of their limits.
    stranger = fresh_v4()
    typed = [f"mfa:{victim}", f"pwchange:{victim}", f"mfa-user:{victim}"]
    typed.append(f"password-change-user:{victim}")
    for name in typed:
        statuses = [
            (await _sign_in(http, proxied, name, "guess-guess", client=stranger)).status_code
            for _ in range(6)
        ]
        assert statuses == [401] * 5 + [429]  # each typed name is just an unknown account
    # The victim signs in with the second factor and changes the password: not refused.
    async with httpx.AsyncClient(
        timeout=30, follow_redirects=False, headers={"X-Forwarded-For": fresh_v4()}
    ) as own:
        tokens = await login(
            own,
            proxied.url,
            tenant=proxied.slug,
            email=victim_email,
            password=PASSWORD,
            totp=pyotp.TOTP(secret).now(),
        )
        url = f"{proxied.url}/me/password"
        changed = await own.post(
            url,
            json={"current_password": PASSWORD, "new_password": "violet anchor meadow 73 drifting"},
            headers=tokens.headers("POST", url),
        )
    assert changed.status_code == 204, changed.text
    # Nothing the stranger typed reached them: the victim's own checks left them at 0.
    throttle = proxied.identity.service.throttle
    mfa_key = throttle.user_key(Kind.MFA_USER, victim)
    change_key = throttle.user_key(Kind.PASSWORD_CHANGE_USER, victim)
    stored = await rows(db, mfa_key, change_key)
    assert {key: row["attempts"] for key, row in stored.items()} == {mfa_key: 0, change_key: 0}
    # And no key in the table holds typed text: every one is a kind and a digest.
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        found = await (await tx.execute("SELECT key FROM bastion.login_throttle")).fetchall()
    keys = [row["key"] for row in found]
    assert keys and all(KEY_FORMAT.fullmatch(key) for key in keys)


async def test_password_change_failures_on_ten_accounts_do_not_block_another(
    proxied: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    office = fresh_v4()  # every account behind one address, as behind a NAT
    url = f"{proxied.url}/me/password"
    headers = {"X-Forwarded-For": office}

    async def signed_in(email: str) -> object:
        async with httpx.AsyncClient(timeout=30, headers=headers) as own:
            return await login(
                own, proxied.url, tenant=proxied.slug, email=email, password=PASSWORD
            )

    members = [await _member(db, proxied, "contributor") for _ in range(11)]
    tokens = [await signed_in(email) for email, _ in members]
    statuses: dict[int, list[int]] = {}

    async def guess(i: int) -> None:
        statuses[i] = []
        for _ in range(6):
            answer = await http.post(
                url,
                json={"current_password": "not it at all, no", "new_password": "x" * 12},
                headers={**headers, **tokens[i].headers("POST", url)},  # type: ignore[attr-defined]
            )
            statuses[i].append(answer.status_code)
            if answer.status_code == 429:
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["type"].endswith("/too-many-attempts")
                assert int(answer.headers["retry-after"]) > 0

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(guess, i)
    # Each guesser locked only itself: five wrong answers, then refused.
    assert all(statuses[i] == [403] * 5 + [429] for i in range(10))
    started = time.monotonic()
    changed = await http.post(
        url,
        json={"current_password": PASSWORD, "new_password": "violet anchor meadow 73 drifting"},
        headers={**headers, **tokens[10].headers("POST", url)},  # type: ignore[attr-defined]
    )
    assert changed.status_code == 204, changed.text
    # Fifty failures from its address slowed it down by at most the bound.
    assert time.monotonic() - started < MAX_DELAY + SLACK
    throttle = proxied.identity.service.throttle
    own_key = throttle.user_key(Kind.PASSWORD_CHANGE_USER, members[10][1])
    assert (await rows(db, own_key))[own_key]["attempts"] == 0
    locked = await _audit(db, proxied.tenant, "password_change.locked")
    assert sorted(str(event["target"]) for event in locked) == sorted(
        f"user:{user_id}" for _, user_id in members[:10]
    )


def _from(address: str) -> httpx.AsyncClient:
    """A client whose connections come from the loopback address ``address``."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(timeout=30, follow_redirects=False, transport=transport)


@pytest.mark.parametrize(
    ("which", "stranger"),
    [(0, "127.0.0.1"), (1, "127.0.0.2")],
    ids=["no-trusted-proxy", "peer-is-not-the-trusted-proxy"],
)
async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    stacks: tuple[Stack, Stack], db: Database, which: int, stranger: str
) -> None:
    # The stranger names the victim's address in X-Forwarded-For to lock the
    # victim's account there. Neither uvicorn nor the app may believe him: on
    # the direct api no peer is a proxy (not even 127.0.0.1, uvicorn's default),
    # on the proxied one only 127.0.0.1 is.
    stack, victims_address = stacks[which], "127.0.0.3"
    email, user_id = await _member(db, stack)
    async with _from(stranger) as http:
        statuses = [
            (await _sign_in(http, stack, email, "wrong wrong wrong", victims_address)).status_code
            for _ in range(6)
        ]
    assert statuses == [401] * 5 + [429]
    async with _from(victims_address) as http:
        answer = await _sign_in(http, stack, email)
    assert answer.status_code == 303, answer.text
    assert await _codes(db, stack.tenant, user_id) == 1
    # The counters and the audit event name the stranger's own address.
    throttle = stack.identity.service.throttle
    theirs = throttle.account_address_key(stack.slug, email, stranger)
    named = throttle.account_address_key(stack.slug, email, victims_address)
    stored = await rows(db, theirs, named)
    assert stored[theirs]["attempts"] == 5 and stored[theirs]["locked_until"] is not None
    assert stored[named]["attempts"] == 0 and stored[named]["locked_until"] is None
    events = await _audit(db, stack.tenant, "login.locked")
    mine = [event for event in events if event["target"] == f"user:{user_id}"]
    assert mine == [{"target": f"user:{user_id}", "details": {"address": stranger}}]


async def test_forwarded_for_from_a_trusted_proxy_is_honoured_and_cannot_be_spoofed(
    proxied: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    email, user_id = await _member(db, proxied)
    victims_address, attackers_address = fresh_v4(), fresh_v4()
    # The attacker writes the victim's address; the proxy appends the real one.
    chain = f"{victims_address}, {attackers_address}"
    statuses = [
        (await _sign_in(http, proxied, email, "wrong wrong wrong", client=chain)).status_code
        for _ in range(6)
    ]
    assert statuses == [401] * 5 + [429]
    # Locked for the attacker's address only; the victim's correct password passes.
    assert (await _sign_in(http, proxied, email, client=chain)).status_code == 429
    assert await _codes(db, proxied.tenant, user_id) == 0
    assert (await _sign_in(http, proxied, email, client=victims_address)).status_code == 303
    assert await _codes(db, proxied.tenant, user_id) == 1
    # The counters: the attacker's pair locked after five (refusals not counted);
    # the victim's, keyed on the address the proxy saw, clean.
    throttle = proxied.identity.service.throttle
    theirs = throttle.account_address_key(proxied.slug, email, attackers_address)
    victims = throttle.account_address_key(proxied.slug, email, victims_address)
    stored = await rows(db, theirs, victims)
    assert stored[theirs]["attempts"] == 5 and stored[theirs]["locked_until"] is not None
    assert stored[victims]["attempts"] == 0 and stored[victims]["locked_until"] is None
    # The lockout was audited once, with the address it holds for.
    events = await _audit(db, proxied.tenant, "login.locked")
    mine = [event for event in events if event["target"] == f"user:{user_id}"]
    assert mine == [{"target": f"user:{user_id}", "details": {"address": attackers_address}}]


async def test_wrong_password_flood_from_many_addresses_delays_the_victim_by_at_most_the_bound(
    proxied: Stack, http: httpx.AsyncClient, db: Database
) -> None:
    email, user_id = await _member(db, proxied)
    statuses: list[int] = []

    async def attacker() -> None:
        address = fresh_v4()
        for _ in range(2):
            answer = await _sign_in(http, proxied, email, "wrong wrong wrong", client=address)
            statuses.append(answer.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(30):
            tg.start_soon(attacker)
    started = time.monotonic()
    answer = await _sign_in(http, proxied, email, client=fresh_v4())
    elapsed = time.monotonic() - started
    assert answer.status_code == 303, answer.text
    # No attacker was refused either (two guesses per address): slowed down only.
    assert statuses == [401] * 60
    assert await _codes(db, proxied.tenant, user_id) == 1
    # Slowed down (the account is under attack) by at most MAX_DELAY, plus the check.
    assert MAX_DELAY <= elapsed < MAX_DELAY + SLACK


@pytest.mark.parametrize("key", ["acct:victim@a.test", "mfa:" + "0" * 64, "ip:127.0.0.1"])
async def test_the_database_refuses_a_key_of_another_shape(db: Database, key: str) -> None:
    """Migration 0019: only ``<kind>:<64 hex>`` keys exist, even for SQL that
    bypasses the throttle's own key function; nothing is written."""
    with pytest.raises(psycopg.errors.CheckViolation):
        async with db.tenant_tx(PLATFORM, None, "system") as tx:
            await tx.execute("INSERT INTO bastion.login_throttle (key) VALUES (%s)", (key,))
    async with db.tenant_tx(PLATFORM, None, "system") as tx:
        row = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.login_throttle WHERE key = %s", (key,)
            )
        ).fetchone()
    assert row == {"n": 0}
