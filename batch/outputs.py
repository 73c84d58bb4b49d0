"""Output files: names from validated ids only, written atomically off the event loop."""

from __future__ import annotations

import os
from pathlib import Path

import aiofiles.os

from batch.files import list_folder, write_atomic_sync
from batch.images import extension

__all__ = ["existing_files", "output_names", "write_atomic"]


def output_names(row_id: str, output_format: str, count: int) -> list[str]:
    ext = extension(output_format)
    if count == 1:
        return [f"{row_id}.{ext}"]
    return [f"{row_id}-{n}.{ext}" for n in range(1, count + 1)]


_write_in_thread = aiofiles.os.wrap(write_atomic_sync)


async def write_atomic(out_dir: Path, name: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/name``; the whole file is written, fsync'ed and renamed
    in one trip to a worker thread."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"refusing output name {name!r}")
    await _write_in_thread(out_dir / name, data)


def existing_files(out_dir: Path) -> set[str]:
    """The names of the folder's regular files (outputs among them)."""
    return list_folder(out_dir, ())[0]
