"""A seeded fuzzer for the manifest loader.

Valid YAML, CSV and JSONL manifests are damaged in ways real files and hostile ones are
(byte flips, truncation, repeated lines, odd Unicode, huge numbers, deep nesting, wrong
types, aliases) and loaded in-process. Every case must either load, into rows that can
be sent and recorded exactly, or raise ManifestError (what the CLI turns into exit 2).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch.errors import ManifestError
from batch.manifest import Manifest, load_manifest
from tests.conftest import make_image

CASES_PER_FORMAT = 250

VALID = {
    "yaml": """\
model: wavespeed-ai/hidream-e1-full
defaults: {output_format: png, seed: -1, params: {guidance_scale: 5}}
rows:
  - &base
    id: cat-hat
    image: images/a.png
    prompt: put a red hat on the cat
    seed: 42
    params: &params {guidance_scale: 5, sizes: [512, 768]}
    meta: &meta {batch: trees}
  - image: images/b.jpg
    prompt: cover the roof with snow
    repeat: 2
    params: *params
  - images: images/*.png
    prompts: [make it autumn, make it winter]
    seeds: [1, 2]
    meta: *meta
  - {<<: *base, id: merged, prompt: add a scarf}
""",
    "csv": """\
id,image,prompt,seed,output_format,repeat,meta.batch,params.guidance_scale,params.sizes
r1,images/a.png,put a red hat on the cat,42,png,1,trees,5,"[512, 768]"
,images/b.jpg,"cover the roof, with snow",-1,jpeg,2,,,
r3,images/a.png,make it autumn,7,webp,,x,1.5,
""",
    "jsonl": """\
{"id": "r1", "image": "images/a.png", "prompt": "put a red hat on the cat", "seed": 42}
{"image": "images/b.jpg", "prompt": "snow", "params": {"guidance_scale": 5, "s": [1, 2]}}
{"images": "images/*.png", "prompts": ["autumn", "winter"], "seeds": [1, 2], "meta": {"b": 1}}
""",
}

# Bytes and snippets hostile input is made of.
BYTES = b"\x00\n\r\t \"',:-[]{}#&*!|>%@`\\/.?0123456789eE\xc3\xff\xed\xa0\x80"
SNIPPETS = [
    '"\\ud83c"',
    '"\\udfff\\ud800"',
    "NaN",
    "-Infinity",
    ".nan",
    "-.inf",
    "1e999",
    "1.0e+999",
    "9" * 400,
    "-" + "9" * 5000,
    "[" * 30 + "]" * 30,
    "{a: " * 25 + "1" + "}" * 25,
    '{"a": ' * 25 + "1" + "}" * 25,
    "&a [*a]",
    "*nowhere",
    "&x [1, 2]",
    "!!binary aGk=",
    "!!python/object/apply:os.system [id]",
    "!!set {a, b}",
    "2020-13-45",
    "2024-05-01",
    "{a: 1, a: 2}",
    '{"a": 1, "a": 2}',
    "<<: *base",
    "*params",
    "[*meta, *meta, *params]",
    "? [a, b]",
    "\u202e\u200b\ufeff",
    "\U0001f3a9",
    "~",
    "null",
    "true",
    "[]",
    "{}",
    "''",
    "\x85\u2028",
    "images/../../../etc/passwd",
    "https://\U0001f3a9.test/a.png",
    "images/**/*.png",
]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# Whole values for a field: wrong types, edge values, text the API cannot take.
VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**31,
    2**70,
    -(2**70),
    1.5,
    float("nan"),
    float("inf"),
    "",
    " ",
    "x" * 10_001,
    "\ud83c",
    "a\udc80b",
    "\U0001f3a9",
    "\x00",
    [],
    [None],
    ["\ud800"],
    _nested(25),
    {},
    {"x": float("nan")},
    {"\ud83c": 1},
    {"prompt": "shadow"},
    {"a": {"b": {"c": [1, 2, {"d": "e"}]}}},
    list(range(50)),
]
FIELDS = ["id", "image", "images", "prompt", "prompts", "seed", "seeds"]
FIELDS += ["output_format", "params", "meta", "repeat", "model", "concurrency", "unknown"]


def _bytes_mutation(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out) + 1)
        op = rng.random()
        if op < 0.3 and pos < len(out):
            out[pos] = rng.choice(BYTES)
        elif op < 0.5:
            out[pos:pos] = bytes([rng.choice(BYTES)]) * rng.randint(1, 3)
        elif op < 0.7:
            del out[pos : pos + rng.randint(1, 8)]
        else:
            out[pos:pos] = rng.choice(SNIPPETS).encode("utf-8", "surrogatepass")
    return bytes(out)


def _line_mutation(data: bytes, rng: random.Random) -> bytes:
    lines = data.splitlines(keepends=True)
    op = rng.random()
    i = rng.randrange(len(lines))
    if op < 0.3:
        lines[i:i] = [lines[i]] * rng.randint(1, 50)  # duplicated lines
    elif op < 0.5:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op < 0.7:
        return data[: rng.randrange(len(data))]  # truncated mid-write
    else:
        del lines[i]
    return b"".join(lines)


def _value_mutation(kind: str, data: bytes, rng: random.Random) -> bytes:
    """Replace or add one field, in a row or at the top, with a hostile value."""
    name, value = rng.choice(FIELDS), rng.choice(VALUES)
    if kind == "jsonl":
        rows = [json.loads(line) for line in data.decode().splitlines()]
        rng.choice(rows)[name] = value
        text = "".join(json.dumps(r) + "\n" for r in rows)  # NaN written as NaN, as people do
        return text.encode("utf-8", "surrogatepass")
    if kind == "yaml":
        doc = yaml.safe_load(data.decode())
        target = doc if rng.random() < 0.2 else rng.choice(doc["rows"])
        target[name] = value
        return yaml.safe_dump(doc, allow_unicode=False).encode()
    header, *rest = data.decode().splitlines()
    column = rng.choice([*header.split(","), f"params.{name}", f"meta.{name}"])
    cell = json.dumps(value) if not isinstance(value, str) else value
    cell = '"' + cell.replace('"', '""') + '"'
    lines = [f"{header},{column}"] + [f"{r},{cell}" for r in rest]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


def _assert_sendable(manifest: Manifest) -> None:
    """What a loaded manifest sends and records is strict JSON and encodes as UTF-8."""
    for row in manifest.rows:
        body = {**row.params, "prompt": row.prompt, "image": row.image, "seed": row.seed}
        json.dumps(body, allow_nan=False).encode()
        json.dumps(dict(row.meta), allow_nan=False, ensure_ascii=False).encode()
        row.id.encode("ascii")
        assert all(math.isfinite(v) for v in row.meta.values() if isinstance(v, float)), row.meta


@pytest.mark.parametrize("kind", ["yaml", "csv", "jsonl"])
def test_fuzzed_manifests_load_or_are_refused_cleanly(tmp_path: Path, kind: str) -> None:
    """Damaged manifests give sendable rows or ManifestError: never another exception."""
    for name in ("a.png", "b.jpg", "c.png"):
        make_image(tmp_path / "images" / name)
    original = VALID[kind].encode()
    load_manifest(_write(tmp_path, kind, original))  # the seed itself is valid
    rng = random.Random(f"wsbatch-fuzz-{kind}")
    mutations: list[Callable[[bytes], bytes]] = [
        lambda d: _bytes_mutation(d, rng),
        lambda d: _line_mutation(d, rng),
        lambda d: _value_mutation(kind, d, rng),
    ]
    outcomes = {"loaded": 0, "refused": 0}
    started = time.process_time()  # CPU, not wall: a loaded machine must not fail this
    for case in range(CASES_PER_FORMAT):
        data = original
        for _ in range(rng.randint(1, 3)):
            try:
                data = rng.choice(mutations)(data)
            except (ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError, IndexError):
                continue  # a mutation that needs the text to still parse did not apply
        path = _write(tmp_path, kind, data)
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            outcomes["refused"] += 1
            assert exc.problems, f"case {case}: empty ManifestError"
            assert all(p.source == str(path) for p in exc.problems)
            str(exc).encode("utf-8", "backslashreplace")  # what the CLI prints
        except Exception as exc:  # pragma: no cover - the failure being hunted
            (tmp_path / f"crash-{case}.{kind}").write_bytes(data)
            raise AssertionError(f"case {case} raised {type(exc).__name__}: {exc}") from exc
        else:
            outcomes["loaded"] += 1
            _assert_sendable(manifest)
    # Both outcomes are exercised, and the whole run stays quick.
    assert outcomes["loaded"] > 5 and outcomes["refused"] > 50, outcomes
    assert time.process_time() - started < 10


def _write(folder: Path, kind: str, data: bytes) -> Path:
    path = folder / f"fuzz.{kind}"
    path.write_bytes(data)
    return path
