"""Password storage and policy: argon2id hashes (RFC 9106), no reuse, no weak ones.

Hashes are argon2id with the parameters of RFC 9106 section 4's second
recommended option (64 MiB of memory, 3 passes) but a single lane, so one
login costs one core. Hashing runs in a worker thread: it takes a few hundred
milliseconds of CPU and must not stall the event loop. At most one hash per
core runs at a time in a process (``concurrency``); further callers wait on
the event loop, holding no thread, so a flood of sign-ins costs bounded CPU
and memory (64 MiB each). :meth:`PasswordService.matches` needs no database:
sign-in calls it outside any transaction, so a flood holds no connection of
the pool every tenant shares either.

The policy follows NIST SP 800-63B section 5.1.1.2 (at least 12 and at most
256 characters, no commonly used password, no password that zxcvbn rates
guessable taking the user's own e-mail and name into account) and adds one
rule of its own: none of the user's current or last ``history`` passwords.

Where the rows live: ``bastion.credentials`` holds the current hash;
``bastion.password_history`` holds the hashes the user had *before* it (a new
password pushes the one it replaces there), trimmed to ``history`` rows.

No password, nor any part of one, is ever logged or put into an exception.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID

import anyio
import anyio.to_thread
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn  # type: ignore[import-untyped]  # ships no type hints

from bastion.db.pool import Conn
from bastion.identity.errors import PasswordChanged, PasswordReused, WeakPassword

MIN_LENGTH = 12
MAX_LENGTH = 256
# zxcvbn's cost grows steeply with length (about 1 s of CPU at 256 characters),
# which is why it refuses more than 72 by default. We score the first 72
# characters: 72 characters that rate strong make a strong password whatever
# follows, a prefix practically never rates stronger than the whole (so this
# errs towards refusing), and the cost stays bounded.
_ZXCVBN_PREFIX = 72

# The most common passwords of public breach corpora that are long enough to
# pass the length rule (plus a few classics), compared case-insensitively.
# zxcvbn knows most of them already; the list makes the refusal independent of
# its dictionaries and of the score threshold.
COMMON_PASSWORDS = frozenset(
    {
        "123456789012",
        "1234567890123",
        "12345678901234",
        "123123123123",
        "111111111111",
        "000000000000",
        "123456123456",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "qwertyuiop12",
        "qwertyuiop123",
        "qwerty123456",
        "qwertyqwerty",
        "asdfghjkl123",
        "zxcvbnm12345",
        "abc123456789",
        "abcdefghijkl",
        "password1234",
        "password12345",
        "password123!",
        "passwordpassword",
        "password1234!",
        "p@ssw0rd1234",
        "p@ssword1234",
        "iloveyou1234",
        "iloveyouiloveyou",
        "welcome12345",
        "welcome123456",
        "letmein12345",
        "changeme1234",
        "administrator",
        "administrator1",
        "admin1234567",
        "adminadmin123",
        "sunshine1234",
        "princess1234",
        "football1234",
        "baseball1234",
        "superman1234",
        "trustno1trustno1",
        "monkey123456",
        "dragon123456",
        "master123456",
        "qazwsxedcrfv",
        "correcthorsebatterystaple",
        "mypassword123",
        "secretpassword",
        "passw0rdpassw0rd",
    }
)

# RFC 9106 section 4, second recommended option (m = 64 MiB, t = 3), with one
# lane instead of four: the server verifies many logins at once, so a login
# should occupy one core, not four. 16-byte salt, 32-byte tag as recommended.
DEFAULT_HASHER = PasswordHasher(
    time_cost=3,
    memory_cost=64 * 1024,  # KiB
    parallelism=1,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)


_T = TypeVar("_T")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _expand_inputs(user_inputs: Sequence[str]) -> list[str]:
    """Return the inputs plus their parts: zxcvbn only matches whole words it is given.

    ``"ann.lee@example.com"`` also yields ``"ann"``, ``"lee"`` and ``"example"``,
    so a password built from the parts of one's own e-mail rates as weak.
    """
    words: list[str] = []
    for value in user_inputs:
        value = str(value).strip().lower()
        if not value:
            continue
        words.append(value)
        words.extend(part for part in re.split(r"[^0-9a-z]+", value) if len(part) >= 3)
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class NewPassword:
    """A new password that passed the policy and the history check, hashed
    (:meth:`PasswordService.prepare`); written by :meth:`PasswordService.store`
    only if the user's hash is still ``replaces``."""

    user_id: UUID
    password_hash: str
    replaces: str | None


class PasswordService:
    """Sets and verifies users' passwords; every method takes the caller's transaction.

    ``history`` is how many previous passwords (besides the current one) may
    not be reused; ``min_score`` the lowest acceptable zxcvbn score (0-4).
    ``hasher`` exists for tests and migrations; production keeps the default.
    ``concurrency`` bounds the hashes computed at once (default: one per core).
    The transaction must be allowed to see the user's rows (role ``system``
    or the user themself).
    """

    def __init__(
        self,
        *,
        history: int = 10,
        min_score: int = 3,
        hasher: PasswordHasher | None = None,
        concurrency: int | None = None,
    ) -> None:
        if history < 0 or not 0 <= min_score <= 4 or (concurrency is not None and concurrency < 1):
            raise ValueError("history >= 0, min_score within 0..4, concurrency >= 1")
        self.history = history
        self.min_score = min_score
        self.hasher = hasher or DEFAULT_HASHER
        self.concurrency = concurrency or _cores()
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()
        # One limiter per event loop (an anyio limiter belongs to one loop).
        self._limiters: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, anyio.CapacityLimiter
        ] = weakref.WeakKeyDictionary()

    async def _bounded(self, fn: Callable[..., _T], *args: object) -> _T:
        """``fn(*args)`` in a worker thread, at most ``concurrency`` at once."""
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(self.concurrency)
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)

    # -- policy ----------------------------------------------------------------

    async def check_strength(self, password: str, *, user_inputs: Sequence[str] = ()) -> None:
        """Return None if ``password`` meets the policy; raise :class:`WeakPassword` if not."""
        if len(password) < MIN_LENGTH:
            raise WeakPassword(f"a password needs at least {MIN_LENGTH} characters")
        if len(password) > MAX_LENGTH:
            raise WeakPassword(f"a password may have at most {MAX_LENGTH} characters")
        if password.casefold() in COMMON_PASSWORDS:
            raise WeakPassword("this password is among the most commonly used ones")
        inputs = _expand_inputs(user_inputs)
        result = await self._bounded(lambda: zxcvbn(password[:_ZXCVBN_PREFIX], user_inputs=inputs))
        if int(result["score"]) < self.min_score:
            # zxcvbn's feedback is fixed text ("This is a very common
            # password."), never an echo of the input, so it is safe to show.
            warning = str(result.get("feedback", {}).get("warning") or "").strip()
            detail = f": {warning}" if warning else ""
            raise WeakPassword(f"this password is too easy to guess{detail}")

    # -- writing ---------------------------------------------------------------

    async def set_password(
        self,
        tx: Conn,
        user_id: UUID,
        new_password: str,
        *,
        user_inputs: Sequence[str] = (),
    ) -> None:
        """Make ``new_password`` the user's password, all in ``tx``; return None.

        For callers that hold no connection others wait for (the CLI, the
        demo): the hashes are computed with ``tx`` open. A request path calls
        :meth:`known_hashes`, :meth:`prepare` (no database) and :meth:`store`.
        Raises :class:`WeakPassword` if it breaks the policy,
        :class:`PasswordReused` if it is the current password or one of the
        last ``history`` ones, and :class:`PasswordChanged` if it changed
        meanwhile. Nothing is written when it raises.
        """
        current, previous = await self.known_hashes(tx, user_id)
        prepared = await self.prepare(
            user_id, new_password, current, previous, user_inputs=user_inputs
        )
        await self.store(tx, prepared)

    async def known_hashes(self, tx: Conn, user_id: UUID) -> tuple[str | None, list[str]]:
        """Return the user's current hash (None if none) and the last ``history`` ones."""
        current = await self.stored_hash(tx, user_id)
        previous: list[str] = []
        if self.history > 0:
            rows = await (
                await tx.execute(
                    "SELECT password_hash FROM bastion.password_history WHERE user_id = %s "
                    "ORDER BY created_at DESC LIMIT %s",
                    (user_id, self.history),
                )
            ).fetchall()
            previous = [r["password_hash"] for r in rows]
        return current, previous

    async def prepare(
        self,
        user_id: UUID,
        new_password: str,
        current: str | None,
        previous: Sequence[str],
        *,
        user_inputs: Sequence[str] = (),
    ) -> NewPassword:
        """Check ``new_password`` against the policy and the hashes read by
        :meth:`known_hashes`, and hash it; no database (up to ``history`` + 2
        argon2 runs: call it outside any transaction).

        Raises :class:`WeakPassword` or :class:`PasswordReused`.
        """
        await self.check_strength(new_password, user_inputs=user_inputs)
        known = ([current] if current is not None else []) + list(previous)
        reused: bool = await self._bounded(self._matches_any, known, new_password)
        if reused:
            raise PasswordReused(
                f"this password is the current one or one of the last {self.history}"
            )
        new_hash = await self._bounded(self.hasher.hash, new_password)
        return NewPassword(user_id, new_hash, current)

    async def store(self, tx: Conn, new: NewPassword) -> None:
        """Write a password from :meth:`prepare`, pushing the current one into the history.

        Raises :class:`PasswordChanged` (nothing written) if the user's hash is
        no longer the one it was checked against: two concurrent changes
        serialise on the row lock, and the second, checked against a history
        that no longer holds, is refused rather than slipping past it.
        """
        row = await (
            await tx.execute(
                "SELECT password_hash FROM bastion.credentials WHERE user_id = %s FOR UPDATE",
                (new.user_id,),
            )
        ).fetchone()
        current: str | None = None if row is None else row["password_hash"]
        if current != new.replaces:
            raise PasswordChanged("the password was changed meanwhile")
        await tx.execute(
            "INSERT INTO bastion.credentials (user_id, password_hash) VALUES (%s, %s) "
            "ON CONFLICT (user_id) DO UPDATE "
            "SET password_hash = EXCLUDED.password_hash, changed_at = now()",
            (new.user_id, new.password_hash),
        )
        if current is not None and self.history > 0:
            await tx.execute(
                "INSERT INTO bastion.password_history (user_id, password_hash) VALUES (%s, %s)",
                (new.user_id, current),
            )
        # Keep the newest ``history`` rows (also trims a list left longer by an
        # earlier, larger setting).
        await tx.execute(
            "DELETE FROM bastion.password_history WHERE user_id = %s AND ctid NOT IN ("
            "SELECT ctid FROM bastion.password_history WHERE user_id = %s "
            "ORDER BY created_at DESC LIMIT %s)",
            (new.user_id, new.user_id, self.history),
        )

    # -- checking --------------------------------------------------------------

    async def verify(self, tx: Conn, user_id: UUID, password: str) -> bool:
        """Return True if ``password`` is the user's password, else False.

        A user without credentials costs one argon2 verification too, so the
        response time does not tell whether the account exists. A hash made
        with older parameters is replaced by one with the current parameters.
        Raises nothing for a wrong password; database errors propagate. Holds
        ``tx`` during the hash: an anonymous caller's path (sign-in) uses
        :meth:`stored_hash`, :meth:`matches` and :meth:`upgrade` instead.
        """
        stored = await self.stored_hash(tx, user_id)
        if not await self.matches(stored, password):
            return False
        assert stored is not None
        await self.upgrade(tx, user_id, stored, await self.upgraded_hash(stored, password))
        return True

    async def stored_hash(self, tx: Conn, user_id: UUID) -> str | None:
        """Return the user's current password hash, or None if there is none."""
        row = await (
            await tx.execute(
                "SELECT password_hash FROM bastion.credentials WHERE user_id = %s", (user_id,)
            )
        ).fetchone()
        return None if row is None else str(row["password_hash"])

    async def matches(self, stored: str | None, password: str) -> bool:
        """Return whether ``password`` matches the hash ``stored``; no database.

        ``None`` (no such user) costs one argon2 verification too, so timing
        does not tell whether the account exists.
        """
        if stored is None:
            await self._bounded(self._check_dummy, password)
            return False
        return await self._bounded(self._check, stored, password)

    async def upgraded_hash(self, stored: str, password: str) -> str | None:
        """Return a hash of the (verified) ``password`` with the current
        parameters if ``stored`` has older ones, else None; no database."""
        if not self.hasher.check_needs_rehash(stored):
            return None
        return await self._bounded(self.hasher.hash, password)

    async def upgrade(self, tx: Conn, user_id: UUID, stored: str, new_hash: str | None) -> None:
        """Store ``new_hash`` (from :meth:`upgraded_hash`) if the hash is still ``stored``."""
        if new_hash is None:
            return
        # Only if unchanged meanwhile: never overwrite a concurrent change.
        await tx.execute(
            "UPDATE bastion.credentials SET password_hash = %s "
            "WHERE user_id = %s AND password_hash = %s",
            (new_hash, user_id, stored),
        )

    # -- helpers ---------------------------------------------------------------

    def _check(self, stored: str, password: str) -> bool:
        """Return whether ``password`` matches ``stored`` (False for a malformed hash)."""
        try:
            return self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def _matches_any(self, hashes: Sequence[str], password: str) -> bool:
        """Return whether ``password`` matches any of ``hashes`` (runs in a worker thread)."""
        return any(self._check(stored, password) for stored in hashes)

    def _check_dummy(self, password: str) -> bool:
        """Check ``password`` against a hash with the current parameters, made once
        (under a lock: a flood of unknown users at start-up makes one, not one each)."""
        with self._dummy_lock:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash("bastion-dummy-password-for-timing")
        return self._check(self._dummy_hash, password)
