"""Second factor: TOTP (RFC 6238) and single-use recovery codes.

TOTP codes have 6 digits and a 30-second step (the RFC 6238 defaults every
authenticator app supports). A code of the previous, current or next step is
accepted, the network and clock delay RFC 6238 section 5.2 allows for, and
each time step is accepted once: the last accepted step is stored and codes of
that step or an earlier one are refused, so an observed code cannot be
replayed (section 5.2, "MUST NOT accept the second attempt").

The shared secret is sealed with AES-256-GCM (NIST SP 800-38D) under a key
from the keystore, with the user id as associated data, so a sealed secret
copied onto another user's row does not open. The column holds
``nonce (12 bytes) || ciphertext+tag``; the clear secret never reaches the
database.

Recovery codes are 80 random bits written as four groups of four base32
characters. Only their SHA-256 is stored: with 80 bits of entropy a salt or a
slow hash adds nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from uuid import UUID

import anyio.to_thread
import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.access import ADMIN_ROLES
from bastion.db.pool import Conn
from bastion.identity.errors import LastFactorRequired, MfaError
from bastion.secrets.protocols import Keystore

KEY_NAME = "identity/totp-key"
DIGITS = 6
STEP_SECONDS = 30
VALID_WINDOW = 1  # steps before and after the current one
RECOVERY_CODES = 10
_NONCE = 12


def mfa_required(roles: Iterable[str]) -> bool:
    """Return True if any of ``roles`` is admin-grade and so requires a second factor."""
    if isinstance(roles, str):  # a lone role name, not an iterable of its letters
        roles = (roles,)
    return any(role in ADMIN_ROLES for role in roles)


def new_recovery_code() -> str:
    """Return a fresh recovery code such as ``K7QD-M2XA-P9RT-4WZB`` (80 random bits)."""
    raw = base64.b32encode(secrets.token_bytes(10)).decode()  # 10 bytes = 16 chars, no padding
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def _recovery_hash(code: str) -> bytes:
    """Return the stored form of a recovery code: SHA-256 of its normalised text."""
    normalised = "".join(code.split()).replace("-", "").upper()
    return hashlib.sha256(normalised.encode()).digest()


def _normalise_totp(code: str) -> str | None:
    """Return the code without spaces, or None unless it is exactly 6 ASCII digits."""
    code = "".join(code.split())
    if len(code) != DIGITS or not (code.isascii() and code.isdigit()):
        return None
    return code


class MfaService:
    """TOTP enrolment and checks, and recovery codes; methods take the caller's transaction.

    The transaction must see the user's rows: role ``system`` or the user
    themself.
    """

    def __init__(self, keystore: Keystore, *, issuer: str = "Bastion") -> None:
        self.keystore = keystore
        self.issuer = issuer
        self._key: bytes | None = None

    # -- sealing ---------------------------------------------------------------

    async def _aead(self) -> AESGCM:
        """Return the AES-256-GCM cipher under the keystore's TOTP key (created once)."""
        if self._key is None:
            # File I/O and a decryption under a lock: keep it off the event loop.
            self._key = await anyio.to_thread.run_sync(
                self.keystore.ensure, KEY_NAME, lambda: secrets.token_bytes(32)
            )
        return AESGCM(self._key)

    async def _seal(self, user_id: UUID, secret: str) -> bytes:
        """Return ``nonce || AES-GCM(secret)`` bound to ``user_id``."""
        nonce = secrets.token_bytes(_NONCE)
        return nonce + (await self._aead()).encrypt(nonce, secret.encode(), user_id.bytes)

    async def _unseal(self, user_id: UUID, sealed: bytes) -> str:
        """Return the clear base32 secret; raise :class:`MfaError` if it does not open."""
        try:
            clear = (await self._aead()).decrypt(
                bytes(sealed[:_NONCE]), bytes(sealed[_NONCE:]), user_id.bytes
            )
        except InvalidTag:
            # Wrong key, altered row or a row moved to another user: fail closed.
            raise MfaError("the TOTP factor cannot be unsealed") from None
        return clear.decode()

    def _totp(self, secret: str) -> pyotp.TOTP:
        return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS, issuer=self.issuer)

    def _matching_step(self, secret: str, code: str, after: int) -> int | None:
        """Return the time step within ±1 of now whose code is ``code`` and > ``after``."""
        totp = self._totp(secret)
        now_step = int(time.time()) // STEP_SECONDS
        match = None
        for step in range(now_step - VALID_WINDOW, now_step + VALID_WINDOW + 1):
            # Compare every candidate (no early exit) in constant time.
            if hmac.compare_digest(totp.generate_otp(step), code) and step > after:
                match = step
        return match

    # -- TOTP ------------------------------------------------------------------

    async def enroll(self, tx: Conn, user_id: UUID, account_name: str) -> tuple[str, str]:
        """Start a TOTP enrolment; return ``(base32 secret, otpauth:// URI)``.

        An unconfirmed earlier enrolment is replaced. Raises :class:`MfaError`
        if the user already has a confirmed factor (remove it first).
        """
        row = await (
            await tx.execute(
                "SELECT confirmed_at FROM bastion.mfa_totp WHERE user_id = %s FOR UPDATE",
                (user_id,),
            )
        ).fetchone()
        if row is not None and row["confirmed_at"] is not None:
            raise MfaError("a confirmed TOTP factor exists; remove it before enrolling again")
        secret = pyotp.random_base32()  # 32 characters = 160 bits (RFC 4226 section 4)
        sealed = await self._seal(user_id, secret)
        await tx.execute(
            "INSERT INTO bastion.mfa_totp (user_id, secret_sealed) VALUES (%s, %s) "
            "ON CONFLICT (user_id) DO UPDATE SET secret_sealed = EXCLUDED.secret_sealed, "
            "confirmed_at = NULL, last_timestep = 0, created_at = now()",
            (user_id, sealed),
        )
        uri = self._totp(secret).provisioning_uri(name=account_name, issuer_name=self.issuer)
        return secret, uri

    async def confirm(self, tx: Conn, user_id: UUID, code: str) -> list[str]:
        """Confirm a pending enrolment with a current code; return 10 new recovery codes.

        The codes are shown once: only their hashes are kept, and earlier
        codes of the user are dropped. Raises :class:`MfaError` if there is no
        pending enrolment or the code is wrong.
        """
        row = await (
            await tx.execute(
                "SELECT secret_sealed, confirmed_at, last_timestep FROM bastion.mfa_totp "
                "WHERE user_id = %s FOR UPDATE",
                (user_id,),
            )
        ).fetchone()
        if row is None or row["confirmed_at"] is not None:
            raise MfaError("there is no pending TOTP enrolment to confirm")
        secret = await self._unseal(user_id, row["secret_sealed"])
        normalised = _normalise_totp(code)
        step = (
            None
            if normalised is None
            else self._matching_step(secret, normalised, row["last_timestep"])
        )
        if step is None:
            raise MfaError("the TOTP code is wrong")
        await tx.execute(
            "UPDATE bastion.mfa_totp SET confirmed_at = now(), last_timestep = %s "
            "WHERE user_id = %s",
            (step, user_id),
        )
        codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
        await tx.execute("DELETE FROM bastion.recovery_codes WHERE user_id = %s", (user_id,))
        async with tx.cursor() as cur:
            await cur.executemany(
                "INSERT INTO bastion.recovery_codes (user_id, code_hash) VALUES (%s, %s)",
                [(user_id, _recovery_hash(c)) for c in codes],
            )
        return codes

    async def verify(self, tx: Conn, user_id: UUID, code: str) -> bool:
        """Return True if ``code`` is a fresh TOTP code of the user's confirmed factor.

        False for a wrong code, a code of an already used time step, or a
        user without a confirmed factor. The accepted step is recorded in the
        caller's transaction, which must commit for the replay protection to
        hold. Raises :class:`MfaError` only if the stored secret cannot be
        unsealed.
        """
        normalised = _normalise_totp(code)
        if normalised is None:
            return False
        # FOR UPDATE: two concurrent uses of one code serialise; the second
        # sees the first one's step and is refused.
        row = await (
            await tx.execute(
                "SELECT secret_sealed, last_timestep FROM bastion.mfa_totp "
                "WHERE user_id = %s AND confirmed_at IS NOT NULL FOR UPDATE",
                (user_id,),
            )
        ).fetchone()
        if row is None:
            return False
        secret = await self._unseal(user_id, row["secret_sealed"])
        step = self._matching_step(secret, normalised, row["last_timestep"])
        if step is None:
            return False
        await tx.execute(
            "UPDATE bastion.mfa_totp SET last_timestep = %s WHERE user_id = %s",
            (step, user_id),
        )
        return True

    async def has_factor(self, tx: Conn, user_id: UUID) -> bool:
        """Return True if the user has a confirmed TOTP factor."""
        row = await (
            await tx.execute(
                "SELECT EXISTS (SELECT 1 FROM bastion.mfa_totp "
                "WHERE user_id = %s AND confirmed_at IS NOT NULL) AS present",
                (user_id,),
            )
        ).fetchone()
        return bool(row and row["present"])

    async def remove(self, tx: Conn, user_id: UUID, *, holds_admin_role: bool) -> None:
        """Remove the user's TOTP factor and recovery codes; return None.

        Raises :class:`LastFactorRequired` if the user holds an admin-grade
        role and has a confirmed factor: TOTP is their only factor, and such
        roles require one. A pending enrolment can always be removed.
        """
        if holds_admin_role and await self.has_factor(tx, user_id):
            raise LastFactorRequired(
                "an admin-grade role requires a second factor; it cannot be removed"
            )
        await tx.execute("DELETE FROM bastion.recovery_codes WHERE user_id = %s", (user_id,))
        await tx.execute("DELETE FROM bastion.mfa_totp WHERE user_id = %s", (user_id,))

    # -- recovery codes ----------------------------------------------------------

    async def use_recovery_code(self, tx: Conn, user_id: UUID, code: str) -> bool:
        """Return True and spend ``code`` if it is an unused recovery code of the user.

        Dashes, spaces and case do not matter. A code works once: it is marked
        used by the same statement that finds it, so two concurrent uses
        cannot both succeed.
        """
        if len(code) > 64:
            return False
        cur = await tx.execute(
            "UPDATE bastion.recovery_codes SET used_at = now() "
            "WHERE user_id = %s AND code_hash = %s AND used_at IS NULL",
            (user_id, _recovery_hash(code)),
        )
        return cur.rowcount == 1

    async def recovery_codes_left(self, tx: Conn, user_id: UUID) -> int:
        """Return how many unused recovery codes the user has."""
        row = await (
            await tx.execute(
                "SELECT count(*) AS n FROM bastion.recovery_codes "
                "WHERE user_id = %s AND used_at IS NULL",
                (user_id,),
            )
        ).fetchone()
        return int(row["n"]) if row else 0
