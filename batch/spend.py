"""The spend guard: a submit is paid for before it is sent.

The reservation is the ``submitting`` intent line, fsync'ed before the request
leaves. Until an outcome settles it, the intent counts as spend, so a kill at
any instant can only over-count what this folder paid, never under-count.
``--budget`` caps the whole folder: with several shards running side by side
the check and the intent happen under one lock file, after reading what the
other shards' ledgers have added since.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import uuid
from pathlib import Path

from batch.events import Submitting
from batch.ledger import LedgerTail, LedgerWriter, ledger_paths
from batch.state import LedgerState
from batch.stop import Stopped, StopSignal

BUDGET_LOCK_NAME = ".wsbatch.budget.lock"
EPSILON = 1e-9
LOCK_POLL_S = 0.005


class SpendGuard:
    def __init__(
        self,
        writer: LedgerWriter,
        state: LedgerState,
        stop: StopSignal,
        *,
        price: float,
        budget: float | None = None,
        max_tasks: int | None = None,
        others: dict[Path, int] | None = None,
    ) -> None:
        self.writer = writer
        self.state = state
        self.stop = stop
        self.price = price
        self.budget = budget
        self.max_tasks = max_tasks
        self.committed = 0  # submits sent this run that may have created a task
        self._folder = writer.path.parent
        self._tails = {path: LedgerTail(path, offset) for path, offset in (others or {}).items()}
        self._lock = asyncio.Lock()
        self._fd = -1

    async def reserve(self, row: str, seed: int, fingerprint: str | None) -> str:
        """Write the durable intent for one submit; raise ``Stopped`` when the run may not
        send another (stopping, --max-tasks, --budget)."""
        self.stop.check()
        if self.max_tasks is not None and self.committed >= self.max_tasks:
            self.stop.request(f"--max-tasks {self.max_tasks} reached")
            raise Stopped
        intent = uuid.uuid4().hex[:16]
        event = Submitting(row, seed, intent, self.price, fingerprint)
        if self.budget is None:
            self.committed += 1
            await self.writer.write(event, durable=True)
            return intent
        async with self._lock:
            self.stop.check()
            await self._lock_folder()
            try:
                # Checked again under the lock: other workers may have sent while we waited.
                if self.max_tasks is not None and self.committed >= self.max_tasks:
                    self.stop.request(f"--max-tasks {self.max_tasks} reached")
                    raise Stopped
                others = await asyncio.to_thread(self._others_spend)
                spent = self.state.spend + others
                if spent + self.price > self.budget + EPSILON:
                    self.stop.request(
                        f"budget ${self.budget:.2f} reached (${spent:.2f} committed in this "
                        f"folder; one more task costs ${self.price:g})"
                    )
                    raise Stopped
                self.committed += 1
                await self.writer.write(event, durable=True)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return intent

    def release(self) -> None:
        """A submit was refused: it created nothing and counts against nothing."""
        self.committed = max(self.committed - 1, 0)

    async def _lock_folder(self) -> None:
        """Take the folder's budget lock without blocking the loop (or a thread that a
        cancelled run could not take back): try, and wait a little between tries."""
        if self._fd < 0:
            self._fd = os.open(
                self._folder / BUDGET_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644
            )
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL_S)

    def _others_spend(self) -> float:
        """What the other ledgers of the folder have added to its spend since this run
        read them (a shard that started after us is read whole)."""
        for path in ledger_paths(self._folder):
            if path != self.writer.path and path not in self._tails:
                self._tails[path] = LedgerTail(path, 0)
        return sum(tail.refresh().spend for tail in self._tails.values())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
