"""Writing a file so that its final name only ever holds a whole file."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".wsbatch-"
TEMP_SUFFIX = ".part"


def temp_name(name: str) -> str:
    """A temporary name beside ``name`` that says which process owns it."""
    return f"{TEMP_PREFIX}{os.getpid()}-{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file to write that appears whole at ``path`` or not at all.

    It is written under a temporary name beside ``path``, fsync'ed and renamed into
    place. O_EXCL|O_NOFOLLOW never writes through a symlink someone planted, and the
    rename replaces a symlink at the final name rather than following it.
    """
    temp = path.parent / temp_name(path.name)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, mode)  # whatever the umask: outputs and datasets are meant to be shared
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def write_atomic_sync(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def _owner_alive(name: str) -> bool:
    pid_text = name[len(TEMP_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False  # written before temp names carried a pid
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_folder(folder: Path, prefixes: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """One listing of ``folder``: the names of its regular files, and every name (of any
    kind of entry) that starts with one of ``prefixes``. Beside a million outputs a
    listing takes most of a second, and a run needs several things of one."""
    files: set[str] = set()
    named: list[str] = []
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return files, named
    with entries:
        for entry in entries:
            name = entry.name
            if entry.is_file(follow_symlinks=False):
                files.add(name)
            if name.startswith(prefixes):
                named.append(name)
    return files, named


def remove_temp_files(folder: Path, names: Iterable[str] | None = None) -> int:
    """Delete temporary files that dead processes left behind; return how many. ``names``
    are the folder's, when the caller has listed it already.

    A live process's files are left alone: a shard starting beside another must not
    pull a file out from under its write.
    """
    removed = 0
    try:
        # Names only: beside a million outputs, a million DirEntry objects cost more.
        listed = os.listdir(folder) if names is None else names
        found = [n for n in listed if n.startswith(TEMP_PREFIX)]
    except FileNotFoundError:
        return 0
    for name in found:
        if name.endswith(TEMP_SUFFIX) and not _owner_alive(name):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


async def read_bytes(path: Path) -> bytes:
    """A whole file, read in a daemon thread.

    A read that never returns (a FIFO, a hung network mount) must not hold the process
    at exit: the default executor's threads are joined when the loop closes, so a
    second Ctrl-C would wait for them forever. A daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()

    def settle(data: bytes | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert data is not None
            future.set_result(data)

    def work() -> None:
        try:
            data, error = path.read_bytes(), None
        except BaseException as exc:
            data, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we were reading
            loop.call_soon_threadsafe(settle, data, error)

    threading.Thread(target=work, name="wsbatch-read", daemon=True).start()
    return await future


def matching(folder: Path, pattern: str, names: Iterable[str] | None = None) -> list[Path]:
    """The entries of ``folder`` whose names match ``pattern`` (``*`` and ``?`` within a
    name), sorted. One listing (none when the caller has the ``names``), and fnmatch only
    past the pattern's literal prefix: beside a million outputs, ``Path.glob`` took most
    of a second for each call."""
    prefix = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
    if names is None:
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
    found = [n for n in names if n.startswith(prefix) and fnmatch.fnmatchcase(n, pattern)]
    return [folder / name for name in sorted(found)]
