"""One LISTEN loop for every in-memory cache that PostgreSQL announcements keep valid.

A cache invalidated by ``NOTIFY`` (PostgreSQL, "LISTEN" and "NOTIFY") can only
be trusted while its listener is connected: an announcement made while nobody
listened is never delivered. :class:`Listener` therefore fails closed for its
owner: ``on_ready`` runs each time it (re)starts listening (drop what was cached
before), ``on_lost`` whenever the connection ends (stop trusting the cache),
and after ``ping_seconds`` of quiet it pings, so that a connection that died
without a word is noticed too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import psycopg

from bastion.logs import get_logger

_log = get_logger("bastion.db")


class Listener:
    """Listens on ``channel`` and hands each payload to ``on_notify``, reconnecting forever."""

    def __init__(
        self,
        conninfo: str,
        channel: str,
        *,
        on_notify: Callable[[str], None],
        on_ready: Callable[[], None],
        on_lost: Callable[[], None],
        retry_seconds: float = 1.0,
        ping_seconds: float = 5.0,
    ) -> None:
        if not channel.isidentifier():  # spliced into LISTEN: an identifier only
            raise ValueError("a channel is a plain identifier")
        self._conninfo = conninfo
        self._channel = channel
        self._on_notify = on_notify
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._retry = retry_seconds
        self._ping = ping_seconds
        self._task: asyncio.Task[None] | None = None
        self.backend_pid: int | None = None  # the listening connection's server process

    def start(self) -> None:
        """Start listening (inside the serving event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {self._channel}")
                    self.backend_pid = conn.info.backend_pid
                    self._on_ready()  # announcements before LISTEN were never seen
                    while True:
                        async for notify in conn.notifies(timeout=self._ping):
                            self._on_notify(notify.payload)
                        # Quiet for a while: is the connection still there?
                        await asyncio.wait_for(conn.execute("SELECT 1"), self._ping)
            except (psycopg.Error, OSError, TimeoutError) as error:
                _log.warning("listener_lost", channel=self._channel, error=type(error).__name__)
            finally:
                self.backend_pid = None
                self._on_lost()
            await asyncio.sleep(self._retry)
