"""Model schemas: what each model takes, checked before anything is sent.

The catalogue comes from ``GET /api/v3/models`` (each model's request schema and
base price) and is cached in the user's cache folder; a snapshot of the default
model ships with wsbatch, so validation works with no network and no cache. A
row is checked against its model's schema offline: unknown fields (with a
did-you-mean), types, ranges, enums, list lengths and required fields.
"""

from __future__ import annotations

import difflib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from batch.errors import Problem
from batch.schema import check_value

CACHE_NAME = "models.json"
# A cached catalogue older than this is still used offline; `models --refresh` renews it.
STALE_S = 7 * 24 * 3600
# Fields wsbatch itself sets on every request, whatever the schema says about them.
CLIENT_FIELDS = frozenset({"enable_base64_output", "enable_sync_mode"})


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_id: str
    schema: Mapping[str, Any]  # the JSON schema of the request body
    base_price: float | None = None
    name: str | None = None
    description: str | None = None

    @property
    def properties(self) -> Mapping[str, Any]:
        props = self.schema.get("properties")
        return props if isinstance(props, dict) else {}

    @property
    def required(self) -> tuple[str, ...]:
        req = self.schema.get("required")
        return tuple(r for r in req if isinstance(r, str)) if isinstance(req, list) else ()

    @property
    def image_field(self) -> str:
        """Where the input image(s) go: ``images`` (a list) or ``image`` (one URL)."""
        return "images" if "images" in self.properties else "image"

    @property
    def max_images(self) -> int:
        spec = self.properties.get("images")
        if isinstance(spec, dict) and isinstance(spec.get("maxItems"), int):
            return int(spec["maxItems"])
        return 10 if "images" in self.properties else 1


@dataclass(frozen=True, slots=True)
class Catalogue:
    models: Mapping[str, ModelInfo]
    fetched_at: float | None  # None: the bundled snapshot
    source: str  # "bundled", "cache" or "live"

    def get(self, model_id: str) -> ModelInfo | None:
        return self.models.get(model_id)

    def age(self, now: float | None = None) -> str:
        if self.fetched_at is None:
            return "bundled with wsbatch"
        seconds = max((now or time.time()) - self.fetched_at, 0.0)
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"fetched {seconds / size:.0f} {unit} ago"
        return "fetched just now"


def parse_catalogue(data: Any) -> dict[str, ModelInfo]:
    """``GET /api/v3/models``'s ``data`` (a list of models) as ModelInfo by id; entries
    without an id or a request schema are left out."""
    found: dict[str, ModelInfo] = {}
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("model_id"), str):
            continue
        schema = _request_schema(item)
        if schema is None:
            continue
        price = item.get("base_price")
        found[item["model_id"]] = ModelInfo(
            model_id=item["model_id"],
            schema=schema,
            base_price=float(price)
            if isinstance(price, int | float) and not isinstance(price, bool)
            else None,
            name=item.get("name") if isinstance(item.get("name"), str) else None,
            description=item.get("description")
            if isinstance(item.get("description"), str)
            else None,
        )
    return found


def _request_schema(item: Mapping[str, Any]) -> dict[str, Any] | None:
    api = item.get("api_schema")
    schemas = api.get("api_schemas") if isinstance(api, dict) else None
    for entry in schemas if isinstance(schemas, list) else []:
        schema = entry.get("request_schema") if isinstance(entry, dict) else None
        if isinstance(schema, dict) and isinstance(schema.get("properties"), dict):
            return schema
    return None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wsbatch"


def bundled() -> Catalogue:
    text = resources.files("batch").joinpath("data", CACHE_NAME).read_text("utf-8")
    return Catalogue(parse_catalogue(json.loads(text)["models"]), None, "bundled")


def cached(folder: Path | None = None) -> Catalogue | None:
    path = (folder or cache_dir()) / CACHE_NAME
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    when = doc.get("fetched_at")
    models = parse_catalogue(doc.get("models"))
    if not models or not isinstance(when, int | float):
        return None
    return Catalogue(models, float(when), "cache")


def save(raw_models: list[Any], folder: Path | None = None) -> Catalogue:
    """Cache a fetched catalogue (written whole, then renamed)."""
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path = folder / CACHE_NAME
    temp = folder / f".{CACHE_NAME}.{os.getpid()}.tmp"
    temp.write_text(json.dumps({"fetched_at": now, "models": raw_models}), "utf-8")
    os.replace(temp, path)
    return Catalogue(parse_catalogue(raw_models), now, "live")


def known(folder: Path | None = None) -> Catalogue:
    """The cached catalogue over the bundled one: every model either knows."""
    base = bundled()
    cache = cached(folder)
    if cache is None:
        return base
    return Catalogue({**base.models, **cache.models}, cache.fetched_at, cache.source)


# -- checking a request against a schema ---------------------------------------------


def check_request(
    fields: Mapping[str, Any], model: ModelInfo, source: str, line: int | None
) -> list[Problem]:
    """Every way ``fields`` (what would be sent, image URLs aside) breaks the schema."""
    props = model.properties
    problems: list[Problem] = []
    for name, value in fields.items():
        spec = props.get(name)
        if spec is None:
            if name in CLIENT_FIELDS:
                continue
            near = difflib.get_close_matches(name, list(props), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(
                Problem(source, line, name, f"is not a field of {model.model_id}{hint}")
            )
            continue
        why = check_value(name, value, spec) if isinstance(spec, dict) else None
        if why is not None:
            problems.append(Problem(source, line, name, f"{why} for {model.model_id}"))
    for name in model.required:
        if name not in fields:
            problems.append(Problem(source, line, name, f"is required by {model.model_id}"))
    return problems


# Fields the client sets itself on every request; the manifest checks them already.
_SET_BY_CLIENT = frozenset({"prompt", "image", "images", "seed", "output_format"})


def schema_problems(rows: Iterable[Any], catalogue: Catalogue) -> list[Problem]:
    """Each row's ``params`` (and its output format, where the model lists formats)
    checked against its model's schema, offline. Rows of a model the catalogue does
    not know are not checked here (the server decides). Identical params are checked
    once: a 100k-row manifest of one model costs a few lookups."""
    seen: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    problems: list[Problem] = []
    for row in rows:
        model = catalogue.get(row.model)
        inputs = 1 + len(row.extra_images)
        if inputs > 1 and (model is None or inputs > model.max_images):
            source, line = _where(row.source)
            takes = (
                f"takes at most {model.max_images} input image(s)"
                if model is not None
                else "has no cached schema to say it takes several images "
                "(`wsbatch models --refresh`)"
            )
            problems.append(Problem(source, line, "image", f"{inputs} images: {row.model} {takes}"))
            continue
        if model is None:
            continue
        params = json.dumps(row.params, sort_keys=True, default=str) if row.params else ""
        key = (row.model, params, row.output_format)
        found = seen.get(key)
        if found is None:
            fields = {k: v for k, v in row.params.items() if k not in _SET_BY_CLIENT}
            if "output_format" in model.properties:
                fields["output_format"] = row.output_format
            # Required fields are the client's to send (prompt, image): not the row's.
            found = [
                (p.field, p.reason)
                for p in check_request(fields, model, "", None)
                if not p.reason.startswith("is required")
            ]
            seen[key] = found
        if found:  # where the row is written, worked out only for a row with a problem
            source, line = _where(row.source)
            problems += [Problem(source, line, f"params.{f}" if f in row.params else f, why)
                         for f, why in found]  # fmt: skip
    return problems


def _where(source: str) -> tuple[str, int | None]:
    head, _, tail = source.rpartition(":")
    return (head, int(tail)) if head and tail.isdigit() else (source, None)


def describe(model: ModelInfo) -> list[str]:
    """One model's fields, for ``wsbatch models NAME``."""
    lines = [model.model_id + (f" ({model.name})" if model.name else "")]
    if model.base_price is not None:
        lines.append(f"  base price ${model.base_price:g} a task")
    required = set(model.required)
    for name, spec in model.properties.items():
        if not isinstance(spec, dict):
            continue
        kind = spec.get("type", "any")
        extras = []
        if "enum" in spec:
            extras.append("one of " + ", ".join(map(str, spec["enum"])))
        if "minimum" in spec or "maximum" in spec:
            extras.append(f"{spec.get('minimum', '')}..{spec.get('maximum', '')}")
        if "maxItems" in spec:
            extras.append(f"{spec.get('minItems', 0)}-{spec['maxItems']} items")
        if "default" in spec:
            extras.append(f"default {spec['default']!r}")
        flag = "required" if name in required else "optional"
        detail = f" ({'; '.join(extras)})" if extras else ""
        lines.append(f"  {name}: {kind}, {flag}{detail}")
    return lines


def names(models: Iterable[ModelInfo]) -> list[str]:
    return sorted(m.model_id for m in models)
