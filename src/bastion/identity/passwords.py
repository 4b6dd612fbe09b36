"""Password storage and policy: argon2id hashes (RFC 9106), no reuse, no weak ones.

Hashes are argon2id with the parameters of RFC 9106 section 4's second
recommended option (64 MiB of memory, 3 passes) but a single lane, so one
login costs one core. Hashing runs in a worker thread: it takes a few hundred
milliseconds of CPU and must not stall the event loop.

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

import re
from collections.abc import Sequence
from uuid import UUID

import anyio.to_thread
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from zxcvbn import zxcvbn  # type: ignore[import-untyped]  # ships no type hints

from bastion.db.pool import Conn
from bastion.identity.errors import PasswordReused, WeakPassword

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


class PasswordService:
    """Sets and verifies users' passwords; every method takes the caller's transaction.

    ``history`` is how many previous passwords (besides the current one) may
    not be reused; ``min_score`` the lowest acceptable zxcvbn score (0-4).
    ``hasher`` exists for tests and migrations; production keeps the default.
    The transaction must be allowed to see the user's rows (role ``system``
    or the user themself).
    """

    def __init__(
        self, *, history: int = 10, min_score: int = 3, hasher: PasswordHasher | None = None
    ) -> None:
        if history < 0 or not 0 <= min_score <= 4:
            raise ValueError("history must be >= 0 and min_score within 0..4")
        self.history = history
        self.min_score = min_score
        self.hasher = hasher or DEFAULT_HASHER
        self._dummy_hash: str | None = None

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
        result = await anyio.to_thread.run_sync(
            lambda: zxcvbn(password[:_ZXCVBN_PREFIX], user_inputs=inputs)
        )
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
        """Make ``new_password`` the user's password; return None.

        Raises :class:`WeakPassword` if it breaks the policy and
        :class:`PasswordReused` if it is the current password or one of the
        last ``history`` ones. Nothing is written when it raises.
        """
        await self.check_strength(new_password, user_inputs=user_inputs)
        # FOR UPDATE: two concurrent changes of one user's password serialise,
        # so neither can slip past the other's history check.
        row = await (
            await tx.execute(
                "SELECT password_hash FROM bastion.credentials WHERE user_id = %s FOR UPDATE",
                (user_id,),
            )
        ).fetchone()
        current: str | None = None if row is None else row["password_hash"]
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
        known = ([current] if current is not None else []) + previous
        reused: bool = await anyio.to_thread.run_sync(self._matches_any, known, new_password)
        if reused:
            raise PasswordReused(
                f"this password is the current one or one of the last {self.history}"
            )
        new_hash = await anyio.to_thread.run_sync(self.hasher.hash, new_password)
        await tx.execute(
            "INSERT INTO bastion.credentials (user_id, password_hash) VALUES (%s, %s) "
            "ON CONFLICT (user_id) DO UPDATE "
            "SET password_hash = EXCLUDED.password_hash, changed_at = now()",
            (user_id, new_hash),
        )
        if current is not None and self.history > 0:
            await tx.execute(
                "INSERT INTO bastion.password_history (user_id, password_hash) VALUES (%s, %s)",
                (user_id, current),
            )
        # Keep the newest ``history`` rows (also trims a list left longer by an
        # earlier, larger setting).
        await tx.execute(
            "DELETE FROM bastion.password_history WHERE user_id = %s AND ctid NOT IN ("
            "SELECT ctid FROM bastion.password_history WHERE user_id = %s "
            "ORDER BY created_at DESC LIMIT %s)",
            (user_id, user_id, self.history),
        )

    # -- checking --------------------------------------------------------------

    async def verify(self, tx: Conn, user_id: UUID, password: str) -> bool:
        """Return True if ``password`` is the user's password, else False.

        A user without credentials costs one argon2 verification too, so the
        response time does not tell whether the account exists. A hash made
        with older parameters is replaced by one with the current parameters.
        Raises nothing for a wrong password; database errors propagate.
        """
        row = await (
            await tx.execute(
                "SELECT password_hash FROM bastion.credentials WHERE user_id = %s", (user_id,)
            )
        ).fetchone()
        if row is None:
            dummy = await self._dummy()
            await anyio.to_thread.run_sync(self._check, dummy, password)
            return False
        stored: str = row["password_hash"]
        if not await anyio.to_thread.run_sync(self._check, stored, password):
            return False
        if self.hasher.check_needs_rehash(stored):
            new_hash = await anyio.to_thread.run_sync(self.hasher.hash, password)
            # Only if unchanged meanwhile: never overwrite a concurrent change.
            await tx.execute(
                "UPDATE bastion.credentials SET password_hash = %s "
                "WHERE user_id = %s AND password_hash = %s",
                (new_hash, user_id, stored),
            )
        return True

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

    async def _dummy(self) -> str:
        """Return a hash with the current parameters, made once, for unknown users."""
        if self._dummy_hash is None:
            # A race makes two dummies; harmless, both have the right cost.
            self._dummy_hash = await anyio.to_thread.run_sync(
                self.hasher.hash, "bastion-dummy-password-for-timing"
            )
        return self._dummy_hash
