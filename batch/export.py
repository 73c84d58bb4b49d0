"""Dataset files of an output folder: ``metadata.jsonl``, Parquet shards, WebDataset shards.

Everything here is derived from the ledger (the source of truth) and the files it
names; nothing is sent anywhere except to the export destination the user chose.

``write_metadata`` keeps ``OUT_DIR/metadata.jsonl`` in the convention of the
Hugging Face ``imagefolder`` loader, so ``load_dataset("imagefolder", data_dir=OUT_DIR)``
gives one sample per output file. ``export_dataset`` writes the completed
(input, prompt, edited) pairs as Parquet (``data/train-NNNNN-of-NNNNN.parquet``,
images as ``{bytes, path}`` structs typed ``Image`` in the embedded ``datasets``
features) or as WebDataset tar shards (``shard-NNNNNN.tar``), to a folder or any
fsspec URL. Both are streamed a row group / a sample at a time and are byte-for-byte
reproducible: the same ledger and files give the same bytes. The rows come from
``batch.completed``, which reads the ledger in passes and holds a sort key and an offset
per output rather than its events: metadata.jsonl, too, is written a line at a time.

All three name their columns as diffusers' InstructPix2Pix training script reads them
by default: ``input_image``, ``edit_prompt``, ``edited_image``. Inputs are embedded as
images, never as paths: an export first copies each input once into
``OUT_DIR/.originals/`` (``batch.originals``; URL inputs are fetched there), which is
also what lets ``metadata.jsonl`` name them (``input_image_file_name``): imagefolder
opens only files inside its folder. No file written here holds an absolute path.

pyarrow and fsspec are optional (``pip install 'wsbatch[export]'``) and imported only
when an export runs; ``write_metadata`` needs neither.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batch.completed import METADATA_NAME as METADATA_NAME
from batch.completed import Pair, Pairs, read_pairs
from batch.errors import BatchError, UsageError
from batch.files import TEMP_PREFIX, TEMP_SUFFIX, atomic_file
from batch.images import extension, sniff_image
from batch.originals import Originals

log = logging.getLogger("wsbatch.export")

FORMATS = ("parquet", "webdataset")
INSTALL_HINT = "pip install 'wsbatch[export]'"
# The default destination is OUT_DIR/.export/<format>. Hidden on purpose: the imagefolder
# loader infers splits from file names anywhere under data_dir, so a visible
# "export/parquet/data/train-00000-of-00001.parquet" would turn load_dataset("imagefolder",
# data_dir=OUT_DIR) into a "train" split holding only that Parquet file; the loader skips
# hidden folders.
DEFAULT_EXPORT_DIR = ".export"
# The Hub's viewer and random access read a whole row group per row: keep them small.
# 100 rows is what `datasets` uses for image data; the byte cap keeps big images in check
# (`datasets` aims for row groups under 100 MB) and bounds the export's memory, which the
# Parquet writer makes several times one row group's bytes (tests/bench/export_bench.py).
ROW_GROUP_ROWS = 100
ROW_GROUP_BYTES = 16 * 1024 * 1024
# Fixed tar header fields, so that two exports of one folder are byte-identical.
TAR_MTIME = 946_684_800  # 2000-01-01T00:00:00Z; 0 makes GNU tar warn on extraction
TAR_MODE = 0o644
# Temporary files take batch.outputs' names: hidden, so no loader reads them; the runner
# sweeps OUT_DIR's at its next start and an export sweeps its destination's.
# The scalar columns every dataset file has after the two images and the prompt, in
# order, with their types; the meta fields follow.
SCALAR_COLUMNS = (
    ("row", "string"),
    ("seed", "int"),
    ("model", "string"),
    ("prediction_id", "string"),
    ("inference_ms", "int"),
    ("nsfw", "bool"),
    ("sha256", "string"),
    ("input_source", "string"),
)
# metadata.jsonl keys, in order: imagefolder makes Image columns `input_image` and
# `edited_image` of the two `*_file_name` keys (datasets >= 3.4).
METADATA_KEYS = (
    "input_image_file_name",
    "edit_prompt",
    "edited_image_file_name",
    *(name for name, _ in SCALAR_COLUMNS),
)
# Parquet columns before the meta fields (and imagefolder's, once loaded).
PARQUET_KEYS = ("input_image", "edit_prompt", "edited_image", *(n for n, _ in SCALAR_COLUMNS))
# WebDataset member names: `<key>.<role>.<ext>`, one extension per role in an export.
INPUT_ROLE = "input"
EDITED_ROLE = "edited"
# A meta field never takes one of these names (nor one imagefolder reads as a file path);
# "image", "file_name" and "original_image" are the names of earlier versions.
STANDARD_KEYS = frozenset(
    {*METADATA_KEYS, *PARQUET_KEYS, "output_index", "file_name", "image", "original_image"}
)

# The names from which the imagefolder loader infers splits (datasets' data_files.py).
_SPLIT_WORD = re.compile(
    r"(?:^|[-._ 0-9])(?:train|training|validation|valid|dev|val|test|testing|eval|evaluation)"
    r"[-._ 0-9]"
)
_PARQUET_NAME = re.compile(r"train-[0-9]{5}-of-[0-9]{5}\.parquet")
_SHARD_NAME = re.compile(r"shard-[0-9]{6}\.tar")
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r".*" + re.escape(TEMP_SUFFIX))
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class _MetaColumn:
    key: str  # the key in the manifest's `meta`
    name: str  # the column name in every dataset file
    kind: str  # "bool", "int", "float" or "string": one type per column


# -- meta fields as columns ----------------------------------------------------


def _names_a_file(name: str) -> bool:
    # imagefolder turns these metadata keys into Image columns and opens their values.
    return name in ("file_name", "file_names") or name.endswith(("_file_name", "_file_names"))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if _INT64[0] <= value <= _INT64[1] else "string"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "string"
    return "string"


def _add_kinds(kinds: dict[str, set[str]], pair: Pair) -> None:
    """Note the types of one pair's meta values, for ``_meta_columns``."""
    for key, value in pair.meta.items():
        seen = kinds.setdefault(key, set())
        if value is not None:
            seen.add(_kind(value))


def _meta_columns(kinds: Mapping[str, set[str]]) -> list[_MetaColumn]:
    """One column per meta key across all rows (``kinds``: the types each key's values
    took, from ``_add_kinds``), each with one type.

    A key that would clash with a standard column, or that imagefolder would read as
    a file path (``*_file_name``), gets a ``meta_`` prefix (and ``filename``): every
    file then loads. Values of mixed types (CSV strings next to YAML numbers) become
    strings, since a column has one type in Parquet and in the JSON loader.
    """
    taken: set[str] = set(STANDARD_KEYS) | set(kinds)
    columns = []
    for key in sorted(kinds):
        name = key
        if name in STANDARD_KEYS or _names_a_file(name):
            name = "meta_" + re.sub(r"file_name(s?)$", r"filename\1", key)
            while name in taken:
                name = "meta_" + name
            taken.add(name)
        found = kinds[key]
        if found <= {"bool"} and found:
            kind = "bool"
        elif found <= {"int"} and found:
            kind = "int"
        elif found <= {"int", "float"} and found:
            kind = "float"
        else:
            kind = "string"
        columns.append(_MetaColumn(key, name, kind))
    return columns


def _meta_value(column: _MetaColumn, value: Any) -> Any:
    if value is None:
        return None
    if column.kind == "float":
        return float(value)
    if column.kind == "string" and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


def _meta_fields(pair: Pair, columns: Sequence[_MetaColumn]) -> dict[str, Any]:
    # Every column on every line: the JSON loader infers its schema from the first block.
    return {c.name: _meta_value(c, pair.meta.get(c.key)) for c in columns}


# -- metadata.jsonl --------------------------------------------------------------


def _is_absolute(reference: str) -> bool:
    # A POSIX or a Windows absolute path (C:\..., \\server\...), or a home reference.
    return (
        reference.startswith(("/", "\\", "~"))
        or re.match(r"[A-Za-z]:[\\/]", reference) is not None
        or os.path.isabs(reference)
    )


def _input_source(pair: Pair) -> str | None:
    """Where the input came from, fit to travel with a dataset: its URL (secrets masked,
    as in the ledger) or the path the manifest gave; an absolute path is cut to its file
    name, since this machine's folders mean nothing elsewhere."""
    if pair.image is not None and (pair.is_url or not _is_absolute(pair.image)):
        return pair.image.replace("\\", "/") if not pair.is_url else pair.image
    source = pair.image_path or pair.image
    return re.split(r"[\\/]", source)[-1] if source else None


def _cached_original(pair: Pair, store: Originals) -> str | None:
    """The input's copy in OUT_DIR/.originals, if an export put it there."""
    if not store.exists:
        return None  # no export yet: do not read every input to find nothing
    if pair.is_url:
        return store.cached_url(str(pair.image))
    if pair.image_path is not None:
        return store.cached_local(pair.image_path)
    return None


def _scalars(pair: Pair) -> dict[str, Any]:
    return {
        "row": pair.row,
        "seed": pair.seed,
        "model": pair.model,
        "prediction_id": pair.prediction_id,
        "inference_ms": pair.inference_ms,
        "nsfw": pair.nsfw,
        "sha256": pair.sha256,
        "input_source": _input_source(pair),
    }


def write_metadata(out_dir: Path) -> Path:
    """Rewrite ``OUT_DIR/metadata.jsonl`` from the ledger; return its path.

    One line per completed output file that exists, sorted by output name:
    ``input_image_file_name`` (the input's copy under ``.originals/``, null until an
    export has put it there), ``edit_prompt``, ``edited_image_file_name`` (the output,
    relative to OUT_DIR), ``row``, ``seed``, ``model``, ``prediction_id``,
    ``inference_ms``, ``nsfw``, ``sha256`` (of this output), ``input_source`` (the
    manifest's path or URL, never an absolute path), then the meta fields. The file is
    replaced atomically, so a reader (or a training job) never sees half of it.

    ``load_dataset("imagefolder", data_dir=OUT_DIR)`` (datasets >= 3.4) then gives one
    sample per line with Image columns ``input_image`` and ``edited_image``. The loader
    infers splits from file names, so row ids containing a split word between
    separators (``cat-test-1``, ``train_02``) would split the folder: derived ids never
    do, explicit ones get a warning naming the ``data_files`` workaround.
    """
    out_dir = Path(out_dir)
    kinds: dict[str, set[str]] = {}
    with read_pairs(out_dir, lambda pair: _add_kinds(kinds, pair)) as pairs:
        return _write_metadata(out_dir, pairs, Originals(out_dir), _meta_columns(kinds))


def _write_metadata(
    out_dir: Path, pairs: Iterable[Pair], store: Originals, columns: Sequence[_MetaColumn]
) -> Path:
    """Write the lines one by one into the file that replaces metadata.jsonl."""
    split_named, first = 0, ""
    dest = out_dir / METADATA_NAME
    with atomic_file(dest) as fh:
        for pair in pairs:
            cached = _cached_original(pair, store)
            record: dict[str, Any] = {
                "input_image_file_name": store.reference(cached) if cached else None,
                "edit_prompt": pair.prompt,
                "edited_image_file_name": pair.file_name,
                **_scalars(pair),
                **_meta_fields(pair, columns),
            }
            line = json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"
            fh.write(line.encode("utf-8"))
            if _SPLIT_WORD.search(pair.file_name):
                split_named, first = split_named + 1, first or pair.file_name
    if split_named:
        log.warning(
            "wsbatch: warning: %d output name(s) hold a split word (first: %s): "
            'load_dataset("imagefolder", data_dir=...) would make splits of them; load with '
            'data_files={"train": "%s/**"} instead',
            split_named,
            first,
            out_dir,
        )
    return dest


# -- export: shared pieces ---------------------------------------------------------


def _import_fsspec() -> Any:
    try:
        import fsspec  # type: ignore[import-untyped,unused-ignore]
        import fsspec.core  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise UsageError(f"export needs fsspec: {INSTALL_HINT}") from None
    return fsspec


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]
        import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise UsageError(f"Parquet export needs pyarrow: {INSTALL_HINT}") from None
    return pa, pq


def _ext_of(data: bytes) -> str:
    sniffed = sniff_image(data[:16])
    return extension(sniffed) if sniffed else "bin"


@dataclass(slots=True)
class _Loaded:
    pair: Pair
    original: bytes
    edited: bytes


@dataclass(slots=True)
class _Job:
    """What the writers need: where the files are and each pair's input copy."""

    out_dir: Path
    store: Originals
    local: dict[str, str | None]  # local input path -> its cache name (None: unreadable)
    columns: list[_MetaColumn] = field(default_factory=list)
    input_ext: str | None = None  # WebDataset: one extension per role, None for PNG
    edited_ext: str | None = None

    def output(self, pair: Pair) -> str:
        # os.path, not pathlib: a Path interns each name it is given, for every pair.
        return os.path.join(self.out_dir, pair.file_name)

    def input_name(self, pair: Pair) -> str | None:
        """The cache name of the pair's input, None when it is not there."""
        if pair.is_url:
            return self.store.urls.get(str(pair.image))
        return self.local.get(pair.image_path) if pair.image_path is not None else None


def _left_out(count: int, why: str, first: str) -> None:
    log.warning(
        "wsbatch: warning: %d output(s) left out of the export: %s (first: %s)",
        count,
        why,
        first,
    )


@dataclass(slots=True)
class _Gather:
    """Sees every pair once (``add``): copies each local input into the cache (once),
    notes each URL input to fetch, and the types of every pair's meta values (for
    metadata.jsonl). NSFW-flagged pairs an export skips need no input."""

    store: Originals
    skip_nsfw: bool
    local: dict[str, str | None] = field(default_factory=dict)
    urls: set[str] = field(default_factory=set)
    kinds: dict[str, set[str]] = field(default_factory=dict)

    def add(self, pair: Pair) -> None:
        _add_kinds(self.kinds, pair)
        if self.skip_nsfw and pair.nsfw is True:
            return
        if pair.image_path is not None and pair.image_path not in self.local:
            try:
                self.local[pair.image_path] = self.store.add_local(pair.image_path)
            except OSError:
                self.local[pair.image_path] = None
        elif pair.is_url:
            self.urls.add(str(pair.image))

    def finish(self, out_dir: Path) -> tuple[_Job, dict[str, str]]:
        """Fetch the URL inputs; return the job that names every input copy and
        ``{url: reason}`` for the URLs that could not be fetched."""
        self.store.save_local_index()
        failures = self.store.add_urls(self.urls)
        return _Job(out_dir, self.store, self.local), failures


@dataclass(slots=True)
class _Kept:
    """The pairs an export writes, and what the loaders need to know of them first."""

    keys: list[bytes] = field(default_factory=list)
    kinds: dict[str, set[str]] = field(default_factory=dict)  # of the kept pairs' meta
    input_exts: set[str] = field(default_factory=set)
    edited_exts: set[str] = field(default_factory=set)


def _keep(
    pairs: Pairs, job: _Job, failures: Mapping[str, str], *, skip_nsfw: bool, heads: bool
) -> _Kept:
    """The pairs whose input is there (and, with ``skip_nsfw``, not flagged NSFW).

    An input that is gone, unknown to the ledger or unreachable would give a pair the
    loaders cannot decode: such pairs are left out, with a warning naming the first.
    ``heads`` also reads the first bytes of every kept output, for WebDataset's names.
    """
    kept = _Kept()
    skipped = missing = unreachable = 0
    first_missing = first_unreachable = ""
    for key, pair in pairs.items():
        if skip_nsfw and pair.nsfw is True:
            skipped += 1
            continue
        name = job.input_name(pair)
        if name is not None:
            kept.keys.append(key)
            _add_kinds(kept.kinds, pair)
            if heads:
                kept.input_exts.add(name.rsplit(".", 1)[-1])
                kept.edited_exts.add(_ext_of(_head(job.output(pair))))
        elif pair.is_url:
            unreachable += 1
            reason = failures.get(str(pair.image))
            first_unreachable = first_unreachable or f"{pair.file_name}: {pair.image}: {reason}"
        else:
            missing += 1
            first_missing = first_missing or pair.file_name
    if skipped:
        log.info("wsbatch: %d NSFW-flagged output(s) left out", skipped)
    if missing:
        _left_out(missing, "their input image is gone or unknown to the ledger", first_missing)
    if unreachable:
        _left_out(unreachable, "their input URL could not be fetched", first_unreachable)
    return kept


def _load(pair: Pair, job: _Job) -> _Loaded:
    try:
        with open(job.output(pair), "rb") as fh:
            edited = fh.read()
        original = job.store.read(str(job.input_name(pair)))
    except OSError as exc:
        # Checked a moment ago: something is deleting files under the export.
        raise BatchError(f"cannot read {exc.filename or exc}: {exc.strerror or ''}") from None
    return _Loaded(pair, original, edited)


def _shards(pairs: Pairs, size: int) -> Iterator[Iterator[Pair]]:
    """The pairs in runs of ``size``, each consumed before the next is asked for."""
    rest = iter(pairs)
    for _ in range(math.ceil(len(pairs) / size)):
        yield itertools.islice(rest, size)


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return "file" in protocols or "local" in protocols


@contextlib.contextmanager
def _open_for_write(fs: Any, path: str) -> Iterator[IO[bytes]]:
    """A file that appears whole at ``path`` or not at all."""
    if _is_local(fs):
        # Same-folder temp + rename: the old file stays readable until the new one is whole.
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        with atomic_file(Path(path), TAR_MODE) as fh:
            yield fh
        return
    # Object stores publish a file when it is committed; without autocommit a failed
    # export aborts the upload instead of publishing a truncated shard.
    try:
        remote = fs.open(path, "wb", autocommit=False)
    except (TypeError, NotImplementedError):
        remote = fs.open(path, "wb")
    try:
        yield remote
        remote.close()
        if not getattr(remote, "autocommit", True):
            remote.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            remote.discard()
        with contextlib.suppress(Exception):
            remote.closed = True  # a discarded file must not upload on garbage collection
        raise


def _remove_stale(fs: Any, folder: str, pattern: re.Pattern[str], keep: set[str]) -> None:
    """Delete shards a previous, larger export left (readers glob the whole folder), and
    the temporary files of an export that was killed."""
    try:
        listed = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return
    for path in listed:
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        stale = pattern.fullmatch(name) and _strip(fs, str(path)) not in keep
        if stale or (_is_local(fs) and _TEMP_NAME.fullmatch(name)):
            fs.rm(str(path))


def _visible_inside(path: Path, folder: Path) -> bool:
    try:
        relative = path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return not any(part.startswith((".", "__")) for part in relative.parts)


def _strip(fs: Any, path: str) -> str:
    return str(fs._strip_protocol(path)).rstrip("/")


def _public(fs: Any, path: str) -> str:
    return path if _is_local(fs) else str(fs.unstrip_protocol(path))


# -- Parquet ---------------------------------------------------------------------------


_ARROW_KINDS = {"bool": "bool_", "int": "int64", "float": "float64", "string": "string"}
_HF_DTYPES = {"bool": "bool", "int": "int64", "float": "float64", "string": "string"}


def _parquet_schema(pa: Any, columns: Sequence[_MetaColumn]) -> Any:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    kinds = [*SCALAR_COLUMNS, *((c.name, c.kind) for c in columns)]
    fields = [("input_image", image), ("edit_prompt", pa.string()), ("edited_image", image)]
    fields += [(name, getattr(pa, _ARROW_KINDS[kind])()) for name, kind in kinds]
    # The `datasets` features, as it stores them itself: the struct columns load as
    # Image (decoded to PIL) rather than as plain dicts, with no guessing.
    features: dict[str, Any] = {
        "input_image": {"_type": "Image"},
        "edit_prompt": {"dtype": "string", "_type": "Value"},
        "edited_image": {"_type": "Image"},
    }
    for name, kind in kinds:
        features[name] = {"dtype": _HF_DTYPES[kind], "_type": "Value"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def _input_name(pair: Pair, job: _Job) -> str:
    # The image's `path`: a name, never this machine's folders. The cache name is
    # unique per content and carries the right extension.
    return str(job.input_name(pair))


def _parquet_table(pa: Any, schema: Any, group: Sequence[_Loaded], job: _Job) -> Any:
    data: dict[str, list[Any]] = {name: [] for name in schema.names}
    for item in group:
        pair = item.pair
        data["input_image"].append({"bytes": item.original, "path": _input_name(pair, job)})
        data["edit_prompt"].append(pair.prompt)
        data["edited_image"].append({"bytes": item.edited, "path": pair.file_name})
        for name, value in _scalars(pair).items():
            data[name].append(value)
        for name, value in _meta_fields(pair, job.columns).items():
            data[name].append(value)
    return pa.table(data, schema=schema)


def _row_groups(pairs: Iterable[Pair], job: _Job) -> Iterator[list[_Loaded]]:
    """Read pairs in groups of at most ROW_GROUP_ROWS rows / about ROW_GROUP_BYTES."""
    group: list[_Loaded] = []
    size = 0
    for pair in pairs:
        item = _load(pair, job)
        group.append(item)
        size += len(item.edited) + len(item.original)
        if len(group) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _write_parquet(fs: Any, root: str, pairs: Pairs, job: _Job, shard_size: int) -> list[str]:
    pa, pq = _import_pyarrow()
    schema = _parquet_schema(pa, job.columns)
    # Statistics of image bytes are useless and large; keep them for the scalar columns.
    scalar_columns = [n for n in schema.names if n not in ("input_image", "edited_image")]
    pool = pa.default_memory_pool()
    total = math.ceil(len(pairs) / shard_size)
    written: list[str] = []
    for number, chunk in enumerate(_shards(pairs, shard_size)):
        path = f"{root}/data/train-{number:05d}-of-{total:05d}.parquet"
        with _open_for_write(fs, path) as fh:
            writer = pq.ParquetWriter(
                fh, schema, compression="snappy", write_statistics=scalar_columns
            )
            try:
                for group in _row_groups(chunk, job):
                    table = _parquet_table(pa, schema, group, job)
                    rows = len(group)
                    group.clear()  # the table holds its own copy: drop the file bytes now
                    writer.write_table(table, row_group_size=rows)
                    del table
                    # Hand the writer's freed buffers back to the OS between row groups
                    # rather than letting the allocator keep the high-water mark.
                    pool.release_unused()
            finally:
                writer.close()
        written.append(path)
    _remove_stale(fs, f"{root}/data", _PARQUET_NAME, {_strip(fs, p) for p in written})
    return written


# -- WebDataset ---------------------------------------------------------------------------


def _sample_key(pair: Pair) -> str:
    """The output's file name without its extension, with no dot left: WebDataset splits
    member names at the first dot. ``cat.png`` gives ``cat``, ``cat-2.png`` (the second
    output of row ``cat``) ``cat-2``, as in OUT_DIR. Names never hold '%', so the
    mapping is one-to-one."""
    stem = pair.file_name.rsplit(".", 1)[0]
    return stem.replace("%", "%25").replace(".", "%2E")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_json(pair: Pair, columns: Sequence[_MetaColumn]) -> bytes:
    record: dict[str, Any] = {
        "edit_prompt": pair.prompt,
        "file_name": pair.file_name,
        "output_index": pair.index,
        **_scalars(pair),
        **_meta_fields(pair, columns),
    }
    return json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(16)
    except OSError:
        return b""


def _role_extension(extensions: Iterable[str]) -> str | None:
    """One extension for a role across the export: the one all its images share, or
    None when they differ (then every image of the role is stored as PNG)."""
    found = set(extensions)
    return found.pop() if len(found) == 1 else None


def _as_png(data: bytes) -> bytes:
    """The same pixels, losslessly, as PNG (a JPEG's EXIF orientation is not applied)."""
    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as opened:
        image: Image.Image = opened
        image.load()
        if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        image.save(out, "PNG")
    return out.getvalue()


def _member(data: bytes, ext: str | None) -> tuple[str, bytes]:
    if ext is not None:
        return ext, data
    return "png", data if _ext_of(data) == "png" else _as_png(data)


def _write_webdataset(fs: Any, root: str, pairs: Pairs, job: _Job, shard_size: int) -> list[str]:
    input_ext, edited_ext = job.input_ext, job.edited_ext
    written: list[str] = []
    for number, chunk in enumerate(_shards(pairs, shard_size)):
        path = f"{root}/shard-{number:06d}.tar"
        with (
            _open_for_write(fs, path) as fh,
            # "w|": a stream, written block by block; a remote file cannot seek anyway.
            tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for pair in chunk:
                item = _load(pair, job)
                key = _sample_key(pair)
                ext, data = _member(item.original, input_ext)
                _tar_member(tar, f"{key}.{INPUT_ROLE}.{ext}", data)
                ext, data = _member(item.edited, edited_ext)
                _tar_member(tar, f"{key}.{EDITED_ROLE}.{ext}", data)
                _tar_member(tar, f"{key}.json", _sample_json(pair, job.columns))
        written.append(path)
    _remove_stale(fs, root, _SHARD_NAME, {_strip(fs, p) for p in written})
    return written


# -- the entry point ---------------------------------------------------------------------


def export_dataset(
    out_dir: Path,
    fmt: str,
    *,
    to: str | None = None,
    shard_size: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    skip_nsfw: bool = False,
) -> list[str]:
    """Write the completed pairs of ``out_dir`` as a dataset; return the files written.

    ``fmt`` is ``"parquet"`` (``DEST/data/train-NNNNN-of-NNNNN.parquet``, the Hub's
    naming: columns ``input_image``, ``edit_prompt``, ``edited_image`` (images as
    ``{bytes, path}``), ``row``, ``seed``, ``model``, ``prediction_id``,
    ``inference_ms``, ``nsfw``, ``sha256``, ``input_source`` and the meta fields) or
    ``"webdataset"`` (``DEST/shard-NNNNNN.tar`` holding ``<key>.input.<ext>``,
    ``<key>.edited.<ext>`` and ``<key>.json`` per output, ``<key>`` the output's file
    name without its extension; one extension per role in the whole export, PNG when
    the images of a role come in several formats). One dataset row per output file,
    sorted by output name; ``shard_size`` rows per file. ``DEST`` is ``to`` — a folder
    or an fsspec URL such as ``s3://bucket/prefix``, with ``storage_options`` for its
    filesystem (credentials, ``client_kwargs``; S3 also honours ``AWS_ENDPOINT_URL``) —
    or by default ``OUT_DIR/.export/<fmt>``.

    Every input is embedded as image bytes: local inputs are copied, URL inputs fetched
    (once, then reused), into ``OUT_DIR/.originals/<sha256>.<ext>``, and
    ``metadata.jsonl`` is rewritten to name those copies. An output whose input is gone
    or whose URL cannot be fetched is left out with a warning; so, with ``skip_nsfw``,
    is every output the API flagged NSFW. Shards of an earlier export that this one
    does not rewrite are deleted, so the folder holds exactly this dataset.
    """
    out_dir = Path(out_dir)
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UsageError(f"--shard-size must be a positive integer, got {shard_size!r}")
    fsspec = _import_fsspec()
    if fmt == "parquet":
        _import_pyarrow()  # fail before any work when it is missing
    if to is not None and not to.strip():
        raise UsageError("--to needs a folder or a URL")
    store = Originals(out_dir)
    gather = _Gather(store, skip_nsfw)
    with read_pairs(out_dir, gather.add) as everything:
        job, failures = gather.finish(out_dir)
        kept = _keep(everything, job, failures, skip_nsfw=skip_nsfw, heads=fmt == "webdataset")
        # The copies are there now: metadata.jsonl can name them for imagefolder.
        _write_metadata(out_dir, everything, store, _meta_columns(gather.kinds))
        if not kept.keys:
            raise UsageError(f"{out_dir} has no completed outputs to export")
        dest = to if to is not None else str(out_dir / DEFAULT_EXPORT_DIR / fmt)
        fs, root = fsspec.core.url_to_fs(dest, **dict(storage_options or {}))
        root = str(root).rstrip("/")
        if fmt == "parquet" and _is_local(fs) and _visible_inside(Path(root), out_dir):
            log.warning(
                'wsbatch: warning: %s is inside %s: load_dataset("imagefolder", data_dir=...) '
                "would take its train-* files for a split; export elsewhere or to a hidden "
                "folder",
                root,
                out_dir,
            )
        job.columns = _meta_columns(kept.kinds)
        # Loaders (`datasets`' webdataset builder, for one) take the member names of the
        # first samples for the columns of all: every sample has the same three names.
        job.input_ext = _role_extension(kept.input_exts)
        job.edited_ext = _role_extension(kept.edited_exts)
        write = _write_parquet if fmt == "parquet" else _write_webdataset
        written = write(fs, root, everything.select(kept.keys), job, shard_size)
    return [_public(fs, path) for path in written]
