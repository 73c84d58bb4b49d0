"""The input images of an output folder, kept inside it for the dataset files.

``OUT_DIR/.originals/<sha256>.<ext>`` holds one copy of each input, named by the
sha256 of its bytes: a local input is copied there, an input given as a URL is
fetched there once (``.originals/urls.json`` maps each URL, as the ledger has it, to
its file). A file whose bytes no longer match its name is fetched or copied again.

Why a copy: the ``imagefolder`` loader only opens files inside the folder of its
``metadata.jsonl`` (no ``..``, no URL), and the Parquet and WebDataset exports embed
the bytes of URL inputs, which the run itself never downloads (the API fetches them).
The folder is hidden, so ``imagefolder`` never takes its files for samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from batch.files import write_atomic_sync
from batch.images import extension, sniff_image
from batch.redact import MASK

log = logging.getLogger("wsbatch.export")

ORIGINALS_DIR = ".originals"
URL_INDEX = "urls.json"
# Local inputs already copied, by path with the size and mtime they had: a run's end
# (which rewrites metadata.jsonl) finds their copies without reading every input again.
LOCAL_INDEX = "locals.json"
FETCH_TIMEOUT = 30.0
FETCH_WORKERS = 8
MAX_ORIGINAL_BYTES = 64 * 1024 * 1024
USER_AGENT = "wsbatch-export"


class OriginalError(Exception):
    """An input that cannot be stored: unreachable, not an image, too big."""


def name_for(data: bytes) -> str:
    """The cache file name of these bytes: ``<sha256>.<ext>``."""
    sniffed = sniff_image(data[:16])
    ext = extension(sniffed) if sniffed else "bin"
    return f"{hashlib.sha256(data).hexdigest()}.{ext}"


def _verified(folder: Path, name: str) -> bytes | None:
    """The cached bytes if the file is there and its bytes still match its name."""
    try:
        data = (folder / name).read_bytes()
    except OSError:
        return None
    return data if name_for(data) == name else None


def _store(folder: Path, data: bytes) -> str:
    name = name_for(data)
    if _verified(folder, name) is None:
        folder.mkdir(exist_ok=True)
        write_atomic_sync(folder / name, data)
    return name


def _read_index(folder: Path) -> dict[str, str]:
    try:
        raw = json.loads((folder / URL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, str) and "/" not in v}


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_stamps(folder: Path) -> dict[str, tuple[int, int, str]]:
    try:
        raw = json.loads((folder / LOCAL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    found: dict[str, tuple[int, int, str]] = {}
    for path, entry in raw.items() if isinstance(raw, dict) else ():
        if (
            isinstance(entry, list)
            and len(entry) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in entry[:2])
            and isinstance(entry[2], str)
            and "/" not in entry[2]
        ):
            found[str(path)] = (entry[0], entry[1], entry[2])
    return found


def _fetchable(url: str) -> str:
    """The URL to request: a masked password (``https://***@host``) is dropped rather
    than sent; a masked signature stays, and the server will refuse it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise OriginalError(f"unsupported URL scheme {parts.scheme!r}")
    if parts.netloc.startswith(MASK + "@"):
        parts = parts._replace(netloc=parts.netloc.split("@", 1)[1])
    return urlunsplit(parts)


def fetch(url: str, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The bytes of an image URL, or OriginalError saying why not."""
    request = urllib.request.Request(_fetchable(url), headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data: bytes = response.read(MAX_ORIGINAL_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise OriginalError(f"HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise OriginalError(str(reason)) from None
    if len(data) > MAX_ORIGINAL_BYTES:
        raise OriginalError(f"larger than {MAX_ORIGINAL_BYTES // 1_048_576} MiB")
    if sniff_image(data[:16]) is None:
        raise OriginalError("not an image")
    return data


class Originals:
    """The ``.originals`` folder of one output folder."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = Path(out_dir) / ORIGINALS_DIR
        self._urls = _read_index(self.folder)
        self._local: dict[str, str | None] = {}
        self._stamps = _read_stamps(self.folder)

    @property
    def exists(self) -> bool:
        return self.folder.is_dir()

    def reference(self, name: str) -> str:
        """The cached file as seen from OUT_DIR (what metadata.jsonl names)."""
        return f"{ORIGINALS_DIR}/{name}"

    # -- what is cached already (no copy, no network) --------------------------

    def cached_local(self, path: str) -> str | None:
        """The cache name of a local input if its copy is there, reading the input once."""
        if path not in self._local:
            stamp = _stamp(path)
            known = self._stamps.get(path)
            if stamp is not None and known is not None and known[:2] == stamp:
                name = known[2]
                self._local[path] = name if (self.folder / name).is_file() else None
                return self._local[path]
            try:
                data = Path(path).read_bytes()
            except OSError:
                self._local[path] = None
            else:
                name = name_for(data)
                self._local[path] = name if (self.folder / name).is_file() else None
        return self._local[path]

    def cached_url(self, url: str) -> str | None:
        name = self._urls.get(url)
        return name if name is not None and (self.folder / name).is_file() else None

    # -- filling the cache -------------------------------------------------------

    def add_local(self, path: str) -> str:
        """Copy a local input in (once); return its cache name. OSError if unreadable."""
        stamp = _stamp(path)
        data = Path(path).read_bytes()
        name = _store(self.folder, data)
        self._local[path] = name
        if stamp is not None:
            self._stamps[path] = (*stamp, name)
        return name

    def save_local_index(self) -> None:
        if not self._stamps:
            return
        self.folder.mkdir(exist_ok=True)
        body = json.dumps({p: list(v) for p, v in sorted(self._stamps.items())})
        write_atomic_sync(self.folder / LOCAL_INDEX, (body + "\n").encode("utf-8"))

    def add_urls(self, urls: Iterable[str]) -> dict[str, str]:
        """Fetch the URLs not cached yet (in parallel); return ``{url: reason}`` for
        those that could not be fetched. Cached files are checked against their sha256
        and fetched again when they no longer match."""
        wanted = sorted(
            {u for u in urls if self._urls.get(u) is None or not self._check(self._urls[u])}
        )
        failures: dict[str, str] = {}
        if not wanted:
            return failures

        def one(url: str) -> tuple[str, bytes | None, str | None]:
            try:
                return url, fetch(url), None
            except OriginalError as exc:
                return url, None, str(exc)

        with ThreadPoolExecutor(max_workers=min(FETCH_WORKERS, len(wanted))) as pool:
            for url, data, reason in pool.map(one, wanted):
                if data is None:
                    failures[url] = reason or "unknown error"
                    self._urls.pop(url, None)
                else:
                    self._urls[url] = _store(self.folder, data)
        self._save_index()
        return failures

    def _check(self, name: str) -> bool:
        return _verified(self.folder, name) is not None

    def _save_index(self) -> None:
        self.folder.mkdir(exist_ok=True)
        body = json.dumps(dict(sorted(self._urls.items())), indent=0, ensure_ascii=False)
        write_atomic_sync(self.folder / URL_INDEX, (body + "\n").encode("utf-8"))

    def read(self, name: str) -> bytes:
        """The cached bytes, checked against their sha256; OSError when damaged."""
        data = _verified(self.folder, name)
        if data is None:
            raise OSError(f"{self.reference(name)} is missing or does not match its sha256")
        return data

    @property
    def urls(self) -> Mapping[str, str]:
        return self._urls
