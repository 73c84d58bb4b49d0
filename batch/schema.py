"""The slice of JSON Schema a model's request schema uses, checked value by value.

Shared by the client (``validate`` before anything is sent) and the emulator (which
refuses what the service would): neither imports the other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
}


def _type_ok(value: Any, wanted: Any) -> bool:
    names = wanted if isinstance(wanted, list) else [wanted]
    for name in names:
        types = _JSON_TYPES.get(name) if isinstance(name, str) else None
        if types is None:
            return True  # a type we do not know: the server decides
        if isinstance(value, bool) and name in ("integer", "number"):
            continue
        if isinstance(value, types):
            return True
    return False


def check_value(name: str, value: Any, spec: Mapping[str, Any]) -> str | None:
    """Why ``value`` does not fit ``spec`` (a JSON schema property), or None."""
    wanted = spec.get("type")
    if wanted is not None and not _type_ok(value, wanted):
        return f"must be {' or '.join(wanted) if isinstance(wanted, list) else wanted}"
    enum = spec.get("enum")
    if isinstance(enum, list) and value not in enum:
        return f"must be one of {', '.join(map(str, enum))}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        low, high = spec.get("minimum"), spec.get("maximum")
        if isinstance(low, int | float) and value < low:
            return f"must be at least {low}"
        if isinstance(high, int | float) and value > high:
            return f"must be at most {high}"
    if isinstance(value, str):
        if isinstance(spec.get("minLength"), int) and len(value) < spec["minLength"]:
            return f"must be at least {spec['minLength']} characters"
        if isinstance(spec.get("maxLength"), int) and len(value) > spec["maxLength"]:
            return f"must be at most {spec['maxLength']} characters"
        pattern = spec.get("pattern")
        if isinstance(pattern, str):
            try:
                if re.search(pattern, value) is None:
                    return f"must match {pattern}"
            except re.error:
                pass
    if isinstance(value, list | tuple):
        if isinstance(spec.get("minItems"), int) and len(value) < spec["minItems"]:
            return f"needs at least {spec['minItems']} item(s)"
        if isinstance(spec.get("maxItems"), int) and len(value) > spec["maxItems"]:
            return f"takes at most {spec['maxItems']} item(s)"
        items = spec.get("items")
        if isinstance(items, dict):
            for n, item in enumerate(value):
                why = check_value(f"{name}[{n}]", item, items)
                if why is not None:
                    return f"item {n + 1} {why}"
    return None


def unknown_fields(body: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    props = schema.get("properties")
    known = props if isinstance(props, dict) else {}
    return [name for name in body if name not in known]


def missing_fields(body: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    required = schema.get("required")
    return (
        [r for r in required if isinstance(r, str) and r not in body]
        if isinstance(required, list)
        else []
    )
