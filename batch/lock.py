"""One run per output directory, enforced with flock so a dead holder never blocks."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from batch.errors import LockedError

LOCK_NAME = ".wsbatch.lock"


# flock has no query: a reader probes a lock by taking it for an instant, so a run that
# meets a held lock tries again for this long before it calls the folder busy.
PROBE_PATIENCE_S = 0.5
SHARDS_LOCK_GLOB = ".wsbatch.shards-*.lock"


def shard_lock_name(shard: tuple[int, int]) -> str:
    return f".wsbatch.shard-{shard[0]}-of-{shard[1]}.lock"


def shards_lock_name(count: int) -> str:
    """Held shared by every shard of a count-N layout while it runs."""
    return f".wsbatch.shards-{count}.lock"


def _flock_patiently(fd: int, mode: int) -> bool:
    deadline = time.monotonic() + PROBE_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _take(path: Path, exclusive: bool, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    if not _flock_patiently(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH):
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(
            f"{what} is in use by another wsbatch run (pid {holder}); "
            "wait for it to finish or stop it first"
        )
    if exclusive:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class OutDirLock:
    """A whole run holds the folder's lock exclusively; a shard run holds it shared
    (so shards run side by side, never beside a whole run) plus its shard's own lock."""

    def __init__(self, out_dir: Path, shard: tuple[int, int] | None = None) -> None:
        self.path = out_dir / LOCK_NAME
        self.shard = shard
        self._fds: list[int] = []

    def acquire(self) -> None:
        folder = str(self.path.parent)
        self._fds.append(_take(self.path, self.shard is None, folder))
        if self.shard is not None:
            try:
                self._take_shard(self.shard)
            except BaseException:
                self.release()
                raise

    def _take_shard(self, shard: tuple[int, int]) -> None:
        folder = self.path.parent
        index, count = shard
        what = f"shard {index}/{count} of {folder}"
        self._fds.append(_take(folder / shard_lock_name(shard), True, what))
        # Shards of different counts split the rows differently, so they would run some
        # rows twice: take this count's lock first, then make sure no other count runs.
        # (Two different counts starting together both see each other and both stop.)
        self._fds.append(_take(folder / shards_lock_name(count), False, what))
        for other in sorted(folder.glob(SHARDS_LOCK_GLOB)):
            if other.name != shards_lock_name(count) and _held_by(other) is not None:
                raise LockedError(
                    f"{folder} has shards of N={other.name[len('.wsbatch.shards-') : -5]} "
                    f"running; every shard on one folder must use the same N (this is {count})"
                )

    def release(self) -> None:
        # The files stay: removing one would race with a run that just opened it.
        while self._fds:
            fd = self._fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> OutDirLock:
        if not self._fds:
            self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _held_by(path: Path) -> str | None:
    """The pid written in a lock file whose lock someone holds now, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        # Probing takes the lock for an instant when it is free; flock has no query.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def holders(out_dir: Path) -> list[str]:
    """Pids of the live runs using ``out_dir``: a whole run, or every running shard."""
    if _held_by(out_dir / LOCK_NAME) is None:
        return []
    pids = [
        pid
        for path in sorted(out_dir.glob(".wsbatch.shard-*.lock"))
        if (pid := _held_by(path)) is not None
    ]
    # A whole run writes its pid in the folder's lock; shards hold that one shared.
    return pids or [(out_dir / LOCK_NAME).read_text().strip() or "unknown"]
