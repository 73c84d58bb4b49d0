"""How many tasks the run keeps on the server: ``--concurrency`` running, a few queued.

The vendor queues tasks above an account's concurrency cap instead of refusing them.
A task queued behind the cap starts the moment a running one finishes, while a client
holding exactly the cap lets the server's slot sit idle until it notices the finish (half
a poll interval or more) and its next submit arrives. So a run keeps one task more than
``--concurrency`` on the server from the start, and once the server shows it queues
them (a poll answers ``created`` while that extra task is out), a few more. Queued tasks
are submitted, paid and recorded like any other: the spend guard commits them at
submit, and they are in flight in progress and status.

Where the account allows more than ``--concurrency``, the one extra task simply runs:
the user's limit is exceeded by one, never more, unless the server is seen queueing.
``queue_ahead=0`` turns it all off.
"""

from __future__ import annotations

import math

from batch.permits import Permits

# Queued tasks beyond the cap, as a share of --concurrency: measured on a lognormal
# 6 s workload with a server cap of 20 (README, "Speed and scale"), 10% recovered half
# of the lag's cost, 20-25% nearly all of it.
AHEAD_SHARE = 0.25
AHEAD_MAX = 200


def default_ahead(concurrency: int) -> int:
    return min(max(1, math.ceil(concurrency * AHEAD_SHARE)), AHEAD_MAX)


class Slots(Permits):
    """Permits for tasks on the server; a job holds one from its submit to its result."""

    def __init__(self, concurrency: int, ahead: int | None = None) -> None:
        super().__init__()
        self.running = max(1, concurrency)
        self.ahead_max = default_ahead(self.running) if ahead is None else max(0, ahead)
        # One probe from the start: it is how the server gets to show that it queues.
        self.ahead = min(1, self.ahead_max)

    @property
    def workers(self) -> int:
        """Workers the pool needs so that every permit can be used."""
        return self.running + self.ahead_max

    @property
    def capacity(self) -> int:
        return self.running + self.ahead

    @property
    def queueing(self) -> bool:
        """The server was seen queueing this run's tasks."""
        return self.ahead_max > 1 and self.ahead == self.ahead_max

    @property
    def queued(self) -> int:
        """Tasks beyond ``--concurrency``: waiting on the server once it is seen queueing."""
        return max(0, self.held - self.running) if self.queueing else 0

    def saw_queued(self) -> bool:
        """A poll answered ``created`` (queued): is this the news that the server queues?

        Only while more than ``--concurrency`` tasks are out does it say the cap is
        reached; below that a task may sit in ``created`` for other reasons."""
        if self.ahead >= self.ahead_max or self.held <= self.running:
            return False
        self.ahead = self.ahead_max
        self.widened(self.ahead_max)
        return True
