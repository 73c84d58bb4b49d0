"""When to poll a task: learned from how long recent tasks took.

Fixed 1 s polling costs about one request per second of task and notices a
completion half a second late on average. Once a few tasks have finished,
this schedule places polls at quantiles of the observed latencies instead,
so most tasks are seen within a fraction of the spread with two or three
polls. A floor keeps the polls of one task apart.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import deque

WINDOW = 256
MIN_SAMPLES = 5
# Three polls placed so that half the tasks are seen by the first, 85% by the second and
# all by the third: about 1.65 polls a task once learned (fixed 1 s polling of a 1-3 s
# task takes 3.5), each seen a fifth of the spread late on average.
QUANTILES = (0.5, 0.85, 1.0)
# Where a learned grid may start, as quantiles of the recent latencies.
GRID_STARTS = tuple(i / 40 for i in range(30))
# One second of completion lag costs as much as this many polls: lag keeps a row waiting
# for a slot, and the server idle, while a poll is one small request.
LAG_WEIGHT = 6.0
# Once the server holds queued tasks of the run, a finished task's slot is refilled at
# once whenever it is noticed: lag then costs only the last tasks' wait.
QUEUED_LAG_WEIGHT = 2.0
# Once no row is left to start, a task's lag is the run's: only the last few tasks pay it.
TAIL_LAG_WEIGHT = 20.0
GRID_SLACK = 0.1
REFRESH_S = 0.2
FRESH_S_PER_TASK = 0.0002
# Gaps as a share of a task's age while no latency is known yet: the first wave is seen
# within a quarter of its age (a sixth of the run's tasks when rows are six times slots).
UNKNOWN_SHARE = 0.25


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
        self, floor: float = 1.0, first: float | None = None, max_gap: float = 10.0
    ) -> None:
        self.floor = floor
        self.first = 2 * floor if first is None else first
        self.max_gap = max_gap
        self.lag_weight = LAG_WEIGHT
        self._dirty = False
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._sorted: list[float] = []
        self._running: dict[object, float] = {}
        self._cache: tuple[float, list[float]] = (-1.0, [])
        self._grid_cache: tuple[float, tuple[float, float] | None] = (-2.0, None)

    def begin(self, task: object, started: float) -> None:
        """A task was submitted at ``started`` (monotonic seconds)."""
        self._running[task] = started

    def set_lag_weight(self, weight: float) -> None:
        """How many polls one second of completion lag is worth from now on."""
        self.lag_weight = weight
        self._grid_cache = (-2.0, None)

    def end(self, task: object) -> None:
        self._running.pop(task, None)

    def observe(self, latency: float) -> None:
        """Record an estimate of how long a task took from submit to completion."""
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(latency)
        bisect.insort(self._sorted, latency)
        self._dirty = True

    def quantiles(self, now: float) -> list[float]:
        """The latencies by which QUANTILES of tasks finish; fewer when too many tasks
        are still running to tell. Recomputed every REFRESH_S, and once a task finished
        as soon as the cost allows: each time sorts every running task, so with thousands
        out (and a completion every millisecond) it waits up to REFRESH_S."""
        at, cached = self._cache
        fresh = min(len(self._running) * FRESH_S_PER_TASK, REFRESH_S)
        if 0 <= now - at < (fresh if self._dirty else REFRESH_S):
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
        self._dirty = False
        return found

    def grid(self, now: float) -> tuple[float, float] | None:
        """(first poll, last latency seen) of the best grid, once the latencies are known.

        Polls of one task may come no closer than the floor, so the schedule is a grid:
        a first poll, then one every floor. Where the grid starts decides both costs
        (early: more polls; late: completions noticed later); it is chosen on the recent
        latencies to minimise polls + lag_weight x lag. A task older than every latency
        seen goes on to widening gaps."""
        known = self.quantiles(now)
        if len(known) < len(QUANTILES) - 1:
            return None  # too many tasks still running to know the distribution
        if self._grid_cache[0] == self._cache[0]:
            return self._grid_cache[1]
        samples, gap = self._sorted, self.floor
        n = len(samples)
        best: tuple[float, float] | None = None
        for q in GRID_STARTS:
            start = samples[min(int(q * n), n - 1)]
            polls = lag = 0.0
            for latency in samples:
                k = math.ceil((latency - start) / gap - 1e-9) if latency > start else 0
                polls += k + 1
                lag += start + k * gap - latency
            cost = polls + self.lag_weight * lag
            if best is None or cost < best[0]:
                best = (cost, start)
        assert best is not None
        found = (best[1], samples[-1])
        self._grid_cache = (self._cache[0], found)
        return found

    def next_delay(self, elapsed: float, since_last_poll: float | None, now: float) -> float:
        """Seconds from now until the next poll of a task ``elapsed`` seconds old."""
        earliest = 0.0 if since_last_poll is None else max(self.floor - since_last_poll, 0.0)
        grid = self.grid(now)
        if grid is not None:
            start, last = grid
            at = max(start, elapsed + earliest)
            if at > start:
                # The next grid point; a poll that answered a little late must not push
                # the task a whole step back, but the floor always holds.
                steps = math.ceil((at - start) / self.floor - GRID_SLACK)
                at = max(start + steps * self.floor, elapsed + earliest)
            if at <= last + self.floor:
                return at - elapsed
            return max(self._widening(elapsed, last, 0.5) - elapsed, earliest)
        known = self.quantiles(now)
        for t in known:
            if t > elapsed + earliest:
                return t - elapsed
        # Past every known quantile (or nothing known yet): widen the gaps from there,
        # more slowly while nothing is known, since the first wave's lag idles the server.
        start = known[-1] if known else self.first
        share = 0.5 if known else UNKNOWN_SHARE
        return max(self._widening(elapsed, start, share) - elapsed, earliest)

    def _widening(self, elapsed: float, start: float, share: float) -> float:
        """The next poll time: ``start``, then gaps that grow with the task's age, as the
        vendor asks of image clients (``share`` of the age, within floor..max_gap)."""
        if elapsed < start:
            return start
        return elapsed + min(max(elapsed * share, self.floor), self.max_gap)
