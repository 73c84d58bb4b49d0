"""Parse a manifest (YAML, CSV, JSON Lines) into validated, frozen rows.

Every problem in the file is collected and reported at once as
``FILE:LINE: field: reason``; nothing here touches the network.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import reprlib
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import yaml

from batch.bulk import gc_paused
from batch.errors import ManifestError, Problem
from batch.images import sniff_image

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
_ROW_FIELD_SET = frozenset(ROW_FIELDS)
_PLAIN_FIELDS = frozenset({"id", "image", "prompt", "seed", "output_format"})
_SEED_TEXT = re.compile(r"-?[0-9]{1,20}")
DEFAULT_FIELDS = ("seed", "output_format", "params", "repeat", "prompt", "meta")
SETTING_FIELDS = ("concurrency", "rate", "timeout", "retries", "budget", "price", "out")
TOP_FIELDS = ("model", "models", "defaults", "rows", *SETTING_FIELDS)
CSV_COLUMNS = ("id", "image", "prompt", "seed", "output_format", "repeat")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_NO_LINES: Mapping[str, int] = MappingProxyType({})
RESERVED_PARAMS = ("prompt", "image", "seed", "output_format")

# Limits no real manifest reaches; past them a file is refused at once, before it can
# cost minutes or gigabytes (alias bombs, a three-line product of a billion rows).
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_MODELS = 10  # models side by side in one manifest
CSV_IMAGE_SEPARATOR = "|"  # several input images of one task in one CSV cell
MAX_INPUTS = 10  # input images of one task, the most any multi-image model takes
MAX_ROWS = 1_000_000  # tasks, counted after images x prompts x seeds x repeat
MAX_DEPTH = 20  # nesting of YAML collections, and of JSON inside params and meta
MAX_ALIAS_CHARS = 64 * 1024 * 1024  # what YAML aliases expand to, all together
MAX_PARAMS_BYTES = 64 * 1024  # a row's params (and its meta) as JSON
_SURROGATE = re.compile("[\ud800-\udfff]")
# How json.dumps writes a string (ensure_ascii): the same C function it calls.
_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii


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
    # The manifest file (one string that every row shares) and the row's line in it:
    # ``source`` says "file:line" when asked, and a million rows carry no million copies.
    source_file: str
    image_path: Path | None = None
    # Further input images of one task (``image: [a.png, b.png]``), for models that take
    # a list; ``image``/``image_path`` are the first.
    extra_images: tuple[tuple[str, Path | None], ...] = ()
    line: int | None = None

    @property
    def source(self) -> str:
        """Where the row was written: "file:line", or the file alone."""
        return f"{self.source_file}:{self.line}" if self.line else self.source_file

    @property
    def is_url(self) -> bool:
        return self.image_path is None

    @property
    def inputs(self) -> tuple[tuple[str, Path | None], ...]:
        """Every input image of the task, the first one first."""
        return ((self.image, self.image_path), *self.extra_images)


# What rows share: (image, image_path, output_format, params, meta, extra_images).
_Kind = tuple[str, Path | None, str, Mapping[str, Any], Mapping[str, Any], tuple[Any, ...]]


class RowTable(Sequence[Row]):
    """A manifest's rows, kept as columns; each ``Row`` is made when it is asked for.

    A million rows are a few lists and arrays (about a hundred bytes a row), not a
    million objects: a resume plans from ``ids`` and ``fingerprints`` and never makes
    the ``Row`` of a finished row, and a run makes each of its rows as a worker takes it.
    """

    __slots__ = (
        "_fps",
        "_kind_of",
        "_kinds",
        "_lines",
        "_seeds",
        "ids",
        "model",
        "prompts",
        "source_file",
    )

    def __init__(self, model: str, source_file: str) -> None:
        self.model = model
        self.source_file = source_file
        self.ids: list[str] = []
        self.prompts: list[str] = []
        self._seeds = array("i")  # SEED_MIN..SEED_MAX
        self._lines = array("i")  # 0: no line (rows from the command line)
        self._fps = bytearray()  # 16 bytes a row: the fingerprint's 32 hex digits
        self._kinds: list[_Kind] = []
        self._kind_of = array("I")

    def add_kind(self, kind: _Kind) -> int:
        """Keep what a run of rows shares; the number rows then refer to it by."""
        self._kinds.append(kind)
        return len(self._kinds) - 1

    def append(
        self, row_id: str, prompt: str, seed: int, digest: bytes, line: int | None, kind: int
    ) -> None:
        self.ids.append(row_id)
        self.prompts.append(prompt)
        self._seeds.append(seed)
        self._lines.append(line or 0)
        self._fps += digest[:16]
        self._kind_of.append(kind)

    def line_at(self, n: int) -> int | None:
        """The manifest line of the row at ``n`` (None: a row from the command line)."""
        return self._lines[n] or None

    def fingerprints(self) -> Iterator[str]:
        """Each row's fingerprint, in order, made one at a time (in C)."""
        fps, size = self._fps, len(self._fps)
        cuts = map(slice, range(0, size, 16), range(16, size + 16, 16))
        return map(bytearray.hex, map(fps.__getitem__, cuts))

    def samples(self) -> list[tuple[int, Row]]:
        """(kind, row): one row of each set of shared fields (image, format, params, meta,
        inputs), the first that has it. A check that looks at nothing else of a row looks
        at these alone."""
        first: dict[int, int] = {}
        for n, kind in enumerate(self._kind_of):
            first.setdefault(kind, n)
        return [(kind, self._row(n)) for kind, n in first.items()]

    def of_kinds(self, kinds: Iterable[int]) -> Iterator[Row]:
        """Every row, in order, of one of ``kinds`` (as ``samples`` numbers them)."""
        wanted = set(kinds)
        return (self._row(n) for n, kind in enumerate(self._kind_of) if kind in wanted)

    def take(self, indices: Iterable[int]) -> RowTable:
        """The rows at ``indices``, as a table of their own (a shard's, those to submit),
        copied column by column in C."""
        picked = array("I", indices)
        part = RowTable(self.model, self.source_file)
        part.ids = list(map(self.ids.__getitem__, picked))
        part.prompts = list(map(self.prompts.__getitem__, picked))
        part._seeds = array("i", map(self._seeds.__getitem__, picked))
        part._lines = array("i", map(self._lines.__getitem__, picked))
        part._kind_of = array("I", map(self._kind_of.__getitem__, picked))
        part._kinds = self._kinds  # shared, and never changed once the manifest is read
        cuts = map(slice, map((16).__mul__, picked), map((16).__mul__, map((1).__add__, picked)))
        part._fps = bytearray(b"".join(map(self._fps.__getitem__, cuts)))
        return part

    def _row(self, n: int) -> Row:
        image, image_path, fmt, params, meta, extra = self._kinds[self._kind_of[n]]
        return Row(
            self.ids[n],
            image,
            self.prompts[n],
            self._seeds[n],
            fmt,
            self.model,
            params,
            meta,
            self._fps[16 * n : 16 * n + 16].hex(),
            self.source_file,
            image_path,
            extra,
            self._lines[n] or None,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Row, ...]: ...

    def __getitem__(self, index: int | slice) -> Row | tuple[Row, ...]:
        if isinstance(index, slice):
            return tuple(map(self._row, range(len(self.ids))[index]))
        if index < 0:
            index += len(self.ids)
        if not 0 <= index < len(self.ids):
            raise IndexError("row index out of range")
        return self._row(index)

    def __iter__(self) -> Iterator[Row]:
        return map(self._row, range(len(self.ids)))

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same rows, as the tuple it stands for would be."""
        if not isinstance(other, RowTable | tuple | list):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, as a tuple is not


def ids_and_fingerprints(rows: Sequence[Row]) -> Iterator[tuple[str, str]]:
    """(id, fingerprint) of each row, without making the rows of a ``RowTable``."""
    if isinstance(rows, RowTable):
        return zip(rows.ids, rows.fingerprints(), strict=True)
    return ((row.id, row.fingerprint) for row in rows)


def models_of(rows: Iterable[Row]) -> Iterable[str]:
    """Each row's model, without making the rows of a ``RowTable`` (one model for all)."""
    if isinstance(rows, RowTable):
        return repeat(rows.model, len(rows))
    return (row.model for row in rows)


def row_ids(rows: Sequence[Row]) -> Iterable[str]:
    """Each row's id, without making the rows of a ``RowTable``."""
    return rows.ids if isinstance(rows, RowTable) else (row.id for row in rows)


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path
    model: str
    rows: Sequence[Row]
    settings: Mapping[str, Any] = field(default_factory=dict)


class _Located(dict[str, Any]):
    """A YAML mapping that remembers its own line, each key's line and repeated keys."""

    line: int = 0
    key_lines: dict[str, int]
    duplicates: list[tuple[str, int]]


class _LocatedList(list[Any]):
    """A YAML sequence that remembers the line of each item."""

    item_lines: list[int]


class _LimitError(yaml.composer.ComposerError):
    """A document past one of the limits on nesting and aliases."""


def _refuse(reason: str, event: Any) -> _LimitError:
    return _LimitError(None, None, reason, event.start_mark)


class _LineLoader(yaml.SafeLoader):
    """SafeLoader with lines on every value, and limits on nesting and aliases.

    Constructed values are shared between an anchor and its aliases, but whatever walks
    them later (hashing params, printing a value) pays for every repetition: a few
    hundred bytes of nested aliases stand for gigabytes. So each alias is charged what
    it would cost written out, and the document is refused once that passes a limit.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._open: set[str] = set()  # anchors of collections still being composed
        self._alias_chars = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (chars, height)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _refuse(f"alias *{event.anchor} is inside its own anchor", event)
            node = super().compose_node(parent, index)
            chars, height = self._measure(node) if node is not None else (0, 0)
            self._alias_chars += chars
            if self._alias_chars > MAX_ALIAS_CHARS:
                limit = MAX_ALIAS_CHARS // 1_048_576
                raise _refuse(f"aliases expand to over {limit} MB (limit on aliases)", event)
            if self._depth + height >= MAX_DEPTH:  # its values sit one level further down
                reason = f"alias *{event.anchor} nests values over {MAX_DEPTH} levels (limit)"
                raise _refuse(reason, event)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _refuse(f"nested over {MAX_DEPTH} levels deep (limit)", event)
        anchor = getattr(event, "anchor", None)
        nested = isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent))
        if anchor and nested:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor and nested:
                self._open.discard(anchor)

    def _measure(self, node: yaml.Node) -> tuple[int, int]:
        """(characters written out, levels of nesting) of a finished node; memoised."""
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.ScalarNode):
            found = (len(node.value) + 2, 0)
        else:
            children: list[yaml.Node] = (
                [part for pair in node.value for part in pair]
                if isinstance(node, yaml.MappingNode)
                else list(node.value)
            )
            chars, height = 2, 0
            for child in children:
                c, h = self._measure(child)
                chars += c
                height = max(height, h)
            found = (chars, height + 1)
        self._sizes[id(node)] = found
        return found

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar the resolver typed but Python refuses (2020-13-45, !!int abc,
        # an int of 5000 digits) raises ValueError & co. without a line: give it one.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid value ({exc})", node.start_mark
            ) from None


def _construct_located(loader: _LineLoader, node: yaml.MappingNode) -> _Located:
    own = sum(1 for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # puts keys merged in with `<<` first, the node's own last
    first_own = len(node.value) - own
    mapping = _Located()
    mapping.line = node.start_mark.line + 1
    mapping.key_lines = {}
    mapping.duplicates = []
    own_keys: set[str] = set()
    for index, (key_node, value_node) in enumerate(node.value):
        if not isinstance(key_node, yaml.ScalarNode):
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            )
        key = str(loader.construct_object(key_node, deep=True))
        line = key_node.start_mark.line + 1
        if index >= first_own:  # overriding a merged key is what `<<` is for
            if key in own_keys:
                mapping.duplicates.append((key, line))
            own_keys.add(key)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = line
    return mapping


def _construct_located_list(loader: _LineLoader, node: yaml.SequenceNode) -> _LocatedList:
    sequence = _LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    sequence.item_lines = [child.start_mark.line + 1 for child in node.value]
    return sequence


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_located)
_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_located_list
)


def shard_of(row_id: str, count: int) -> int:
    """The shard (0..count-1) a row belongs to: a stable hash of its id."""
    return int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") % count


def canonical_params(params: Any) -> str:
    # allow_nan=False: the checks let through only what strict JSON carries.
    return json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _request_hash(model: str, image: str, prompt: str, seed: int, fmt: str, params: str) -> str:
    """sha256 of ``[model, image, prompt, seed, fmt, params]`` as compact, key-sorted JSON
    (``params`` already so encoded): the text ``json.dumps`` makes of that list, built
    here from its parts because a million rows each paid for a whole dumps call."""
    return _hash_encoded(_json_str(model), _json_str(image), prompt, seed, _json_str(fmt), params)


def _hash_encoded(
    model_text: str, image_text: str, prompt: str, seed: int, fmt_text: str, params: str
) -> str:
    """``_request_hash`` with the model, image and format already JSON strings."""
    head, tail = _around(model_text, image_text, fmt_text)
    return _digest(head, prompt, seed, tail + params + "]").hex()


def _around(model_text: str, image_text: str, fmt_text: str) -> tuple[str, str]:
    """The canonical text before the prompt, and after the seed up to the params: what
    rows of one image, format and params share (the builder makes these once)."""
    return f"[{model_text},{image_text},", f",{fmt_text},"


def _digest(head: str, prompt: str, seed: int, tail: str) -> bytes:
    """sha256 of ``head``, the prompt as JSON, the seed, ``tail`` (see ``_around``)."""
    return _digest_encoded(head, _json_str(prompt), seed, tail)


def _digest_encoded(head: str, prompt_text: str, seed: int, tail: str) -> bytes:
    """``_digest`` with the prompt already a JSON string (rows share a few prompts)."""
    return hashlib.sha256(f"{head}{prompt_text},{int(seed)}{tail}".encode()).digest()


class _ShortRepr(reprlib.Repr):
    """repr that looks at a bounded part of a value, however big or deeply shared."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxdict, self.maxstring = 3, 4, 4, 60
        self.maxlong, self.maxother, self.maxtuple, self.maxset = 60, 60, 4, 4

    def repr1(self, x: Any, level: int) -> str:
        # The YAML loader's dict and list subclasses would fall back to the full repr.
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(x, level)
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(x, level)
        if x is not None and not isinstance(x, (str, int, float, list, dict, tuple, set)):
            return f"<{type(x).__name__}>"
        return super().repr1(x, level)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 200:  # repr of 5000 digits raises, and is no use anyway
            return f"<an integer of about {int(x.bit_length() * 0.30103)} digits>"
        return super().repr_int(x, level)


_REPR = _ShortRepr()


def _show(value: Any, limit: int = 60) -> str:
    """A value for a message, cut short: a 5000-digit seed or a list of a billion
    aliases should not fill the screen, nor take long to print."""
    text = str(value).split(";")[0] if isinstance(value, Exception) else _REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _suggest(name: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown field '{name}'{hint}"


_UNSENDABLE = "a lone surrogate, which cannot be sent as UTF-8"
_INT64 = (-(2**63), 2**64 - 1)  # what any JSON decoder on the other side can hold


def _json_problems(value: dict[Any, Any], scalars_only: bool) -> list[tuple[str, str]]:
    """Why a params (or meta) mapping is not exactly what strict JSON can carry.

    Walks at most MAX_PARAMS_BYTES worth of it and MAX_DEPTH levels, so a value
    shared a billion times over is refused quickly. Each problem is a path under the
    mapping (".steps", ".sizes[2]") and a reason.
    """
    problems: list[tuple[str, str]] = []
    budget = MAX_PARAMS_BYTES
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack and len(problems) < 10:
        where, item, depth = stack.pop()
        if isinstance(item, str):
            budget -= len(item) + 3
            if _SURROGATE.search(item):
                problems.append((where, f"is not valid Unicode text ({_UNSENDABLE})"))
        elif item is None or isinstance(item, bool):
            budget -= 5
        elif isinstance(item, int):
            budget -= 8
            if not _INT64[0] <= item <= _INT64[1]:
                problems.append((where, f"{_show(item)} is too large a number to send"))
        elif isinstance(item, float):
            budget -= 8
            if not math.isfinite(item):
                problems.append((where, f"{item} is not a finite number (JSON has none)"))
        elif scalars_only and depth > 0:
            problems.append((where, "must be a scalar"))
        elif depth >= MAX_DEPTH:
            problems.append((where, f"nests over {MAX_DEPTH} levels deep (limit)"))
        elif isinstance(item, list):
            budget -= 2 + len(item)
            if budget >= 0:
                stack.extend((f"{where}[{i}]", x, depth + 1) for i, x in enumerate(item))
        elif isinstance(item, dict):
            budget -= 2 + 4 * len(item)
            if budget >= 0:
                for key, x in item.items():
                    name = str(key)
                    budget -= len(name)
                    if _SURROGATE.search(name):
                        problems.append((f"{where}.{_show(name)}", f"key: {_UNSENDABLE}"))
                    stack.append((f"{where}.{name}", x, depth + 1))
        else:
            problems.append((where, f"must be JSON data, got {type(item).__name__}"))
        if budget < 0:
            limit = MAX_PARAMS_BYTES // 1024
            return [("", f"is over {limit} KB as JSON (limit on params and meta per row)")]
    return problems


@dataclass(slots=True)
class _RawRow:
    """A row as written, before checks: its fields and where each one is."""

    fields: dict[str, Any]
    line: int | None
    # Shared: CSV and JSON Lines rows have none, and a million rows need no million dicts.
    key_lines: Mapping[str, int] = field(default_factory=lambda: _NO_LINES)

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
        self._reported: set[Problem] = set()
        self._seen = 0  # problems found, counting repeats that are reported once
        self.rows = RowTable(model, self.source)
        self._kinds: dict[tuple[Any, ...], tuple[int, str, str]] = {}  # see _append
        self._texts: dict[tuple[Any, ...], tuple[str, str]] = {}
        # Explicit ids, and the line of those whose line the table cannot tell (a plain
        # CSV row's is its own, in the table): a million line numbers are 30 MB of ints.
        self._explicit_ids: set[str] = set()
        self._id_lines: dict[str, int | None] = {}
        self._id_rows: dict[str, int] = {}  # made on the first duplicate only
        self._id_rows_upto = 0  # rows of the table in _id_rows
        self._derived_ids: set[str] = set()
        self._derived_seen: dict[str, int] = {}
        self._image_checks: dict[str, str | None] = {}
        self._ref_checks: dict[str, tuple[Path | bool | None, list[str], str]] = {}
        self._glob_cache: dict[str, list[str] | str] = {}
        self._planned = 0  # tasks the rows so far expand to
        self._full = False  # past MAX_ROWS: the rest is not looked at
        # params and meta by identity: defaults and YAML aliases share one object
        self._json_checks: dict[int, tuple[Any, list[tuple[str, str]], Any]] = {}
        self._plans: list[tuple[Any, ...]] = []  # rows from the first that expands on
        self._params_texts: dict[int, tuple[Any, str]] = {}
        # Each prompt a row passed, as one shared string and its JSON text: a million rows
        # of a few edits keep a few prompts, encoded once.
        self._prompts: dict[str, tuple[str, str]] = {}
        # (image, format) of plain rows -> what _kind gives them, and their input's path
        self._plain_kinds: dict[tuple[str, str], tuple[tuple[int, str, str], Path | None, str]] = {}
        self._model_text = _json_str(model)

    def problem(self, line: int | None, name: str, reason: str) -> None:
        # A row that expands (prompts x images x seeds) would repeat the same problem.
        found = Problem(self.source, line, name, reason)
        self._seen += 1
        if found not in self._reported:
            self._reported.add(found)
            self.problems.append(found)

    # -- field checks ----------------------------------------------------

    def _check_image(self, ref: str, line: int | None, name: str) -> Path | bool | None:
        """Return the local path, None for a URL, or False after a problem."""
        # Large manifests name the same few images over and over: check each once.
        cached = self._ref_checks.get(ref)
        if cached is None:
            before = len(self.problems)
            result = self._check_image_once(ref, line, name)
            reasons = [p.reason for p in self.problems[before:]]
            self._ref_checks[ref] = cached = (result, reasons, ref)
            return result
        result, reasons, _ = cached
        for reason in reasons:
            self.problem(line, name, reason)
        return result

    def _check_image_once(self, ref: str, line: int | None, name: str) -> Path | bool | None:
        if _SURROGATE.search(ref):
            self.problem(line, name, f"{_show(ref)} is not valid Unicode text ({_UNSENDABLE})")
            return False
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
        if "\x00" in ref:
            self.problem(line, name, "image path contains a NUL character")
            return False
        try:
            path = (self.base / ref).resolve()
        except (OSError, ValueError, RuntimeError) as exc:
            self.problem(line, name, f"image path '{ref}' cannot be resolved ({exc})")
            return False
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
        except (OSError, ValueError) as exc:
            return f"image file '{ref}' cannot be read ({getattr(exc, 'strerror', None) or exc})"
        if not stat.S_ISREG(st.st_mode):
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
            if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,20}", value.strip()):
                value = int(value.strip())
            else:
                self.problem(line, name, f"must be an integer, got {_show(value)}")
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
        if _SURROGATE.search(value):
            self.problem(line, name, f"is not valid Unicode text ({_UNSENDABLE})")
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
        if _SURROGATE.search(pattern):
            return f"{_show(pattern)} is not valid Unicode text ({_UNSENDABLE})"
        target = self.base / pattern
        try:
            if target.is_dir():
                found = [
                    p
                    for p in sorted(target.iterdir())
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")  # macOS "._x.png" and other hidden files
                    and p.is_file()
                ]
                if not found:
                    return f"folder '{pattern}' holds no image files"
            else:
                # base, not base/pattern: the manifest's own folder may hold [ ] * ?
                found = [p for p in map(Path, _glob_paths(str(self.base), pattern)) if p.is_file()]
                if not found:
                    return f"'{pattern}' matches no files"
        except (OSError, ValueError, RecursionError) as exc:
            return f"'{pattern}' cannot be listed ({getattr(exc, 'strerror', None) or exc})"
        # A file reached twice (a symlink to it, a linked folder) is one image: one row,
        # named by a path without links if there is one, else by the first in order.
        real_base = os.path.realpath(self.base)
        best: dict[str, tuple[bool, str]] = {}
        for p in found:
            rel = os.path.relpath(p, self.base)
            real = os.path.realpath(p)
            key = (real != os.path.normpath(os.path.join(real_base, rel)), rel)
            if real not in best or key < best[real]:
                best[real] = key
        return sorted(rel.replace(os.sep, "/") for _, rel in best.values())

    # -- rows --------------------------------------------------------------

    def add(
        self,
        raw: _RawRow,
        defaults: Mapping[str, Any],
        default_lines: Mapping[str, int] | None = None,
    ) -> None:
        if self._full:
            return
        if not defaults and self._add_plain(raw):
            return
        row = raw.fields
        before = self._seen
        for name in row:
            if name not in _ROW_FIELD_SET:
                self.problem(raw.line_of(name), name, _suggest(name, ROW_FIELDS))
        merged = {**defaults, **{k: v for k, v in row.items() if v is not None}}
        key_lines, row_line = raw.key_lines, raw.line

        if default_lines:

            def where(name: str) -> tuple[int | None, str]:
                """Line and field to blame: the row's own, or the defaults' when inherited."""
                if row.get(name) is None and name in default_lines:
                    return default_lines[name], f"defaults.{name}"
                return key_lines.get(name, row_line), name
        else:

            def where(name: str) -> tuple[int | None, str]:
                return key_lines.get(name, row_line), name

        explicit_id = merged.get("id")
        if explicit_id is not None:
            explicit_id = self._check_id(explicit_id, raw)

        images = self._one_or_many(merged, raw, "image", "images", where)
        prompts = self._one_or_many(merged, raw, "prompt", "prompts", where)
        seeds = self._one_or_many(merged, raw, "seed", "seeds", where, default=-1)

        fmt = merged.get("output_format", "jpeg")
        if fmt not in OUTPUT_FORMATS:
            self.problem(
                *where("output_format"),
                f"must be one of {', '.join(OUTPUT_FORMATS)}, got {_show(fmt)}",
            )
        params = self._params(merged.get("params", {}), *where("params"))
        meta = self._meta(merged.get("meta", {}), *where("meta"))
        repeat = merged.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            self.problem(*where("repeat"), f"must be an integer 1..{MAX_REPEAT}")
            repeat = 1

        # Check every value even when something else is wrong: report all problems at once.
        checked_images: list[tuple[tuple[str, Path | None], ...]] = []
        if images is not None:
            image_line, image_field = where(images[0])
            for value in images[1]:
                group = []
                for ref in value if isinstance(value, list) else [value]:
                    image_path = self._check_image(ref, image_line, image_field)
                    if image_path is None or isinstance(image_path, Path):
                        group.append((ref, image_path))
                if group:
                    checked_images.append(tuple(group))
        checked_prompts: list[str] = []
        if prompts is not None:
            for text in prompts[1]:
                checked = self._prompt(text, *where(prompts[0]))
                if checked is not None:
                    checked_prompts.append(checked)
        checked_seeds: list[int] = []
        if seeds is not None:
            for value in seeds[1]:
                seed = self._seed(value, *where(seeds[0]))
                if seed is not None:
                    checked_seeds.append(seed)

        if self._seen > before or images is None or prompts is None or seeds is None:
            return
        # Counted before anything is built: three short lists and a repeat can ask for
        # billions of rows.
        count = len(checked_images) * len(checked_prompts) * len(checked_seeds) * repeat
        if explicit_id is not None and count > 1:
            self.problem(
                raw.line_of("id"),
                "id",
                "an explicit id names one task; drop 'repeat' or the lists, or drop the id",
            )
            return
        if not self._plan(raw, count):
            return
        self._add_plan(
            count,
            (
                raw.line,
                explicit_id,
                checked_images,
                checked_prompts,
                checked_seeds,
                repeat,
                fmt,
                params,
                meta,
            ),
        )

    def _add_plan(self, count: int, plan: tuple[Any, ...]) -> None:
        """Make a checked row's ``count`` tasks now, or keep its plan for ``finish``.

        A row of one task is made as it is read: a million such rows are never held
        twice, as plans and then as rows. A row that expands waits, with every row after
        it (rows are made in file order: derived ids count identical rows), until the
        whole manifest is known to stay within MAX_ROWS."""
        if count == 1 and not self._plans:
            self._make(plan)
        else:
            self._plans.append(plan)

    def _make(self, plan: tuple[Any, ...]) -> None:
        """Make one checked row's tasks."""
        if len(plan) == 7:  # a plain row
            line, explicit_id, image_ref, image_path, prompt, seed, fmt = plan
            self._append(
                line, explicit_id, image_ref, image_path, prompt, seed, fmt, _EMPTY, _EMPTY
            )
            return
        line, explicit_id, images, prompts, seeds, repeat, fmt, params, meta = plan
        for group in images:
            (image_ref, image_path), extra = group[0], group[1:]
            for prompt in prompts:
                for seed in seeds:
                    for _ in range(repeat):
                        self._append(
                            line,
                            explicit_id,
                            image_ref,
                            image_path,
                            prompt,
                            seed,
                            fmt,
                            params,
                            meta,
                            extra,
                        )

    def _plan(self, raw: _RawRow, count: int) -> bool:
        """Count a row's tasks against MAX_ROWS; past it, say so once and stop."""
        if self._planned + count <= MAX_ROWS:
            self._planned += count
            return True
        reason = (
            f"expands to {count:,} tasks, which takes the manifest past the limit of "
            f"{MAX_ROWS:,} rows; split it into several manifests"
        )
        self.problem(raw.line, "rows", reason)
        self._full = True
        return False

    def _append(
        self,
        line: int | None,
        explicit_id: str | None,
        image: str,
        image_path: Path | None,
        prompt: str,
        seed: int,
        fmt: str,
        params: Mapping[str, Any],
        meta: Mapping[str, Any],
        extra: tuple[tuple[str, Path | None], ...] = (),
    ) -> None:
        kind = self._kind(image, image_path, fmt, params, meta, extra)
        self._append_row(line, explicit_id, kind, prompt, seed)

    def _kind(
        self,
        image: str,
        image_path: Path | None,
        fmt: str,
        params: Mapping[str, Any],
        meta: Mapping[str, Any],
        extra: tuple[tuple[str, Path | None], ...],
    ) -> tuple[int, str, str]:
        """What rows share (params and meta by identity: rows share the very objects, from
        defaults and aliases), found once: its place in the table, and the parts of the
        request's canonical text around the prompt and seed."""
        shared = (image, image_path, fmt, id(params), id(meta), extra)
        found = self._kinds.get(shared)
        if found is None:
            texts = self._texts.get(shared[:4])  # rows that differ in meta share these
            if texts is None:
                # One input keeps the hash (and so the derived id) it always had.
                key = image if not extra else json.dumps([image, *(ref for ref, _ in extra)])
                head, tail = _around(self._model_text, _json_str(key), _json_str(fmt))
                texts = self._texts[shared[:4]] = (head, tail + self._params_json(params) + "]")
            kind = self.rows.add_kind((image, image_path, fmt, params, meta, extra))
            found = self._kinds[shared] = (kind, *texts)
        return found

    def _append_row(
        self,
        line: int | None,
        explicit_id: str | None,
        found: tuple[int, str, str],
        prompt: str,
        seed: int,
    ) -> None:
        shared = self._prompts.get(prompt)
        if shared is None:
            shared = self._prompts[prompt] = (prompt, _json_str(prompt))
        prompt, prompt_text = shared
        kind, head, tail = found
        digest = _digest_encoded(head, prompt_text, seed, tail)
        row_id = explicit_id or self._derived_id(digest.hex())
        self.rows.append(row_id, prompt, seed, digest, line, kind)

    def _add_plain(self, raw: _RawRow) -> bool:
        """Add a row of the common shape (scalar image, prompt, seed, format, id) that is
        valid, with the same checks as ``add``; False sends it down the general path,
        which also reports whatever is wrong. A 100k-row CSV takes a third of the time."""
        fields = raw.fields
        if not fields.keys() <= _PLAIN_FIELDS:
            return False
        get = fields.get
        return self.add_values(
            raw.line,
            get("id"),
            get("image"),
            get("prompt"),
            get("seed", -1),
            get("output_format", "jpeg"),
            raw.key_lines,
        )

    def add_values(
        self,
        line: int | None,
        explicit: Any,
        image: Any,
        prompt: Any,
        seed: Any,
        fmt: Any,
        key_lines: Mapping[str, int] = _NO_LINES,
    ) -> bool:
        """``_add_plain`` given the row's values (a CSV record's cells need no dict): True
        when the row was valid and added, False to send it down the general path."""
        if (
            self._planned >= MAX_ROWS
            or type(prompt) is not str
            or type(image) is not str
            or fmt not in OUTPUT_FORMATS
        ):
            return False
        if prompt not in self._prompts and (  # a prompt a row already had passed these
            not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS or _SURROGATE.search(prompt)
        ):
            return False
        if type(seed) is str and _SEED_TEXT.fullmatch(seed):
            seed = int(seed)
        if type(seed) is not int or not SEED_MIN <= seed <= SEED_MAX:
            return False
        if explicit is not None and (
            type(explicit) is not str
            or not ID_PATTERN.fullmatch(explicit)
            or explicit in (".", "..")
            or explicit in self._explicit_ids
        ):
            return False
        plain = self._plain_kinds.get((image, fmt))
        if plain is None:
            checked = self._ref_checks.get(image)  # only images already found good
            if checked is None or checked[1] or checked[0] is False:
                return False
            path = checked[0] if isinstance(checked[0], Path) else None
            # One string for the rows that share it.
            kind = self._kind(checked[2], path, fmt, _EMPTY, _EMPTY, ())
            plain = self._plain_kinds[(image, fmt)] = (kind, path, checked[2])
        if explicit is not None:
            self._explicit_ids.add(explicit)
            at = key_lines.get("id", line)
            if self._plans or at != line:  # not the line the table gets for it now
                self._id_lines[explicit] = at
        self._planned += 1
        if self._plans:  # an earlier row expands: this one waits its turn
            self._plans.append((line, explicit, plain[2], plain[1], prompt, seed, fmt))
        else:
            self._append_row(line, explicit, plain[0], prompt, seed)
        return True

    def _one_or_many(
        self,
        merged: dict[str, Any],
        raw: _RawRow,
        one: str,
        many: str,
        where: Callable[[str], tuple[int | None, str]],
        default: Any = None,
    ) -> tuple[str, list[Any]] | None:
        """The field used (``one`` or ``many``) and its values, or None after a problem."""
        # A field written empty (`image:` in YAML, null in JSON) counts as absent.
        has_one = raw.fields.get(one) is not None
        has_many = raw.fields.get(many) is not None
        if has_one and has_many:
            self.problem(raw.line_of(many), many, f"give either '{one}' or '{many}', not both")
            return None
        # The row's own field beats the defaults; the single form beats the list.
        if has_one:
            chosen = one
        elif has_many:
            chosen = many
        elif one in merged:
            chosen = one
        elif many in merged:
            chosen = many
        elif default is not None:
            return one, [default]
        else:
            self.problem(raw.line_of(one), one, "is required")
            return None
        value = merged[chosen]
        line, name = where(chosen)
        values: list[Any] | None
        if chosen == "images":
            values = self._expand_images(value, line)
        elif chosen == many:
            values = self._list(value, line, name)
        elif one == "image" and isinstance(value, list):
            # Several inputs of one task (multi-image models): one value, a list.
            if not 1 <= len(value) <= MAX_INPUTS or not all(
                isinstance(v, str) and v.strip() for v in value
            ):
                self.problem(line, name, f"must list 1..{MAX_INPUTS} non-empty paths or URLs")
                values = None
            else:
                values = [list(value)]
        elif one == "image" and not (isinstance(value, str) and value.strip()):
            self.problem(line, name, "must be a non-empty path or URL")
            values = None
        else:
            values = [value]
        return None if values is None else (chosen, values)

    def _params_json(self, params: Mapping[str, Any]) -> str:
        """A row's params as canonical JSON, encoded once per object (rows share them)."""
        if not params:
            return "{}"
        cached = self._params_texts.get(id(params))
        if cached is None or cached[0] is not params:
            cached = self._params_texts[id(params)] = (params, canonical_params(dict(params)))
        return cached[1]

    def _checked_json(
        self, value: Any, scalars_only: bool
    ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """Problems (path, reason) of a params or meta mapping, and the mapping itself.

        Checked once per object: `defaults` and YAML aliases hand the same one to
        every row."""
        cached = self._json_checks.get(id(value))
        if cached is not None and cached[0] is value:
            return cached[1], cached[2]
        problems = _json_problems(value, scalars_only)
        result = {str(k): v for k, v in value.items()} if not problems else {}
        self._json_checks[id(value)] = (value, problems, result)
        return problems, result

    def _params(self, value: Any, line: int | None, name: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.problem(line, name, "must be a mapping")
            return _EMPTY
        if not value:
            return _EMPTY  # shared: 100k rows need not carry 100k empty dicts
        problems, params = self._checked_json(value, scalars_only=False)
        for key in value:
            if key in RESERVED_PARAMS:
                self.problem(line, f"{name}.{key}", "set it as a row field")
        for where, reason in problems:
            self.problem(line, f"{name}{where}", reason)
        return params

    def _meta(self, value: Any, line: int | None, name: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.problem(line, name, "must be a mapping of names to scalars")
            return _EMPTY
        if not value:
            return _EMPTY  # shared, as for params: rows without meta share their fields
        problems, meta = self._checked_json(value, scalars_only=True)
        for where, reason in problems:
            self.problem(line, f"{name}{where}", reason)
        return meta

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
        if text in self._explicit_ids:
            first = self._first_line(text)
            where = f" (first at line {first})" if first else ""
            self.problem(line, "id", f"duplicate id '{text}'{where}")
            return None
        self._explicit_ids.add(text)
        self._id_lines[text] = line
        return text

    def _first_line(self, row_id: str) -> int | None:
        """The line of the row that took the explicit id ``row_id`` first."""
        if row_id in self._id_lines:
            return self._id_lines[row_id]
        # The table's first row of that id; indexed once, then as the table grows.
        ids, index = self.rows.ids, self._id_rows
        for n in range(self._id_rows_upto, len(ids)):
            index.setdefault(ids[n], n)
        self._id_rows_upto = len(ids)
        at = index.get(row_id)
        return None if at is None else self.rows.line_at(at)

    def _derived_id(self, digest: str) -> str:
        base = digest[:12]
        n = self._derived_seen.get(base, 0) + 1
        self._derived_seen[base] = n
        # Identical rows are legal (repeat sampling): each copy is its own task.
        row_id = base if n == 1 else f"{base}_{n}"
        self._derived_ids.add(row_id)
        return row_id

    def finish(self) -> RowTable:
        if self._full:  # nothing built, and nothing worth building
            raise ManifestError(sorted(self.problems, key=lambda p: p.line or 0))
        for plan in self._plans:
            self._make(plan)
        self._plans.clear()
        explicit, derived = self._explicit_ids, self._derived_ids
        for row_id in explicit:
            if row_id in derived:
                self.problem(
                    self._first_line(row_id), "id", f"'{row_id}' collides with a derived id"
                )
            # A task that returns several images writes <id>-1, <id>-2, ...
            stem, dash, number = row_id.rpartition("-")
            if dash and number.isdigit() and (stem in explicit or stem in derived):
                self.problem(
                    self._first_line(row_id),
                    "id",
                    f"'{row_id}' could collide with output {number} of row '{stem}'; "
                    "pick another id",
                )
        if self.problems:
            # In file order, as a compiler lists them; problems without a line first.
            raise ManifestError(sorted(self.problems, key=lambda p: p.line or 0))
        self.rows.source_file = self.source  # "command line" is set after the builder
        return self.rows


_GLOB_MAGIC = re.compile(r"[*?\[]")


def _glob_paths(base: str, pattern: str) -> list[str]:
    """Paths matching a glob pattern relative to ``base``, sorted, like ``glob.glob``
    with ``recursive=True`` (``*`` skips hidden names, ``**`` any depth of folders),
    except that ``**`` enters each real folder once, through symlinks only after the
    folders themselves: a symlink loop, or two links to one folder, cannot repeat what
    it lists or make it endless."""
    root = "/" if pattern.startswith("/") else base
    written = [part for part in pattern.split("/") if part]
    parts = [p for i, p in enumerate(written) if not (p == "**" and written[i - 1 : i] == [p])]
    found: list[str] = []
    entered: set[tuple[str, int]] = set()

    def listdir(folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except OSError:
            return []

    def walk(rel: str, i: int) -> None:
        full = os.path.join(root, rel) if rel else root
        if i == len(parts):
            found.append(full)
            return
        part = parts[i]
        if part == "**":
            if not os.path.isdir(full):
                if rel and i == len(parts) - 1:  # a trailing ** matches files as well
                    found.append(full)
                return
            key = (os.path.realpath(full), i)
            if key in entered:
                return
            entered.add(key)
            walk(rel, i + 1)  # ** matches no folder at all, too
            for name in listdir(full):
                if name.startswith("."):
                    continue
                child = os.path.join(rel, name)
                if os.path.islink(os.path.join(root, child)):
                    linked.append((child, i))  # after the real folders: their paths win
                else:
                    walk(child, i)
        elif _GLOB_MAGIC.search(part):
            for name in listdir(full):
                if (part.startswith(".") or not name.startswith(".")) and fnmatch.fnmatchcase(
                    name, part
                ):
                    walk(os.path.join(rel, name), i + 1)
        elif os.path.lexists(os.path.join(full, part)):
            walk(os.path.join(rel, part), i + 1)

    linked: list[tuple[str, int]] = []
    walk("", 0)
    while linked:
        todo = sorted(linked)
        linked.clear()
        for rel, i in todo:
            walk(rel, i)
    if pattern.endswith("/"):  # as in glob: folders only
        found = [f"{path}/" for path in found if os.path.isdir(path)]
    return sorted(found)


# -- file formats -----------------------------------------------------------


def _read_text(path: Path) -> str:
    def refuse(reason: str) -> ManifestError:
        return ManifestError([Problem(str(path), None, "manifest", reason)])

    limit = f"over the {MAX_MANIFEST_BYTES // 1_048_576} MB limit for a manifest"
    try:
        # Opened without blocking: a FIFO named m.yaml must not hang validation.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise refuse("is not a regular file")
            if st.st_size > MAX_MANIFEST_BYTES:
                raise refuse(f"is {st.st_size / 1_048_576:.0f} MB, {limit}")
            # The size it has and a byte more (to see it grow): asking for the limit
            # would set aside 256 MB for any file.
            data = fh.read(min(st.st_size, MAX_MANIFEST_BYTES) + 1)
            if len(data) > st.st_size:
                data += fh.read(MAX_MANIFEST_BYTES + 1 - len(data))
    except FileNotFoundError:
        raise refuse("file does not exist") from None
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror})") from None
    except ValueError as exc:  # a NUL in the path
        raise refuse(f"cannot be read ({exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:  # grew while being read
        raise refuse(f"is {limit}")
    if b"\x00" in data:
        raise ManifestError([Problem(str(path), None, "manifest", "is binary, not text")])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError([Problem(str(path), line, "manifest", "is not valid UTF-8")]) from None
    if not text or text.isspace():  # not strip(): a copy of the whole text
        raise ManifestError([Problem(str(path), None, "manifest", "is empty")])
    return text


def _yaml_rows(path: Path, text: str) -> tuple[dict[str, Any], list[_RawRow], list[Problem]]:
    source = str(path)
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if not isinstance(exc, (yaml.constructor.ConstructorError, _LimitError)):
            what = f"syntax error: {what}"
        context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and context_mark is not None and context_mark.line + 1 != line:
            # An unclosed bracket or quote is found lines later: say where it began.
            what += f" ({context} at line {context_mark.line + 1})"
        raise ManifestError([Problem(source, line, "yaml", what)]) from None
    except RecursionError:
        raise ManifestError([Problem(source, None, "yaml", "nested too deeply")]) from None
    top: dict[str, Any] = {}
    problems: list[Problem] = []
    items: Any = []
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, _Located):
        top = doc
        problems += _duplicate_keys(source, doc, "")
        for name in doc:
            if name not in TOP_FIELDS:
                problems.append(
                    Problem(source, doc.key_lines[name], name, _suggest(name, TOP_FIELDS))
                )
        if "rows" not in doc:
            problems.append(Problem(source, doc.line, "rows", "is required"))
        elif not isinstance(doc["rows"], list):
            problems.append(
                Problem(source, doc.key_lines["rows"], "rows", "must be a list of rows")
            )
        else:
            items = doc["rows"]
    elif doc is None:  # nothing but comments
        raise ManifestError([Problem(source, None, "manifest", "is empty")])
    else:
        raise ManifestError(
            [Problem(source, 1, "manifest", "must be a list of rows or a mapping with 'rows'")]
        )
    item_lines = items.item_lines if isinstance(items, _LocatedList) else []
    if len(items) > MAX_ROWS:
        line = item_lines[MAX_ROWS] if len(item_lines) > MAX_ROWS else None
        raise ManifestError([*problems, _too_many_rows(source, line)])
    raws: list[_RawRow] = []
    for index, item in enumerate(items):
        if not isinstance(item, _Located):
            line = item_lines[index] if index < len(item_lines) else None
            got = "nothing" if item is None else type(item).__name__
            problems.append(Problem(source, line, "rows", f"each row must be a mapping, got {got}"))
            continue
        problems += _duplicate_keys(source, item, "")
        raws.append(_RawRow(dict(item), item.line, dict(item.key_lines)))
    return top, raws, problems


def _duplicate_keys(source: str, mapping: _Located, prefix: str) -> list[Problem]:
    return [
        Problem(source, line, f"{prefix}{key}", "appears twice in one mapping")
        for key, line in mapping.duplicates
    ]


def _too_many_rows(source: str, line: int | None) -> Problem:
    reason = f"more than {MAX_ROWS:,} rows, the limit for one manifest; split it"
    return Problem(source, line, "rows", reason)


class _NotJson(ValueError):
    """A value json.loads takes but JSON does not have (NaN, Infinity)."""


def _no_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not valid JSON (no finite number)")


def _strict_object(duplicates: list[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def make(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)
        if len(found) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    duplicates.append(key)
                seen.add(key)
        return found

    return make


def _text_lines(text: str, newline: str | None) -> Iterator[str]:
    """The lines of ``text`` as ``io.StringIO(text, newline=newline)`` reads them, without
    its copy of the text at four bytes a character (250 MB for a 1M-row CSV)."""
    if text.count("\r") != text.count("\r\n"):
        yield from io.StringIO(text, newline=newline)  # a lone CR ends a line: rare
        return
    start, size = 0, len(text)
    while start < size:
        end = text.find("\n", start) + 1 or size
        line = text[start:end]
        if newline is None and line.endswith("\r\n"):
            line = line[:-2] + "\n"  # universal newlines, as StringIO translates them
        yield line
        start = end


def _jsonl_rows(path: Path, text: str, problems: list[Problem]) -> Iterator[_RawRow]:
    """Each row as read, one at a time (a million raw rows need not all be alive at
    once); problems go to ``problems`` as they are found."""
    rows = 0
    duplicates: list[str] = []
    # Strict, as YAML is: a key given twice, or NaN, is a mistake, not a value to guess at.
    decoder = json.JSONDecoder(
        object_pairs_hook=_strict_object(duplicates), parse_constant=_no_constant
    )
    for number, line in enumerate(_text_lines(text, None), start=1):
        if not line.strip():
            continue
        if rows >= MAX_ROWS:
            raise ManifestError([*problems, _too_many_rows(str(path), number)])
        duplicates.clear()
        try:
            item = decoder.decode(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), number, "json", f"syntax error: {exc.msg}"))
            continue
        except (ValueError, RecursionError) as exc:  # an int of 5000 digits, [[[[..., NaN
            reason = "nested too deeply" if isinstance(exc, RecursionError) else _show(exc)
            problems.append(Problem(str(path), number, "json", f"invalid value: {reason}"))
            continue
        for key in dict.fromkeys(duplicates):
            problems.append(Problem(str(path), number, key, "appears twice in one object"))
        if not isinstance(item, dict):
            problems.append(Problem(str(path), number, "json", "each line must be a JSON object"))
            continue
        rows += 1
        yield _RawRow(item, number)


_PlainTaker = Callable[[int, str | None, str, str, str | int, str], bool]


def _csv_rows(
    path: Path, text: str, problems: list[Problem], take: _PlainTaker | None = None
) -> Iterator[_RawRow]:
    """Each row as read, one at a time; problems go to ``problems`` as found.

    ``take`` (the builder's ``add_values``) is offered each record's cells first when
    the columns are plain ones: a record it takes is not yielded, and a million such
    records build no dict. One it refuses (a cell to trim, an empty one, anything wrong)
    is yielded as always, and the general path reads and reports it."""
    source = str(path)
    reader = csv.reader(_text_lines(text, ""), strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ManifestError([Problem(source, 1, "csv", f"syntax error: {exc}")]) from None
    header = [h.strip() for h in header]
    bad_header: list[Problem] = []
    for name in header:
        if name not in CSV_COLUMNS and not name.startswith(("meta.", "params.")):
            bad_header.append(Problem(source, 1, name, _suggest(name, CSV_COLUMNS)))
    for required in ("image", "prompt"):
        if required not in header:
            bad_header.append(Problem(source, 1, required, "required column is missing"))
    if len(set(header)) != len(header):
        bad_header.append(Problem(source, 1, "header", "a column name appears twice"))
    if bad_header:
        raise ManifestError(bad_header)
    # Each column's kind, told once: a million rows need not test every cell's name.
    kinds = [
        _META if n.startswith("meta.") else _PARAMS if n.startswith("params.") else _FIELD
        for n in header
    ]
    rows = 0
    cell_duplicates: list[str] = []
    cell_decoder = json.JSONDecoder(object_pairs_hook=_strict_object(cell_duplicates))
    width = len(header)
    if take is not None and (not set(header) <= _PLAIN_FIELDS or "image" not in header):
        take = None
    at = {name: header.index(name) if name in header else width for name in _PLAIN_FIELDS}
    # An absent column reads as the empty cell past the record's end: "" is "not given".
    i_id, i_image, i_prompt, i_seed, i_fmt = (
        at[n] for n in ("id", "image", "prompt", "seed", "output_format")
    )
    while True:
        line = reader.line_num + 1  # where the record starts: a quoted cell may span lines
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            # The reader cannot resynchronise after this; keep what was found so far.
            problems.append(Problem(source, line, "csv", f"syntax error in this record: {exc}"))
            break
        if take is not None and len(values) == width and rows < MAX_ROWS:
            values.append("")
            if take(
                line,
                values[i_id] or None,
                values[i_image],
                values[i_prompt],
                values[i_seed] or -1,
                values[i_fmt] or "jpeg",
            ):
                rows += 1
                continue
            values.pop()
        if not "".join(values).strip():
            continue
        if rows >= MAX_ROWS:
            raise ManifestError([*problems, _too_many_rows(source, line)])
        if len(values) != len(header):
            reason = f"has {len(values)} columns, the header has {len(header)}"
            problems.append(Problem(source, line, "csv", reason))
            continue
        fields: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for kind, name, value in zip(kinds, header, values, strict=True):
            if kind is _META:
                meta[name[5:]] = value
            elif kind is _PARAMS:
                if value.strip():  # an empty cell is a parameter not given, not ""
                    cell_duplicates.clear()
                    try:
                        params[name[7:]] = _csv_scalar(value, cell_decoder)
                    except RecursionError:
                        problems.append(Problem(source, line, name, "nested too deeply"))
                    for key in dict.fromkeys(cell_duplicates):
                        reason = f"key '{key}' appears twice in one object"
                        problems.append(Problem(source, line, name, reason))
            elif value.strip() != "":
                if name != "prompt":  # "a.png, put a hat on" leaves a space before the path
                    value = value.strip()
                if name == "image" and CSV_IMAGE_SEPARATOR in value:
                    # Several inputs of one task in one cell: a.png|b.png
                    fields[name] = [v.strip() for v in value.split(CSV_IMAGE_SEPARATOR)]
                    continue
                fields[name] = _csv_int(value) if name == "repeat" else value
        if meta:
            fields["meta"] = meta
        if params:
            fields["params"] = params
        rows += 1
        yield _RawRow(fields, line)


_FIELD, _META, _PARAMS = "field", "meta", "params"


def _csv_int(value: str) -> int | str:
    return int(value) if re.fullmatch(r"[0-9]{1,9}", value) else value


def _csv_scalar(value: str, decoder: json.JSONDecoder) -> Any:
    """A params cell: JSON if it is JSON (5, true, [1, 2]), else the text as it is."""
    try:
        return decoder.decode(value)
    except ValueError:
        return value


def _valid_model(value: Any) -> bool:
    # The id becomes part of the submit URL: no "." or ".." segments.
    return (
        isinstance(value, str)
        and re.fullmatch(r"[\w.-]+(/[\w.-]+)*", value) is not None
        and not any(part.strip(".") == "" for part in value.split("/"))
    )


def load_manifest(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Manifest:
    """Read and validate a whole manifest; raise ManifestError listing every problem."""
    with gc_paused():
        return _load_manifest(Path(path), model, max_image_bytes)


def _load_manifest(path: Path, model: str | None, max_image_bytes: int) -> Manifest:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".csv", ".jsonl"):
        reason = "unknown manifest type: use .yaml, .yml, .csv or .jsonl"
        raise ManifestError([Problem(str(path), None, "manifest", reason)])
    text = _read_text(path)
    top: dict[str, Any] = {}
    raws: Iterable[_RawRow] | None = None
    problems: list[Problem] = []
    if suffix in (".yaml", ".yml"):
        top, raws, problems = _yaml_rows(path, text)
    elif suffix == ".jsonl":
        raws = _jsonl_rows(path, text, problems)

    lines = top.key_lines if isinstance(top, _Located) else {}
    manifest_model = top.get("model", DEFAULT_MODEL)
    if not _valid_model(manifest_model):
        problems.append(
            Problem(str(path), lines.get("model"), "model", "must be a model id like 'owner/name'")
        )
        manifest_model = DEFAULT_MODEL
    if model is not None and not _valid_model(model):
        problems.append(
            Problem(
                str(path), None, "model", f"--model {model!r} is not a model id like 'owner/name'"
            )
        )
        model = None
    defaults = top.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(Problem(str(path), lines.get("defaults"), "defaults", "must be a mapping"))
        defaults = {}
    dlines = defaults.key_lines if isinstance(defaults, _Located) else {}
    if isinstance(defaults, _Located):
        problems += _duplicate_keys(str(path), defaults, "defaults.")
    for name in defaults:
        if name not in DEFAULT_FIELDS:
            problems.append(
                Problem(
                    str(path), dlines.get(name), f"defaults.{name}", _suggest(name, DEFAULT_FIELDS)
                )
            )
    # Reported once above; applying them would repeat the problem on every row.
    defaults = {k: v for k, v in defaults.items() if k in DEFAULT_FIELDS}
    settings = {k: top[k] for k in SETTING_FIELDS if k in top}
    problems += _check_settings(path, settings, lines)
    if "models" in top:
        # Every row on each model, side by side (the CLI's --model repeated).
        chosen = top["models"]
        if (
            isinstance(chosen, list)
            and 1 <= len(chosen) <= MAX_MODELS
            and all(_valid_model(m) for m in chosen)
            and len(set(chosen)) == len(chosen)
        ):
            settings["models"] = list(chosen)
        else:
            reason = f"must list 1..{MAX_MODELS} different model ids like 'owner/name'"
            problems.append(Problem(str(path), lines.get("models"), "models", reason))

    builder = _Builder(path, model or manifest_model, max_image_bytes)
    # One list: CSV and JSON Lines rows are read as the builder takes them, and what the
    # reading finds wrong joins what the checks find.
    builder.problems = problems
    if raws is None:  # a CSV: its plain records go straight to the builder
        raws = _csv_rows(path, text, problems, builder.add_values)
    for raw in raws:
        builder.add(raw, defaults, dlines)
    rows = builder.finish()
    return Manifest(path=path, model=model or manifest_model, rows=rows, settings=settings)


def _check_settings(path: Path, settings: dict[str, Any], lines: dict[str, int]) -> list[Problem]:
    problems = []
    for name, value in settings.items():
        if name == "out":
            ok = isinstance(value, str) and bool(value.strip()) and not _SURROGATE.search(value)
        elif name in ("concurrency", "retries"):
            ok = (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value >= (1 if name == "concurrency" else 0)
            )
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        if not ok:
            problems.append(
                Problem(str(path), lines.get(name), name, f"invalid value {_show(value)}")
            )
    return problems


def manifest_from_args(
    images: str,
    prompts: list[str],
    *,
    seeds: list[int] | None = None,
    output_format: str | None = None,
    model: str | None = None,
    base: Path | None = None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> Manifest:
    """The manifest that ``wsbatch run --images ... --prompt ...`` stands for.

    It expands exactly like a manifest row with ``images:``/``prompts:``/``seeds:``,
    so the same command run again derives the same ids and resumes.
    """
    base = (base or Path.cwd()).resolve()
    source = base / "command-line"
    fields: dict[str, Any] = {"images": images, "prompts": list(prompts)}
    if seeds:
        fields["seeds"] = list(seeds)
    if output_format:
        fields["output_format"] = output_format
    chosen = model or DEFAULT_MODEL
    problems = []
    if not _valid_model(chosen):
        problems.append(Problem("--model", None, "model", f"{chosen!r} is not a model id"))
        chosen = DEFAULT_MODEL
    builder = _Builder(source, chosen, max_image_bytes)
    builder.source = "command line"
    builder.problems.extend(problems)
    builder.add(_RawRow(fields, None), {})
    return Manifest(path=source, model=chosen, rows=builder.finish(), settings={})
