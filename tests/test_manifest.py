"""Parsing manifests into rows: formats, paths, derived ids, expansion, defaults."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from batch.errors import ManifestError, Problem
from batch.manifest import DEFAULT_MODEL, Manifest, load_manifest
from tests.conftest import WriteManifest, make_image

# -- helpers -------------------------------------------------------------------


def problems_of(path: Path, **kwargs: Any) -> list[Problem]:
    """The problems load_manifest reports for a manifest that must be refused."""
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    return info.value.problems


def located(problems: list[Problem]) -> set[tuple[int | None, str]]:
    return {(p.line, p.field) for p in problems}


def ids(manifest: Manifest) -> list[str]:
    return [r.id for r in manifest.rows]


@pytest.fixture
def write_text(tmp_path: Path):
    """Write a manifest verbatim (exact lines matter) next to tmp_path/images."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# -- formats -------------------------------------------------------------------


def test_yaml_mapping_form(images: list[Path], write_text) -> None:
    """A YAML manifest with model, defaults and rows gives the rows the user wrote."""
    path = write_text(
        "m.yaml",
        "model: owner/some-model\n"
        "defaults: {output_format: png}\n"
        "rows:\n"
        "  - id: cat-hat\n"
        "    image: images/a.png\n"
        "    prompt: put a red hat on the cat\n"
        "    seed: 42\n"
        "    params: {guidance_scale: 3.5}\n",
    )
    manifest = load_manifest(path)
    assert manifest.model == "owner/some-model"
    (row,) = manifest.rows
    assert (row.id, row.image, row.prompt, row.seed) == (
        "cat-hat",
        "images/a.png",
        "put a red hat on the cat",
        42,
    )
    assert row.output_format == "png"
    assert row.model == "owner/some-model"
    assert dict(row.params) == {"guidance_scale": 3.5}
    assert row.source == f"{path}:4"
    assert row.image_path == images[0].resolve()


def test_yaml_bare_list(images: list[Path], write_manifest: WriteManifest) -> None:
    """A YAML file that is just a list of rows is a manifest with the default model."""
    path = write_manifest(
        [{"image": "images/a.png", "prompt": "one"}, {"image": "images/b.jpg", "prompt": "two"}]
    )
    manifest = load_manifest(path)
    assert manifest.model == DEFAULT_MODEL
    assert [(r.image, r.prompt, r.output_format) for r in manifest.rows] == [
        ("images/a.png", "one", "jpeg"),
        ("images/b.jpg", "two", "jpeg"),
    ]


def test_csv_with_meta_columns(images: list[Path], write_text) -> None:
    """A CSV's header names the fields; `meta.x` columns become row metadata."""
    path = write_text(
        "m.csv",
        "id,image,prompt,seed,output_format,meta.split,meta.source\n"
        "r1,images/a.png,add snow,7,webp,train,flickr\n"
        'r2, images/b.jpg ,"add rain, heavy",,png,test,\n',
    )
    r1, r2 = load_manifest(path).rows
    assert (r1.id, r1.image, r1.prompt, r1.seed, r1.output_format) == (
        "r1",
        "images/a.png",
        "add snow",
        7,
        "webp",
    )
    assert dict(r1.meta) == {"split": "train", "source": "flickr"}
    assert (r2.image, r2.prompt, r2.seed) == ("images/b.jpg", "add rain, heavy", -1)
    assert dict(r2.meta) == {"split": "test", "source": ""}
    assert r2.source == f"{path}:3"


def test_csv_record_line_is_where_it_starts(images: list[Path], write_text) -> None:
    """A quoted multi-line CSV cell does not shift later problems' line numbers."""
    path = write_text(
        "m.csv",
        'image,prompt\nimages/a.png,"line one\nline two"\nimages/a.png,\n',
    )
    assert located(problems_of(path)) == {(4, "prompt")}


def test_jsonl(images: list[Path], write_manifest: WriteManifest) -> None:
    """JSON Lines: one row object per line, blank lines ignored."""
    rows = [
        {"id": "j1", "image": "images/c.webp", "prompt": "x", "seed": 3, "meta": {"k": 1}},
        {"image": "images/d.png", "prompt": "y", "params": {"strength": 0.4}},
    ]
    path = write_manifest(rows, kind="jsonl")
    path.write_text(path.read_text() + "\n   \n")
    j1, j2 = load_manifest(path).rows
    assert (j1.id, j1.seed, dict(j1.meta)) == ("j1", 3, {"k": 1})
    assert dict(j2.params) == {"strength": 0.4}
    assert j2.source == f"{path}:2"


def test_csv_header_only_is_an_empty_manifest(write_text) -> None:
    """A CSV with a header and no rows is valid: nothing to do, not an error."""
    manifest = load_manifest(write_text("m.csv", "id,image,prompt,seed\n"))
    assert manifest.rows == ()


# -- images --------------------------------------------------------------------


def test_relative_paths_resolve_against_manifest_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image paths are relative to the manifest, wherever wsbatch is started from."""
    make_image(tmp_path / "project" / "pics" / "x.png")
    path = tmp_path / "project" / "m.yaml"
    path.write_text("- image: pics/x.png\n  prompt: hi\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (row,) = load_manifest(Path("..") / "project" / "m.yaml").rows
    assert row.image_path == (tmp_path / "project" / "pics" / "x.png").resolve()
    assert row.image == "pics/x.png"


def test_url_images_pass_through_without_file_checks(write_text) -> None:
    """An http(s) image is the server's business: no local file is looked for."""
    path = write_text(
        "m.yaml",
        "- image: https://cdn.example.com/no/such/file.png\n  prompt: a\n"
        "- image: HTTP://example.com/x.jpg\n  prompt: b\n",
    )
    first, second = load_manifest(path).rows
    assert first.is_url and first.image_path is None
    assert first.image == "https://cdn.example.com/no/such/file.png"
    assert second.is_url


def test_image_over_size_limit(images: list[Path], write_manifest: WriteManifest) -> None:
    """An image bigger than the cap is refused before anything is uploaded."""
    path = write_manifest([{"image": "images/a.png", "prompt": "x"}])
    size = images[0].stat().st_size
    (problem,) = problems_of(path, max_image_bytes=size - 1)
    assert (problem.line, problem.field) == (1, "image")
    assert "limit" in problem.reason
    assert load_manifest(path, max_image_bytes=size).rows


# -- derived ids ---------------------------------------------------------------


def test_derived_ids_stable_across_reordering(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """Reordering an id-less manifest keeps every row's id, so resume is unaffected."""
    rows = [
        {"image": f"images/{p.name}", "prompt": f"edit {i}", "seed": i}
        for i, p in enumerate(images)
    ]
    forward = load_manifest(write_manifest(rows, name="fwd"))
    backward = load_manifest(write_manifest(rows[::-1], name="bwd"))
    by_prompt = {r.prompt: r.id for r in forward.rows}
    assert {r.prompt: r.id for r in backward.rows} == by_prompt
    assert len(set(by_prompt.values())) == len(rows)
    for row_id in by_prompt.values():
        assert len(row_id) == 12 and all(c in "0123456789abcdef" for c in row_id)


def test_identical_rows_each_get_their_own_id(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """Copies of one id-less row are separate tasks: <hash>, <hash>_2, <hash>_3."""
    row = {"image": "images/a.png", "prompt": "sample", "seed": -1}
    manifest = load_manifest(write_manifest([row, row, row]))
    base = manifest.rows[0].id
    assert ids(manifest) == [base, f"{base}_2", f"{base}_3"]


def test_derived_id_depends_on_every_request_field(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """Changing any part of the request (image, prompt, seed, format, params) changes the id."""
    base = {"image": "images/a.png", "prompt": "p", "seed": 1, "output_format": "png"}
    variants = [
        base,
        {**base, "image": "images/b.jpg"},
        {**base, "prompt": "q"},
        {**base, "seed": 2},
        {**base, "output_format": "webp"},
        {**base, "params": {"strength": 0.5}},
    ]
    assert len(set(ids(load_manifest(write_manifest(variants))))) == len(variants)


def test_model_override_changes_ids(images: list[Path], write_manifest: WriteManifest) -> None:
    """`--model` is part of the request, so it gives different derived ids."""
    path = write_manifest([{"image": "images/a.png", "prompt": "p"}], model="owner/one")
    default = load_manifest(path)
    override = load_manifest(path, model="owner/two")
    assert override.model == "owner/two" and override.rows[0].model == "owner/two"
    assert ids(default) != ids(override)


def test_explicit_id_colliding_with_derived_id_is_refused(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """An explicit id equal to another row's derived id would share its output file."""
    row = {"image": "images/a.png", "prompt": "p"}
    derived = ids(load_manifest(write_manifest([row], name="one")))[0]
    path = write_manifest([row, {"id": derived, "image": "images/b.jpg", "prompt": "q"}])
    problems = problems_of(path)
    assert [(p.field, "collides" in p.reason) for p in problems] == [("id", True)]


# -- expansion -----------------------------------------------------------------


def test_repeat_expands_row(images: list[Path], write_manifest: WriteManifest) -> None:
    """`repeat: N` turns one row into N tasks with distinct ids."""
    manifest = load_manifest(
        write_manifest([{"image": "images/a.png", "prompt": "p", "repeat": 3}])
    )
    assert len(manifest.rows) == 3
    assert len(set(ids(manifest))) == 3
    assert {r.seed for r in manifest.rows} == {-1}


def test_repeat_from_defaults(images: list[Path], write_manifest: WriteManifest) -> None:
    """`repeat` in `defaults` applies to every row; a row may override it."""
    rows = [
        {"image": "images/a.png", "prompt": "p"},
        {"image": "images/b.jpg", "prompt": "q", "repeat": 1},
    ]
    manifest = load_manifest(write_manifest(rows, defaults={"repeat": 2}))
    assert [r.prompt for r in manifest.rows] == ["p", "p", "q"]


def test_repeat_with_explicit_id_is_refused(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """One explicit id cannot name several tasks (their outputs would overwrite each other)."""
    path = write_manifest([{"id": "x", "image": "images/a.png", "prompt": "p", "repeat": 2}])
    assert located(problems_of(path)) == {(1, "id")}


def test_images_glob_expands_sorted(images: list[Path], write_text) -> None:
    """`images:` with a glob gives one row per matching file, in sorted order."""
    path = write_text("m.yaml", "- images: images/*.png\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["images/a.png", "images/d.png"]


def test_images_folder_expands_to_its_images(images: list[Path], write_text) -> None:
    """`images:` naming a folder takes its image files, sorted, skipping hidden and other files."""
    (images[0].parent / "notes.txt").write_text("not an image")
    (images[0].parent / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (images[0].parent / "sub.png").mkdir()
    path = write_text("m.yaml", "- images: images\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == [f"images/{p.name}" for p in images]


def test_glob_works_when_manifest_folder_has_glob_characters(tmp_path: Path) -> None:
    """A project folder named like `set[1]` does not break `images:` globs."""
    folder = tmp_path / "set[1]"
    make_image(folder / "pics" / "x.png")
    path = folder / "m.yaml"
    path.write_text("- images: pics/*.png\n  prompt: p\n")
    assert [r.image for r in load_manifest(path).rows] == ["pics/x.png"]


def test_prompts_and_seeds_expand_to_product(
    images: list[Path], write_manifest: WriteManifest
) -> None:
    """images x prompts x seeds expand in a stable order, each with its own id."""
    row = {"images": "images/*.png", "prompts": ["snow", "rain"], "seeds": [1, 2, 3]}
    first = load_manifest(write_manifest([row], name="one"))
    again = load_manifest(write_manifest([row], name="two"))
    got = [(r.image, r.prompt, r.seed) for r in first.rows]
    assert got == [
        (img, prompt, seed)
        for img in ("images/a.png", "images/d.png")
        for prompt in ("snow", "rain")
        for seed in (1, 2, 3)
    ]
    assert len(set(ids(first))) == 12
    assert ids(first) == ids(again)


def test_meta_carried_through(images: list[Path], write_manifest: WriteManifest) -> None:
    """`meta` reaches every expanded row untouched, and does not change the id."""
    row = {"image": "images/a.png", "prompts": ["a", "b"]}
    plain = load_manifest(write_manifest([row], name="plain"))
    tagged = load_manifest(
        write_manifest([{**row, "meta": {"split": "train", "w": 0.5, "ok": True}}], name="tagged")
    )
    assert [dict(r.meta) for r in tagged.rows] == [{"split": "train", "w": 0.5, "ok": True}] * 2
    assert ids(plain) == ids(tagged)


def test_seed_minus_one_is_kept(images: list[Path], write_manifest: WriteManifest) -> None:
    """Seed -1 (and a missing seed) stays -1 here; the runner picks the concrete seed later."""
    rows = [
        {"image": "images/a.png", "prompt": "a", "seed": -1},
        {"image": "images/a.png", "prompt": "b"},
    ]
    assert [r.seed for r in load_manifest(write_manifest(rows)).rows] == [-1, -1]


def test_defaults_merge(images: list[Path], write_manifest: WriteManifest) -> None:
    """`defaults` fill in what a row leaves out; a row's own value wins."""
    rows = [
        {"image": "images/a.png"},
        {"image": "images/b.jpg", "prompt": "own", "seed": 5, "output_format": "jpeg"},
    ]
    manifest = load_manifest(
        write_manifest(rows, defaults={"prompt": "shared", "seed": 9, "output_format": "webp"})
    )
    assert [(r.prompt, r.seed, r.output_format) for r in manifest.rows] == [
        ("shared", 9, "webp"),
        ("own", 5, "jpeg"),
    ]


def test_yaml_merge_keys_may_be_overridden(images: list[Path], write_text) -> None:
    """`<<: *base` then a row's own key is an override, not a duplicate-key problem."""
    path = write_text(
        "m.yaml",
        "rows:\n"
        "  - &base {image: images/a.png, prompt: shared, seed: 3}\n"
        "  - <<: *base\n"
        "    prompt: own\n",
    )
    assert [(r.prompt, r.seed) for r in load_manifest(path).rows] == [("shared", 3), ("own", 3)]


def test_bad_default_reported_once_at_its_line(images: list[Path], write_text) -> None:
    """A bad value in `defaults` is one problem at the defaults line, not one per row."""
    path = write_text(
        "m.yaml",
        "defaults:\n  output_format: tiff\n  sed: 1\nrows:\n"
        "  - {image: images/a.png, prompt: a}\n  - {image: images/b.jpg, prompt: b}\n",
    )
    assert located(problems_of(path)) == {(2, "defaults.output_format"), (3, "defaults.sed")}


# -- problems: all of them, located, never a crash ----------------------------


def test_all_problems_reported_in_line_order(images: list[Path], write_text) -> None:
    """Every problem of every row is reported at once, in file order."""
    path = write_text(
        "m.yaml",
        "modle: x/y\n"
        "rows:\n"
        "  - image: images/nope.png\n"
        "    prompt: 5\n"
        "    seed: 99999999999\n"
        "  - image: images/a.png\n"
        "    promt: hi\n",
    )
    problems = problems_of(path)
    assert [(p.line, p.field) for p in problems] == [
        (1, "modle"),
        (3, "image"),
        (4, "prompt"),
        (5, "seed"),
        (6, "prompt"),
        (7, "promt"),
    ]
    assert "did you mean 'model'" in problems[0].reason
    assert "did you mean 'prompt'" in problems[-1].reason
    assert str(problems[0]).startswith(f"{path}:1: modle: ")


def test_expanded_row_problem_reported_once(images: list[Path], write_text) -> None:
    """A missing image used by three prompts is reported once, at the `image` line."""
    path = write_text("m.yaml", "- prompts: [a, b, c]\n  image: images/nope.png\n")
    assert [(p.line, p.field) for p in problems_of(path)] == [(2, "image")]


def test_expansion_problems_point_at_their_field(images: list[Path], write_text) -> None:
    """Problems in `images:`/`prompts:`/`seeds:` carry the line of that field."""
    path = write_text(
        "m.yaml",
        "- prompt: hi\n  images: images/*.txt\n"
        "- image: images/a.png\n  prompts: []\n"
        "- image: images/a.png\n  prompt: p\n  seeds: [1, x]\n",
    )
    assert located(problems_of(path)) == {(2, "images"), (4, "prompts"), (7, "seeds")}


def _row_with(params: Any) -> str:
    return json.dumps({"image": "images/a.png", "prompt": "p", "params": params}) + "\n"


# name, text, expected line, expected field
BAD_INPUTS: list[tuple[str, str, int | None, str]] = [
    ("null-image.yaml", "- image:\n  prompt: hi\n", 1, "image"),
    ("null-image.jsonl", '{"image": null, "prompt": "hi"}\n', 1, "image"),
    ("bad-date.yaml", "- image: images/a.png\n  prompt: x\n  seed: 2020-13-45\n", 3, "yaml"),
    ("bad-int-tag.yaml", "- image: images/a.png\n  prompt: !!int abc\n", 2, "yaml"),
    ("python-tag.yaml", "- !!python/object/apply:os.system [id]\n", 1, "yaml"),
    ("recursive.yaml", "- image: images/a.png\n  prompt: x\n  params: &a {x: *a}\n", 3, "yaml"),
    ("deep.yaml", "[" * 400 + "]" * 400 + "\n", 1, "yaml"),
    ("two-docs.yaml", "rows: []\n---\nrows: []\n", 2, "yaml"),
    ("comments-only.yaml", "# nothing here\n", None, "manifest"),
    ("scalar.yaml", "hello\n", 1, "manifest"),
    ("rows-scalar.yaml", "rows: 3\n", 1, "rows"),
    ("no-rows.yaml", "model: a/b\n", 1, "rows"),
    ("row-not-mapping.yaml", "- image: images/a.png\n  prompt: x\n- 12\n", 3, "rows"),
    ("dup-key.yaml", "- image: images/a.png\n  prompt: a\n  prompt: b\n", 3, "prompt"),
    ("nul-path.yaml", '- image: "images/a\\0.png"\n  prompt: x\n', 1, "image"),
    ("model-dots.yaml", "model: a/../../b\nrows: []\n", 1, "model"),
    ("meta-list.yaml", "- image: images/a.png\n  prompt: x\n  meta: {a: [1]}\n", 3, "meta.a"),
    (
        "reserved.yaml",
        "- image: images/a.png\n  prompt: x\n  params: {seed: 1}\n",
        3,
        "params.seed",
    ),
    ("folder-image.yaml", "- image: images\n  prompt: x\n", 1, "image"),
    ("both.yaml", "- image: images/a.png\n  images: images\n  prompt: x\n", 2, "images"),
    (
        "huge-int.jsonl",
        '{"image": "images/a.png", "prompt": "x", "seed": ' + "9" * 5000 + "}\n",
        1,
        "json",
    ),
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", 1, "json"),
    ("not-object.jsonl", "[1, 2]\n", 1, "json"),
    ("huge-seed.csv", "image,prompt,seed\nimages/a.png,x," + "9" * 5000 + "\n", 2, "seed"),
    ("unicode-digit.csv", "image,prompt,repeat\nimages/a.png,x,\u00b2\n", 2, "repeat"),
    ("arabic-seed.csv", "image,prompt,seed\nimages/a.png,x,\u0663\n", 2, "seed"),
    ("short-row.csv", "image,prompt,seed\nimages/a.png,x\n", 2, "csv"),
    ("dup-column.csv", "image,prompt,prompt\n", 1, "header"),
    ("bad-column.csv", "image,prompt,sed\n", 1, "sed"),
    ("whitespace.csv", "  \n\n", None, "manifest"),
    ("manifest.txt", "image,prompt\n", None, "manifest"),
    # limits, and values the API cannot take (the worst of each is in tests/corpus)
    ("alias-loop.yaml", "- image: images/a.png\n  prompt: x\n  params: &l {a: [*l]}\n", 3, "yaml"),
    ("key-list.yaml", "- image: images/a.png\n  prompt: x\n  ? [a, b]\n  : 1\n", 3, "yaml"),
    (
        "deep-params.jsonl",
        _row_with(json.loads('{"a":' * 21 + "1" + "}" * 21)),
        1,
        "params" + ".a" * 20,
    ),
    (
        "deep-cell.csv",
        'image,prompt,params.x\nimages/a.png,p,"' + "[" * 25 + "]" * 25 + '"\n',
        2,
        "params.x" + "[0]" * 19,
    ),
    ("surrogate-key.jsonl", _row_with({"neg\udc00": 1}), 1, "params.'neg\\udc00'"),
    ("surrogate-deep.jsonl", _row_with({"sizes": [1, "\ud83c"]}), 1, "params.sizes[1]"),
    (
        "surrogate-meta-key.jsonl",
        '{"image": "images/a.png", "prompt": "p", "meta": {"\\ud800": 1}}\n',
        1,
        "meta.'\\ud800'",
    ),
    ("surrogate-images.yaml", '- images: "images/\\ud83c*.png"\n  prompt: x\n', 1, "images"),
    (
        "minus-infinity.jsonl",
        '{"image": "images/a.png", "prompt": "p", "params": {"s": -Infinity}}\n',
        1,
        "json",
    ),
    (
        "nan-meta.yaml",
        "- image: images/a.png\n  prompt: x\n  meta: {score: .nan}\n",
        3,
        "meta.score",
    ),
    ("huge-int-param.jsonl", _row_with({"steps": 10**30}), 1, "params.steps"),
    (
        "date-param.yaml",
        "- image: images/a.png\n  prompt: x\n  params: {when: 2024-05-01}\n",
        3,
        "params.when",
    ),
    (
        "binary-param.yaml",
        "- image: images/a.png\n  prompt: x\n  params: {m: !!binary aGk=}\n",
        3,
        "params.m",
    ),
    (
        "dup-param.jsonl",
        '{"image": "images/a.png", "prompt": "p", "params": {"s": 1, "s": 2}}\n',
        1,
        "s",
    ),
    (
        "dup-in-cell.csv",
        'image,prompt,params.size\nimages/a.png,p,"{""w"": 1, ""w"": 2}"\n',
        2,
        "params.size",
    ),
    (
        "big-meta.jsonl",
        '{"image": "images/a.png", "prompt": "p", "meta": {"n": "' + "a" * 70_000 + '"}}\n',
        1,
        "meta",
    ),
    ("bad-out.yaml", 'out: "x\\ud83c"\nrows: []\n', 1, "out"),
    ("huge-setting.yaml", "concurrency: [[[[1, 2, 3, 4, 5, 6]]]]\nrows: []\n", 1, "concurrency"),
]


@pytest.mark.parametrize(
    ("name", "text", "line", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_becomes_a_located_problem(
    images: list[Path], write_text, name: str, text: str, line: int | None, field: str
) -> None:
    """Odd inputs (nulls, bad tags, deep nesting, huge numbers) are problems, never crashes."""
    problems = problems_of(write_text(name, text))
    assert (line, field) in located(problems), problems


def test_model_override_is_checked(images: list[Path], write_manifest: WriteManifest) -> None:
    """A `--model` with `..` segments would leave the API's model path: refused."""
    path = write_manifest([{"image": "images/a.png", "prompt": "p"}])
    assert located(problems_of(path, model="../admin")) == {(None, "model")}


def test_missing_manifest_file(tmp_path: Path) -> None:
    """A manifest path that does not exist is a problem, not a crash."""
    (problem,) = problems_of(tmp_path / "absent.yaml")
    assert (problem.field, problem.reason) == ("manifest", "file does not exist")


def test_non_utf8_reports_its_line(tmp_path: Path) -> None:
    """A Latin-1 manifest is refused with the line of the first bad byte."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"image,prompt\nimages/a.png,caf\xe9\n")
    assert located(problems_of(path)) == {(2, "manifest")}


@pytest.mark.parametrize("kind", ["yaml", "csv", "jsonl"])
def test_mutated_manifests_never_crash(
    images: list[Path], write_manifest: WriteManifest, tmp_path: Path, kind: str
) -> None:
    """Random byte damage to a valid manifest gives rows or problems, never another exception."""
    rows = [
        {"id": "r1", "image": "images/a.png", "prompt": "add snow", "seed": 1},
        {"image": "images/b.jpg", "prompt": "add rain", "seed": -1, "output_format": "png"},
    ]
    original = write_manifest(rows, kind=kind).read_bytes()
    rng = random.Random(f"wsbatch-{kind}")
    alphabet = b"\x00\n\r\t \"',:-[]{}#&*!|>%@`\\/.?0123456789eE\xc3\xff"
    target = tmp_path / f"fuzz.{kind}"
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data) + 1)
            op = rng.random()
            if op < 0.4 and pos < len(data):
                data[pos] = rng.choice(alphabet)
            elif op < 0.7:
                data[pos:pos] = bytes([rng.choice(alphabet)]) * rng.randint(1, 3)
            else:
                del data[pos : pos + rng.randint(1, 8)]
        target.write_bytes(bytes(data))
        try:
            load_manifest(target)
        except ManifestError as exc:
            assert exc.problems and all(p.source == str(target) for p in exc.problems)


def test_id_that_could_collide_with_numbered_outputs_is_refused(tmp_path, images):
    """An explicit id like `x-2` next to a row `x` is refused: x's second output is x-2."""
    path = tmp_path / "clash.yaml"
    path.write_text(
        "- {id: x, image: images/a.png, prompt: p}\n- {id: x-2, image: images/a.png, prompt: q}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert "output 2 of row 'x'" in str(info.value)
    assert info.value.problems[0].line == 2


def test_plain_rows_take_the_same_checks_as_any_row(tmp_path, images):
    """The fast path for plain rows derives exactly the rows the general path does."""
    rows = [
        {"image": "images/a.png", "prompt": "p one", "seed": 3},
        {"image": "images/a.png", "prompt": "p one", "seed": 3},  # a repeat sample
        {"id": "named", "image": "images/b.jpg", "prompt": "p two", "output_format": "png"},
        {"image": "https://example.com/x.png", "prompt": "p three"},
    ]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = tmp_path / "general.yaml"  # defaults force the general path
    general.write_text(yaml.safe_dump({"defaults": {"repeat": 1}, "rows": rows}))

    def key(row):
        return (row.id, row.image, row.prompt, row.seed, row.output_format, row.fingerprint,
                dict(row.params), dict(row.meta), row.image_path)  # fmt: skip

    assert [key(r) for r in load_manifest(plain).rows] == [
        key(r) for r in load_manifest(general).rows
    ]
