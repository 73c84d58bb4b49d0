"""The submit pacer against a simulated fixed-window limit (no Retry-After, as documented).

The pacer's decisions are plain methods over a clock, so a deterministic simulation
drives them: a server that accepts ``limit`` submits per ``window`` seconds, windows
turning at fixed times, and a client that always has rows waiting.
"""

from __future__ import annotations

import math

import pytest

from batch.limits import SubmitLimiter
from tests.conftest import simple_rows
from tests.pacing_sim import LATENCY, grid
from tests.pacing_sim import simulate as run_pool


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(limits, rows: int, phase: float = 0.3, latency: float = 0.05):
    """Send ``rows`` submits as fast as the pacer allows; ``limits(t)`` gives (limit, window)
    at time t. Returns (time the last accepted submit was sent, 429 count, pacer)."""
    clock = Clock()
    clock.now = phase
    pacer = SubmitLimiter(clock=clock)
    accepted = 0
    used: dict[int, int] = {}
    last = 0.0
    while accepted < rows:
        wait = pacer._wait(clock.now)
        if wait > 0:
            clock.now += min(wait, 0.01) if pacer._probe_out else wait
            continue
        slot = pacer._grant(clock.now)
        limit, window = limits(clock.now)
        index = math.floor(clock.now / window)
        clock.now += latency / 10  # the answer comes back a moment later
        if used.get(index, 0) < limit:
            used[index] = used.get(index, 0) + 1
            accepted += 1
            last = slot.sent_at
            pacer.on_success(slot)
        else:
            pacer.on_rate_limited(slot, None)
    return last, pacer.rate_limited, pacer


@pytest.mark.parametrize(("limit", "window"), [(20, 5.0), (10, 6.0), (10, 60.0), (100, 60.0)])
def test_learned_pace_reaches_the_limit_with_few_429s(limit, window):
    """With no --rate, the pacer spends each window's quota and rarely hits the limit."""
    rows = limit * 8
    last, refused, pacer = simulate(lambda t: (limit, window), rows)
    ideal = (rows / limit - 1) * window  # the last window opens then
    assert last <= ideal + 0.2 * window * rows / limit
    assert refused <= 0.15 * rows + 20  # finding the first turn, then about one a window
    assert pacer.quota is not None and limit <= pacer.quota <= limit * 1.5**2


def test_burst_of_429s_is_one_signal():
    """Twenty 429s of submits sent together teach one thing, not twenty."""
    clock = Clock()
    pacer = SubmitLimiter(clock=clock)
    slots = [pacer._grant(0.0) for _ in range(30)]
    for slot in slots[:10]:
        pacer.on_success(slot)
    clock.now = 0.1
    for slot in slots[10:]:
        pacer.on_rate_limited(slot, None)
    assert pacer.rate_limited == 20 and pacer.signals == 1 and pacer.quota == 10


def test_pace_recovers_when_the_limit_lifts():
    """When the account's limit rises, the learned quota grows back window by window."""
    last, _, pacer = simulate(lambda t: (10, 2.0) if t < 20 else (1000, 2.0), 400)
    assert pacer.quota is not None and pacer.quota > 50
    assert last < 20 + 16 * 2.0  # the 300 rows past the lift took under 16 windows


def test_retry_after_pauses_everyone_and_teaches_nothing():
    """A 429 that names its wait holds every submit that long; no quota is guessed."""
    clock = Clock()
    pacer = SubmitLimiter(clock=clock)
    pacer.on_rate_limited(pacer._grant(0.0), 3.0)
    assert pacer._wait(0.0) == pytest.approx(3.0) and pacer.quota is None


def test_a_run_under_a_window_limit_learns_it(run, images, write_manifest, emulator):
    """Against a real per-window limit with no Retry-After, every row completes, each
    paid once, and most submits are accepted at the first try."""
    emulator.config.rate_limit, emulator.config.rate_window = 8, 1.0
    emulator.config.latency = (0.05, 0.1)
    result = run(write_manifest(simple_rows(images, 48)), "--concurrency", "8")
    assert result.code == 0, result.err
    assert emulator.stats.submits_accepted == 48
    assert result.summary["rate_limited"] <= 24


def test_workers_freed_together_send_a_few_submits_until_a_limit_is_known():
    """Before any 429, only a few submits (or the square root of a second's accepted ones)
    are in the air at once: hitting an unknown limit costs a few 429s, not one per worker."""
    clock = Clock()
    pacer = SubmitLimiter(clock=clock)
    granted = [pacer._grant(0.0) for _ in range(4)]
    assert pacer._wait(0.0) > 0  # a fifth waits for an answer
    for slot in granted:
        pacer.on_success(slot)
    assert pacer._wait(0.01) <= 0  # answered: four more may go
    more = [pacer._grant(0.01) for _ in range(4)]
    clock.now = 0.02
    for slot in more:
        pacer.on_rate_limited(slot, None)
    assert pacer.signals == 1 and pacer.quota == 4


def test_submits_in_the_air_count_against_the_quota():
    """Once the quota is known, submits not yet answered count as this window's: workers
    freed together do not send two submits for the window's last place."""
    clock = Clock()
    pacer = SubmitLimiter(clock=clock)
    first = [pacer._grant(0.0) for _ in range(3)]
    for slot in first:
        pacer.on_success(slot)
    pacer.on_rate_limited(pacer._grant(0.01), None)  # quota 3 learned
    probe = pacer._grant(pacer._probe_at)
    clock.now = pacer._probe_at + 0.01
    pacer.on_success(probe)  # the window turned: 1 of 3 spent
    pacer._grant(clock.now)  # 2 of 3, in the air
    assert pacer._wait(clock.now) <= 0
    pacer._grant(clock.now)  # 3 of 3, in the air
    assert pacer._wait(clock.now) > 0  # the quota is committed, though none answered yet


# -- the pool against fixed windows of any length, quota and phase (tests/pacing_sim.py) --


def _share_bound(quota: int, workers: int, phase: float) -> float:
    """The 429 share ten windows may cost. Learning a quota and a window takes about a
    dozen 429s whatever the quota, so small quotas pay a larger share; a run that starts
    late in a window with many workers sends some of its first burst into the next one."""
    if quota <= 2:
        return 0.5
    late_crowd = workers >= 20 and phase >= 0.9
    if quota < 20:
        return 0.25 if late_crowd else 0.15
    return 0.15 if late_crowd else 0.10


def _pace_floor(quota: int, window: float, workers: int, floor: float) -> float:
    """Where the workers need over a third of each window to send its quota, a turn found
    late costs pace that is not made up within the window: a lower floor there."""
    sending = quota * LATENCY / workers / window
    return floor - 0.1 if sending > 1 / 3 else floor


@pytest.mark.parametrize(("window", "quota", "workers", "phase"), grid())
def test_ten_windows_keep_the_pace_with_few_429s(window, quota, workers, phase):
    """Over ten windows of 5 to 60 s, from any phase, the pool gets the limit's pace."""
    result = run_pool(quota, window, workers, phase)
    assert result.throughput >= _pace_floor(quota, window, workers, 0.85)
    assert result.share_429 <= _share_bound(quota, workers, phase)


@pytest.mark.parametrize("window", [5.0, 6.0, 60.0])
@pytest.mark.parametrize("quota", [10, 100])
@pytest.mark.parametrize("workers", [4, 20])
@pytest.mark.parametrize("phase", [0.0, 0.5, 0.9])
def test_once_learned_windows_cost_almost_no_429s(window, quota, workers, phase):
    """After ten windows of learning, the next twenty cost under 5 % 429s at full pace."""
    result = run_pool(quota, window, workers, phase, windows=30, skip=10)
    assert result.share_429 <= 0.05
    assert result.throughput >= _pace_floor(quota, window, workers, 0.85)


@pytest.mark.parametrize("window", [5.0, 6.0, 60.0])
def test_the_window_length_is_learned(window):
    """The window's length is learned to a few percent, whatever it is."""
    pacer = run_pool(20, window, 4, 0.5).pacer
    assert pacer.window is not None and abs(pacer.window - window) <= 0.05 * window


def test_a_minute_window_that_began_with_the_run_is_found_at_its_turn():
    """The first search climbs a ladder through the documented minute, uncapped."""
    result = run_pool(10, 60.0, 4, 0.0, windows=1.05)
    assert result.accepted >= 11  # the second window's quota began within 3 s of its turn
    assert result.refused <= 8


def test_a_five_second_window_is_found_within_two_windows():
    """The minute is a prior, not an assumption: a 5 s window costs only a few probes."""
    result = run_pool(10, 5.0, 4, 0.0, windows=2)
    assert result.accepted >= 15
    assert result.refused <= 5


def test_a_run_started_late_in_a_minute_window_is_not_fooled():
    """A first window cut short by a late start does not pass for a short window."""
    result = run_pool(10, 60.0, 4, 0.9, windows=10)
    assert result.refused <= 20  # was over 800: steps of a thirty-second of a bad guess
    assert result.pacer.window is not None and abs(result.pacer.window - 60.0) <= 3.0


@pytest.mark.parametrize(
    ("quota", "window", "workers", "rows"), [(10, 6.0, 4, 60), (20, 5.0, 20, 120)]
)
def test_a_short_run_of_busy_workers_ends_near_the_ideal(quota, window, workers, rows):
    """Bench a and b: workers away a second per task still finish near the ideal time."""
    result = run_pool(quota, window, workers, 0.02, windows=20, busy=1.0, latency=0.03, rows=rows)
    ideal = (math.ceil(rows / quota) - 1 - 0.02) * window  # when the last window opens
    assert result.took <= 1.2 * ideal
    assert result.share_429 <= 0.10
