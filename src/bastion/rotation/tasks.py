"""The worker's periodic key rotation: :meth:`RotationPlan.run_due` on a schedule.

One run at a time (a queueing lock), on ``settings.key_rotation_check_cron``
(hourly by default): each kind is rotated when its period has passed and
superseded versions retired once their overlap is over. A run that changes
nothing writes nothing, so a run repeated (a retry, two workers) is harmless.
"""

from __future__ import annotations

import procrastinate

from bastion.logs import get_logger
from bastion.rotation import RotationPlan

_log = get_logger("bastion.rotation")

TASK = "keys.rotate_due"
QUEUE = "billing"  # a slot of the worker's small, always-on queue


def register(queue: procrastinate.App, plan: RotationPlan, *, cron: str) -> None:
    """Run ``plan.run_due`` on ``cron``."""

    @queue.periodic(cron=cron, periodic_id="keys-rotate-due")
    @queue.task(name=TASK, queue=QUEUE, queueing_lock=TASK)
    async def rotate_due_task(timestamp: int) -> None:
        results = await plan.run_due()
        _log.info(
            "key_rotation_run",
            rotated=sum(1 for r in results if r.rotated is not None),
            retired=sum(len(r.retired) for r in results),
        )
