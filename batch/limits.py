"""Submission pacing shared by the whole pool: the --rate cap, and the account's
per-window limit learned from 429s.

The vendor limits generations per window (a minute, for real accounts), resets
the count at each window's turn, and sends no Retry-After. A 429 therefore says
"this window's quota is spent", nothing more. The pacer learns the quota (what
was accepted in a window), the window's length and where its turns fall; then
it spends each window's quota at once, as the account allows, and waits for the
next turn instead of hammering the API. A turn is found with a single probe
sent a little before it is due, then a few steps later until one is accepted:
about one 429 a window. 429s of submits sent before the pacer reacted are one
signal, however many workers got them.

A 429 with Retry-After is the server speaking plainly: everyone waits that long,
and nothing is learned from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

FIRST_STEP_S = 0.25
MAX_FIRST_STEP_S = 8.0
SHRINK = 0.9  # a window that had turned before the early probe was shorter than thought
MIN_WINDOW_S = 0.5
MAX_WINDOW_S = 120.0
EARLY = 1 / 16  # probe this share of a window before the turn is due
STEP = 1 / 32  # then step forward by this share until a probe is accepted
LATE = 1 / 64  # a probe due at a known turn goes this share of a window after it
REBRACKET = 4  # find the turn precisely again after this many windows
# Windows that spend the learned quota with no 429 let the next one try half as much again:
# the limit may have risen, or the 429s were a passing storm.
GROWTH = 1.5
GROW_AFTER = 2
UNLEARNED_OUTSTANDING = 4


@dataclass(slots=True)
class Slot:
    """One permission to send a submit; hand it back with the outcome."""

    sent_at: float
    probe: bool
    extra: bool = False  # beyond the quota last confirmed: a try at a higher limit


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
        self.window: float | None = None
        self._anchor: float | None = None  # a turn of the window, as found by a probe
        self._turn: float | None = None  # the latest turn found
        self._accepted = 0  # accepted since the latest turn
        self._in_flight = 0  # submits (not probes) granted and not yet answered
        self._clean = True  # no 429 since the latest turn
        self._signal_at = -1.0  # 429s of submits sent before this are the last signal's
        self._first_sent: float | None = None
        # Probing for the next turn: one submit at a time.
        self._probing = False
        self._probe_out = False
        self._probe_at = 0.0
        self._step = FIRST_STEP_S
        self._refused = False  # a probe was refused since probing began (turn bracketed)
        self._refused_at = 0.0
        self._early = True  # the current probe was sent before the turn was due
        self._precise = 0  # turns found to within a step
        self._unbracketed = 0  # turns found since the last precise one
        self._clean_windows = 0
        self._confirmed: float | None = None  # the quota before a try at a higher one
        self._extra_out = False
        self._outstanding = 0  # submits granted and not yet answered
        self._recent_accepts: deque[float] = deque()

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
        if self._probing:
            return max(wait, 1.0 if self._probe_out else self._probe_at - now)
        if self._spent() and self._turn is not None and self.window is not None:
            self._start_probing(self._next_turn())
            return max(wait, self._probe_at - now)
        if self.quota is None and self._outstanding >= self._unlearned_cap(now):
            # Nothing known yet: no more submits in the air at once than were accepted
            # in the last second (and a few), so that a limit reached costs a few 429s,
            # not one per worker that came free together.
            return max(wait, 1.0)
        if self._extra_out and self._beyond_confirmed():
            return max(wait, 1.0)  # one try past the known limit at a time; its answer wakes us
        return wait

    def _unlearned_cap(self, now: float) -> int:
        recent = self._recent_accepts
        while recent and recent[0] < now - 1.0:
            recent.popleft()
        return max(UNLEARNED_OUTSTANDING, len(recent))

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
            return Slot(now, probe=True)
        extra = self._beyond_confirmed()
        self._in_flight += 1
        if extra:
            self._extra_out = True
        return Slot(now, probe=False, extra=extra)

    def _next_turn(self) -> float:
        """When to probe for the next turn. Counted from a precisely found turn once the
        window's length is known from two of them; every few windows (or while unsure),
        a little early, to find the turn precisely again at the price of about one 429."""
        assert self._turn is not None and self.window is not None
        window = self.window
        self._early = not (
            self._anchor is not None and self._precise >= 2 and self._unbracketed < REBRACKET
        )
        if self._early:
            return self._turn + window * (1 - EARLY)
        assert self._anchor is not None
        turns = round((self._turn - self._anchor) / window) + 1
        return self._anchor + turns * window + window * LATE

    def _start_probing(self, at: float) -> None:
        self._probing = True
        self._probe_out = False
        self._probe_at = at
        self._refused = False
        self._step = max(FIRST_STEP_S, self.window * STEP) if self.window else FIRST_STEP_S

    # -- outcomes ------------------------------------------------------------

    def _answered(self, slot: Slot) -> None:
        self._outstanding = max(self._outstanding - 1, 0)
        if not slot.probe:
            self._in_flight = max(self._in_flight - 1, 0)

    def on_success(self, slot: Slot) -> None:
        self._answered(slot)
        if self.quota is None:
            self._recent_accepts.append(self._clock())
        if slot.extra:
            self._extra_out = False
        if slot.probe and self._probing:
            self._found_turn(self._clock())
        else:
            self._accepted += 1
        self._wake.set()

    def _found_turn(self, now: float) -> None:
        """A probe was accepted: the window has turned. When a probe was refused a step
        before, the turn is known to within that step; otherwise it came earlier than
        we looked, and windows are shorter than we think."""
        precise = self._refused and now - self._refused_at <= self._step * 2
        if self.window is None:
            self.window = _clamp(now - (self._first_sent or now))
        elif not self._refused:
            if self._early:
                self.window = _clamp(self.window * SHRINK)  # turned before we looked
            self._unbracketed += 1
        elif precise:
            # Counted from the last precise turn if there is one, else from the last
            # turn seen (found late, so this errs long and the early probes correct it).
            since = self._anchor if self._anchor is not None else self._turn
            if since is not None:
                turns = max(round((now - since) / self.window), 1)
                self.window = _clamp((now - since) / turns)
        if precise:
            self._anchor = now
            self._precise += 1
            self._unbracketed = 0
        if self._clean and self._confirmed is not None:
            self._confirmed = max(self._confirmed, self._accepted)  # a higher limit held
        if self._clean and self._spent() and self.quota is not None:
            self._clean_windows += 1
            if self._clean_windows >= GROW_AFTER:
                # Spent and never refused: the limit may have risen. What is sent past the
                # quota goes one submit at a time, so a limit that has not risen costs
                # one 429, not one per worker.
                self._confirmed = max(self._confirmed or 0.0, self.quota)
                self.quota *= GROWTH
                self._clean_windows = 0
        self._turn = now
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
        now = self._clock()
        self._wake.set()
        if retry_after is not None:
            self._next_at = max(self._next_at, now + retry_after)  # said plainly
            if slot.probe:
                self._probe_out = False
            return
        if slot.probe and self._probing:
            # Not turned yet: look again a step later.
            self._probe_out = False
            self._refused = True
            self._refused_at = now
            if self.window is None:
                self._step = min(self._step * 1.5, MAX_FIRST_STEP_S)
            self._probe_at = now + self._step
            return
        if slot.sent_at < self._signal_at:
            return  # sent before we reacted: part of the signal already taken
        # This window's quota is spent: what it accepted is the quota.
        self.signals += 1
        self._signal_at = now
        self._clean = False
        self._clean_windows = 0
        self.quota = float(max(self._accepted, 1))
        self._confirmed = None  # the quota is what held; nothing is tried past it now
        if self._turn is not None and self.window is not None:
            self._start_probing(self._next_turn())
        else:
            self._start_probing(now + FIRST_STEP_S)


def _clamp(window: float) -> float:
    return min(max(window, MIN_WINDOW_S), MAX_WINDOW_S)
