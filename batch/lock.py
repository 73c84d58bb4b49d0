"""One run per output directory, enforced with flock so a dead holder never blocks.

Readers (``wsbatch status``) never touch a lock a run takes. Each holder also announces
itself in a pid file of its own, ``.wsbatch.run-<pid>-<token>.pid``, which it locks
exclusively *before* the file appears under that name (it is made under a temporary name
and renamed) and deletes before it lets go. A reader probes those files with a shared,
non-blocking flock: refused means a live holder; granted means a file a dead run left,
which nobody will ever lock again. So a reader can neither make a run wait nor make it
exit 3, however it is scheduled; and unlike a query of /proc/locks it works the same
over NFS and off Linux.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from batch.errors import LockedError
from batch.files import matching

LOCK_NAME = ".wsbatch.lock"


# flock has no query: a run that checks another shard count's lock takes it for an
# instant, so a run that meets a held lock tries again for this long before it calls
# the folder busy. (Readers never take these locks: see ``holders``.)
PROBE_PATIENCE_S = 0.5
SHARDS_LOCK_GLOB = ".wsbatch.shards-*.lock"
HOLDER_PREFIX = ".wsbatch.run-"
HOLDER_GLOB = f"{HOLDER_PREFIX}*.pid"
HOLDER_TEMP_GLOB = f"{HOLDER_PREFIX}*.tmp"
# A holder file still under its temporary name is being announced; only one older than
# this is a leftover of a run killed in that instant.
HOLDER_TEMP_MAX_AGE_S = 60.0


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
        if path.name == LOCK_NAME:
            # Shards hold the folder's lock shared and write no pid in it: ask their files.
            holder = ", ".join(holders(path.parent)) or holder
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
        self._holder: Path | None = None

    def acquire(self, *, sweep: bool = True) -> None:
        """Take the lock. ``sweep=False``: the caller lists the folder anyway, and calls
        ``sweep_holders`` with that listing while it holds the lock (beside a million
        outputs each listing takes half a second)."""
        folder = str(self.path.parent)
        self._fds.append(_take(self.path, self.shard is None, folder))
        try:
            if self.shard is not None:
                self._take_shard(self.shard)
            if sweep:
                sweep_holders(self.path.parent)
            self._announce()
        except BaseException:
            self.release()
            raise

    def _announce(self) -> None:
        """Write this holder's pid file, locked before it is visible (see the module)."""
        folder = self.path.parent
        stem = f"{HOLDER_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        temp, final = folder / f"{stem}.tmp", folder / f"{stem}.pid"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self._fds.append(fd)
        fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else knows this file yet
        what = "whole" if self.shard is None else f"{self.shard[0]}/{self.shard[1]}"
        os.write(fd, f"{os.getpid()}\n{what}\n".encode())
        os.rename(temp, final)
        self._holder = final

    def _take_shard(self, shard: tuple[int, int]) -> None:
        folder = self.path.parent
        index, count = shard
        what = f"shard {index}/{count} of {folder}"
        self._fds.append(_take(folder / shard_lock_name(shard), True, what))
        # Shards of different counts split the rows differently, so they would run some
        # rows twice: take this count's lock first, then make sure no other count runs.
        # (Two different counts starting together both see each other and both stop.)
        self._fds.append(_take(folder / shards_lock_name(count), False, what))
        for other in matching(folder, SHARDS_LOCK_GLOB):
            if other.name != shards_lock_name(count) and _held_by(other) is not None:
                raise LockedError(
                    f"{folder} has shards of N={other.name[len('.wsbatch.shards-') : -5]} "
                    f"running; every shard on one folder must use the same N (this is {count})"
                )

    def release(self) -> None:
        # The lock files stay: removing one would race with a run that just opened it.
        # The pid file goes first, while it is still locked: no reader sees it stale.
        if self._holder is not None:
            with contextlib.suppress(OSError):
                self._holder.unlink()
            self._holder = None
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
    """The pid written in a lock file whose lock someone holds now, else None.

    For a run checking other shard counts only: probing takes the lock for an instant
    when it is free. Readers use ``holders``, which takes no lock a run takes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def _holder_info(path: Path) -> tuple[str, str] | None:
    """(pid, "whole" or "K/N") of a live holder's pid file; None when its run is gone.

    The shared probe is refused while the holder lives; when it is granted the file is
    a dead run's, which no run will lock again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            lines = os.read(fd, 128).decode(errors="replace").split()
            return (lines[0] if lines else "unknown", lines[1] if len(lines) > 1 else "whole")
        except OSError:
            return None
        return None
    finally:
        os.close(fd)


def sweep_holders(folder: Path, names: Iterable[str] | None = None) -> None:
    """Delete pid files of dead runs (called with the folder's lock held). ``names``
    are the folder's, when the caller has listed it already."""
    now = time.time()
    mine = matching(folder, f"{HOLDER_PREFIX}*", names)  # one listing for both kinds
    for path in [p for p in mine if p.match(HOLDER_GLOB) or p.match(HOLDER_TEMP_GLOB)]:
        with contextlib.suppress(OSError):
            if path.suffix == ".tmp" and now - path.lstat().st_mtime < HOLDER_TEMP_MAX_AGE_S:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live holder
            finally:
                os.close(fd)
            path.unlink()


def _shard_order(info: tuple[str, str]) -> tuple[int, str]:
    index = info[1].partition("/")[0]
    return (int(index) if index.isdigit() else -1, info[0])


def holders(out_dir: Path, names: Iterable[str] | None = None) -> list[str]:
    """Pids of the live runs using ``out_dir``: a whole run, or every running shard.
    ``names`` are the folder's, when the caller has listed it already.

    It takes no lock a run would take (see the module), so it never makes a run wait."""
    found = [
        info
        for path in matching(out_dir, HOLDER_GLOB, names)
        if (info := _holder_info(path)) is not None
    ]
    return [pid for pid, _ in sorted(found, key=_shard_order)]
