"""Adyen standard webhooks: each NotificationRequestItem's HMAC, verified by Adyen's library.

Adyen signs, per item, ``pspReference:originalReference:merchantAccountCode:
merchantReference:value:currency:eventCode:success`` with HMAC-SHA256 under
the merchant's hex key and puts it in ``additionalData.hmacSignature``
(https://docs.adyen.com/development-resources/webhooks/verify-hmac-signatures);
:func:`Adyen.util.is_valid_hmac_notification` checks it. A batch with any
item that does not verify is refused whole, and nothing of it is stored.

Only the signed fields are trusted for effects. The rest of an item
(``additionalData``, ``eventDate``) is not covered by the HMAC, so Bastion
puts what it needs in the signed ``merchantReference`` when it creates a
payment: ``<shopper reference>/<plan code>/<sequence>``, the sequence (a
number Bastion increases) being the object's own version for ordering.
The event id is ``pspReference:eventCode:success``, Adyen's identity of a
notification (a redelivery repeats it).

The signed string joins its fields with ``:`` unescaped, so an item whose
signed fields hold a ``:`` has more than one reading under the same HMAC
(``pspReference`` "P" with ``originalReference`` "X:Y" signs exactly as "P:X"
with "Y") — another event id, so the same notification applied twice. Such
an item is refused: a signature must name one event.

What the worker applies (issue 23, finding 5; :mod:`bastion.billing.service`):
a successful AUTHORISATION of exactly the plan's price, to the configured
merchant account in the configured mode, buys one month; a CANCELLATION,
REFUND, CANCEL_OR_REFUND or CHARGEBACK of that payment takes it back. The
batch's ``live`` flag is not covered by the HMAC: it is stored with each item
(:data:`LIVE_KEY`) and must match the configuration, and the merchant
account, which is signed, binds the rest — use a different HMAC key for the
test and the live webhook so that neither can be replayed into the other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import Adyen.util  # type: ignore[import-untyped]

from bastion import jsonsafe
from bastion.billing.errors import (
    EventTooLarge,
    InvalidSignature,
    MalformedEvent,
    WebhooksUnavailable,
)
from bastion.billing.webhooks import MAX_BODY_BYTES, IncomingEvent

PROVIDER = "adyen"
# Notifications that take a payment back: each reverts what the payment bought.
# A CHARGEBACK names the payment in ``pspReference``; the others are
# modifications whose ``originalReference`` names it.
REVERSALS = frozenset({"CANCELLATION", "REFUND", "CANCEL_OR_REFUND", "CHARGEBACK"})
HANDLED = frozenset({"AUTHORISATION"}) | REVERSALS
# The batch's ``live`` flag ("true" / "false"), which Adyen's HMAC does not
# cover, stored with each item under this key (an item's own value is
# overwritten): the worker refuses an item of the other mode.
LIVE_KEY = "bastion:live"
ACK = "[accepted]"  # the body Adyen expects, or it redelivers


def merchant_reference(shopper_reference: str, plan: str, sequence: int) -> str:
    """Return the reference Bastion gives a payment that buys ``plan``."""
    return f"{shopper_reference}/{plan}/{sequence}"


def parse_reference(reference: str) -> tuple[str, str, int] | None:
    parts = reference.split("/")
    if len(parts) != 3 or not parts[2].isdigit() or len(parts[2]) > 18:
        return None
    return parts[0], parts[1], int(parts[2])


# The fields Adyen's HMAC covers, in its order (``value`` and ``currency`` are
# the amount's).
_SIGNED_FIELDS = (
    "pspReference",
    "originalReference",
    "merchantAccountCode",
    "merchantReference",
    "eventCode",
    "success",
)


def _unambiguous(item: dict[str, Any]) -> bool:
    """Whether the signed string of ``item`` reads one way only (no ``:`` inside a field)."""
    amount = item.get("amount")
    fields = [item.get(name, "") for name in _SIGNED_FIELDS]
    if isinstance(amount, dict):
        fields += [amount.get("value", ""), amount.get("currency", "")]
    return not any(":" in str(field) for field in fields)


def _valid(item: dict[str, Any], key: bytes) -> bool:
    try:
        return bool(Adyen.util.is_valid_hmac_notification(item, key.decode()))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


class AdyenWebhook:
    """Verifies and reads Adyen notification batches."""

    def __init__(self, hmac_keys: Callable[[], tuple[bytes, ...]]) -> None:
        self.hmac_keys = hmac_keys

    def verify(self, body: bytes) -> list[IncomingEvent]:
        """Return the batch's verified events; raise :class:`EventTooLarge`,
        :class:`MalformedEvent` (not a notification batch) or
        :class:`InvalidSignature` (an item fails, or no key is configured)."""
        if len(body) > MAX_BODY_BYTES:
            raise EventTooLarge(f"webhook bodies are limited to {MAX_BODY_BYTES} bytes")
        try:
            batch = jsonsafe.loads(body)
        except ValueError:  # not JSON, or nested too deep to read
            raise MalformedEvent("the body is not JSON") from None
        items = batch.get("notificationItems") if isinstance(batch, dict) else None
        if not isinstance(items, list) or not 0 < len(items) <= 100:
            raise MalformedEvent("the body is not an Adyen notification batch")
        keys = self.hmac_keys()
        if not keys:  # fail closed; the provider retries a 503
            raise WebhooksUnavailable("no HMAC key is configured")
        events = []
        for wrapper in items:
            item = wrapper.get("NotificationRequestItem") if isinstance(wrapper, dict) else None
            if not isinstance(item, dict) or not isinstance(item.get("amount"), dict):
                raise MalformedEvent("a notification item is malformed")
            if not _unambiguous(item):
                raise MalformedEvent("a notification item's signed fields hold a ':'")
            if not any(_valid(item, key) for key in keys):
                raise InvalidSignature("a notification item's HMAC does not verify")
            events.append(_event(item, _live(batch.get("live"))))
        return events


def _live(flag: Any) -> bool | None:
    """The batch's mode: True (live), False (test) or None (absent or unreadable)."""
    text = str(flag).lower() if isinstance(flag, (str, bool)) else ""
    return {"true": True, "false": False}.get(text)


def payment_reference(item: dict[str, Any]) -> str | None:
    """The pspReference of the payment an item is about: the item's own for an
    AUTHORISATION or a CHARGEBACK, the ``originalReference`` of a modification."""
    original = item.get("originalReference")
    if item.get("eventCode") != "CHARGEBACK" and isinstance(original, str) and original:
        return original[:255]
    psp = item.get("pspReference")
    return psp[:255] if isinstance(psp, str) and psp else None


def _event(item: dict[str, Any], live: bool | None) -> IncomingEvent:
    psp, code = item.get("pspReference"), item.get("eventCode")
    success = str(item.get("success", "")).lower()
    if not isinstance(psp, str) or not isinstance(code, str) or not psp or not code:
        raise MalformedEvent("a notification item lacks pspReference or eventCode")
    event_id = f"{psp}:{code}:{success}"
    reference = parse_reference(str(item.get("merchantReference", "")))
    if len(event_id) > 255 or len(code) > 255:
        raise MalformedEvent("a notification item's identifiers are too long")
    return IncomingEvent(
        provider=PROVIDER,
        event_id=event_id,
        event_type=code,
        handled=code in HANDLED and reference is not None,
        customer=reference[0][:255] if reference else None,
        tenant_hint=None,
        object_id=psp[:255],
        version=reference[2] if reference else 0,
        raw=json.dumps({**item, LIVE_KEY: live}, separators=(",", ":")).encode(),
    )
