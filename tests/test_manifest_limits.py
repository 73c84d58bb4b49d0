"""Hostile manifests in-process: limits, text the API cannot take, globs through symlinks.

The worst cases also run as subprocesses in tests/test_validation.py's corpus; here each
behaviour is pinned down directly against ``load_manifest``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from batch import manifest as manifest_module
from batch.errors import ManifestError, Problem
from batch.manifest import MAX_ROWS, load_manifest
from tests.conftest import make_image


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value.problems


def refused_quickly(path: Path, seconds: float = 1.0) -> list[Problem]:
    """Refused, in under `seconds` of CPU (wall time would fail on a loaded machine)."""
    started = time.process_time()
    problems = problems_of(path)
    assert time.process_time() - started < seconds
    return problems


# -- rows ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "jsonl", "yaml"])
def test_too_many_rows_is_refused_at_the_first_row_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A file with more rows than the limit is refused at the row past it, in any format."""
    monkeypatch.setattr(manifest_module, "MAX_ROWS", 5)
    make_image(tmp_path / "a.png")
    rows = [{"image": "a.png", "prompt": f"p{i}"} for i in range(8)]
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        path.write_text("image,prompt\n" + "".join(f"a.png,p{i}\n" for i in range(8)))
        line = 7  # the header, then rows 1..5 on lines 2..6
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        line = 6
    else:
        path.write_text("".join(f"- {{image: a.png, prompt: p{i}}}\n" for i in range(8)))
        line = 6
    (problem,) = problems_of(path)
    assert (problem.line, problem.field) == (line, "rows")
    assert "more than 5 rows" in problem.reason


def test_expansion_is_counted_before_it_is_built(tmp_path: Path) -> None:
    """images x prompts x seeds x repeat is refused by arithmetic, not by building rows."""
    make_image(tmp_path / "a.png")
    prompts = ", ".join(f"p{i}" for i in range(1000))
    seeds = ", ".join(str(i) for i in range(1000))
    path = tmp_path / "m.yaml"
    path.write_text(
        f"- image: a.png\n  prompts: [{prompts}]\n  seeds: [{seeds}]\n  repeat: 10000\n"
    )
    (problem,) = refused_quickly(path)
    assert (problem.line, problem.field) == (1, "rows")
    assert "10,000,000,000 tasks" in problem.reason and f"{MAX_ROWS:,}" in problem.reason


def test_rows_up_to_the_limit_are_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly the limit is fine; one more task anywhere in the file is not."""
    monkeypatch.setattr(manifest_module, "MAX_ROWS", 6)
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.yaml"
    path.write_text("- {image: a.png, prompts: [a, b], repeat: 2}\n- {image: a.png, prompt: c}\n")
    path.write_text(path.read_text() + "- {image: a.png, prompt: d}\n")
    assert len(load_manifest(path).rows) == 6
    path.write_text(path.read_text() + "- {image: a.png, prompt: e}\n")
    assert [(p.line, p.field) for p in problems_of(path)] == [(4, "rows")]


def test_manifest_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    """A manifest past the size limit is refused from its size alone (a sparse file here)."""
    path = tmp_path / "m.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(manifest_module.MAX_MANIFEST_BYTES + 1)
    (problem,) = refused_quickly(path)
    assert (problem.line, problem.field) == (None, "manifest")
    assert "over the 256 MB limit" in problem.reason


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_manifest_that_is_a_pipe_does_not_hang(tmp_path: Path) -> None:
    """A named pipe called m.yaml is refused instead of waiting for a writer for ever."""
    os.mkfifo(tmp_path / "m.yaml")
    (problem,) = refused_quickly(tmp_path / "m.yaml")
    assert "not a regular file" in problem.reason


# -- YAML anchors and aliases -----------------------------------------------------


def test_alias_bomb_is_refused_at_its_alias(tmp_path: Path) -> None:
    """Nested aliases standing for gigabytes are refused where they pass the limit."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\nrows:\n  - {image: a.png, prompt: p, seed: *l9}\n")
    (problem,) = refused_quickly(path)
    assert problem.field == "yaml" and "aliases expand to over 64 MB" in problem.reason
    assert problem.line is not None and problem.line <= 10


def test_aliases_in_ordinary_use_still_load(tmp_path: Path) -> None:
    """Merge keys and shared params, even in thousands of rows (as yaml.dump writes them)."""
    make_image(tmp_path / "a.png")
    common = {"guidance_scale": 5, "sizes": [512, 768]}
    rows = [{"image": "a.png", "prompt": f"p{i}", "params": common} for i in range(3000)]
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(rows))
    assert "*id001" in path.read_text()  # PyYAML wrote one anchor and 2999 aliases
    loaded = load_manifest(path)
    assert len(loaded.rows) == 3000 and dict(loaded.rows[-1].params) == common

    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "base: &base {output_format: png, params: {steps: 20}}\nrows:\n"
        + "".join(f"  - {{<<: *base, image: a.png, prompt: p{i}}}\n" for i in range(500))
    )
    # `base` is not a top-level field: fine for the point made here, which is the aliases.
    assert {(p.line, p.field) for p in problems_of(merged)} == {(1, "base")}


def test_alias_nesting_past_the_depth_limit_is_refused(tmp_path: Path) -> None:
    """Aliases cannot stack shallow values into nesting deeper than the limit."""
    lines = ["d0: &d0 [1]"] + [f"d{i}: &d{i} [[*d{i - 1}]]" for i in range(1, 12)]
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\nrows: []\n")
    (problem,) = problems_of(path)
    assert problem.field == "yaml" and "levels" in problem.reason


def test_a_huge_value_in_a_message_is_cut_short(tmp_path: Path) -> None:
    """A wrong value made of shared aliases is named in a few characters, not printed whole."""
    lines = ["a: &a [x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]" for p, c in zip("abcde", "bcdef", strict=True)
    ]
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\nconcurrency: *f\nrows:\n  - {image: a.png, prompt: *f}\n")
    problems = refused_quickly(path)
    assert all(len(p.reason) < 200 for p in problems), problems


# -- text that cannot be sent ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('- image: a.png\n  prompt: "flag \\ud83c"\n', 2, "prompt"),
        ('- image: a.png\n  prompts: [ok, "\\udfff"]\n', 2, "prompts"),
        ('- image: a.png\n  prompt: p\n  meta: {note: "\\ud800"}\n', 3, "meta.note"),
        ('- image: a.png\n  prompt: p\n  params: {neg: ["\\ud800"]}\n', 3, "params.neg[0]"),
        ('- image: "https://x.test/\\ud83c.png"\n  prompt: p\n', 1, "image"),
        ('defaults: {prompt: "\\ud83c"}\nrows:\n  - image: a.png\n', 1, "defaults.prompt"),
    ],
)
def test_lone_surrogates_are_refused_where_they_are(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    """Text that is not valid Unicode would fail on the wire or in the ledger: refused."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    problems = problems_of(path)
    assert (line, field) in {(p.line, p.field) for p in problems}, problems
    assert any("lone surrogate" in p.reason for p in problems)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+999"])
def test_non_finite_numbers_are_refused_in_params_and_meta(tmp_path: Path, value: str) -> None:
    """NaN and infinities are not JSON: a request or ledger line holding one is refused."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.yaml"
    path.write_text(
        f"- image: a.png\n  prompt: p\n  params: {{g: {value}}}\n  meta: {{m: {value}}}\n"
    )
    assert {(p.line, p.field) for p in problems_of(path)} == {(3, "params.g"), (4, "meta.m")}


def test_valid_unicode_passes_untouched(tmp_path: Path) -> None:
    """Emoji, accents and CJK (astral characters included) are fine everywhere."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    row = {"image": "a.png", "prompt": "añade 🎩 帽子", "meta": {"é": "🌲"}, "params": {"n": "ß"}}
    path.write_text(json.dumps(row) + "\n")
    (loaded,) = load_manifest(path).rows
    assert (loaded.prompt, dict(loaded.meta), dict(loaded.params)) == (
        "añade 🎩 帽子",
        {"é": "🌲"},
        {"n": "ß"},
    )


def test_params_at_the_size_limit_pass_and_past_it_are_refused(tmp_path: Path) -> None:
    """params up to the limit are sent as they are; a few bytes more is a located problem."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    size = manifest_module.MAX_PARAMS_BYTES
    path.write_text(
        json.dumps({"image": "a.png", "prompt": "p", "params": {"n": "a" * (size - 100)}})
    )
    assert len(load_manifest(path).rows) == 1
    path.write_text(json.dumps({"image": "a.png", "prompt": "p", "params": {"n": "a" * size}}))
    assert {(p.line, p.field) for p in problems_of(path)} == {(1, "params")}


def test_empty_csv_params_cell_means_not_given(tmp_path: Path) -> None:
    """An empty `params.*` cell leaves that parameter out instead of sending ""."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.csv"
    path.write_text(
        "image,prompt,params.guidance_scale,params.negative_prompt\n"
        "a.png,one,5,\n"
        "a.png,two,, \n"
        'a.png,three,,""\n'
        'a.png,four,6,"blurry, dark"\n'
    )
    rows = load_manifest(path).rows
    assert [dict(r.params) for r in rows] == [
        {"guidance_scale": 5},
        {},
        {},
        {"guidance_scale": 6, "negative_prompt": "blurry, dark"},
    ]


def test_jsonl_duplicate_keys_are_refused_like_yaml(tmp_path: Path) -> None:
    """A key twice in one JSON object is a mistake, as it is in YAML, not a silent last-wins."""
    make_image(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"image": "a.png", "prompt": "one"}\n{"image": "a.png", "prompt": "x", "prompt": "y"}\n'
    )
    assert {(p.line, p.field) for p in problems_of(path)} == {(2, "prompt")}


# -- globs through symlinks -----------------------------------------------------------


def _tree_with_loops(root: Path) -> Path:
    """photos/ with 2 images, links back up (loops), a link to a file and a linked folder."""
    photos = root / "photos"
    make_image(photos / "one.png")
    make_image(photos / "sub" / "two.png")
    (photos / "sub" / "up").symlink_to("..")
    (photos / "sub" / "top").symlink_to("../..")
    (photos / "sub" / "self").symlink_to(".")
    (photos / "again.png").symlink_to("one.png")
    (photos / "mirror").symlink_to("sub")
    return photos


def test_glob_through_symlink_loops_lists_each_image_once(tmp_path: Path) -> None:
    """`**` follows no loop and lists each file once: 2 images are 2 rows, not 82."""
    _tree_with_loops(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text("- images: photos/**/*.png\n  prompt: p\n")
    started = time.process_time()
    rows = load_manifest(path).rows
    assert time.process_time() - started < 1
    assert [r.image for r in rows] == ["photos/one.png", "photos/sub/two.png"]
    assert len({r.image_path for r in rows}) == 2


def test_glob_results_are_deterministic_and_sorted(tmp_path: Path) -> None:
    """The same tree gives the same rows in the same order, each time."""
    _tree_with_loops(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text("- images: '**/*.png'\n  prompt: p\n")
    first = [r.image for r in load_manifest(path).rows]
    assert first == sorted(first)
    assert first == [r.image for r in load_manifest(path).rows]


def test_glob_follows_a_linked_folder_that_does_not_loop(tmp_path: Path) -> None:
    """A symlink to a folder elsewhere (an external disk) is still searched."""
    make_image(tmp_path / "elsewhere" / "far.png")
    (tmp_path / "project" / "photos").mkdir(parents=True)
    (tmp_path / "project" / "photos" / "disk").symlink_to(tmp_path / "elsewhere")
    path = tmp_path / "project" / "m.yaml"
    path.write_text("- images: photos/**/*.png\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["photos/disk/far.png"]


def test_glob_keeps_globs_rules_for_hidden_names(tmp_path: Path) -> None:
    """As with glob.glob: `*` and `**` skip hidden names unless the pattern names them."""
    make_image(tmp_path / "p" / "a.png")
    make_image(tmp_path / "p" / ".b.png")
    make_image(tmp_path / "p" / ".cache" / "c.png")
    path = tmp_path / "m.yaml"
    path.write_text("- images: p/**/*.png\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["p/a.png"]
    path.write_text("- images: p/.*.png\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["p/.b.png"]


def test_folder_of_links_to_one_file_is_one_row(tmp_path: Path) -> None:
    """`images: folder` lists a file and its symlinks once."""
    make_image(tmp_path / "f" / "a.png")
    (tmp_path / "f" / "b.png").symlink_to("a.png")
    path = tmp_path / "m.yaml"
    path.write_text("- images: f\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["f/a.png"]
