"""The gateway process's ledger of model calls: budget leases and batched writes
(CHECKLIST P3, A1).

On the request path a call touches no database table for its budget: it
takes one call and its token estimate from its tenant's open lease — a block
reserved in PostgreSQL by :meth:`BudgetService.lease` — and, when done,
records what it used and its audit event in memory. A flusher writes, every
``flush_seconds`` and per tenant, the queued audit events and the settlement
of the leases that closed, in one transaction.

* Nothing overshoots: every call of every lease was reserved in the database
  first, under the budget row's conditional UPDATE; near the end of a budget
  leases shrink to one call (see :meth:`BudgetService.lease`). In memory, a
  call is taken from a lease only in one step with checking that the lease has
  a call free (no await in between), and the caller that opens a lease takes
  its own call before the lease is visible to anyone else: a lease is never
  spent beyond the calls it holds, whatever the timing.
* A lease takes no new calls once older than ``lease_seconds`` and closes when
  its last call is done, so a new limit (a plan downgrade) holds within
  ``lease_seconds + flush_seconds``, and usage reaches the database as fast.
* While a lease is open (a call in flight: a long stream, say) its hold in
  the database is renewed every third of the hold, so
  :meth:`BudgetService.release_expired` never gives back the calls of a
  living process. Should a hold be lost all the same (the process was cut off
  from the database longer than the hold), the lease takes no more calls
  and the loss is logged as ``budget_lease_lost``. A flush in progress when the
  ledger closes is finished, not cancelled, so no closed lease is dropped.
* If the process dies, the audit events of the last flush interval are lost
  (their log lines were written), and its open leases stay held until
  :meth:`BudgetService.release_expired` gives them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from bastion.audit import log as audit
from bastion.billing.budgets import BudgetService, Reservation
from bastion.db.pool import Database
from bastion.gateway.providers import Usage
from bastion.logs import get_logger

_log = get_logger("bastion.gateway")


@dataclass
class Lease:
    reservation: Reservation
    opened: float
    calls_free: int
    tokens_free: int
    calls_used: int = 0
    tokens_used: int = 0
    in_flight: int = 0
    # When its hold in the database was last set (ledger clock), and whether
    # it was found given back (it then takes no more calls).
    renewed: float = 0.0
    lost: bool = False


@dataclass(frozen=True)
class Slot:
    """One call's share of a lease: a call and its token estimate."""

    lease: Lease
    tokens: int


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    request_id: str | None = None


@dataclass
class _Book:
    """One tenant's open leases, leases to settle and audit events to write."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: list[Lease] = field(default_factory=list)
    closed: list[Lease] = field(default_factory=list)
    events: list[AuditEntry] = field(default_factory=list)


class CallLedger:
    def __init__(
        self,
        db: Database,
        budgets: BudgetService,
        *,
        lease_calls: int = 64,
        lease_seconds: float = 2.0,
        flush_seconds: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.budgets = budgets
        self.lease_calls = lease_calls
        self.lease_seconds = lease_seconds
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._books: dict[UUID, _Book] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def _book(self, tenant_id: UUID) -> _Book:
        return self._books.setdefault(tenant_id, _Book())

    def _claim(self, book: _Book, tokens: int) -> Slot | None:
        """A call and ``tokens`` from an open lease that still has them, or None.

        Checking and taking happen in one step (no await), so two callers
        never take the same free call.
        """
        now = self.clock()
        for lease in book.open:
            if (
                now - lease.opened < self.lease_seconds
                and not lease.lost
                and lease.calls_free >= 1
                and lease.tokens_free >= tokens
            ):
                return _take_from(lease, tokens)
        return None

    async def take(self, tenant_id: UUID, tokens: int) -> Slot:
        """A call and ``tokens`` of the tenant's budget; raises OverBudget/NoBudget."""
        book = self._book(tenant_id)
        slot = self._claim(book, tokens)
        if slot is not None:
            return slot
        async with book.lock:  # one lease request per tenant at a time
            slot = self._claim(book, tokens)
            if slot is not None:
                return slot
            # Shielded: a caller that goes away mid-request must not leave a
            # block reserved in the database and unknown here; its call, taken
            # from the new lease, is then given back.
            opening = asyncio.ensure_future(self._open_lease(book, tenant_id, tokens))
            try:
                return await asyncio.shield(opening)
            except asyncio.CancelledError:
                opening.add_done_callback(_give_back_if_opened)
                raise

    async def _open_lease(self, book: _Book, tenant_id: UUID, tokens: int) -> Slot:
        reservation = await self.budgets.lease(
            tenant_id, calls=self.lease_calls, tokens_per_call=tokens, min_tokens=tokens
        )
        now = self.clock()
        lease = Lease(reservation, now, reservation.calls, reservation.tokens, renewed=now)
        # The opener's call is taken before the lease is published: published
        # first, a request running before the opener resumes could take the
        # last free call and the opener would take it again.
        slot = _take_from(lease, tokens)
        book.open.append(lease)
        return slot

    def record(
        self, tenant_id: UUID, slot: Slot | None, usage: Usage | None, event: AuditEntry
    ) -> None:
        """The call is over: its usage (None: it failed, its share goes back) and
        its audit event, both written by the next flush."""
        if slot is not None:
            if usage is None:
                _give_back(slot)
            else:
                lease = slot.lease
                lease.in_flight -= 1
                lease.calls_used += 1
                lease.tokens_used += usage.total_tokens
                lease.tokens_free += slot.tokens - usage.total_tokens
        self._book(tenant_id).events.append(event)

    def _close_done(self, book: _Book, *, everything: bool) -> None:
        now = self.clock()
        for lease in list(book.open):
            spent = lease.calls_free == 0 or now - lease.opened >= self.lease_seconds
            if lease.in_flight == 0 and (spent or everything):
                book.open.remove(lease)
                book.closed.append(lease)

    def _due_for_renewal(self, book: _Book) -> list[Lease]:
        """Open leases (calls in flight, or calls still to give) whose hold in
        the database is a third gone: it is pushed back."""
        now = self.clock()
        every = self.budgets.hold_seconds / 3
        return [lease for lease in book.open if now - lease.renewed >= every]

    async def flush(self, *, everything: bool = False) -> None:
        """Write what is queued; ``everything`` also closes leases still open.

        One flush at a time: a second waits for the first.
        """
        async with self._flushing:
            for tenant_id, book in list(self._books.items()):
                await self._flush_book(tenant_id, book, everything=everything)

    async def _flush_book(self, tenant_id: UUID, book: _Book, *, everything: bool) -> None:
        self._close_done(book, everything=everything)
        renewing = self._due_for_renewal(book)
        if not book.closed and not book.events and not renewing:
            return
        closed, events = book.closed, book.events
        book.closed, book.events = [], []
        kept: set[UUID] = set()
        try:
            async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                if renewing:
                    kept = await self.budgets.renew(
                        [lease.reservation for lease in renewing], tx=tx
                    )
                for lease in closed:
                    if lease.calls_used:
                        done = await self.budgets.settle(
                            lease.reservation,
                            lease.tokens_used,
                            calls_used=lease.calls_used,
                            tx=tx,
                        )
                    else:
                        done = await self.budgets.release(lease.reservation, tx=tx)
                    if not done:  # released by someone else: its use is not counted
                        _log.error(
                            "budget_lease_lost",
                            tenant=str(tenant_id),
                            calls_used=lease.calls_used,
                            tokens_used=lease.tokens_used,
                        )
                await audit.record_many(
                    tx,
                    [(e.actor, e.action, e.target, e.details, e.request_id) for e in events],
                )
        except Exception as error:
            # The database is away: keep everything for the next flush.
            book.closed[:0], book.events[:0] = closed, events
            _log.warning("ledger_flush_failed", error=type(error).__name__)
            return
        now = self.clock()
        for lease in renewing:
            if lease.reservation.id in kept:
                lease.renewed = now
            else:  # its hold was already given back: take no more calls from it
                lease.lost = True
                _log.error("budget_lease_lost", tenant=str(tenant_id), in_flight=lease.in_flight)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            # Shielded: closing the ledger cancels this loop, never a flush
            # half-way (its closed leases would be dropped, their holds kept).
            await asyncio.shield(self.flush())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop flushing periodically; settle every lease and write every event
        (after a periodic flush in progress, which the lock waits for)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush(everything=True)


def _take_from(lease: Lease, tokens: int) -> Slot:
    lease.calls_free -= 1
    lease.tokens_free -= tokens
    lease.in_flight += 1
    return Slot(lease, tokens)


def _give_back(slot: Slot) -> None:
    """The slot's call did not happen: its call and tokens are free again."""
    lease = slot.lease
    lease.in_flight -= 1
    lease.calls_free += 1
    lease.tokens_free += slot.tokens


def _give_back_if_opened(opening: asyncio.Future[Slot]) -> None:
    """Done callback of a lease opened for a caller that went away meanwhile."""
    if not opening.cancelled() and opening.exception() is None:
        _give_back(opening.result())
