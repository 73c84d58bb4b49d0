"""Stopping a run: who asked, why, and which waits may simply be cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Stopped(Exception):
    """The run is stopping: leave the row as the ledger has it."""


class StopSignal:
    """Set once: no new submissions from then on.

    Tasks inside ``interruptible()`` are waiting for something that costs nothing to
    abandon (an upload, a submit slot, a backoff between two settled submits), so a
    stop cancels them at once; a task that has sent a submit is never cancelled
    before its outcome is written.
    """

    def __init__(self) -> None:
        self.stopping = False
        self.reason: str | None = None
        self.by: str | None = None  # the signal's name, for the exit code
        self.exit_code: int | None = None  # a stop that needs the user (the balance)
        self._waiting: set[asyncio.Task[object]] = set()
        self._cancelled: set[asyncio.Task[object]] = set()
        self.listeners: list[Callable[[], None]] = []

    def request(self, reason: str, by: str | None = None, exit_code: int | None = None) -> bool:
        """Stop submitting; True the first time."""
        if self.stopping:
            return False
        self.stopping = True
        self.reason = reason
        self.by = by
        self.exit_code = exit_code
        for task in list(self._waiting):
            self._cancelled.add(task)
            task.cancel()
        for listener in self.listeners:
            listener()
        return True

    def check(self) -> None:
        if self.stopping:
            raise Stopped

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        if self.stopping:
            raise Stopped
        self._waiting.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if task not in self._cancelled:
                raise  # not ours: a second signal, or the grace period ending
            self._cancelled.discard(task)
            task.uncancel()
            raise Stopped from None
        finally:
            self._waiting.discard(task)
