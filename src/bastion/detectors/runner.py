"""The detector runner: the worker's loop that feeds committed audit events to the rules.

Position: a cursor per tenant (migration 0033). A tenant's events commit in
``seq`` order, so "everything up to the cursor" is exact. One :meth:`step`
reads the next events past the cursors, shows them to every rule in time
order, and commits the firings together with the cursors' advance (one
transaction, compare-and-set on each cursor): a crash before that commit
leaves the cursors where they were and the batch is processed again by the
next runner; a crash after it leaves firings whose response has not run, and
:meth:`respond_pending` runs it (each incident action is idempotent). The
rules' windows live in memory; :meth:`warm_up` rebuilds them from the events
already processed (and the spend baseline from the trail's hourly sums), so a
restarted runner fires on a burst that began before the crash, and the
cooldowns from the firings table, so it does not fire twice on one.

The runner polls every ``poll_seconds`` while nothing is waiting, and steps
again at once while batches keep coming. It is not woken by NOTIFY: a notifying
commit takes a database-wide lock through its WAL flush, so announcing audit
events would serialise every tenant's audited writes (migration 0037). A
malformed event is counted (``detector_cursors.malformed``), logged and
skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio

from bastion.db.pool import Database
from bastion.detectors.alerts import WebhookAlerts
from bastion.detectors.errors import FiringNamesYou, FiringNotFound
from bastion.detectors.response import Responder
from bastion.detectors.rules import Event, Finding, Malformed, Rule, SpendAnomaly, user_of
from bastion.detectors.store import DetectorStore, StaleCursor
from bastion.logs import get_logger

_log = get_logger("bastion.detectors")


class DetectorRunner:
    """Reads the trail past the cursors, fires the rules and answers the firings."""

    def __init__(
        self,
        db: Database,
        rules: Sequence[Rule],
        responder: Responder,
        *,
        alerts: WebhookAlerts | None = None,
        on_fired: Callable[[str], None] | None = None,
        per_tenant: int = 500,
        tenants: int = 100,
        cooldown_seconds: int = 3600,
        poll_seconds: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.store = DetectorStore(db)
        self.rules = list(rules)
        self.responder = responder
        self.alerts = alerts
        self.on_fired = on_fired
        self.per_tenant = per_tenant
        self.tenants = tenants
        self.cooldown = timedelta(seconds=cooldown_seconds)
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.malformed = 0  # events skipped since start (also counted per tenant in the table)
        self._last: dict[tuple[str, UUID, str], datetime] = {}  # cooldowns
        self._warm = False

    # -- state after a (re)start -------------------------------------------------------

    async def warm_up(self) -> None:
        """Rebuild the rules' windows and the cooldowns from what is committed."""
        now = self.clock()
        for rule in self.rules:
            rule.setup()
        self._last = {
            (rule, tenant, subject): at
            for rule, tenant, subject, at in await self.store.recent_firings(now - self.cooldown)
        }
        longest = max((rule.params.get("window_seconds", 0) for rule in self.rules), default=0)
        # Whole hours, so that the spend buckets seeded below and the replayed
        # events never count the same hour twice.
        since = datetime.fromtimestamp((int(now.timestamp()) - longest) // 3600 * 3600, UTC)
        for rule in self.rules:
            if isinstance(rule, SpendAnomaly):
                baseline = now - timedelta(days=rule.p("baseline_days"), hours=1)
                for row in await self.store.spend_hours(baseline):
                    if row["hour"] >= since:
                        continue
                    hour = int(row["hour"].timestamp()) // 3600
                    tenant = str(row["tenant_id"])
                    rule.seed_hour(("tenant", tenant), hour, row["micro_usd"])
                    rule.seed_hour(("model", tenant, row["model"][:200]), hour, row["micro_usd"])
                    user = user_of(row["actor"])
                    if user is not None:
                        rule.seed_hour(("user", tenant, str(user)), hour, row["micro_usd"])
        watched = sorted(set().union(*(rule.watches for rule in self.rules)))
        for event in await self.store.history(since, watched):
            self._observe(event, live=False)
        self._warm = True

    # -- one step ----------------------------------------------------------------------

    def _observe(self, event: Event, *, live: bool) -> tuple[list[Finding], bool]:
        """Show ``event`` to every rule; return the findings and whether it was malformed."""
        found: list[Finding] = []
        malformed = False
        for rule in self.rules:
            try:
                found.extend(rule.observe(event, live=live))
            except Malformed as error:
                malformed = True
                _log.warning(
                    "detector_event_malformed",
                    rule=rule.name,
                    tenant=str(event.tenant_id),
                    seq=event.seq,
                    error=str(error),
                )
            except Exception as error:  # a rule's bug must not stop the stream either
                malformed = True
                _log.error(
                    "detector_rule_failed",
                    rule=rule.name,
                    tenant=str(event.tenant_id),
                    seq=event.seq,
                    error=type(error).__name__,
                )
        return found, malformed

    def _cooled(self, finding: Finding, at: datetime) -> bool:
        """False (drop it) if the same rule fired on the same subject within the cooldown."""
        key = (finding.rule, finding.tenant_id, finding.subject)
        last = self._last.get(key)
        if last is not None and at - last < self.cooldown:
            return False
        self._last[key] = at
        return True

    async def step(self) -> int:
        """Process the next batch and answer its firings; return the events read."""
        if not self._warm:
            await self.warm_up()
        batch = await self.store.next_batch(per_tenant=self.per_tenant, tenants=self.tenants)
        findings: list[Finding] = []
        malformed: dict[UUID, int] = {}
        saved = dict(self._last)
        for event in sorted(batch.events, key=lambda e: (e.at, str(e.tenant_id), e.seq)):
            found, bad = self._observe(event, live=True)
            if bad:
                malformed[event.tenant_id] = malformed.get(event.tenant_id, 0) + 1
            findings.extend(f for f in found if self._cooled(f, event.at))
        if batch.events:
            try:
                ids = await self.store.commit(batch, findings, malformed)
            except BaseException:
                # Nothing was written: this memory ran ahead of the database.
                self._last = saved
                self._warm = False
                raise
            self.malformed += sum(malformed.values())
            for finding, firing_id in zip(findings, ids, strict=True):
                _log.warning(
                    "detector_fired",
                    firing=firing_id,
                    rule=finding.rule,
                    tenant=str(finding.tenant_id),
                    reason=finding.reason,
                    actions=list(finding.actions),
                )
                if self.on_fired is not None:
                    self.on_fired(finding.rule)
        await self.respond_pending()
        if findings and self.alerts is not None:
            self.alerts.wake()
        return len(batch.events)

    async def respond_pending(self) -> int:
        """Run the responses of committed firings that have none yet; return how many ran."""
        ran = 0
        for firing in await self.store.unresponded():
            try:
                response: dict[str, Any] = await self.responder.respond(firing)
            except Exception as error:
                _log.error(
                    "detector_response_failed",
                    firing=firing.id,
                    rule=firing.rule,
                    error=type(error).__name__,
                )
                continue  # retried at the next step
            await self.store.responded(firing.id, response)
            ran += 1
        return ran

    async def drain(self) -> int:
        """Step until nothing is left (tests, benchmarks); return the events read."""
        total = 0
        while n := await self.step():
            total += n
        return total

    # -- the worker's loop ---------------------------------------------------------------

    async def run_forever(self) -> None:
        """Step while there is work, else wait ``poll_seconds``; a failed step is retried."""
        while True:
            try:
                if await self.step():
                    continue  # more may be waiting
            except StaleCursor:
                _log.warning("detector_cursor_moved")  # another runner: rebuild and go on
                continue
            except Exception as error:
                _log.error("detector_step_failed", error=type(error).__name__)
            await anyio.sleep(self.poll_seconds)


class DetectorService:
    """What an operator does with firings: list them, undo one (CLI)."""

    def __init__(self, db: Database, responder: Responder) -> None:
        self.store = DetectorStore(db)
        self.responder = responder

    async def firings(self, *, limit: int = 100, tenant_id: UUID | None = None) -> list[Any]:
        return await self.store.firings(limit=limit, tenant_id=tenant_id)

    async def undo(
        self, firing_id: int, *, actor: str, reason: str, tenant_id: UUID | None = None
    ) -> dict[str, Any] | None:
        """Undo a firing's freeze and pause (audited); None if unknown (in
        ``tenant_id``, when given) or undone already.

        Marked undone first, so a response that had not run yet never will."""
        firing = await self.store.mark_undone(
            firing_id, actor=actor, reason=reason, tenant_id=tenant_id
        )
        if firing is None:
            return None
        if firing.responded_at is None:
            return {"response": "had not run; it never will"}
        return await self.responder.undo(firing, actor=actor)

    async def undo_as_owner(
        self, tenant_id: UUID, user_id: UUID, firing_id: int, *, reason: str
    ) -> dict[str, Any]:
        """An owner's undo (the route checks the role and MFA): a firing of their
        own tenant that is not about themselves (a compromised owner must not
        lift what was done about them). Raises :class:`FiringNotFound`,
        :class:`FiringNamesYou`."""
        firing = await self.store.firing(firing_id, tenant_id=tenant_id)
        if firing is None or firing.undone_at is not None:
            raise FiringNotFound("no such firing to undo in this tenant")
        if firing.user_id == user_id:
            raise FiringNamesYou("this firing is about you: another owner or an operator undoes it")
        done = await self.undo(
            firing_id, actor=f"user:{user_id}", reason=reason, tenant_id=tenant_id
        )
        if done is None:  # undone by someone else meanwhile
            raise FiringNotFound("no such firing to undo in this tenant")
        return done
