"""A ledger's snapshot brought up to date in a process of its own: what a run that wrote
many lines does as it ends, so that the next resume or ``status`` starts from it.

A process of its own because the read holds every row's state: a fresh run keeps its
memory flat in its rows, and this would be a resume's worth on top of it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from batch.ledger import read_ledger
from batch.snapshot import snapshot_lines

# The child imports this very package, wherever it was imported from.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


async def refresh_snapshot(ledger: Path, lines_written: int) -> bool:
    """Refresh ``ledger``'s snapshot when this run wrote enough lines to be worth it;
    return whether a refresh ran. A stop (cancel) kills it: the old snapshot stays."""
    if lines_written < snapshot_lines():
        return False
    path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batch.refresh",
        str(ledger),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
    )
    try:
        await proc.wait()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode == 0


def main(argv: list[str]) -> int:
    read_ledger(Path(argv[0]), keep_last=False)  # leaves the snapshot, as any such read
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
