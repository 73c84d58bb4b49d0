"""When to poll a task: learned from how long recent tasks took.

Fixed 1 s polling costs about one request per second of task and notices a
completion half a second late on average. Once a few tasks have finished,
this schedule places polls at quantiles of the observed latencies instead,
so most tasks are seen within a fraction of the spread with two or three
polls. A floor keeps the polls of one task apart.
"""

from __future__ import annotations

import bisect
import random
from collections import deque

WINDOW = 256
MIN_SAMPLES = 5
# Three polls placed so that half the tasks are seen by the first, 85% by the second and
# all by the third: about 1.65 polls a task once learned (fixed 1 s polling of a 1-3 s
# task takes 3.5), each seen a fifth of the spread late on average.
QUANTILES = (0.5, 0.85, 1.0)


def latency_sample(lower: float, upper: float, reported: float | None) -> float:
    """An estimate of a task's latency known to lie in (lower, upper].

    Polls only bracket the completion. The server's own inference time, when it
    reports one, usually lands inside the bracket and is the better guess; otherwise
    a uniform draw keeps the estimates unbiased (a midpoint would pull every quantile
    toward the schedule's own poll times).
    """
    if reported is not None and reported > 0:
        return min(max(reported, lower), upper)
    return random.uniform(lower, upper)


class PollSchedule:
    """Poll times for every task of a run, learned from the tasks that finished.

    Tasks still running are taken into account too (as Kaplan-Meier censored
    observations): right after start-up only the fastest tasks have finished, and
    quantiles of those alone would send every other task polls far too early.
    """

    def __init__(
        self, floor: float = 0.5, first: float | None = None, max_gap: float = 10.0
    ) -> None:
        self.floor = floor
        self.first = 2 * floor if first is None else first
        self.max_gap = max_gap
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._sorted: list[float] = []
        self._running: dict[object, float] = {}
        self._cache: tuple[float, list[float]] = (-1.0, [])

    def begin(self, task: object, started: float) -> None:
        """A task was submitted at ``started`` (monotonic seconds)."""
        self._running[task] = started

    def end(self, task: object) -> None:
        self._running.pop(task, None)

    def observe(self, latency: float) -> None:
        """Record an estimate of how long a task took from submit to completion."""
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(latency)
        bisect.insort(self._sorted, latency)
        self._cache = (-1.0, [])

    def quantiles(self, now: float) -> list[float]:
        """The latencies by which QUANTILES of tasks finish; fewer when too many tasks
        are still running to tell. Recomputed at most every 0.2 s."""
        at, cached = self._cache
        if 0 <= now - at < 0.2:
            return cached
        events = [(t, 1) for t in self._sorted]
        events += [(now - started, 0) for started in self._running.values()]
        events.sort()
        found: list[float] = []
        if len(self._sorted) >= MIN_SAMPLES:
            survival = 1.0
            i, n = 0, len(events)
            while i < n and len(found) < len(QUANTILES):
                t, at_risk, finished = events[i][0], n - i, 0
                while i < n and events[i][0] == t:
                    finished += events[i][1]
                    i += 1
                if finished:
                    survival *= 1.0 - finished / at_risk
                    while len(found) < len(QUANTILES) and 1.0 - survival >= (
                        QUANTILES[len(found)] - 1e-9
                    ):
                        found.append(t)
        self._cache = (now, found)
        return found

    def next_delay(self, elapsed: float, since_last_poll: float | None, now: float) -> float:
        """Seconds from now until the next poll of a task ``elapsed`` seconds old."""
        earliest = 0.0 if since_last_poll is None else max(self.floor - since_last_poll, 0.0)
        known = self.quantiles(now)
        for t in known:
            if t > elapsed + earliest:
                return t - elapsed
        # Past every known quantile (or nothing known yet): widen the gaps from there.
        start = known[-1] if known else self.first
        return max(self._widening(elapsed, start, 0.5) - elapsed, earliest)

    def _widening(self, elapsed: float, start: float, share: float) -> float:
        """The next poll time: ``start``, then gaps that grow with the task's age, as the
        vendor asks of image clients (``share`` of the age, within floor..max_gap)."""
        if elapsed < start:
            return start
        return elapsed + min(max(elapsed * share, self.floor), self.max_gap)
