"""Small thumbnails of a report's images, made once with Pillow into ``OUT_DIR/.thumbs/``.

A thumbnail is named by a key: an output's sha256 as the ledger recorded it, or for an
input (the ledger has no hash of it) the sha256 of its path, size and modification
time. A rerun of the report finds the thumbnails it made before and makes only the
missing ones, in a thread pool (Pillow releases the GIL while it decodes, scales and
encodes). An image that is already no larger than a thumbnail, in a format every
browser shows, is its own thumbnail: hard-linked (or copied), never decoded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image

THUMB_DIR = ".thumbs"
THUMB_PX = 160  # the longer side, in pixels: the report shows them at 128 CSS px
QUALITY = 70
# A small image in one of these formats is its own thumbnail (copied, not re-encoded).
COPY_AS_IS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
COPY_MAX_BYTES = 48 * 1024
MIME = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
_SHA = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(rf"([0-9a-f]{{64}})-{THUMB_PX}\.(png|jpg|webp|gif)")


@dataclass(frozen=True, slots=True)
class Source:
    """An image to show: ``key`` names its thumbnail, ``path`` is where it is read from."""

    key: str
    path: str


def output_key(sha256: object) -> str | None:
    """An output's key: the sha256 the ledger recorded for it, when it is one."""
    return sha256 if isinstance(sha256, str) and _SHA.fullmatch(sha256) else None


def file_key(path: str) -> str | None:
    """A key for a file the ledger has no hash of: its path, size and mtime, hashed.

    An edited input gets a new key (so a new thumbnail); a missing one gets none.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()


def existing(folder: Path) -> dict[str, str]:
    """Key -> file name of every thumbnail already in ``folder``."""
    found: dict[str, str] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _NAME.fullmatch(entry.name)
                if match is not None:
                    found[match[1]] = entry.name
    except OSError:
        pass
    return found


def ensure_thumbs(
    out_dir: Path, sources: Iterable[Source], workers: int | None = None
) -> dict[str, str]:
    """Key -> thumbnail file name (in ``out_dir/.thumbs``) of every source that has one.

    Thumbnails already made are reused; the others are made in a thread pool. A source
    that cannot be read as an image (missing, truncated, not an image) has none.
    """
    folder = out_dir / THUMB_DIR
    have = existing(folder)
    todo: dict[str, str] = {}
    for source in sources:
        if source.key not in have:
            todo.setdefault(source.key, source.path)
    if not todo:
        return have
    folder.mkdir(parents=True, exist_ok=True)
    jobs = list(todo.items())
    if len(jobs) < 8:
        made = [_make(folder, key, path) for key, path in jobs]
    else:
        count = workers or min(8, (os.cpu_count() or 2) + 1)
        with ThreadPoolExecutor(count, thread_name_prefix="thumbs") as pool:
            made = list(pool.map(lambda job: _make(folder, *job), jobs))
    for (key, _), name in zip(jobs, made, strict=True):
        if name is not None:
            have[key] = name
    return have


def data_uri(folder: Path, name: str) -> str | None:
    """A thumbnail as a data: URI, for a report that must travel as one file."""
    try:
        raw = (folder / name).read_bytes()
    except OSError:
        return None
    mime = MIME.get(name.rsplit(".", 1)[-1], "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def _write(folder: Path, name: str, data: bytes) -> None:
    # Unique per thread, then renamed: a reader never sees half a thumbnail.
    tmp = folder / f".tmp-{os.getpid()}-{threading.get_ident()}-{name}"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


def _link(folder: Path, name: str, path: str) -> None:
    """A small image as its own thumbnail: a hard link (one system call, no bytes
    written), else a copy. Outputs are replaced by rename, never rewritten in place,
    so a link keeps the bytes its key names."""
    try:
        os.link(path, folder / name)
    except FileExistsError:
        pass  # made meanwhile by another report of this folder
    except OSError:  # another file system, or links not allowed
        with open(path, "rb") as fh:
            _write(folder, name, fh.read())


def _make(folder: Path, key: str, path: str) -> str | None:
    try:
        with Image.open(path) as im:
            width, height = im.size
            ext = COPY_AS_IS.get(im.format or "")
            tiny = width <= THUMB_PX and height <= THUMB_PX
            if ext is not None and tiny and os.stat(path).st_size <= COPY_MAX_BYTES:
                name = f"{key}-{THUMB_PX}.{ext}"
                _link(folder, name, path)
                return name
            # JPEG decodes at 1/2, 1/4 or 1/8 scale here: most of the saving on big photos.
            im.draft("RGB", (THUMB_PX, THUMB_PX))
            im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR, reducing_gap=2.0)
            alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            small = im.convert("RGBA" if alpha else "RGB")
        buf = BytesIO()
        small.save(buf, "WEBP", quality=QUALITY, method=0)
        name = f"{key}-{THUMB_PX}.webp"
        _write(folder, name, buf.getvalue())
        return name
    except Exception:  # any unreadable image: Pillow raises many kinds of error
        return None
