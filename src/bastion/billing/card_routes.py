"""The billing routes' card-number refusal: a FastAPI dependency (CHECKLIST P4).

Every billing route depends on :func:`refuse_card_numbers`, which refuses a
request carrying a payment card number before the route reads it
(:func:`bastion.billing.checkout.contains_card_number` finds one in any
spelling). HTTP edge: it reads the raw request and answers 413 itself.
"""

from __future__ import annotations

from fastapi import Request

from bastion.api.problems import PayloadTooLarge
from bastion.billing.checkout import MAX_BILLING_BODY_BYTES, CardDataRefused, contains_card_number
from bastion.logs import get_logger

_log = get_logger("bastion.billing")


async def refuse_card_numbers(request: Request) -> None:
    """FastAPI dependency for every billing route: 422 ``card-data-refused`` on a PAN.

    It runs before the route's own parsing; the refusal names no part of the
    input, and the log line says only that a card number was refused. A body
    or query over :data:`MAX_BILLING_BODY_BYTES` is refused (413) unscanned.
    """
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > MAX_BILLING_BODY_BYTES:
        raise PayloadTooLarge(f"billing requests are limited to {MAX_BILLING_BODY_BYTES} bytes")
    body = await request.body()
    if len(body) > MAX_BILLING_BODY_BYTES or len(request.url.query) > MAX_BILLING_BODY_BYTES:
        raise PayloadTooLarge(f"billing requests are limited to {MAX_BILLING_BODY_BYTES} bytes")
    if contains_card_number(body, request.url.query):
        _log.warning("card_number_refused", path=request.url.path)
        raise CardDataRefused(
            "payment card numbers must be entered on the payment provider's hosted page"
        )
