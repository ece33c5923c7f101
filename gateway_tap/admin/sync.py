"""Each tap worker follows the admin state: a version row polled every ``poll_interval_s``.

Polling, not PostgreSQL ``LISTEN/NOTIFY``: it works the same on SQLite (the embedded
default) and PostgreSQL, survives reconnects without missing a notification, and costs one
primary-key read per interval (measured ~1.7 ms CPU per worker per second at 0.25 s; see
``docs/decisions.md``). When the version moved (or a rotated key's overlap ended) the whole
state is read in one transaction and handed to ``apply``; the version this worker runs, with the
entries it could not apply, is reported to ``admin_taps`` (``gateway-tap status`` and ``GET /v1/status``
show it). Nothing stops the polling: a failure to apply is logged and retried at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from gateway_tap.admin.state import AdminState, Rejected
from gateway_tap.admin.store import AdminStore
from gateway_tap.budgets.store import BudgetStoreError

log = logging.getLogger("gateway_tap.admin")

HEARTBEAT_S = 10.0
"""How often a worker re-reports the version it runs even when nothing changed, and records its keys' use."""

ApplyFn = Callable[[AdminState], Awaitable[bool]]
UsedFn = Callable[[], set[str]]
"""Takes the hashes of the keys used since the last call (:attr:`gateway_tap.apps.AppIndex.used`)."""
RejectedFn = Callable[[], Sequence[Rejected]]
"""The entries of the applied state this worker left out."""


class StateSync:
    """Polls the version row and applies new states, one at a time."""

    def __init__(self, store: AdminStore, apply: ApplyFn, *, interval_s: float, gateway_id: str, worker: int,
                 used: UsedFn | None = None, prepare: Callable[[], Awaitable[object]] | None = None,
                 rejected: RejectedFn = lambda: (), clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._rejected = rejected
        self._prepare = prepare
        self._apply = apply
        self._used = used
        self._unrecorded: set[str] = set()
        self.interval_s = interval_s
        self.gateway_id = gateway_id
        self.worker = worker
        self.clock = clock
        self.state = AdminState()
        self.applied_version = 0
        self._applied_once = False
        self._next_expiry_s: float | None = None
        self._reported_s = 0.0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._apply_failing = False

    async def start(self) -> None:
        """Apply the current state (a database that is down is logged and retried), then poll."""
        await self.poll()
        self._task = asyncio.create_task(self._loop(), name="admin-state-sync")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(BudgetStoreError):
            await self.record_use(self.clock())

    async def record_use(self, now_s: float) -> None:
        """Write the keys used since the last time (kept for the next try when the database is down)."""
        if self._used is not None:
            self._unrecorded |= self._used()
        if self._unrecorded:
            await self.store.mark_used(self._unrecorded, now_s)
            self._unrecorded = set()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll()

    async def poll(self, *, force: bool = False) -> None:
        """One check; applies the state when its version moved, a rotated key expired, or ``force``."""
        async with self._lock:
            try:
                if self._prepare is not None:  # e.g. migrating the schema: until it once succeeded
                    await self._prepare()
                    self._prepare = None
                version = await self.store.version()
                now = self.clock()
                expired = self._next_expiry_s is not None and now >= self._next_expiry_s
                if force or expired or not self._applied_once or version != self.applied_version:
                    state = await self.store.state()
                    if await self._apply(state):
                        self.state = state
                        self._next_expiry_s = state.next_expiry_s(self.clock())
                    # Not applied at all (logged, and reported as rejected): keep what runs; try again on the next
                    # change.
                    self._applied_once = True
                    self.applied_version = state.version
                    self._reported_s = 0.0
                if now - self._reported_s >= HEARTBEAT_S:
                    await self.store.report_tap(self.gateway_id, self.worker, os.getpid(), self.applied_version,
                                                self._rejected())
                    self._reported_s = now
                    await self.record_use(now)
                if self._failing:
                    log.info("admin state database reachable again", extra={"worker": self.worker})
                    self._failing = False
                self._apply_failing = False
            except BudgetStoreError as exc:
                if not self._failing:
                    log.warning("admin state not refreshed: %s; the state in force stays", exc,
                                extra={"worker": self.worker})
                    self._failing = True
            except Exception:
                # A bug must not end the polling: every later change would be ignored (retried next poll).
                if not self._apply_failing:
                    log.exception("admin state not applied; the state in force stays; retrying every %.2f s",
                                  self.interval_s, extra={"worker": self.worker})
                    self._apply_failing = True
