"""Submission pacing shared by the whole pool: the --rate cap, and the account's
per-window limit learned from 429s.

The vendor limits generations per window (a minute, for real accounts), resets
the count at each window's turn, and sends no Retry-After. A 429 therefore says
"this window's quota is spent", nothing more. The pacer learns the quota (what
was accepted in a window) and, from single probes sent around the turns, when
turns fall; then it spends each window's quota at once and waits for the next
turn instead of hammering the API. 429s of submits sent before the pacer
reacted are one signal, however many workers got them.

Nothing assumes a window's length. Every probe answer bounds a turn: a refused
one was sent before it, an accepted one answered after it. Turns found so far
bound the length, and so the next turn; a probe goes well into that interval
while it is wide (at most one 429 a window narrows it), at its end once it is
narrow (no 429). Where nothing bounds it, probes climb a doubling ladder
through the documented minute, so a guess off by a factor of ten costs a few
429s, not hundreds, and a 5 s window is found as fast as a minute-long one.

A 429 with Retry-After is the server speaking plainly: everyone waits that long,
and nothing is learned from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

DOCUMENTED_WINDOW_S = 60.0  # the first turn is searched for on a ladder through this
FIRST_STEP_S = 0.25
FIRST_RUNG_S = DOCUMENTED_WINDOW_S / 32  # a turn this soon after the start costs a moment
MIN_WINDOW_S = 0.5
EARLY = 1 / 8  # with one turn known, probe this share of the guessed window early
SPLIT = 0.5  # a wide interval is probed halfway: one 429 at most halves it
PRECISE = 1 / 32  # a turn predicted to within this share of a window is probed at its end
TURNS_KEPT = 8
# Windows that spend the learned quota with no 429 let the next one try half as much again:
# the limit may have risen, or the 429s were a passing storm. Each try that fails doubles
# the clean windows the next one waits for, so a steady limit costs ever fewer 429s.
GROWTH = 1.5
GROW_AFTER = 3
UNLEARNED_OUTSTANDING = 2


@dataclass(slots=True)
class Slot:
    """One permission to send a submit; hand it back with the outcome."""

    sent_at: float
    probe: bool
    extra: bool = False  # beyond the quota last confirmed: a try at a higher limit


@dataclass(slots=True)
class _Turn:
    """A window's turn: after ``lo`` (a refused send), at or before ``hi`` (an answer)."""

    lo: float
    hi: float
    index: int  # windows since the first turn found


class SubmitLimiter:
    def __init__(
        self, rate_per_minute: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = 60.0 / rate_per_minute if rate_per_minute else 0.0
        self._clock = clock
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._next_at = 0.0  # the --rate cap and Retry-After pauses
        self.rate_limited = 0  # every 429
        self.signals = 0  # 429s that said "quota spent" (one per spent window)
        # Learned; None until the first 429 without Retry-After.
        self.quota: float | None = None
        self.window: float | None = None  # best estimate, for display and the first guesses
        self._turns: list[_Turn] = []
        self._refused_at = -math.inf  # latest refused send since the latest turn
        self._accepted = 0  # accepted since the latest turn
        self._in_flight = 0  # submits (not probes) granted and not yet answered
        self._clean = True  # no 429 since the latest turn
        self._signal_at = -math.inf  # 429s of submits sent before this are the last signal's
        self._first_sent: float | None = None
        # Probing for the next turn: one submit at a time.
        self._probing = False
        self._probe_out = False
        self._probe_at = 0.0
        self._rtt = 0.0  # the latest probe's round trip: no turn is known more closely
        self._probe_sent = 0.0
        self._turn_sent = -math.inf  # when the probe that found the latest turn went out
        self._next_lo, self._next_hi = -math.inf, math.inf  # where the sought turn lies
        self._index = 0  # of the sought turn
        self._proven = True  # a 429 came before the latest turn was found
        self._before = 0  # accepted in the window before it
        self._target = -math.inf  # a guess at the sought turn, where nothing bounds it
        self._origin: float | None = None  # the run's first window turned no later than this
        self._clean_windows = 0
        self._grow_after = GROW_AFTER
        self._confirmed: float | None = None  # the quota before a try at a higher one
        self._extra_out = False
        self._outstanding = 0  # submits granted and not yet answered
        self._unlearned_accepts = 0
        self._plain = False  # a 429 came with Retry-After

    # -- asking --------------------------------------------------------------

    async def acquire(self) -> Slot:
        """Wait for this submission's turn (FIFO across the pool)."""
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait(now)
                if wait <= 0:
                    return self._grant(now)
                self._wake.clear()
                # An outcome that changes the picture wakes the waiter early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)

    def _wait(self, now: float) -> float:
        wait = self._next_at - now
        if not self._probing and self._spent():
            if self._turns:
                self._start_probing(now)
            else:
                self._first_search(now)  # the windows are being learned again
        if self._probing:
            # A probe waits for the window's other submits to be answered: one landing
            # after it could take the place it was given, and pass for a turn.
            busy = self._probe_out or self._in_flight > 0
            return max(wait, 1.0 if busy else self._probe_at - now)
        if self.quota is None and not self._plain and self._outstanding >= self._unlearned_cap():
            # Nothing known yet: no more submits in the air at once than the square root
            # of those accepted so far (and a couple), so that a limit reached costs a few
            # 429s, not one per worker that came free together, while a run that meets no
            # limit is held back only in its first seconds.
            return max(wait, 1.0)
        if self._beyond_confirmed() and (self._extra_out or self._in_flight > 0):
            # One try past the known limit at a time, once the rest is answered, so that
            # a refusal is the try's own; an answer wakes us.
            return max(wait, 1.0)
        return wait

    def _unlearned_cap(self) -> int:
        return max(UNLEARNED_OUTSTANDING, math.isqrt(self._unlearned_accepts))

    def _committed(self) -> int:
        """This window's submits: accepted, and in the air (each may yet be accepted), so
        that workers freed together do not overshoot the quota's last few submits."""
        return self._accepted + self._in_flight

    def _beyond_confirmed(self) -> bool:
        return self._confirmed is not None and self._committed() >= self._confirmed

    def _spent(self) -> bool:
        return self.quota is not None and self._committed() >= self.quota

    def _grant(self, now: float) -> Slot:
        self._outstanding += 1
        self._next_at = max(self._next_at, now + self.interval)
        if self._first_sent is None:
            self._first_sent = now
        if self._probing:
            self._probe_out = True
            self._probe_sent = now
            return Slot(now, probe=True)
        extra = self._beyond_confirmed()
        self._in_flight += 1
        if extra:
            self._extra_out = True
        return Slot(now, probe=False, extra=extra)

    # -- where the next turn is ----------------------------------------------

    def _corners(self) -> tuple[list[tuple[float, float]], bool]:
        """Corners of the set of (turn 0, window length) pairs that everything seen allows:
        turn k falls at turn 0 + k * length inside its bracket, and the window the run
        began in turned no later than its first submit. Also whether the set is bounded."""
        turns = self._turns
        lines = [(t.index, t.lo) for t in turns] + [(t.index, t.hi) for t in turns]
        if self._origin is not None:
            lines.append((-1, self._origin))
        corners = []
        for i, (k1, c1) in enumerate(lines):
            for k2, c2 in lines[i + 1 :]:
                if k1 == k2:
                    continue
                length = (c1 - c2) / (k1 - k2)
                first = c1 - k1 * length
                if length > 0 and self._allows(first, length):
                    corners.append((first, length))
        return corners, len({t.index for t in turns}) >= 2

    def _allows(self, first: float, length: float) -> bool:
        slack = 1e-9 * max(abs(first), 1.0)
        if self._origin is not None and first - length > self._origin + slack:
            return False
        return all(t.lo - slack <= first + t.index * length <= t.hi + slack for t in self._turns)

    def _range(self, index: int) -> tuple[float, float, float]:
        """Turn ``index`` falls in (lo, hi], and windows last at least the third figure.
        hi is infinite while nothing bounds the window's length from above."""
        corners, bounded = self._corners()
        if not corners:
            last = self._turns[-1]
            return last.lo + (index - last.index) * MIN_WINDOW_S, math.inf, MIN_WINDOW_S
        at = [first + index * length for first, length in corners]
        lengths = [length for _, length in corners]
        if bounded:
            self.window = (min(lengths) + max(lengths)) / 2
        return min(at), max(at) if bounded else math.inf, min(lengths)

    def _start_probing(self, now: float) -> None:
        self._probing = True
        self._probe_out = False
        latest = self._turns[-1]
        self._index = latest.index + 1
        while self._range(self._index)[1] < now and self._index < latest.index + 100:
            self._index += 1  # windows with nothing to send still turned
        if math.isinf(self._range(self._index)[1]):
            # Nothing bounds the window yet: guess it from the first one (right when the
            # run began at a turn), probe a little early, then step out geometrically.
            guess = self.window or MIN_WINDOW_S
            self._target = latest.hi + guess * (1 - EARLY)
        else:
            self._target = math.inf
        self._aim(now)

    def _aim(self, now: float) -> None:
        """Well into the next turn's interval while it is wide, at its end once it is
        narrow (no 429); never so late that a second turn may have passed, which would
        leave the count of windows in doubt."""
        lo, hi, shortest = self._range(self._index)
        lo = max(lo, self._refused_at)
        shortest = max(shortest, self._refused_at - self._turns[-1].hi, MIN_WINDOW_S)
        self._next_lo, self._next_hi = lo, hi
        if self._target < math.inf:
            at = self._target
        elif hi - lo <= max((self.window or 0.0) * PRECISE, 2 * self._rtt):
            at = hi
        else:
            at = lo + (hi - lo) * SPLIT
        self._probe_at = max(min(at, lo + shortest - self._rtt), now)

    def _first_search(self, now: float) -> None:
        """No turn known: probe on a doubling ladder of times since the run's first submit
        that passes through the documented minute, so a minute-long window that began
        with the run is found at its turn and a 5 s one within a few probes."""
        since = self._first_sent if self._first_sent is not None else now
        self._origin = since
        self._probing = True
        self._probe_out = False
        self._next_lo, self._next_hi = now, math.inf
        self._probe_at = since + _rung_above(max(now + FIRST_STEP_S - since, FIRST_RUNG_S / 2))

    # -- outcomes ------------------------------------------------------------

    def _answered(self, slot: Slot) -> None:
        self._outstanding = max(self._outstanding - 1, 0)
        if not slot.probe:
            self._in_flight = max(self._in_flight - 1, 0)

    def on_success(self, slot: Slot) -> None:
        self._answered(slot)
        if self.quota is None:
            self._unlearned_accepts += 1
        if slot.extra:
            self._extra_out = False
        if slot.probe and self._probing:
            self._found_turn(self._clock())
        else:
            self._accepted += 1
            if self.quota is not None and slot.sent_at < self._signal_at:
                self.quota = max(self.quota, float(self._accepted))  # in the air at the signal
        self._wake.set()

    def _found_turn(self, now: float) -> None:
        """A probe was accepted: the window has turned since the latest refused send."""
        self._rtt = now - self._probe_sent
        self._turn_sent = self._probe_sent
        self._proven = self._refused_at > -math.inf  # the window was spent, not just counted
        self._before = self._accepted
        if not self._turns:
            turn = _Turn(self._refused_at, now, 0)
            if self._first_sent is not None:
                self.window = max(now - self._first_sent, MIN_WINDOW_S)
        else:
            # Only what was seen: bounds taken from the model would make a wrong model
            # confirm itself.
            after = self._turns[-1].lo + MIN_WINDOW_S
            turn = _Turn(max(self._refused_at, after), now, self._index)
        if turn.lo > -math.inf:  # else no 429 bounds it: nothing learned, but a fresh count
            self._turns.append(turn)
            if len(self._turns) > TURNS_KEPT:
                # Forget the loosest turn, not the oldest: the closely bracketed ones, far
                # apart, are what pins the window's length down.
                loosest = max(self._turns[:-1], key=lambda t: t.hi - t.lo)
                self._turns.remove(loosest)
        if self._turns and (turn.lo >= turn.hi or not self._corners()[0]):
            # Nothing fits what was seen before (the run began after a turn it did not see,
            # or the windows changed): learn them again, from this turn if a 429 bounds it.
            self._turns.clear()
            self._origin = None
            if self._refused_at > -math.inf:
                self._turns.append(_Turn(self._refused_at, now, 0))
            else:
                self._first_sent = now
        if self._clean and self._confirmed is not None:
            self._confirmed = max(self._confirmed, self._accepted)  # a higher limit held
            self._grow_after = GROW_AFTER
        if self._clean and self._spent() and self.quota is not None:
            self._clean_windows += 1
            if self._clean_windows >= self._grow_after:
                # Spent and never refused: the limit may have risen. What is sent past the
                # quota goes one submit at a time, so a limit that has not risen costs
                # one 429, not one per worker.
                self._confirmed = max(self._confirmed or 0.0, self.quota)
                self.quota *= GROWTH
                self._clean_windows = 0
        self._refused_at = -math.inf
        self._accepted = 1
        self._clean = True
        self._probing = False
        self._probe_out = False

    def on_other(self, slot: Slot) -> None:
        """The submit ended some other way (5xx, dropped): it told us nothing."""
        self._answered(slot)
        if slot.extra:
            self._extra_out = False
        if slot.probe and self._probing:
            self._probe_out = False
            self._probe_at = self._clock()
        self._wake.set()

    def on_rate_limited(self, slot: Slot, retry_after: float | None) -> None:
        self.rate_limited += 1
        self._answered(slot)
        if slot.extra:
            self._extra_out = False
            if self._confirmed is not None:
                self._grow_after *= 2  # the limit had not risen
        now = self._clock()
        self._wake.set()
        if retry_after is not None:
            self._next_at = max(self._next_at, now + retry_after)  # said plainly
            self._plain = True  # limits are told, not guessed at: no need to creep up on one
            if slot.probe:
                self._probe_out = False
            return
        if slot.sent_at < self._turn_sent:
            return  # sent in the window before the latest turn: nothing about this one
        self._refused_at = max(self._refused_at, slot.sent_at)
        if slot.probe and self._probing:
            # Not turned yet: look again later, further each time.
            self._probe_out = False
            self._rtt = now - slot.sent_at
            if not self._turns:
                since = self._origin if self._origin is not None else slot.sent_at
                self._probe_at = since + _rung_above(max(self._probe_at, slot.sent_at) - since)
            elif slot.sent_at >= min(self._target, self._next_hi):
                # Past the guess, or where the turn could be (what we knew is wrong): on
                # to the next rung of a doubling ladder through the documented minute.
                since = self._turns[-1].hi
                self._target = since + _rung_above(slot.sent_at - since)
                self._aim(now)
            elif self._target < math.inf:
                self._aim(now)  # held short of the guess: a step nearer
            else:
                self._target = self._next_hi  # the turn is in what is left: no 429 more
                self._aim(now)
            return
        if slot.sent_at < self._signal_at:
            return  # sent before we reacted: part of the signal already taken
        expected = self._confirmed if self._confirmed is not None else self.quota
        if self._turns and not self._proven and expected and self._accepted < expected / 2:
            # Refused far short of the quota just after a turn that followed no 429: that
            # "turn" was room left in the window (the quota was learned short). Undo it.
            # (A little short is the last window's late submits, counted in this one.)
            self._turns.pop()
            self._accepted += self._before
            self._proven = True
        # This window's quota is spent: what it accepted is the quota.
        self.signals += 1
        self._signal_at = now
        self._clean = False
        self._clean_windows = 0
        self.quota = float(max(self._accepted, 1))
        self._confirmed = None  # the quota is what held; nothing is tried past it now
        if not self._probing:
            if self._turns:
                self._start_probing(now)
            else:
                self._first_search(now)


def _rung_above(elapsed: float) -> float:
    """The first rung past ``elapsed`` of a doubling ladder through the documented minute."""
    rung = DOCUMENTED_WINDOW_S
    while rung / 2 > max(elapsed, FIRST_RUNG_S / 2):
        rung /= 2
    while rung <= elapsed:
        rung *= 2
    return rung
