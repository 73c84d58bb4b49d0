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
# Three polls placed so that ~40% of tasks are seen by the first, ~75% by the second and
# all by the third: about 1.9 polls a task, a third of the spread late on average.
QUANTILES = (0.4, 0.75, 1.0)


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
    def __init__(
        self, floor: float = 0.5, first: float | None = None, max_gap: float = 10.0
    ) -> None:
        self.floor = floor
        self.first = 2 * floor if first is None else first
        self.max_gap = max_gap
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._sorted: list[float] = []

    def observe(self, latency: float) -> None:
        """Record an estimate of how long a task took from submit to completion."""
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._recent.append(latency)
        bisect.insort(self._sorted, latency)

    def _quantile(self, q: float) -> float:
        s = self._sorted
        return s[min(int(q * (len(s) - 1) + 0.5), len(s) - 1)]

    def next_delay(self, elapsed: float, since_last_poll: float | None) -> float:
        """Seconds from now until the next poll of a task ``elapsed`` seconds old."""
        earliest = 0.0 if since_last_poll is None else max(self.floor - since_last_poll, 0.0)
        if len(self._sorted) < MIN_SAMPLES:
            target = self._backoff_target(elapsed, since_last_poll, self.first)
            return max(target - elapsed, earliest)
        for q in QUANTILES:
            t = self._quantile(q)
            if t > elapsed + earliest:
                return t - elapsed
        slowest = self._sorted[-1]
        return max(self._backoff_target(elapsed, since_last_poll, slowest) - elapsed, earliest)

    def _backoff_target(self, elapsed: float, since_last_poll: float | None, start: float) -> float:
        if since_last_poll is None or elapsed < start:
            return max(start, elapsed)
        # Past what we expected: widen the gaps, as the vendor asks of image clients.
        gap = min(max(since_last_poll * 1.5, self.floor), self.max_gap)
        return elapsed + gap
