"""The best any poll schedule can do on scenario d's latencies: lag against polls a task.

Polls of one task at least ``floor`` apart put a floor under the mean completion lag.
This takes the latency distribution as known in advance (which no client has) and, for
each number of polls a task, finds the grid (first poll, then a fixed gap of at least
the floor) with the least mean lag. Grids are optimal here: for a unimodal
distribution, a gap wider than the floor only adds lag where the density is.

    python -m tests.bench.frontier [--median 6 --sigma 0.3 --floor 1]
"""

from __future__ import annotations

import argparse
import math
import random


def frontier(
    samples: list[float], floor: float, starts: list[float], gaps: list[float]
) -> dict[float, tuple[float, float, float]]:
    """Polls a task (to 0.1) -> (least mean lag, first poll, gap)."""
    best: dict[float, tuple[float, float, float]] = {}
    n = len(samples)
    for start in starts:
        for gap in gaps:
            polls = lag = 0.0
            for t in samples:
                k = math.ceil((t - start) / gap - 1e-12) if t > start else 0
                polls += k + 1
                lag += start + k * gap - t
            key = round(polls / n, 1)
            if key not in best or lag / n < best[key][0]:
                best[key] = (lag / n, start, gap)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--median", type=float, default=6.0)
    parser.add_argument("--sigma", type=float, default=0.3)
    parser.add_argument("--floor", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    rng = random.Random(1)
    mu = math.log(args.median)
    samples = [rng.lognormvariate(mu, args.sigma) for _ in range(args.samples)]
    starts = [args.median * i / 40 for i in range(10, 40)]
    gaps = [args.floor * (1 + i / 20) for i in range(0, 21)]
    best = frontier(samples, args.floor, starts, gaps)
    print("polls/task  least mean lag s  first poll s  gap s")
    for polls in sorted(best):
        lag, start, gap = best[polls]
        print(f"{polls:10.1f}  {lag:16.3f}  {start:12.2f}  {gap:5.2f}")


if __name__ == "__main__":
    main()
