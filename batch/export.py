"""Dataset files of an output folder: ``metadata.jsonl``, Parquet shards, WebDataset shards.

Everything here is derived from the ledger (the source of truth) and the files it
names; nothing is sent anywhere except to the export destination the user chose.

``write_metadata`` keeps ``OUT_DIR/metadata.jsonl`` in the convention of the
Hugging Face ``imagefolder`` loader, so ``load_dataset("imagefolder", data_dir=OUT_DIR)``
gives one sample per output file. ``export_dataset`` writes the completed
(original, prompt, edited) pairs as Parquet (``data/train-NNNNN-of-NNNNN.parquet``,
images as ``{bytes, path}`` structs typed ``Image`` in the embedded ``datasets``
features) or as WebDataset tar shards (``shard-NNNNNN.tar``), to a folder or any
fsspec URL. Both are streamed a row group / a sample at a time and are byte-for-byte
reproducible: the same ledger and files give the same bytes.

pyarrow and fsspec are optional (``pip install 'wsbatch[export]'``) and imported only
when an export runs; ``write_metadata`` needs neither.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batch.errors import BatchError, UsageError
from batch.files import TEMP_PREFIX, TEMP_SUFFIX, atomic_file, write_atomic_sync
from batch.images import extension, sniff_image
from batch.ledger import ledger_paths, read_ledgers
from batch.state import RowStatus

log = logging.getLogger("wsbatch.export")

METADATA_NAME = "metadata.jsonl"
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
# metadata.jsonl keys, in order; the meta fields follow.
METADATA_KEYS = (
    "file_name",
    "row",
    "original_image",
    "edit_prompt",
    "seed",
    "model",
    "prediction_id",
    "inference_ms",
    "nsfw",
    "sha256",
)
# Parquet columns before the meta fields.
PARQUET_KEYS = (
    "original_image",
    "edit_prompt",
    "edited_image",
    "row",
    "seed",
    "model",
    "prediction_id",
)
# A meta field never takes one of these names (nor one imagefolder reads as a file path);
# "image" is the column imagefolder makes of file_name.
STANDARD_KEYS = frozenset({*METADATA_KEYS, *PARQUET_KEYS, "output_index", "image"})

# The names from which the imagefolder loader infers splits (datasets' data_files.py).
_SPLIT_WORD = re.compile(
    r"(?:^|[-._ 0-9])(?:train|training|validation|valid|dev|val|test|testing|eval|evaluation)"
    r"[-._ 0-9]"
)
_PARQUET_NAME = re.compile(r"train-[0-9]{5}-of-[0-9]{5}\.parquet")
_SHARD_NAME = re.compile(r"shard-[0-9]{6}\.tar")
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r".*" + re.escape(TEMP_SUFFIX))
_INT64 = (-(2**63), 2**63 - 1)


# -- what the ledger says ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pair:
    """One completed output file and what produced it."""

    file_name: str  # relative to OUT_DIR (outputs sit at its top level)
    index: int  # position among its row's outputs
    row: str
    prompt: str | None
    seed: int | None
    model: str | None
    prediction_id: str | None
    inference_ms: int | float | None
    nsfw: bool | None
    sha256: str | None
    image: str | None  # the manifest's reference: a path relative to it, or a URL
    image_path: str | None  # absolute local path of the input; None for URL inputs
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_url(self) -> bool:
        return self.image_path is None and self.image is not None and "://" in self.image


@dataclass(frozen=True, slots=True)
class _MetaColumn:
    key: str  # the key in the manifest's `meta`
    name: str  # the column name in every dataset file
    kind: str  # "bool", "int", "float" or "string": one type per column


def _is_regular_file(path: str | os.PathLike[str], *, follow: bool) -> bool:
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode)


def _safe_output_name(name: Any) -> bool:
    # Output names come from validated ids; a hand-edited ledger must still not be able
    # to pull "../secret" or "/etc/passwd" into a dataset.
    return (
        isinstance(name, str)
        and bool(name)
        and name == os.path.basename(name)
        and "\\" not in name
        and not name.startswith(".")
        and name not in (METADATA_NAME,)
    )


def _item(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number_or_none(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return int(value)  # one JSON type per column for the loaders
    return value


def _collect(out_dir: Path) -> list[_Pair]:
    """Every completed output file that exists, sorted by file name."""
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger.jsonl: not a wsbatch output folder")
    state = read_ledgers(paths)
    # Completed events written before they carried the model fall back to the run's.
    run_model = next(
        (r["model"] for r in reversed(state.runs) if isinstance(r.get("model"), str)), None
    )
    pairs: list[_Pair] = []
    for row_id, row in state.rows.items():
        if row.status is not RowStatus.COMPLETED:
            continue
        event = row.last
        outputs = event.get("outputs")
        if not isinstance(outputs, list):
            continue
        meta = event.get("meta")
        seed = event.get("seed")
        for index, name in enumerate(outputs):
            if not _safe_output_name(name):
                continue
            # lstat: the runner never writes a symlink, so one here was planted.
            if not _is_regular_file(out_dir / name, follow=False):
                continue  # deleted since: the next run fetches it again
            nsfw = _item(event.get("nsfw"), index)
            pairs.append(
                _Pair(
                    file_name=name,
                    index=index,
                    row=row_id,
                    prompt=_str_or_none(event.get("prompt")),
                    seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                    model=_str_or_none(event.get("model")) or run_model,
                    prediction_id=_str_or_none(event.get("prediction_id")),
                    inference_ms=_number_or_none(event.get("inference_ms")),
                    nsfw=nsfw if isinstance(nsfw, bool) else None,
                    sha256=_str_or_none(_item(event.get("sha256"), index)),
                    image=_str_or_none(event.get("image")),
                    image_path=_str_or_none(event.get("image_path")),
                    meta={str(k): v for k, v in meta.items()} if isinstance(meta, dict) else {},
                )
            )
    pairs.sort(key=lambda p: p.file_name)
    return pairs


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


def _meta_columns(pairs: Sequence[_Pair]) -> list[_MetaColumn]:
    """One column per meta key across all rows, each with one type.

    A key that would clash with a standard column, or that imagefolder would read as
    a file path (``*_file_name``), gets a ``meta_`` prefix (and ``filename``): every
    file then loads. Values of mixed types (CSV strings next to YAML numbers) become
    strings, since a column has one type in Parquet and in the JSON loader.
    """
    kinds: dict[str, set[str]] = {}
    for pair in pairs:
        for key, value in pair.meta.items():
            seen = kinds.setdefault(key, set())
            if value is not None:
                seen.add(_kind(value))
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


def _meta_fields(pair: _Pair, columns: Sequence[_MetaColumn]) -> dict[str, Any]:
    # Every column on every line: the JSON loader infers its schema from the first block.
    return {c.name: _meta_value(c, pair.meta.get(c.key)) for c in columns}


# -- metadata.jsonl --------------------------------------------------------------


def _original_reference(pair: _Pair, out_dir: Path) -> str | None:
    """The input as seen from OUT_DIR: a relative path that resolves, or the URL."""
    if pair.image_path is not None:
        try:
            rel = os.path.relpath(pair.image_path, os.path.abspath(out_dir))
        except ValueError:  # another drive (Windows): no relative path exists
            return pair.image_path
        return rel.replace(os.sep, "/")
    return pair.image


def write_metadata(out_dir: Path) -> Path:
    """Rewrite ``OUT_DIR/metadata.jsonl`` from the ledger; return its path.

    One line per completed output file that exists, sorted by ``file_name``:
    ``file_name`` (relative to OUT_DIR), ``row``, ``original_image`` (the input as a
    path relative to OUT_DIR, or its URL), ``edit_prompt``, ``seed``, ``model``,
    ``prediction_id``, ``inference_ms``, ``nsfw`` and ``sha256`` (of this output),
    then the meta fields. The file is replaced atomically, so a reader (or a
    training job) never sees half of it.

    ``load_dataset("imagefolder", data_dir=OUT_DIR)`` then gives one sample per line.
    The loader infers splits from file names, so row ids containing a split word
    between separators (``cat-test-1``, ``train_02``) would split the folder: derived
    ids never do, explicit ones get a warning naming the ``data_files`` workaround.
    """
    out_dir = Path(out_dir)
    pairs = _collect(out_dir)
    columns = _meta_columns(pairs)
    lines = []
    for pair in pairs:
        record: dict[str, Any] = {
            "file_name": pair.file_name,
            "row": pair.row,
            **_described(pair, _original_reference(pair, out_dir), columns),
        }
        lines.append(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    dest = out_dir / METADATA_NAME
    write_atomic_sync(dest, "".join(lines).encode("utf-8"))
    split_named = [p.file_name for p in pairs if _SPLIT_WORD.search(p.file_name)]
    if split_named:
        log.warning(
            "wsbatch: warning: %d output name(s) hold a split word (first: %s): "
            'load_dataset("imagefolder", data_dir=...) would make splits of them; load with '
            'data_files={"train": "%s/**"} instead',
            len(split_named),
            split_named[0],
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


def _ext(name: str, data: bytes | None) -> str:
    """A file extension for a sample member: the bytes say it best, the name otherwise."""
    sniffed = sniff_image(data[:16]) if data else None
    found = extension(sniffed) if sniffed else None
    if found is None:
        found = Path(name).suffix.lower().lstrip(".") or "bin"
        found = {"jpeg": "jpg", "tif": "tiff"}.get(found, found)
    return found


@dataclass(slots=True)
class _Loaded:
    pair: _Pair
    original: bytes | None
    edited: bytes


def _usable(pairs: Iterable[_Pair]) -> list[_Pair]:
    """Pairs whose original can be stored: a readable local file, or a URL.

    A local input deleted since the run, or a ledger too old to name it, would give
    an image the loaders cannot decode; such pairs are left out, with a warning.
    """
    kept: list[_Pair] = []
    missing: list[str] = []
    for pair in pairs:
        if pair.is_url or (
            pair.image_path is not None and _is_regular_file(pair.image_path, follow=True)
        ):
            kept.append(pair)
        else:
            missing.append(pair.file_name)
    if missing:
        log.warning(
            "wsbatch: warning: %d output(s) left out of the export: their input image is gone "
            "or unknown to the ledger (first: %s)",
            len(missing),
            missing[0],
        )
    return kept


def _load(pair: _Pair, out_dir: Path) -> _Loaded:
    try:
        edited = (out_dir / pair.file_name).read_bytes()
        original = None if pair.is_url else Path(str(pair.image_path)).read_bytes()
    except OSError as exc:
        # Checked a moment ago: something is deleting files under the export.
        raise BatchError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return _Loaded(pair, original, edited)


def _chunks(items: Sequence[_Pair], size: int) -> Iterator[Sequence[_Pair]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    fields = [
        ("original_image", image),
        ("edit_prompt", pa.string()),
        ("edited_image", image),
        ("row", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("prediction_id", pa.string()),
    ]
    fields += [(c.name, getattr(pa, _ARROW_KINDS[c.kind])()) for c in columns]
    # The `datasets` features, as it stores them itself: the struct columns load as
    # Image (decoded to PIL) rather than as plain dicts, with no guessing.
    features: dict[str, Any] = {}
    for name, _ in fields:
        if name in ("original_image", "edited_image"):
            features[name] = {"_type": "Image"}
        elif name == "seed":
            features[name] = {"dtype": "int64", "_type": "Value"}
        elif name in PARQUET_KEYS:
            features[name] = {"dtype": "string", "_type": "Value"}
    for c in columns:
        features[c.name] = {"dtype": _HF_DTYPES[c.kind], "_type": "Value"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def _original_path(pair: _Pair) -> str | None:
    # The manifest's reference (relative, or the URL), not this machine's absolute path.
    if pair.image is not None:
        return pair.image
    return os.path.basename(pair.image_path) if pair.image_path else None


def _parquet_table(
    pa: Any, schema: Any, group: Sequence[_Loaded], columns: Sequence[_MetaColumn]
) -> Any:
    data: dict[str, list[Any]] = {name: [] for name in schema.names}
    for item in group:
        pair = item.pair
        data["original_image"].append({"bytes": item.original, "path": _original_path(pair)})
        data["edit_prompt"].append(pair.prompt)
        data["edited_image"].append({"bytes": item.edited, "path": pair.file_name})
        data["row"].append(pair.row)
        data["seed"].append(pair.seed)
        data["model"].append(pair.model)
        data["prediction_id"].append(pair.prediction_id)
        for name, value in _meta_fields(pair, columns).items():
            data[name].append(value)
    return pa.table(data, schema=schema)


def _row_groups(pairs: Sequence[_Pair], out_dir: Path) -> Iterator[list[_Loaded]]:
    """Read pairs in groups of at most ROW_GROUP_ROWS rows / about ROW_GROUP_BYTES."""
    group: list[_Loaded] = []
    size = 0
    for pair in pairs:
        item = _load(pair, out_dir)
        group.append(item)
        size += len(item.edited) + len(item.original or b"")
        if len(group) >= ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def _write_parquet(
    fs: Any, root: str, pairs: Sequence[_Pair], out_dir: Path, shard_size: int
) -> list[str]:
    pa, pq = _import_pyarrow()
    columns = _meta_columns(pairs)
    schema = _parquet_schema(pa, columns)
    # Statistics of image bytes are useless and large; keep them for the scalar columns.
    scalar_columns = [n for n in schema.names if n not in ("original_image", "edited_image")]
    pool = pa.default_memory_pool()
    total = math.ceil(len(pairs) / shard_size)
    written: list[str] = []
    for number, chunk in enumerate(_chunks(pairs, shard_size)):
        path = f"{root}/data/train-{number:05d}-of-{total:05d}.parquet"
        with _open_for_write(fs, path) as fh:
            writer = pq.ParquetWriter(
                fh, schema, compression="snappy", write_statistics=scalar_columns
            )
            try:
                for group in _row_groups(chunk, out_dir):
                    table = _parquet_table(pa, schema, group, columns)
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


def _sample_key(pair: _Pair) -> str:
    """A unique key without dots: WebDataset splits member names at the first dot.

    Ids never hold '%' and the output index follows the last '-', so the mapping is
    one-to-one.
    """
    return f"{pair.row.replace('%', '%25').replace('.', '%2E')}-{pair.index}"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _described(pair: _Pair, original: str | None, columns: Sequence[_MetaColumn]) -> dict[str, Any]:
    """The fields metadata.jsonl and a WebDataset sample share, in the SPEC's order."""
    return {
        "original_image": original,
        "edit_prompt": pair.prompt,
        "seed": pair.seed,
        "model": pair.model,
        "prediction_id": pair.prediction_id,
        "inference_ms": pair.inference_ms,
        "nsfw": pair.nsfw,
        "sha256": pair.sha256,
        **_meta_fields(pair, columns),
    }


def _sample_json(pair: _Pair, columns: Sequence[_MetaColumn]) -> bytes:
    record: dict[str, Any] = {
        "row": pair.row,
        "output_index": pair.index,
        "file_name": pair.file_name,
        **_described(pair, _original_path(pair), columns),
    }
    return json.dumps(record, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _write_webdataset(
    fs: Any, root: str, pairs: Sequence[_Pair], out_dir: Path, shard_size: int
) -> list[str]:
    columns = _meta_columns(pairs)
    written: list[str] = []
    for number, chunk in enumerate(_chunks(pairs, shard_size)):
        path = f"{root}/shard-{number:06d}.tar"
        with (
            _open_for_write(fs, path) as fh,
            # "w|": a stream, written block by block; a remote file cannot seek anyway.
            tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for pair in chunk:
                item = _load(pair, out_dir)
                key = _sample_key(pair)
                # A URL input has no bytes here: its sample has no .original member and
                # the URL is in the .json.
                if item.original is not None:
                    ext = _ext(str(pair.image_path), item.original)
                    _tar_member(tar, f"{key}.original.{ext}", item.original)
                _tar_member(tar, f"{key}.edited.{_ext(pair.file_name, item.edited)}", item.edited)
                _tar_member(tar, f"{key}.json", _sample_json(pair, columns))
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
) -> list[str]:
    """Write the completed pairs of ``out_dir`` as a dataset; return the files written.

    ``fmt`` is ``"parquet"`` (``DEST/data/train-NNNNN-of-NNNNN.parquet``, the Hub's
    naming: columns ``original_image``, ``edit_prompt``, ``edited_image``, ``row``,
    ``seed``, ``model``, ``prediction_id`` and the meta fields; images as
    ``{bytes, path}``) or ``"webdataset"`` (``DEST/shard-NNNNNN.tar`` holding
    ``<key>.original.<ext>``, ``<key>.edited.<ext>`` and ``<key>.json`` per output).
    One dataset row per output file, sorted by output name; ``shard_size`` rows per
    file. ``DEST`` is ``to`` — a folder or an fsspec URL such as ``s3://bucket/prefix``,
    with ``storage_options`` for its filesystem (credentials, ``client_kwargs``; S3 also
    honours ``AWS_ENDPOINT_URL``) — or by default ``OUT_DIR/.export/<fmt>``.

    An input given as a URL is stored as its URL (Parquet: ``path`` set, ``bytes``
    null; WebDataset: no ``.original`` member); an output whose local input is gone is
    left out with a warning. Shards of an earlier export that this one does not
    rewrite are deleted, so the folder holds exactly this dataset.
    """
    out_dir = Path(out_dir)
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UsageError(f"--shard-size must be a positive integer, got {shard_size!r}")
    fsspec = _import_fsspec()
    if fmt == "parquet":
        _import_pyarrow()  # fail before any work when it is missing
    pairs = _usable(_collect(out_dir))
    if not pairs:
        raise UsageError(f"{out_dir} has no completed outputs to export")
    if to is not None and not to.strip():
        raise UsageError("--to needs a folder or a URL")
    dest = to if to is not None else str(out_dir / DEFAULT_EXPORT_DIR / fmt)
    fs, root = fsspec.core.url_to_fs(dest, **dict(storage_options or {}))
    root = str(root).rstrip("/")
    if fmt == "parquet" and _is_local(fs) and _visible_inside(Path(root), out_dir):
        log.warning(
            'wsbatch: warning: %s is inside %s: load_dataset("imagefolder", data_dir=...) '
            "would take its train-* files for a split; export elsewhere or to a hidden folder",
            root,
            out_dir,
        )
    write = _write_parquet if fmt == "parquet" else _write_webdataset
    return [_public(fs, path) for path in write(fs, root, pairs, out_dir, shard_size)]
