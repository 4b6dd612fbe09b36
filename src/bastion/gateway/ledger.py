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
  leases shrink to one call (see :meth:`BudgetService.lease`).
* A lease takes no new calls once older than ``lease_seconds`` and closes when
  its last call is done, so a new limit (a plan downgrade) holds within
  ``lease_seconds + flush_seconds``, and usage reaches the database as fast.
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

    def _book(self, tenant_id: UUID) -> _Book:
        return self._books.setdefault(tenant_id, _Book())

    def _fitting(self, book: _Book, tokens: int) -> Lease | None:
        now = self.clock()
        for lease in book.open:
            if (
                now - lease.opened < self.lease_seconds
                and lease.calls_free >= 1
                and lease.tokens_free >= tokens
            ):
                return lease
        return None

    async def take(self, tenant_id: UUID, tokens: int) -> Slot:
        """A call and ``tokens`` of the tenant's budget; raises OverBudget/NoBudget."""
        book = self._book(tenant_id)
        lease = self._fitting(book, tokens)
        if lease is None:
            async with book.lock:  # one lease request per tenant at a time
                lease = self._fitting(book, tokens)
                if lease is None:
                    # Shielded: a caller that goes away mid-request must not
                    # leave a block reserved in the database and unknown here.
                    lease = await asyncio.shield(self._open_lease(book, tenant_id, tokens))
        lease.calls_free -= 1
        lease.tokens_free -= tokens
        lease.in_flight += 1
        return Slot(lease, tokens)

    async def _open_lease(self, book: _Book, tenant_id: UUID, tokens: int) -> Lease:
        reservation = await self.budgets.lease(
            tenant_id, calls=self.lease_calls, tokens_per_call=tokens, min_tokens=tokens
        )
        lease = Lease(reservation, self.clock(), reservation.calls, reservation.tokens)
        book.open.append(lease)
        return lease

    def record(
        self, tenant_id: UUID, slot: Slot | None, usage: Usage | None, event: AuditEntry
    ) -> None:
        """The call is over: its usage (None: it failed, its share goes back) and
        its audit event, both written by the next flush."""
        if slot is not None:
            lease = slot.lease
            lease.in_flight -= 1
            if usage is None:
                lease.calls_free += 1
                lease.tokens_free += slot.tokens
            else:
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

    async def flush(self, *, everything: bool = False) -> None:
        """Write what is queued; ``everything`` also closes leases still open."""
        for tenant_id, book in list(self._books.items()):
            self._close_done(book, everything=everything)
            if not book.closed and not book.events:
                continue
            closed, events = book.closed, book.events
            book.closed, book.events = [], []
            try:
                async with self.db.tenant_tx(tenant_id, None, "system") as tx:
                    for lease in closed:
                        if lease.calls_used:
                            await self.budgets.settle(
                                lease.reservation,
                                lease.tokens_used,
                                calls_used=lease.calls_used,
                                tx=tx,
                            )
                        else:
                            await self.budgets.release(lease.reservation, tx=tx)
                    await audit.record_many(
                        tx,
                        [(e.actor, e.action, e.target, e.details, e.request_id) for e in events],
                    )
            except Exception as error:
                # The database is away: keep everything for the next flush.
                book.closed[:0], book.events[:0] = closed, events
                _log.warning("ledger_flush_failed", error=type(error).__name__)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop flushing periodically; settle every lease and write every event."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush(everything=True)
