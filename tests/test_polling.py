"""The learned poll schedule: few polls, completions noticed soon, the floor respected."""

from __future__ import annotations

import math
import random

from batch.polling import QUANTILES, PollSchedule, latency_sample


def simulate(
    schedule: PollSchedule, latencies: list[float], reported: bool = True
) -> tuple[float, float]:
    """Poll one task at a time as the runner would; return (polls per task, mean lag).

    ``reported``: the server states each task's inference time, as the API does.
    Asserts on the way that no two polls of one task come closer than the floor."""
    polls = lag = 0.0
    now = 1000.0
    for latency in latencies:
        started, last_poll, pending_at = now, None, 0.0
        schedule.begin("t", started)
        while True:
            elapsed = now - started
            since = None if last_poll is None else now - last_poll
            now += schedule.next_delay(elapsed, since, now)
            assert since is None or now - last_poll >= schedule.floor - 1e-9
            polls += 1
            last_poll = now
            if now - started >= latency:
                told = latency if reported else None
                schedule.observe(latency_sample(pending_at, now - started, told))
                schedule.end("t")
                lag += now - started - latency
                break
            pending_at = now - started
    return polls / len(latencies), lag / len(latencies)


def test_learned_schedule_beats_fixed_one_second_polling():
    """For 1-3 s tasks it uses under 0.6x the polls of the SDK's 1 s polling, and is sooner."""
    rng = random.Random(5)
    latencies = [rng.uniform(1.0, 3.0) for _ in range(400)]
    polls, lag = simulate(PollSchedule(floor=0.5), latencies)
    # The vendor SDK polls right after submitting, then every second.
    fixed_polls = sum(int(x) + 2 for x in latencies) / len(latencies)
    fixed_lag = sum(int(x) + 1 - x for x in latencies) / len(latencies)
    assert polls <= 0.6 * fixed_polls
    assert lag < fixed_lag


def test_polls_of_one_task_respect_the_floor():
    """No two polls of one task are closer than the configured floor."""
    schedule = PollSchedule(floor=0.8)
    for x in (1.0, 1.1, 1.2, 1.25, 1.3, 1.35, 5.0):
        schedule.observe(x)
    assert schedule.next_delay(elapsed=1.05, since_last_poll=0.1, now=0.0) >= 0.7 - 1e-9


def test_running_tasks_hold_quantiles_back():
    """Early finishers alone must not define the schedule while most tasks still run."""
    schedule = PollSchedule(floor=0.5)
    for i in range(50):
        schedule.begin(i, 0.0)
    for i, latency in enumerate([1.0, 1.05, 1.1, 1.15, 1.2]):
        schedule.end(i)
        schedule.observe(latency)
    assert schedule.quantiles(now=1.5) == []  # 45 tasks are older than every sample
    # The widening fallback, not a quantile at 1.2 s, decides the next poll.
    assert schedule.next_delay(elapsed=1.5, since_last_poll=0.0, now=1.5) >= 0.5


def test_quantiles_of_finished_tasks():
    """With every task finished, the schedule polls at the latency quantiles."""
    schedule = PollSchedule()
    for i in range(1, 101):
        schedule.observe(i / 10)
    found = schedule.quantiles(now=0.0)
    assert len(found) == len(QUANTILES)
    assert abs(found[0] - 5.0) <= 0.11 and found[-1] == 10.0


def test_latency_sample_stays_inside_what_the_polls_bracket():
    """A server-reported time is clamped into the poll bracket; otherwise a draw inside it."""
    assert latency_sample(1.0, 2.0, 1.5) == 1.5
    assert latency_sample(1.0, 2.0, 0.2) == 1.0
    assert latency_sample(1.0, 2.0, 9.0) == 2.0
    assert all(1.0 <= latency_sample(1.0, 2.0, None) <= 2.0 for _ in range(100))


def test_seconds_long_tasks_with_a_spread_use_a_third_of_the_polls():
    """Lognormal 6 s tasks: polls 1 s apart at most, under half the SDK's polls, lag near
    its half second."""
    rng = random.Random(6)
    latencies = [6.0 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(600)]
    polls, lag = simulate(PollSchedule(floor=1.0), latencies)
    fixed_polls = sum(int(x) + 2 for x in latencies) / len(latencies)
    assert polls <= 0.5 * fixed_polls
    assert lag <= 0.65
