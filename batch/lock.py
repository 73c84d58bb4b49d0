"""One run per output directory, enforced with flock so a dead holder never blocks."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from batch.errors import LockedError

LOCK_NAME = ".wsbatch.lock"


def shard_lock_name(shard: tuple[int, int]) -> str:
    return f".wsbatch.shard-{shard[0]}-of-{shard[1]}.lock"


def _take(path: Path, exclusive: bool, what: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockedError(
            f"{what} is in use by another wsbatch run (pid {holder}); "
            "wait for it to finish or stop it first"
        ) from None
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
                what = f"shard {self.shard[0]}/{self.shard[1]} of {folder}"
                self._fds.append(_take(self.path.parent / shard_lock_name(self.shard), True, what))
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        # The files stay: removing one would race with a run that just opened it.
        while self._fds:
            fd = self._fds.pop()
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> OutDirLock:
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
