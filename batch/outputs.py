"""Output files: names from validated ids only, written atomically."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import aiofiles.os

from batch.images import extension

TEMP_PREFIX = ".wsbatch-"
TEMP_SUFFIX = ".part"


def output_names(row_id: str, output_format: str, count: int) -> list[str]:
    ext = extension(output_format)
    if count == 1:
        return [f"{row_id}.{ext}"]
    return [f"{row_id}-{n}.{ext}" for n in range(1, count + 1)]


def _write_atomic_sync(out_dir: Path, name: str, data: bytes) -> None:
    temp = out_dir / f"{TEMP_PREFIX}{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    # O_EXCL|O_NOFOLLOW: never write through a symlink someone planted.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # rename replaces a symlink at the final name rather than following it
        os.replace(temp, out_dir / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


_write_atomic_in_thread = aiofiles.os.wrap(_write_atomic_sync)


async def write_atomic(out_dir: Path, name: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/name`` so that the final name only ever holds whole files.

    The whole file is written, fsync'ed and renamed in one trip to a worker
    thread, so the event loop never blocks on the disk.
    """
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"refusing output name {name!r}")
    await _write_atomic_in_thread(out_dir, name, data)


def remove_temp_files(out_dir: Path) -> int:
    """Delete temporary files a killed run left behind; return how many."""
    removed = 0
    try:
        entries = list(os.scandir(out_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(TEMP_SUFFIX):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def existing_files(out_dir: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(out_dir) if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return set()
