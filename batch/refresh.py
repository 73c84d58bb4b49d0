"""A ledger's snapshot brought up to date in a process of its own, after a run that
wrote many lines, so that the next resume or ``status`` starts from it.

The process is detached, as ``git gc --auto`` detaches: the run's command returns at
once, and its memory stays flat in its rows. The refresh is a read of the ledger (what a
``status`` costs: at 1M rows about 12 s and 700 MB) at a lower priority. It holds no lock
a run needs and replaces the snapshot whole, so a run that starts meanwhile only finds an
older one; one refresh of a ledger runs at a time (an advisory lock on the ledger file
that only refreshes take), a second one started meanwhile leaves at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

from batch.snapshot import snapshot_lines

# The child imports this very package, wherever it was imported from (and ``-P``: never
# a ``batch`` in the folder it was started from).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
FORK_WAIT_S = 30.0  # the child forks off its read within a second; past this, a host's bug


async def refresh_snapshot(ledger: Path, lines_written: int) -> bool:
    """Start the refresh of ``ledger``'s snapshot when this run wrote enough lines to be
    worth it; return whether one was started. Waits only for the detached process to
    be forked off (a few tenths of a second)."""
    if lines_written < snapshot_lines() or not sys.executable:
        return False  # no interpreter to start (an embedding host): the next read leaves it
    path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "batch.refresh",
            str(ledger),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
            start_new_session=True,  # a Ctrl-C at the terminal is not for it
        )
    except OSError:
        return False  # a cache not refreshed costs the next read time, never the run
    try:
        await asyncio.wait_for(proc.wait(), FORK_WAIT_S)
    except TimeoutError:
        proc.kill()  # not an interpreter that forks (an embedding host's binary)
        await proc.wait()
        return False
    return proc.returncode == 0


def refresh(ledger: Path) -> bool:
    """What the detached process does: read the ledger, which leaves its snapshot. False
    when another refresh of it is under way (or it is gone)."""
    from batch.ledger import read_ledger  # imported after the fork: the run waits less

    try:
        fh = open(ledger, "rb")  # noqa: SIM115 - held, for its lock, through the read
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        read_ledger(ledger, keep_last=False)
    return True


def main(argv: list[str]) -> int:
    if hasattr(os, "fork") and os.fork() > 0:
        return 0  # the run waits for this much; the read goes on in the forked child
    with contextlib.suppress(OSError):
        os.nice(10)
    refresh(Path(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
