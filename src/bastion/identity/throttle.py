"""Login throttling per account and per client address.

Implements the rate limiting NIST SP 800-63B section 5.2.2 requires of
password verifiers (and OWASP ASVS V2.2.1): at most ``account_limit``
password checks per account and ``ip_limit`` per client address in a window,
then a lockout.

An attempt is *reserved* before the password is checked, with one atomic
``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per key: the row lock
serialises concurrent logins, so fifty parallel wrong guesses still get at
most ``account_limit`` password checks. The counter is only reset by a
successful login (:meth:`LoginThrottle.succeeded`) or when the window or the
lockout has passed.

The lockout is written by the reservation that reaches the limit (which is
itself allowed). The refused reservations that follow need not be committed:
a caller's transaction usually rolls back on :class:`Throttled`, and the
stored lock keeps holding regardless.

Accounts are keyed by the normalised e-mail whether or not such a user
exists, so the throttle is no oracle for which accounts exist. The table is
reachable only with the ``system`` role.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

from bastion.db.pool import Conn
from bastion.identity.errors import Throttled

# login_throttle.key is limited to 400 characters; longer keys are hashed.
_MAX_KEY = 400

# One statement per key. ``t`` is the stored row (its values before this
# update), ``now()`` the transaction's start. A row resets to a fresh window
# when its lockout has ended, or when its window has ended and it is not
# locked. The reservation that reaches the limit sets the lockout.
_RESERVE = """
INSERT INTO bastion.login_throttle AS t (key, attempts, window_start, locked_until)
VALUES (%(key)s, 1, now(),
        CASE WHEN 1 >= %(limit)s THEN now() + %(lockout)s END)
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
        THEN CASE WHEN 1 >= %(limit)s THEN now() + %(lockout)s END
        WHEN t.locked_until IS NOT NULL THEN t.locked_until
        WHEN t.attempts + 1 >= %(limit)s THEN now() + %(lockout)s
    END
RETURNING attempts,
    GREATEST(1, ceil(extract(epoch FROM
        coalesce(locked_until, window_start + %(window)s) - now())))::int AS retry_after
"""


def account_key(account: str) -> str:
    """Return the throttle key of an account: ``acct:`` + the lower-cased e-mail."""
    return _bounded("acct:", account.strip().lower())


def ip_key(ip: str) -> str:
    """Return the throttle key of a client address: ``ip:`` + the address."""
    return _bounded("ip:", ip.strip())


def _bounded(prefix: str, value: str) -> str:
    """Return ``prefix + value``, or a SHA-256 of ``value`` if that is too long for the key."""
    key = prefix + value
    if len(key) <= _MAX_KEY:
        return key
    return f"{prefix}sha256:{hashlib.sha256(value.encode()).hexdigest()}"


class LoginThrottle:
    """Counts password checks per account and per client address.

    Call :meth:`attempt` before checking a password and :meth:`succeeded`
    after a correct one. Both take a transaction with the ``system`` role.
    """

    def __init__(
        self,
        *,
        account_limit: int = 5,
        ip_limit: int = 50,
        window: timedelta = timedelta(minutes=15),
        lockout: timedelta = timedelta(minutes=15),
    ) -> None:
        if account_limit < 1 or ip_limit < 1:
            raise ValueError("limits must be at least 1")
        if window <= timedelta(0) or lockout <= timedelta(0):
            raise ValueError("window and lockout must be positive")
        self.account_limit = account_limit
        self.ip_limit = ip_limit
        self.window = window
        self.lockout = lockout

    async def attempt(self, tx: Conn, account: str, ip: str) -> None:
        """Reserve one password check for ``account`` from ``ip``; return None if allowed.

        Raises :class:`Throttled` (with ``retry_after`` in seconds) if the
        account or the address is locked or over its limit; the password must
        then not be checked. Both keys are reserved in the caller's
        transaction, always the account first, so concurrent logins lock rows
        in one order and cannot deadlock.
        """
        retry_after = 0
        for key, limit in ((account_key(account), self.account_limit), (ip_key(ip), self.ip_limit)):
            row = await (
                await tx.execute(
                    _RESERVE,
                    {"key": key, "limit": limit, "window": self.window, "lockout": self.lockout},
                )
            ).fetchone()
            assert row is not None  # an upsert with RETURNING always returns its row
            if row["attempts"] > limit:
                retry_after = max(retry_after, int(row["retry_after"]))
        if retry_after:
            raise Throttled(retry_after)

    async def succeeded(self, tx: Conn, account: str) -> None:
        """Reset the account's counter and lockout after a correct password; return None.

        The address counter is left alone: one good login from an address must
        not excuse a credential-stuffing run from it.
        """
        await tx.execute(
            "UPDATE bastion.login_throttle SET attempts = 0, window_start = now(), "
            "locked_until = NULL WHERE key = %s",
            (account_key(account),),
        )
