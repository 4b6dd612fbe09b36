"""Throttling of password and code checks: slow guessers down, lock out only
the address that failed.

Implements the rate limiting NIST SP 800-63B section 5.2.2 requires of
verifiers, with its "increasing wait times" to keep an attacker from locking
the real user out, and OWASP's Authentication Cheat Sheet ("Account lockout":
lockouts are a denial-of-service lever; prefer delays, scope lockouts). Three
kinds of counter, each counting *failed* checks within ``window``:

- per account **and client address** (``login-account-address``): the
  ``pair_limit``-th failure locks that account for that address only, for
  ``lockout``. Someone guessing from one address stops there; the account's
  owner at any other address is not refused.
- per account, all addresses (``login-account``) and per client address, all
  accounts (``address``): past ``account_free`` / ``address_free`` failures
  every further check waits ``base_delay * 2**n`` seconds, at most
  ``max_delay``, and is then made. Never a refusal: whatever others do, a
  correct password is accepted after at most ``max_delay`` (plus the check).
- per user, for the second factor (``mfa-user``) and for the current password
  at a password change (``password-change-user``): ``user_limit`` failures lock
  the factor. Keyed on the user id of a signed login ticket or a verified
  token, never on anything a caller types, and reaching them takes the user's
  password or session already.

The price of never refusing the owner: an attacker with many addresses gets
``pair_limit`` guesses per address and window on one account, each held up
to ``max_delay`` once the account is under attack. IPv6 counts per /64, the
password policy refuses guessable passwords, and admin-grade roles must have
a second factor, whose counter is per user (a hard limit).

Key spaces no input can name: a key is ``<kind>:<hex>``, the kind chosen here
in code, the hex an HMAC-SHA256 (RFC 2104) under a secret key of the
unambiguous encoding of the kind and its parts. An e-mail such as
``mfa-user:<uuid>`` is hashed like any other; and the table holds no e-mail
or address in clear.

Client addresses: an IPv4 address counts as itself, an IPv6 address as its
/64 (one host commonly holds a whole /64). The address must already be the
real client's (see the api's ``ClientAddressMiddleware``).

An attempt is *reserved* before the check, one atomic ``INSERT ... ON
CONFLICT DO UPDATE ... RETURNING`` per key, keys in sorted order (so
concurrent reservations cannot deadlock): fifty parallel guesses from one
address still get at most ``pair_limit`` checks, and parallel checks see each
other's reservations in their delays. A correct check then gives its
reservation back (:meth:`LoginThrottle.succeeded`): only failures stay
counted. The table is reachable only with the ``system`` role.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from uuid import UUID

from bastion.db.pool import Conn
from bastion.identity.errors import Throttled


class Kind(StrEnum):
    """What a counter counts; the prefix of its key."""

    ACCOUNT = "login-account"
    ACCOUNT_ADDRESS = "login-account-address"
    ADDRESS = "address"
    MFA_USER = "mfa-user"
    PASSWORD_CHANGE_USER = "password-change-user"  # noqa: S105 (a counter, no secret)


# One statement per key. ``t`` is the stored row (its values before this
# update), ``now()`` the transaction's start. A row starts a fresh window when
# its lockout has ended, or when its window has ended and it is not locked.
# ``limit`` is NULL for counters that never lock; otherwise the reservation
# that reaches it sets the lockout (and is itself allowed).
_RESERVE = """
INSERT INTO bastion.login_throttle AS t (key, attempts, window_start, locked_until)
VALUES (%(key)s, 1, now(),
        CASE WHEN 1 >= %(limit)s::int THEN now() + %(lockout)s END)
ON CONFLICT (key) DO UPDATE SET
    attempts = CASE
        WHEN (t.locked_until IS NOT NULL AND t.locked_until <= now())
          OR (t.locked_until IS NULL AND t.window_start <= now() - %(window)s)
        THEN 1
        ELSE LEAST(t.attempts, 1000000) + 1
    END,
    window_start = CASE
        WHEN (t.locked_until IS NOT NULL AND t.locked_until <= now())
          OR (t.locked_until IS NULL AND t.window_start <= now() - %(window)s)
        THEN now()
        ELSE t.window_start
    END,
    locked_until = CASE
        WHEN (t.locked_until IS NOT NULL AND t.locked_until <= now())
          OR (t.locked_until IS NULL AND t.window_start <= now() - %(window)s)
        THEN CASE WHEN 1 >= %(limit)s::int THEN now() + %(lockout)s END
        WHEN t.locked_until IS NOT NULL THEN t.locked_until
        WHEN t.attempts + 1 >= %(limit)s::int THEN now() + %(lockout)s
    END
RETURNING attempts,
    GREATEST(1, ceil(extract(epoch FROM
        coalesce(locked_until, window_start + %(window)s) - now())))::int AS retry_after
"""

# A correct check ends its lock counters' run of failures ("consecutive
# failed attempts", NIST 5.2.2) and gives its place back in the delay counters
# (where others' failures stay counted).
_RESET = (
    "UPDATE bastion.login_throttle SET attempts = 0, window_start = now(), locked_until = NULL "
    "WHERE key = %s"
)
_REFUND = "UPDATE bastion.login_throttle SET attempts = GREATEST(attempts - 1, 0) WHERE key = %s"


def client_network(address: str) -> str:
    """Return what a client address counts as: an IPv4 address itself, an IPv6
    address its /64, anything unparseable (no socket peer) its stripped text."""
    text = address.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class _Counter:
    key: str
    limit: int | None  # failures that lock; None: never locks, only slows down
    free: int  # failures before the first delay (counters that never lock)


@dataclass(frozen=True)
class Reservation:
    """One attempt's place in its counters.

    ``delay`` is how long the caller must wait before making the check;
    ``locked`` says that this attempt reached a lock limit (if it fails, the
    next attempt is refused: worth an audit event).
    """

    delay: float
    locked: bool
    reset_keys: tuple[str, ...]
    refund_keys: tuple[str, ...]


class LoginThrottle:
    """Counts failed password and code checks (see the module docstring).

    Call :meth:`login`, :meth:`second_factor` or :meth:`password_change`
    before a check, wait the returned delay, check, and call :meth:`succeeded`
    after a correct one. All take a transaction with the ``system`` role.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        pair_limit: int = 5,
        user_limit: int = 5,
        account_free: int = 5,
        address_free: int = 20,
        base_delay: timedelta = timedelta(milliseconds=500),
        max_delay: timedelta = timedelta(seconds=4),
        window: timedelta = timedelta(minutes=15),
        lockout: timedelta = timedelta(minutes=15),
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the throttle key needs at least 16 bytes")
        if min(pair_limit, user_limit) < 1 or min(account_free, address_free) < 0:
            raise ValueError("limits must be at least 1, free failures at least 0")
        if min(base_delay, max_delay, window, lockout) <= timedelta(0):
            raise ValueError("delays, window and lockout must be positive")
        self._secret = secret
        self.pair_limit = pair_limit
        self.user_limit = user_limit
        self.account_free = account_free
        self.address_free = address_free
        self.base_delay = base_delay.total_seconds()
        self.max_delay = max_delay.total_seconds()
        self.window = window
        self.lockout = lockout

    # -- keys ----------------------------------------------------------------------

    def key(self, kind: Kind, *parts: str) -> str:
        """Return the key of counter ``kind`` for ``parts``: ``<kind>:<64 hex>``."""
        encoded = json.dumps([kind.value, *parts], separators=(",", ":")).encode()
        return f"{kind.value}:{hmac.new(self._secret, encoded, hashlib.sha256).hexdigest()}"

    def account_key(self, tenant: str, email: str) -> str:
        """The ``login-account`` key of ``email`` in the tenant named ``tenant``."""
        return self.key(Kind.ACCOUNT, tenant, email.strip().lower())

    def account_address_key(self, tenant: str, email: str, address: str) -> str:
        """The ``login-account-address`` key of ``email`` in ``tenant`` from ``address``."""
        return self.key(
            Kind.ACCOUNT_ADDRESS, tenant, email.strip().lower(), client_network(address)
        )

    def address_key(self, address: str) -> str:
        """The ``address`` key of a client address."""
        return self.key(Kind.ADDRESS, client_network(address))

    def user_key(self, kind: Kind, user_id: UUID) -> str:
        """The ``mfa-user`` or ``password-change-user`` key of ``user_id``."""
        if kind not in (Kind.MFA_USER, Kind.PASSWORD_CHANGE_USER):
            raise ValueError(f"{kind} is not keyed by user")
        return self.key(kind, str(user_id))

    # -- reserving -----------------------------------------------------------------------

    async def login(self, tx: Conn, tenant: str, email: str, address: str) -> Reservation:
        """Reserve a password check of ``email`` in the tenant slug ``tenant`` from
        ``address``; return the :class:`Reservation`.

        Unknown tenants and accounts count like known ones (no oracle). Raises
        :class:`Throttled` (with ``retry_after`` in seconds) if this account is
        locked for this address; the password must then not be checked.
        """
        return await self._reserve(
            tx,
            (
                _Counter(self.account_key(tenant, email), None, self.account_free),
                _Counter(self.account_address_key(tenant, email, address), self.pair_limit, 0),
                _Counter(self.address_key(address), None, self.address_free),
            ),
        )

    async def second_factor(self, tx: Conn, user_id: UUID, address: str) -> Reservation:
        """Reserve a TOTP or recovery-code check of ``user_id`` (from a signed login
        ticket) from ``address``. Raises :class:`Throttled` if the user's second
        factor is locked."""
        return await self._user_check(tx, Kind.MFA_USER, user_id, address)

    async def password_change(self, tx: Conn, user_id: UUID, address: str) -> Reservation:
        """Reserve a check of ``user_id``'s current password (the caller's verified
        token) from ``address``. Raises :class:`Throttled` if locked."""
        return await self._user_check(tx, Kind.PASSWORD_CHANGE_USER, user_id, address)

    async def succeeded(self, tx: Conn, reservation: Reservation) -> None:
        """Take back a correct check's reservation; return None."""
        # One row at a time in key order, as reservations lock them: no deadlock.
        for key in sorted((*reservation.reset_keys, *reservation.refund_keys)):
            await tx.execute(_RESET if key in reservation.reset_keys else _REFUND, (key,))

    # -- helpers ---------------------------------------------------------------------

    async def _user_check(self, tx: Conn, kind: Kind, user_id: UUID, address: str) -> Reservation:
        return await self._reserve(
            tx,
            (
                _Counter(self.user_key(kind, user_id), self.user_limit, 0),
                _Counter(self.address_key(address), None, self.address_free),
            ),
        )

    async def _reserve(self, tx: Conn, counters: tuple[_Counter, ...]) -> Reservation:
        """Count one attempt on every counter, in key order; return the reservation.

        Raises :class:`Throttled` if a locking counter is over its limit (the
        caller's transaction then rolls back, and no counter keeps the attempt).
        """
        delay, retry_after, locked = 0.0, 0, False
        for counter in sorted(counters, key=lambda c: c.key):
            row = await (
                await tx.execute(
                    _RESERVE,
                    {
                        "key": counter.key,
                        "limit": counter.limit,
                        "window": self.window,
                        "lockout": self.lockout,
                    },
                )
            ).fetchone()
            assert row is not None  # an upsert with RETURNING always returns its row
            attempts: int = row["attempts"]
            if counter.limit is None:
                delay = max(delay, self._delay(attempts - 1 - counter.free))
            elif attempts > counter.limit:
                retry_after = max(retry_after, int(row["retry_after"]))
            elif attempts == counter.limit:
                locked = True
        if retry_after:
            raise Throttled(retry_after)
        return Reservation(
            delay=delay,
            locked=locked,
            reset_keys=tuple(c.key for c in counters if c.limit is not None),
            refund_keys=tuple(c.key for c in counters if c.limit is None),
        )

    def _delay(self, excess: int) -> float:
        """Seconds to wait with ``excess`` failures (or pending checks) beyond the free ones."""
        if excess < 0:
            return 0.0
        return min(self.max_delay, self.base_delay * (1 << min(excess, 32)))
