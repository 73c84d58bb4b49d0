"""The prediction ids a folder's ledgers know, kept small while a run adds them.

The settler tells a listed task that no row owns from one that a row does by these
ids, so a run keeps every id it is given to its end. As strings in a set a million
of them hold about 125 MB; a run moves them, a few thousand at a time, into sorted
arrays of their 64-bit hashes, 8 bytes each. A ledger read keeps them as strings:
a set is filled three times faster, and a read ends with the process.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import chain

# 4,096 arrays sorted apart, picked by a hash's top bits: an insert moves a few
# hundred bytes where one array of a million would move megabytes.
_BUCKET_BITS = 12
_SHIFT = 64 - _BUCKET_BITS
_MASK = (1 << _BUCKET_BITS) - 1
# Ids a run lets wait as strings; each move takes twice as many, so what a resume read
# brings along is moved as the run goes, never all at once on the event loop.
MOVE = 4096
_NEVER = 1 << 62


class TaskIds:
    """A set of prediction ids that answers ``in`` and ``len``.

    Moved ids are their ``hash``: this process's, so the moved part never leaves it
    (no pickling). Two ids with one hash make an unknown id look known; among a
    million ids and a listing of ten thousand the odds are about 5e-10.
    """

    __slots__ = ("_buckets", "_ids", "_move_at", "_moved")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: set[str] = set(ids)
        self._buckets: list[array[int]] | None = None
        self._move_at = _NEVER
        self._moved = 0

    def add(self, pid: str) -> None:
        ids = self._ids
        ids.add(pid)
        if len(ids) >= self._move_at:
            self._move(2 * MOVE)

    def keep_small(self) -> None:
        """From now on keep at most about ``MOVE`` ids as strings: a run's setting."""
        self._move_at = min(self._move_at, len(self._ids) + MOVE)

    def update(self, other: TaskIds | Iterable[str]) -> None:
        if not isinstance(other, TaskIds):
            for pid in other:
                self.add(pid)
            return
        self._ids |= other._ids  # moved on, a step at a time, by the adds that follow
        if other._buckets is not None:
            for h in chain.from_iterable(other._buckets):
                self._insert(h)

    def strings(self) -> set[str] | None:
        """Every id, when none has been moved (a ledger read's set); else None."""
        return self._ids if self._buckets is None else None

    def __contains__(self, pid: object) -> bool:
        if pid in self._ids:
            return True
        if self._buckets is None or not isinstance(pid, str):
            return False
        return self._has(hash(pid))

    def __len__(self) -> int:
        if self._buckets is None:
            return len(self._ids)
        return self._moved + sum(1 for p in self._ids if not self._has(hash(p)))

    def __bool__(self) -> bool:
        return bool(self._ids) or self._moved > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskIds):
            return NotImplemented
        return self._hashes() == other._hashes()

    __hash__ = None  # type: ignore[assignment]  # a set, not a value

    def __repr__(self) -> str:
        return f"TaskIds({len(self)} ids)"

    def __reduce__(self) -> tuple[object, ...]:
        if self._moved:
            raise TypeError("moved task ids are this process's hashes and cannot be pickled")
        return (TaskIds, (sorted(self._ids),))

    def _hashes(self) -> set[int]:
        moved: Iterator[int] = chain.from_iterable(self._buckets or ())
        return {*map(hash, self._ids), *moved}

    def _has(self, h: int) -> bool:
        assert self._buckets is not None
        bucket = self._buckets[h >> _SHIFT & _MASK]
        i = bisect_left(bucket, h)
        return i < len(bucket) and bucket[i] == h

    def _insert(self, h: int) -> None:
        if self._buckets is None:
            self._buckets = [array("q") for _ in range(_MASK + 1)]
        bucket = self._buckets[h >> _SHIFT & _MASK]
        i = bisect_left(bucket, h)
        if i == len(bucket) or bucket[i] != h:
            bucket.insert(i, h)
            self._moved += 1

    def _move(self, count: int) -> None:
        pop, insert = self._ids.pop, self._insert
        for _ in range(min(count, len(self._ids))):
            insert(hash(pop()))
        self._move_at = len(self._ids) + MOVE


__all__ = ["MOVE", "TaskIds"]
