"""Parse a manifest (YAML, CSV, JSON Lines) into validated, frozen rows.

Every problem in the file is collected and reported at once as
``FILE:LINE: field: reason``; nothing here touches the network.
"""

from __future__ import annotations

import csv
import difflib
import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batch.errors import ManifestError, Problem

DEFAULT_MODEL = "wavespeed-ai/hidream-e1-full"
OUTPUT_FORMATS = ("jpeg", "png", "webp")
SEED_MIN, SEED_MAX = -1, 2_147_483_647
MAX_PROMPT_CHARS = 10_000
MAX_REPEAT = 10_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

ROW_FIELDS = (
    "id",
    "image",
    "images",
    "prompt",
    "prompts",
    "seed",
    "seeds",
    "output_format",
    "params",
    "repeat",
    "meta",
)
DEFAULT_FIELDS = ("seed", "output_format", "params", "repeat", "prompt", "meta")
SETTING_FIELDS = ("concurrency", "rate", "timeout", "retries", "budget", "price", "out")
TOP_FIELDS = ("model", "defaults", "rows", *SETTING_FIELDS)
CSV_COLUMNS = ("id", "image", "prompt", "seed", "output_format", "repeat")
RESERVED_PARAMS = ("prompt", "image", "seed", "output_format")


@dataclass(frozen=True, slots=True)
class Row:
    """One edit to make: a single API task once expanded."""

    id: str
    image: str
    prompt: str
    seed: int
    output_format: str
    model: str
    params: Mapping[str, Any]
    meta: Mapping[str, Any]
    fingerprint: str
    source: str
    image_path: Path | None = None

    @property
    def is_url(self) -> bool:
        return self.image_path is None


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    model: str
    rows: tuple[Row, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)


class _Located(dict[str, Any]):
    """A YAML mapping that remembers its own line and each key's line."""

    line: int = 0
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_located(loader: _LineLoader, node: yaml.MappingNode) -> _Located:
    loader.flatten_mapping(node)
    mapping = _Located()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[str(key)] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[str(key)] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located)


def sniff_image(head: bytes) -> str | None:
    """Name the image format from its first bytes, or None if it is not one."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _request_hash(model: str, image: str, prompt: str, seed: int, fmt: str, params: Any) -> str:
    canonical = json.dumps(
        [model, image, prompt, seed, fmt, params], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _suggest(name: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{hint}"


@dataclass(slots=True)
class _RawRow:
    """A row as written, before checks: its fields and where each one is."""

    fields: dict[str, Any]
    line: int | None
    key_lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, key: str) -> int | None:
        return self.key_lines.get(key, self.line)


class _Builder:
    """Checks raw rows and turns them into frozen Rows, gathering every problem."""

    def __init__(self, path: Path, model: str, max_image_bytes: int) -> None:
        self.path = path
        self.source = str(path)
        self.base = path.parent
        self.model = model
        self.max_image_bytes = max_image_bytes
        self.problems: list[Problem] = []
        self.rows: list[Row] = []
        self._explicit_ids: dict[str, int | None] = {}
        self._derived_seen: dict[str, int] = {}
        self._image_checks: dict[str, str | None] = {}
        self._glob_cache: dict[str, list[str] | str] = {}

    def problem(self, line: int | None, name: str, reason: str) -> None:
        self.problems.append(Problem(self.source, line, name, reason))

    # -- field checks ----------------------------------------------------

    def _check_image(self, ref: str, line: int | None, name: str) -> Path | bool | None:
        """Return the local path, None for a URL, or False after a problem."""
        if "://" in ref:
            scheme = ref.split("://", 1)[0].lower()
            if scheme not in ("http", "https"):
                self.problem(line, name, f"unsupported URL scheme '{scheme}' (use http or https)")
                return False
            if not re.match(r"https?://[^/\s]+", ref, re.IGNORECASE) or any(
                c.isspace() for c in ref
            ):
                self.problem(line, name, f"malformed URL '{ref}'")
                return False
            return None
        path = (self.base / ref).resolve()
        key = str(path)
        if key not in self._image_checks:
            self._image_checks[key] = self._probe_file(path, ref)
        reason = self._image_checks[key]
        if reason is not None:
            self.problem(line, name, reason)
            return False
        return path

    def _probe_file(self, path: Path, ref: str) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"image file '{ref}' does not exist"
        except OSError as exc:
            return f"image file '{ref}' cannot be read ({exc.strerror})"
        if not path.is_file():
            return f"image '{ref}' is not a regular file"
        if st.st_size > self.max_image_bytes:
            mb = st.st_size / 1_048_576
            cap = self.max_image_bytes / 1_048_576
            return f"image file '{ref}' is {mb:.1f} MB, over the {cap:.0f} MB limit"
        try:
            with open(path, "rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            return f"image file '{ref}' cannot be read ({exc.strerror})"
        if sniff_image(head) is None:
            return f"'{ref}' is not an image (unknown file signature)"
        return None

    def _seed(self, value: Any, line: int | None, name: str) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                value = int(value.strip())
            else:
                self.problem(line, name, f"must be an integer, got {value!r}")
                return None
        if not SEED_MIN <= value <= SEED_MAX:
            self.problem(line, name, f"{value} is out of range {SEED_MIN}..{SEED_MAX}")
            return None
        return int(value)

    def _prompt(self, value: Any, line: int | None, name: str) -> str | None:
        if not isinstance(value, str):
            self.problem(line, name, f"must be a string, got {type(value).__name__}")
            return None
        if not value.strip():
            self.problem(line, name, "must not be empty")
            return None
        if len(value) > MAX_PROMPT_CHARS:
            self.problem(line, name, f"is {len(value)} characters, over {MAX_PROMPT_CHARS}")
            return None
        return value

    def _list(self, value: Any, line: int | None, name: str) -> list[Any] | None:
        if not isinstance(value, list):
            self.problem(line, name, f"must be a list, got {type(value).__name__}")
            return None
        if not value:
            self.problem(line, name, "must not be an empty list")
            return None
        return value

    def _expand_images(self, pattern: Any, line: int | None) -> list[str] | None:
        if not isinstance(pattern, str) or not pattern.strip():
            self.problem(line, "images", "must be a glob or a folder path")
            return None
        cached = self._glob_cache.get(pattern)
        if cached is None:
            cached = self._glob(pattern)
            self._glob_cache[pattern] = cached
        if isinstance(cached, str):
            self.problem(line, "images", cached)
            return None
        return cached

    def _glob(self, pattern: str) -> list[str] | str:
        target = self.base / pattern
        if target.is_dir():
            found = [p for p in sorted(target.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                return f"folder '{pattern}' holds no image files"
        else:
            found = [
                Path(p) for p in sorted(glob.glob(str(target), recursive=True)) if Path(p).is_file()
            ]
            if not found:
                return f"'{pattern}' matches no files"
        return [os.path.relpath(p, self.base).replace(os.sep, "/") for p in found]

    # -- rows --------------------------------------------------------------

    def add(self, raw: _RawRow, defaults: Mapping[str, Any]) -> None:
        row = raw.fields
        before = len(self.problems)
        for name in row:
            if name not in ROW_FIELDS:
                self.problem(raw.line_of(name), name, _suggest(name, ROW_FIELDS))
        merged = {**defaults, **{k: v for k, v in row.items() if v is not None}}

        explicit_id = merged.get("id")
        if explicit_id is not None:
            explicit_id = self._check_id(explicit_id, raw)

        images = self._one_or_many(merged, raw, "image", "images")
        prompts = self._one_or_many(merged, raw, "prompt", "prompts")
        seeds = self._one_or_many(merged, raw, "seed", "seeds", default=-1)

        fmt = merged.get("output_format", "jpeg")
        if fmt not in OUTPUT_FORMATS:
            self.problem(
                raw.line_of("output_format"),
                "output_format",
                f"must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}",
            )
        params = merged.get("params", {})
        if not isinstance(params, dict):
            self.problem(raw.line_of("params"), "params", "must be a mapping")
            params = {}
        for name in params:
            if name in RESERVED_PARAMS:
                self.problem(raw.line_of("params"), f"params.{name}", "set it as a row field")
        params = {str(k): v for k, v in params.items()}
        try:
            json.dumps(params)
        except (TypeError, ValueError):
            self.problem(raw.line_of("params"), "params", "values must be JSON data")
            params = {}
        meta = self._meta(merged.get("meta", {}), raw)
        repeat = merged.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            self.problem(raw.line_of("repeat"), "repeat", f"must be an integer 1..{MAX_REPEAT}")
            repeat = 1

        if len(self.problems) > before or images is None or prompts is None or seeds is None:
            return
        combos = [(i, p, s) for i in images for p in prompts for s in seeds]
        count = len(combos) * repeat
        if explicit_id is not None and count > 1:
            self.problem(
                raw.line_of("id"),
                "id",
                "an explicit id names one task; drop 'repeat' or the lists, or drop the id",
            )
            return
        for image_ref, prompt, seed in combos:
            image_path = self._check_image(
                image_ref,
                raw.line_of("image") or raw.line_of("images"),
                "image" if "image" in merged else "images",
            )
            checked_prompt = self._prompt(
                prompt, raw.line_of("prompt") or raw.line_of("prompts"), "prompt"
            )
            checked_seed = self._seed(seed, raw.line_of("seed") or raw.line_of("seeds"), "seed")
            if image_path is False or checked_prompt is None or checked_seed is None:
                continue
            digest = _request_hash(self.model, image_ref, checked_prompt, checked_seed, fmt, params)
            for _ in range(repeat):
                row_id = explicit_id or self._derived_id(digest)
                self.rows.append(
                    Row(
                        id=row_id,
                        image=image_ref,
                        prompt=checked_prompt,
                        seed=checked_seed,
                        output_format=fmt,
                        model=self.model,
                        params=params,
                        meta=meta,
                        fingerprint=digest[:32],
                        source=f"{self.source}:{raw.line}" if raw.line else self.source,
                        image_path=image_path if isinstance(image_path, Path) else None,
                    )
                )

    def _one_or_many(
        self, merged: dict[str, Any], raw: _RawRow, one: str, many: str, default: Any = None
    ) -> list[Any] | None:
        if one in raw.fields and many in raw.fields:
            self.problem(raw.line_of(many), many, f"give either '{one}' or '{many}', not both")
            return None
        # The row's own field beats the defaults; the single form beats the list.
        if one in raw.fields:
            chosen = one
        elif many in raw.fields:
            chosen = many
        elif one in merged:
            chosen = one
        elif many in merged:
            chosen = many
        elif default is not None:
            return [default]
        else:
            self.problem(raw.line, one, "is required")
            return None
        value = merged[chosen]
        if chosen == "images":
            return self._expand_images(value, raw.line_of(chosen))
        if chosen == many:
            return self._list(value, raw.line_of(chosen), chosen)
        if one == "image" and not (isinstance(value, str) and value.strip()):
            self.problem(raw.line_of(one), one, "must be a non-empty path or URL")
            return None
        return [value]

    def _meta(self, value: Any, raw: _RawRow) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problem(raw.line_of("meta"), "meta", "must be a mapping of names to scalars")
            return {}
        for key, item in value.items():
            if item is not None and not isinstance(item, (str, int, float, bool)):
                self.problem(raw.line_of("meta"), f"meta.{key}", "must be a scalar")
        return {str(k): v for k, v in value.items()}

    def _check_id(self, value: Any, raw: _RawRow) -> str | None:
        line = raw.line_of("id")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problem(line, "id", f"must be a string, got {type(value).__name__}")
            return None
        text = str(value)
        if not ID_PATTERN.fullmatch(text) or text in (".", ".."):
            self.problem(
                line,
                "id",
                f"'{text}' is not a valid id: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 128 characters",
            )
            return None
        first = self._explicit_ids.get(text, -1)
        if first != -1:
            where = f" (first at line {first})" if first else ""
            self.problem(line, "id", f"duplicate id '{text}'{where}")
            return None
        self._explicit_ids[text] = line
        return text

    def _derived_id(self, digest: str) -> str:
        base = digest[:12]
        n = self._derived_seen.get(base, 0) + 1
        self._derived_seen[base] = n
        # Identical rows are legal (repeat sampling): each copy is its own task.
        return base if n == 1 else f"{base}_{n}"

    def finish(self) -> tuple[Row, ...]:
        derived = {r.id for r in self.rows if r.id not in self._explicit_ids}
        for row_id, line in self._explicit_ids.items():
            if row_id in derived:
                self.problem(line, "id", f"'{row_id}' collides with a derived id")
        if self.problems:
            raise ManifestError(self.problems)
        return tuple(self.rows)


# -- file formats -----------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError([Problem(str(path), None, "manifest", "file does not exist")]) from None
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror})"
        raise ManifestError([Problem(str(path), None, "manifest", reason)]) from None
    if b"\x00" in data:
        raise ManifestError([Problem(str(path), None, "manifest", "is binary, not text")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError([Problem(str(path), line, "manifest", "is not valid UTF-8")]) from None
    if not text.strip():
        raise ManifestError([Problem(str(path), None, "manifest", "is empty")])
    return text


def _yaml_rows(path: Path, text: str) -> tuple[Any, list[_RawRow]]:
    source = str(path)
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError([Problem(source, line, "yaml", f"syntax error: {what}")]) from None
    top: dict[str, Any] = {}
    items: Any
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict):
        top = doc
        problems = []
        for name in doc:
            if name not in TOP_FIELDS:
                line = getattr(doc, "key_lines", {}).get(name)
                problems.append(Problem(source, line, name, _suggest(name, TOP_FIELDS)))
        if "rows" not in doc:
            problems.append(Problem(source, getattr(doc, "line", None), "rows", "is required"))
        if problems:
            raise ManifestError(problems)
        items = doc["rows"]
        if not isinstance(items, list):
            line = doc.key_lines.get("rows") if isinstance(doc, _Located) else None
            raise ManifestError([Problem(source, line, "rows", "must be a list of rows")])
    else:
        raise ManifestError(
            [Problem(source, 1, "manifest", "must be a list of rows or a mapping with 'rows'")]
        )
    raws: list[_RawRow] = []
    problems = []
    for item in items:
        if not isinstance(item, _Located):
            problems.append(
                Problem(source, None, "rows", f"each row must be a mapping, got {item!r}")
            )
            continue
        raws.append(_RawRow(dict(item), item.line, dict(item.key_lines)))
    if problems:
        raise ManifestError(problems)
    return top, raws


def _jsonl_rows(path: Path, text: str) -> list[_RawRow]:
    raws: list[_RawRow] = []
    problems: list[Problem] = []
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), number, "json", f"syntax error: {exc.msg}"))
            continue
        if not isinstance(item, dict):
            problems.append(Problem(str(path), number, "json", "each line must be a JSON object"))
            continue
        raws.append(_RawRow(item, number))
    if problems:
        raise ManifestError(problems)
    return raws


def _csv_rows(path: Path, text: str) -> list[_RawRow]:
    source = str(path)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ManifestError([Problem(source, 1, "csv", f"syntax error: {exc}")]) from None
    header = [h.strip() for h in header]
    problems: list[Problem] = []
    for name in header:
        if name not in CSV_COLUMNS and not name.startswith(("meta.", "params.")):
            problems.append(Problem(source, 1, name, _suggest(name, CSV_COLUMNS)))
    for required in ("image", "prompt"):
        if required not in header:
            problems.append(Problem(source, 1, required, "required column is missing"))
    if len(set(header)) != len(header):
        problems.append(Problem(source, 1, "header", "a column name appears twice"))
    if problems:
        raise ManifestError(problems)
    raws: list[_RawRow] = []
    line = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ManifestError(
                [Problem(source, reader.line_num, "csv", f"syntax error: {exc}")]
            ) from None
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            reason = f"has {len(values)} columns, the header has {len(header)}"
            problems.append(Problem(source, line, "csv", reason))
            continue
        fields: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for name, value in zip(header, values, strict=True):
            if name.startswith("meta."):
                meta[name[5:]] = value
            elif name.startswith("params."):
                params[name[7:]] = _csv_scalar(value)
            elif value.strip() != "":
                fields[name] = int(value) if name == "repeat" and value.strip().isdigit() else value
        if meta:
            fields["meta"] = meta
        if params:
            fields["params"] = params
        raws.append(_RawRow(fields, line))
    if problems:
        raise ManifestError(problems)
    return raws


def _csv_scalar(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def load_manifest(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Manifest:
    """Read and validate a whole manifest; raise ManifestError listing every problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".csv", ".jsonl"):
        reason = "unknown manifest type: use .yaml, .yml, .csv or .jsonl"
        raise ManifestError([Problem(str(path), None, "manifest", reason)])
    text = _read_text(path)
    top: dict[str, Any] = {}
    if suffix in (".yaml", ".yml"):
        top, raws = _yaml_rows(path, text)
    elif suffix == ".jsonl":
        raws = _jsonl_rows(path, text)
    else:
        raws = _csv_rows(path, text)

    lines = top.key_lines if isinstance(top, _Located) else {}
    problems: list[Problem] = []
    manifest_model = top.get("model", DEFAULT_MODEL)
    if not isinstance(manifest_model, str) or not re.fullmatch(
        r"[\w.-]+(/[\w.-]+)*", manifest_model
    ):
        problems.append(
            Problem(str(path), lines.get("model"), "model", "must be a model id like 'owner/name'")
        )
        manifest_model = DEFAULT_MODEL
    defaults = top.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(Problem(str(path), lines.get("defaults"), "defaults", "must be a mapping"))
        defaults = {}
    dlines = defaults.key_lines if isinstance(defaults, _Located) else {}
    for name in defaults:
        if name not in DEFAULT_FIELDS:
            problems.append(
                Problem(
                    str(path), dlines.get(name), f"defaults.{name}", _suggest(name, DEFAULT_FIELDS)
                )
            )
    settings = {k: top[k] for k in SETTING_FIELDS if k in top}
    problems += _check_settings(path, settings, lines)

    builder = _Builder(path, model or manifest_model, max_image_bytes)
    builder.problems.extend(problems)
    for raw in raws:
        builder.add(raw, defaults)
    rows = builder.finish()
    return Manifest(path=path, model=model or manifest_model, rows=rows, settings=settings)


def _check_settings(path: Path, settings: dict[str, Any], lines: dict[str, int]) -> list[Problem]:
    problems = []
    for name, value in settings.items():
        if name == "out":
            ok = isinstance(value, str) and bool(value.strip())
        elif name in ("concurrency", "retries"):
            ok = (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value >= (1 if name == "concurrency" else 0)
            )
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            problems.append(Problem(str(path), lines.get(name), name, f"invalid value {value!r}"))
    return problems
