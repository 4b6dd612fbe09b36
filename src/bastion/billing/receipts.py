"""Signed receipts: JWS (RFC 7515) with Ed25519 (RFC 8037, RFC 9864) (CHECKLIST P4).

For each paid invoice and each closed usage period Bastion issues a receipt:
a JSON object signed as a JWS with ``alg: Ed25519`` (the fully-specified
algorithm of RFC 9864; ``EdDSA`` is deprecated) and the signing key's
``kid``. Anyone can verify it with the JWK Set (RFC 7517) published at
``/.well-known/bastion-receipt-keys``; ``bastion receipts verify FILE`` does.
A receipt file is the flattened JWS JSON serialization (RFC 7515 section
7.2.2); the compact form is accepted too.

The keys are a :class:`~bastion.secrets.keyring.JwkRing` in the keystore
(secret ``billing/receipt-signing``), like the JWT keys:

1. :meth:`ReceiptKeys.rotate` adds a version; it is published at once and
   signs once it has been published for ``publish_ahead``, so verifiers that
   cache the key set see it before any receipt it signed.
2. Older versions stay published and keep verifying what they signed: a
   receipt is kept for years, unlike a 15-minute token, so nothing retires a
   receipt key on a timer.
3. :meth:`ReceiptKeys.retire` withdraws a key (it leaked, or the operator
   decided its receipts must be re-issued): it leaves the key set, and every
   receipt it signed fails verification from then on.

A ``kid`` is the key's RFC 7638 thumbprint, derived from the public key alone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID, uuid4

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from bastion import jsonsafe
from bastion.db.pool import Conn, Database
from bastion.encoding import b64url_decode
from bastion.logs import get_logger
from bastion.secrets.keyring import JwkRing
from bastion.secrets.protocols import Keystore

_log = get_logger("bastion.billing")

SECRET_NAME = "billing/receipt-signing"  # noqa: S105 - a secret's name, not a secret
ALGORITHM = "Ed25519"
CURVE = "Ed25519"
# The JWS ``typ`` (RFC 7515 section 4.1.9): says what the object is, so that
# no other Ed25519 JWS signed with these keys can pass for a receipt.
RECEIPT_TYPE = "bastion-receipt+jws"
KEYS_PATH = "/.well-known/bastion-receipt-keys"
_MAX_RECEIPT_BYTES = 64 * 1024

ReceiptKind = Literal["invoice", "usage_period"]


class ReceiptInvalid(Exception):
    """A receipt that does not verify; ``reason`` says why, never the key or payload."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReceiptKeys(JwkRing[OKPKey]):
    """Ed25519 receipt-signing keys with publish-ahead rotation, in the keystore."""

    def __init__(
        self,
        keystore: Keystore,
        *,
        publish_ahead: timedelta = timedelta(minutes=5),
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            keystore,
            secret_name=SECRET_NAME,
            key_type=OKPKey,
            curve=CURVE,
            algorithm=ALGORITHM,
            publish_ahead=publish_ahead,
            clock=clock,
        )

    def retire(self, kid: str) -> None:
        """Withdraw key ``kid``: receipts it signed no longer verify.

        Raises :class:`KeyError` for an unknown or already retired kid, and
        :class:`ValueError` for the only active key (nothing could sign).
        """
        self.refresh()
        entry = self._active_by_kid.get(kid)
        if entry is None:
            raise KeyError(kid)
        if len(self._active_by_kid) == 1:
            raise ValueError("the only active receipt key cannot be retired; rotate first")
        self._keystore.retire(SECRET_NAME, entry.version)
        self.refresh()


# -- signing and verifying ---------------------------------------------------------


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per receipt."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_receipt(keys: ReceiptKeys, payload: Mapping[str, Any]) -> tuple[str, str]:
    """Sign ``payload``; return ``(kid, compact JWS)``."""
    kid, key = keys.current()
    header = {"alg": ALGORITHM, "kid": kid, "typ": RECEIPT_TYPE}
    return kid, jws.serialize_compact(header, canonical_json(payload), key, algorithms=[ALGORITHM])


def to_flattened(compact: str) -> dict[str, str]:
    """The flattened JSON serialization (RFC 7515 section 7.2.2) of a compact JWS."""
    protected, payload, signature = compact.split(".")
    return {"protected": protected, "payload": payload, "signature": signature}


def _compact_of(document: str | bytes) -> str:
    """Accept a receipt file: flattened JSON serialization or compact; return compact."""
    if len(document) > _MAX_RECEIPT_BYTES:
        raise ReceiptInvalid("too large")
    text = document.decode("utf-8", "replace") if isinstance(document, bytes) else document
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = jsonsafe.loads(text)
        except ValueError:
            raise ReceiptInvalid("not JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("jws"), dict):
            obj = obj["jws"]  # the api's answer: {"receipt": ..., "jws": {...}}
        parts = [obj.get(k) if isinstance(obj, dict) else None for k in _FLATTENED]
        if not all(isinstance(p, str) for p in parts) or "header" in obj:
            raise ReceiptInvalid("not a flattened JWS")
        return ".".join(str(p) for p in parts)
    if text.count(".") != 2:
        raise ReceiptInvalid("not a JWS")
    return text


_FLATTENED = ("protected", "payload", "signature")


@dataclass(frozen=True)
class VerifiedReceipt:
    kid: str
    payload: dict[str, Any]


def verify_receipt(
    document: str | bytes, public_key: Callable[[object], OKPKey | None]
) -> VerifiedReceipt:
    """Verify a receipt file against the published keys; return its payload.

    ``public_key(kid)`` returns the active key of that kid or None (an unknown
    or retired key). Raises :class:`ReceiptInvalid` if the JWS is malformed,
    not an Ed25519 receipt, signed by no published key, or altered.
    """
    compact = _compact_of(document)
    try:
        unverified = jws.extract_compact(compact.encode())
    except (JoseError, ValueError):
        raise ReceiptInvalid("malformed JWS") from None
    header = unverified.headers()
    if header.get("alg") != ALGORITHM:
        raise ReceiptInvalid("not signed with Ed25519")
    if header.get("typ") != RECEIPT_TYPE:
        raise ReceiptInvalid("not a Bastion receipt")
    if header.get("crit") is not None:
        raise ReceiptInvalid("unsupported critical header")
    kid = header.get("kid")
    key = public_key(kid)
    if key is None:
        raise ReceiptInvalid("signed by an unknown or retired key")
    try:
        verified = jws.deserialize_compact(compact, key, algorithms=[ALGORITHM])
    except (JoseError, ValueError):
        raise ReceiptInvalid("bad signature") from None
    try:
        payload = jsonsafe.loads(verified.payload)
    except ValueError:
        raise ReceiptInvalid("payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("kind") not in ("invoice", "usage_period"):
        raise ReceiptInvalid("payload is not a receipt")
    return VerifiedReceipt(str(kid), payload)


def jwks_lookup(jwks: Mapping[str, Any]) -> Callable[[object], OKPKey | None]:
    """A ``public_key(kid)`` over a fetched JWK Set; keys that are not Ed25519 are ignored."""
    found: dict[str, OKPKey] = {}
    for jwk in jwks.get("keys", []) if isinstance(jwks.get("keys"), list) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != CURVE:
            continue
        if "d" in jwk or not isinstance(jwk.get("kid"), str):
            continue
        try:
            found[jwk["kid"]] = OKPKey.import_key(jwk)
        except (JoseError, ValueError, TypeError):
            continue
    return lambda kid: found.get(kid) if isinstance(kid, str) else None


# -- issuing -----------------------------------------------------------------------


@dataclass(frozen=True)
class PaidInvoice:
    """What a paid invoice's receipt states: provider ids and integer minor units."""

    invoice_id: str
    customer_id: str
    amount_paid: int
    currency: str
    paid_at: datetime
    period_start: datetime | None = None
    period_end: datetime | None = None
    provider: str = "stripe"


@dataclass(frozen=True)
class Receipt:
    id: UUID
    tenant_id: UUID
    kind: ReceiptKind
    subject: str
    kid: str
    jws: str
    issued_at: datetime

    @property
    def payload(self) -> dict[str, Any]:
        """The signed payload (already verified when it was issued)."""
        part = self.jws.split(".")[1]
        return dict(json.loads(jws_b64decode(part)))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "kind": self.kind,
            "subject": self.subject,
            "kid": self.kid,
            "issued_at": self.issued_at.isoformat(),
            "receipt": self.payload,
            "jws": to_flattened(self.jws),
        }


def jws_b64decode(part: str) -> bytes:
    """base64url without padding (RFC 7515 section 2), strictly: one spelling per
    value (:func:`bastion.encoding.b64url_decode`); raises :class:`ValueError`."""
    return b64url_decode(part)


def _epoch(value: object) -> datetime | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return datetime.fromtimestamp(value, UTC)
    return None


def _paid_invoice(invoice: Mapping[str, Any]) -> PaidInvoice | None:
    """A Stripe Invoice object's receipt fields, or None if one is missing or mistyped."""
    invoice_id, customer = invoice.get("id"), invoice.get("customer")
    amount, currency = invoice.get("amount_paid"), invoice.get("currency")
    transitions = invoice.get("status_transitions")
    paid_at = _epoch(transitions.get("paid_at")) if isinstance(transitions, Mapping) else None
    paid_at = paid_at or _epoch(invoice.get("created"))
    if not (isinstance(invoice_id, str) and 0 < len(invoice_id) <= 255):
        return None
    if not (isinstance(customer, str) and 0 < len(customer) <= 255):
        return None
    if not (isinstance(amount, int) and not isinstance(amount, bool) and amount >= 0):
        return None
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
        return None
    if paid_at is None:
        return None
    return PaidInvoice(
        invoice_id=invoice_id,
        customer_id=customer,
        amount_paid=amount,
        currency=currency,
        paid_at=paid_at,
        period_start=_epoch(invoice.get("period_start")),
        period_end=_epoch(invoice.get("period_end")),
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class ReceiptService:
    """Issues receipts (idempotently: one per invoice, one per usage period) and reads them."""

    def __init__(self, db: Database, keys: ReceiptKeys, *, issuer: str) -> None:
        self.db = db
        self.keys = keys
        self.issuer = issuer

    async def issue_invoice(
        self, tenant_id: UUID, invoice: PaidInvoice, *, tx: Conn | None = None
    ) -> Receipt:
        """The receipt of a paid invoice, created once per (tenant, invoice).

        With ``tx`` (a system transaction of the tenant — the webhook's) it
        commits with the event that says the invoice is paid.
        """
        if invoice.amount_paid < 0:
            raise ValueError("amount_paid must not be negative")
        body: dict[str, Any] = {
            "invoice": {
                "provider": invoice.provider,
                "id": invoice.invoice_id,
                "customer": invoice.customer_id,
                "amount_paid": invoice.amount_paid,
                "currency": invoice.currency.lower(),
                "paid_at": _iso(invoice.paid_at),
                "period_start": _iso(invoice.period_start) if invoice.period_start else None,
                "period_end": _iso(invoice.period_end) if invoice.period_end else None,
            }
        }
        subject = f"{invoice.provider}:{invoice.invoice_id}"
        return await self._issue(tenant_id, "invoice", subject, body, tx)

    async def on_invoice_paid(self, tx: Conn, tenant_id: UUID, event: Mapping[str, Any]) -> None:
        """The billing service's ``invoice_paid_hook``: a Stripe ``invoice.paid`` event
        (already verified and applied once, in ``tx``) becomes the invoice's receipt.

        An invoice object without the fields a receipt states is logged and skipped,
        so that it cannot block the event it came with.
        """
        data = event.get("data")
        invoice = data.get("object") if isinstance(data, Mapping) else None
        paid = _paid_invoice(invoice) if isinstance(invoice, Mapping) else None
        if paid is None:
            _log.warning("receipt_skipped", tenant=str(tenant_id), reason="malformed-invoice")
            return
        await self.issue_invoice(tenant_id, paid, tx=tx)

    async def close_usage_periods(self, tenant_id: UUID) -> list[Receipt]:
        """Issue a receipt for every ended budget period of the tenant that has none.

        A period with a call still in flight (a held reservation) is left for a
        later run: its usage is not final until that call settles or is released.
        Returns the receipts issued now.
        """
        issued: list[Receipt] = []
        async with self.db.tenant_tx(tenant_id, None, "system") as tx:
            cur = await tx.execute(
                "SELECT b.period_start, b.period_end FROM bastion.budgets b "
                "WHERE b.period_end <= now() AND NOT EXISTS (SELECT 1 FROM bastion.receipts r "
                "WHERE r.kind = 'usage_period' AND r.period_start = b.period_start) "
                "AND NOT EXISTS (SELECT 1 FROM bastion.budget_reservations h "
                "WHERE h.period_start = b.period_start AND h.status = 'held') "
                "ORDER BY b.period_start"
            )
            periods = await cur.fetchall()
            for period in periods:
                cur = await tx.execute(
                    "SELECT id, calls_used, tokens_used FROM bastion.budget_reservations "
                    "WHERE period_start = %s AND status = 'settled' ORDER BY id",
                    (period["period_start"],),
                )
                records = await cur.fetchall()
                # A digest of the records lets anyone holding the usage export
                # check that the receipt's totals are those records.
                digest = hashlib.sha256()
                for record in records:
                    digest.update(
                        f"{record['id']}:{record['calls_used']}:{record['tokens_used']}\n".encode()
                    )
                body = {
                    "period": {
                        "start": _iso(period["period_start"]),
                        "end": _iso(period["period_end"]),
                    },
                    "usage": {
                        "calls": sum(int(r["calls_used"]) for r in records),
                        "tokens": sum(int(r["tokens_used"]) for r in records),
                    },
                    "records_sha256": digest.hexdigest(),
                }
                receipt = await self._issue(
                    tenant_id,
                    "usage_period",
                    _iso(period["period_start"]),
                    body,
                    tx,
                    period_start=period["period_start"],
                )
                issued.append(receipt)
        return issued

    async def list(self, tenant_id: UUID, user_id: UUID, role: str) -> list[Receipt]:
        """The tenant's receipts, newest first (RLS: the caller's tenant only)."""
        async with self.db.tenant_tx(tenant_id, user_id, role) as tx:
            cur = await tx.execute(
                "SELECT id, tenant_id, kind, subject, kid, jws, issued_at FROM bastion.receipts "
                "ORDER BY issued_at DESC, id LIMIT 1000"
            )
            return [Receipt(**row) for row in await cur.fetchall()]

    async def get(
        self, tenant_id: UUID, user_id: UUID, role: str, receipt_id: UUID
    ) -> Receipt | None:
        async with self.db.tenant_tx(tenant_id, user_id, role) as tx:
            cur = await tx.execute(
                "SELECT id, tenant_id, kind, subject, kid, jws, issued_at FROM bastion.receipts "
                "WHERE id = %s",
                (receipt_id,),
            )
            row = await cur.fetchone()
        return None if row is None else Receipt(**row)

    async def _issue(
        self,
        tenant_id: UUID,
        kind: ReceiptKind,
        subject: str,
        body: Mapping[str, Any],
        tx: Conn | None,
        *,
        period_start: datetime | None = None,
    ) -> Receipt:
        if tx is None:
            async with self.db.tenant_tx(tenant_id, None, "system") as own:
                return await self._issue(
                    tenant_id, kind, subject, body, own, period_start=period_start
                )
        receipt_id = uuid4()
        issued_at = datetime.now(UTC).replace(microsecond=0)
        payload = {
            "id": str(receipt_id),
            "iss": self.issuer,
            "iat": int(issued_at.timestamp()),
            "tenant_id": str(tenant_id),
            "kind": kind,
            **body,
        }
        kid, compact = sign_receipt(self.keys, payload)
        # ON CONFLICT: a duplicate (a retried webhook, two closers at once) keeps
        # the first receipt and returns it.
        cur = await tx.execute(
            "INSERT INTO bastion.receipts (id, kind, subject, period_start, kid, jws, issued_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (tenant_id, kind, subject) "
            "DO NOTHING RETURNING id, tenant_id, kind, subject, kid, jws, issued_at",
            (receipt_id, kind, subject, period_start, kid, compact, issued_at),
        )
        row = await cur.fetchone()
        if row is None:
            cur = await tx.execute(
                "SELECT id, tenant_id, kind, subject, kid, jws, issued_at FROM bastion.receipts "
                "WHERE kind = %s AND subject = %s",
                (kind, subject),
            )
            row = await cur.fetchone()
            if row is None:  # pragma: no cover - the conflict says it exists
                raise RuntimeError("receipt vanished")
        return Receipt(**row)


def verify_with_keys(document: str | bytes, keys: ReceiptKeys) -> VerifiedReceipt:
    """Verify against the local key ring (the operator's view of the published set)."""
    return verify_receipt(document, keys.public_key)


__all__: Sequence[str] = (
    "KEYS_PATH",
    "PaidInvoice",
    "Receipt",
    "ReceiptInvalid",
    "ReceiptKeys",
    "ReceiptService",
    "VerifiedReceipt",
    "jwks_lookup",
    "sign_receipt",
    "verify_receipt",
)
