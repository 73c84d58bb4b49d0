"""The spend guard: a submit is paid for before it is sent.

The reservation is the ``submitting`` intent line, fsync'ed before the request
leaves. Until an outcome settles it, the intent counts as spend, so a kill at
any instant can only over-count what this folder paid, never under-count.
The account's balance, read when the run began, caps what the run commits.
``--budget`` caps the whole folder: with several shards running side by side
the check and the intent happen under one lock file, after reading what the
other shards' ledgers have added since. Each holder of the lock signs the lock file;
a signature not our own means another shard held it, and only then is the folder
listed for ledgers that appeared (a listing costs as much as the folder has files).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import uuid

from batch.errors import AuthError
from batch.events import Submitting
from batch.ledger import LedgerWriter, OtherLedgers
from batch.state import LedgerState
from batch.stop import Stopped, StopSignal

BUDGET_LOCK_NAME = ".wsbatch.budget.lock"
EPSILON = 1e-9
LOCK_POLL_S = 0.005


def new_intent() -> str:
    return uuid.uuid4().hex[:16]


class SpendGuard:
    def __init__(
        self,
        writer: LedgerWriter,
        state: LedgerState,
        stop: StopSignal,
        *,
        budget: float | None = None,
        balance: float | None = None,
        max_tasks: int | None = None,
        others: OtherLedgers | None = None,
    ) -> None:
        self.writer = writer
        self.state = state
        self.stop = stop
        self.budget = budget
        # The account's credit when the run began: this run and the shards beside it may
        # commit no more than that (refunds of failed tasks come hours later).
        self.balance = balance
        self.max_tasks = max_tasks
        self.committed = 0  # submits sent this run that may have created a task
        self._start_spend = state.spend
        self._folder = writer.path.parent
        self._others = others if others is not None else OtherLedgers(writer.path)
        self._lock = asyncio.Lock()
        self._fd = -1
        self._signature: bytes | None = None  # what this guard last wrote in the lock file
        self._signer = uuid.uuid4().hex  # guards of one process (tests, notebooks) differ too
        self._signed = 0

    async def reserve(self, event: Submitting) -> None:
        """Write the durable intent for one submit; raise ``Stopped`` when the run may not
        send another (stopping, --max-tasks, --budget, the balance)."""
        self.stop.check()
        self._check_max_tasks()
        if self.budget is None and self.balance is None:
            self.committed += 1
            await self.writer.write(event, durable=True)
            return
        async with self._lock:
            self.stop.check()
            await self._lock_folder()
            try:
                # Checked again under the lock: other workers may have sent while we waited.
                self._check_max_tasks()
                scan = self._held_by_another()
                others = 0.0  # alone in the folder: no file to read, no thread to wait for
                if scan or self._others.known:
                    others = await asyncio.to_thread(self._others.spend, scan=scan)
                self._check_money(event.price, others)
                self.committed += 1
                await self.writer.write(event, durable=True)
            finally:
                self._sign()
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _check_max_tasks(self) -> None:
        if self.max_tasks is not None and self.committed >= self.max_tasks:
            self.stop.request(f"--max-tasks {self.max_tasks} reached")
            raise Stopped

    def _check_money(self, price: float, others: float) -> None:
        if self.budget is not None:
            spent = self.state.spend + others
            if spent + price > self.budget + EPSILON:
                self.stop.request(
                    f"budget ${self.budget:.2f} reached (${spent:.2f} committed in this "
                    f"folder; one more task costs ${price:g})"
                )
                raise Stopped
        if self.balance is not None:
            used = self.state.spend - self._start_spend + others
            if used + price > self.balance + EPSILON:
                self.stop.request(
                    f"the account's balance ${self.balance:.2f} is used up "
                    f"(${used:.2f} committed since this run began; one more task costs "
                    f"${price:g}); top up, then run again",
                    exit_code=AuthError.exit_code,
                )
                raise Stopped

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

    def _held_by_another(self) -> bool:
        """Whether another process took the budget lock since this guard last held it
        (always, the first time): only such a one can have started a new ledger."""
        return self._signature is None or os.pread(self._fd, 64, 0) != self._signature

    def _sign(self) -> None:
        self._signed += 1
        self._signature = f"{self._signer} {self._signed:>19}\n".encode()
        os.pwrite(self._fd, self._signature, 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
