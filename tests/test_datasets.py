"""Dataset workflows (SPEC §10): folder expansion, metadata.jsonl, Parquet and WebDataset."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from batch.emulator import Emulator, EmulatorConfig, serve_in_thread
from batch.errors import UsageError
from batch.export import DEFAULT_EXPORT_DIR, METADATA_NAME, export_dataset, write_metadata
from tests.conftest import API_KEY, make_image

# `datasets` reads these when imported (lazily, below): never reach the Hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

PROMPTS = ["make it autumn", "make it winter"]
SEEDS = [1, 2]
N_IMAGES = 12
N_ROWS = N_IMAGES * len(PROMPTS) * len(SEEDS)


@dataclass
class Batch:
    root: Path
    manifest: Path
    out: Path
    emulator: Emulator
    uploads: int  # emulator counters right after the first run
    submits: int
    first_code: int

    def completed(self) -> dict[str, dict[str, Any]]:
        events = [json.loads(line) for line in (self.out / "ledger.jsonl").read_text().splitlines()]
        return {e["row"]: e for e in events if e["event"] == "completed"}


def run_cli(*args: Any) -> tuple[int, str, str]:
    from batch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batch]:
    """12 images x 2 prompts x 2 seeds, run once against the emulator."""
    root = tmp_path_factory.mktemp("datasets")
    for i in range(N_IMAGES):
        # Distinct colours, PNG and JPEG inputs mixed.
        make_image(
            root / "photos" / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", (20 * i, 90, 240 - i)
        )
    manifest = root / "trees.yaml"
    row = {"images": "photos/", "prompts": PROMPTS, "seeds": SEEDS, "meta": {"source": "test"}}
    manifest.write_text(yaml.safe_dump({"defaults": {"output_format": "png"}, "rows": [row]}))
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        # The autouse env fixture is per test; this run happens before any test.
        mp.setenv("WSBATCH_ZERO_BACKOFF", "1")
        mp.setenv("WSBATCH_POLL_FLOOR", "0.05")
        mp.setenv("WAVESPEED_API_KEY", API_KEY)
        mp.delenv("WAVESPEED_BASE_URL", raising=False)
        with serve_in_thread(EmulatorConfig(api_key=API_KEY, seed=1)) as emu:
            code, _, err = run_cli(
                "run", manifest, "--base-url", emu.base_url, "--out", out, "--no-progress"
            )
            assert code == 0, err
            yield Batch(
                root, manifest, out, emu, emu.stats.uploads, emu.stats.submits_accepted, code
            )


def load(kind: str, tmp_path: Path, **kwargs: Any) -> Any:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets.load_dataset(kind, split="train", cache_dir=str(tmp_path / "hf"), **kwargs)


def pixels(source: Path | bytes | Image.Image) -> bytes:
    image = (
        source
        if isinstance(source, Image.Image)
        else Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    )
    return image.convert("RGB").tobytes()


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# -- the run -------------------------------------------------------------------------


def test_folder_row_expands_to_every_combination_uploading_each_image_once(batch):
    """`images: photos/` x 2 prompts x 2 seeds gives 48 tasks and uploads each image once."""
    completed = batch.completed()
    assert len(completed) == N_ROWS
    outputs = [name for e in completed.values() for name in e["outputs"]]
    assert len(outputs) == len(set(outputs)) == N_ROWS
    assert all((batch.out / name).is_file() for name in outputs)
    assert batch.uploads == N_IMAGES
    assert batch.submits == N_ROWS
    combos = {(e["image"], e["prompt"], e["seed"]) for e in completed.values()}
    assert len(combos) == N_ROWS
    assert all(e["meta"] == {"source": "test"} for e in completed.values())


def test_rerun_of_a_finished_expansion_sends_nothing(batch):
    """Running the same manifest again uploads nothing and submits nothing."""
    emu = batch.emulator
    code, _, err = run_cli(
        "run", batch.manifest, "--base-url", emu.base_url, "--out", batch.out, "--no-progress"
    )
    assert code == 0, err
    assert emu.stats.uploads == batch.uploads
    assert emu.stats.submits_accepted == batch.submits


# -- metadata.jsonl and imagefolder ------------------------------------------------------


def test_imagefolder_loads_one_sample_per_output_with_its_prompt_and_seed(batch, tmp_path):
    """load_dataset("imagefolder", data_dir=OUT_DIR) gives the 48 (input_image, edit_prompt,
    edited_image) pairs as images with their metadata, even with a report, stray files and
    default exports inside OUT_DIR."""
    (batch.out / "report.html").write_text("<html><img src='x.png'></html>")
    (batch.out / "notes.txt").write_text("not a sample")
    export_dataset(batch.out, "parquet")  # default destinations sit inside OUT_DIR
    export_dataset(batch.out, "webdataset")
    path = write_metadata(batch.out)
    assert path == batch.out / METADATA_NAME

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(lines[0])[:11] == [
        "input_image_file_name",
        "edit_prompt",
        "edited_image_file_name",
        "row",
        "seed",
        "model",
        "prediction_id",
        "inference_ms",
        "nsfw",
        "sha256",
        "input_source",
    ]
    names = [line["edited_image_file_name"] for line in lines]
    assert names == sorted(names)
    assert all(line["input_image_file_name"].startswith(".originals/") for line in lines)

    ds = load("imagefolder", tmp_path, data_dir=str(batch.out))
    assert ds.num_rows == N_ROWS
    assert ds.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
    completed = batch.completed()
    for sample in ds:
        event = completed[sample["row"]]
        assert sample["edit_prompt"] == event["prompt"]
        assert sample["seed"] == event["seed"]
        assert sample["source"] == "test"
        assert sample["prediction_id"] == event["prediction_id"]
        assert sample["input_source"] == event["image"]
        assert pixels(sample["edited_image"]) == pixels(batch.out / event["outputs"][0])
        assert pixels(sample["input_image"]) == pixels(Path(event["image_path"]))


def test_metadata_is_rewritten_identically_and_atomically(batch):
    """Rewriting metadata.jsonl from an unchanged ledger gives the same bytes, no temp left."""
    first = write_metadata(batch.out).read_bytes()
    second = write_metadata(batch.out).read_bytes()
    assert first == second
    assert len(first.splitlines()) == N_ROWS
    assert not [p for p in batch.out.iterdir() if p.name.endswith(".part")]


# -- Parquet ------------------------------------------------------------------------------


def test_parquet_export_loads_as_image_pairs_equal_to_the_files(batch, tmp_path):
    """The Parquet export loads with `datasets` as Image pairs byte-equal to input and output."""
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    dest = tmp_path / "pq"
    written = export_dataset(batch.out, "parquet", to=str(dest), shard_size=20)
    assert [Path(p).name for p in written] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    for path in written:
        meta = pq.ParquetFile(path).metadata
        assert all(meta.row_group(i).num_rows <= 100 for i in range(meta.num_row_groups))
        assert b"huggingface" in pq.read_schema(path).metadata

    ds = load("parquet", tmp_path, data_files=sorted(written))
    assert ds.num_rows == N_ROWS
    assert isinstance(ds.features["input_image"], datasets.Image)
    assert isinstance(ds.features["edited_image"], datasets.Image)
    assert ds.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
    completed = batch.completed()
    decoded = ds[0]
    event = completed[decoded["row"]]
    assert pixels(decoded["edited_image"]) == pixels(batch.out / event["outputs"][0])
    assert pixels(decoded["input_image"]) == pixels(Path(event["image_path"]))

    raw = ds.cast_column("input_image", datasets.Image(decode=False)).cast_column(
        "edited_image", datasets.Image(decode=False)
    )
    for sample in raw:
        event = completed[sample["row"]]
        assert sample["edited_image"]["bytes"] == (batch.out / event["outputs"][0]).read_bytes()
        assert sample["input_image"]["bytes"] == Path(event["image_path"]).read_bytes()
        assert sample["input_source"] == event["image"]
        assert sample["edit_prompt"] == event["prompt"]
        assert (sample["seed"], sample["model"]) == (event["seed"], event["model"])
        assert sample["prediction_id"] == event["prediction_id"]
        assert (sample["nsfw"], sample["sha256"]) == (event["nsfw"][0], event["sha256"][0])
        assert sample["inference_ms"] == event["inference_ms"]
        assert sample["source"] == "test"


def test_a_smaller_export_replaces_the_shards_of_a_larger_one(batch, tmp_path):
    """Re-exporting with bigger shards leaves no stale shard (nor a killed export's temp
    file) behind."""
    pq = pytest.importorskip("pyarrow.parquet")
    dest = tmp_path / "pq"
    export_dataset(batch.out, "parquet", to=str(dest), shard_size=10)
    export_dataset(batch.out, "webdataset", to=str(dest / "wds"), shard_size=10)
    assert len(list((dest / "data").iterdir())) == 5
    (dest / "data" / ".wsbatch-killed.part").write_bytes(b"half a shard")
    written = export_dataset(batch.out, "parquet", to=str(dest), shard_size=1000)
    export_dataset(batch.out, "webdataset", to=str(dest / "wds"), shard_size=1000)
    assert sorted((dest / "data").iterdir()) == [Path(p) for p in written]
    assert [p.name for p in (dest / "wds").iterdir()] == ["shard-000000.tar"]
    assert pq.read_table(dest / "data").num_rows == N_ROWS


# -- WebDataset ---------------------------------------------------------------------------


def test_webdataset_shards_read_back_with_the_webdataset_library(batch, tmp_path):
    """The tar shards read back with `webdataset` as 48 (input, edited, json) samples keyed
    by output name, mixed jpg/png inputs stored under one member name."""
    wds = pytest.importorskip("webdataset")
    written = export_dataset(batch.out, "webdataset", to=str(tmp_path / "wds"), shard_size=20)
    assert [Path(p).name for p in written] == [f"shard-00000{i}.tar" for i in range(3)]
    completed = batch.completed()
    samples = list(wds.WebDataset(written, shardshuffle=False, empty_check=False))
    assert len(samples) == N_ROWS
    assert len({s["__key__"] for s in samples}) == N_ROWS
    for sample in samples:
        assert "." not in sample["__key__"]
        assert sorted(k for k in sample if not k.startswith("__")) == [
            "edited.png",
            "input.png",
            "json",
        ]
        meta = json.loads(sample["json"])
        event = completed[meta["row"]]
        assert f"{sample['__key__']}.png" == event["outputs"][0] == meta["file_name"]
        assert (meta["edit_prompt"], meta["seed"], meta["source"]) == (
            event["prompt"],
            event["seed"],
            "test",
        )
        assert sample["edited.png"] == (batch.out / event["outputs"][0]).read_bytes()
        # PNG inputs keep their bytes, JPEG ones are re-encoded losslessly as PNG.
        source = Path(event["image_path"])
        assert pixels(sample["input.png"]) == pixels(source)
        if source.suffix == ".png":
            assert sample["input.png"] == source.read_bytes()


def test_exporting_twice_gives_byte_identical_files(batch, tmp_path):
    """Two exports of the same OUT_DIR, in either format, are byte-for-byte the same."""
    for fmt in ("parquet", "webdataset"):
        export_dataset(batch.out, fmt, to=str(tmp_path / "a" / fmt), shard_size=25)
        first = tree_digest(tmp_path / "a" / fmt)
        export_dataset(batch.out, fmt, to=str(tmp_path / "a" / fmt), shard_size=25)
        elsewhere = tmp_path / "b" / fmt
        export_dataset(batch.out, fmt, to=str(elsewhere), shard_size=25)
        assert len(first) == 2
        assert tree_digest(tmp_path / "a" / fmt) == first == tree_digest(elsewhere)


# -- object stores ----------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on a free loopback port with bucket `exports`; yields its URL."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="exports")
        yield url
    finally:
        server.stop()


def test_export_to_s3_writes_readable_shards(batch, s3, monkeypatch):
    """--to s3://bucket/prefix writes Parquet (and WebDataset) shards that read back whole."""
    s3fs = pytest.importorskip("s3fs")
    pq = pytest.importorskip("pyarrow.parquet")
    options = {"client_kwargs": {"endpoint_url": s3}}
    written = export_dataset(
        batch.out, "parquet", to="s3://exports/trees", shard_size=30, storage_options=options
    )
    assert written == [
        "s3://exports/trees/data/train-00000-of-00002.parquet",
        "s3://exports/trees/data/train-00001-of-00002.parquet",
    ]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}, skip_instance_cache=True)
    table = pq.read_table([w.removeprefix("s3://") for w in written], filesystem=fs)
    assert table.num_rows == N_ROWS
    local = export_dataset(batch.out, "parquet", to=str(batch.root / "s3-twin"), shard_size=30)
    assert fs.cat(written[0].removeprefix("s3://")) == Path(local[0]).read_bytes()

    # Without storage options, as `wsbatch export --to` runs: botocore reads the endpoint
    # from AWS_ENDPOINT_URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    shards = export_dataset(batch.out, "webdataset", to="s3://exports/wds", shard_size=30)
    assert shards == ["s3://exports/wds/shard-000000.tar", "s3://exports/wds/shard-000001.tar"]
    assert fs.ls("exports/wds") == [s.removeprefix("s3://") for s in shards]

    # An export that fails midway publishes no truncated shard.
    monkeypatch.setattr("batch.export._load", fail_after(20))
    with pytest.raises(RuntimeError, match="disk gone"):
        export_dataset(batch.out, "webdataset", to="s3://exports/broken", shard_size=1000)
    assert not fs.exists("exports/broken/shard-000000.tar")


def fail_after(n: int) -> Any:
    """A stand-in for export's file reader that fails on its n+1th call."""
    from batch import export

    real, calls = export._load, [0]

    def load(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] > n:
            raise RuntimeError("disk gone")
        return real(*args)

    return load


def test_a_failed_export_keeps_the_previous_files_whole(batch, tmp_path, monkeypatch):
    """An export that dies midway leaves the previous shard in place and no temp file."""
    dest = tmp_path / "pq"
    (before,) = export_dataset(batch.out, "parquet", to=str(dest))
    digest = hashlib.sha256(Path(before).read_bytes()).hexdigest()
    monkeypatch.setattr("batch.export._load", fail_after(30))
    with pytest.raises(RuntimeError, match="disk gone"):
        export_dataset(batch.out, "parquet", to=str(dest))
    assert [p.name for p in (dest / "data").iterdir()] == [Path(before).name]
    assert hashlib.sha256(Path(before).read_bytes()).hexdigest() == digest


# -- edge cases from fabricated ledgers ----------------------------------------------------------


def fabricate(out: Path, rows: list[dict[str, Any]]) -> None:
    """An OUT_DIR whose ledger holds these completed rows (written without the API)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"ts": "2026-01-01T00:00:00.000Z", "event": "run", "model": "m/x", "rows": len(rows)}]
    for n, row in enumerate(rows):
        name = row.get("outputs", [f"{row['row']}.png"])
        for out_name in name:
            if "/" not in out_name:
                make_image(out / out_name, (n * 10, 20, 30))
        lines.append(
            {
                "ts": "2026-01-01T00:00:01.000Z",
                "event": "completed",
                "prediction_id": f"p{n}",
                "outputs": name,
                "sha256": ["0" * 64] * len(name),
                "nsfw": [False] * len(name),
                "inference_ms": 1000,
                "seed": n,
                "model": "m/x",
                "prompt": f"prompt {n}",
                **row,
            }
        )
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def test_meta_keys_never_clobber_standard_columns_or_break_loading(tmp_path):
    """Meta keys named like standard columns or file paths, and of mixed types, still load."""
    source = make_image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    common = {"image": "in/a.png", "image_path": str(source)}
    fabricate(
        out,
        [
            {
                "row": "r1",
                **common,
                "meta": {"seed": "s", "file_name": "f", "mask_file_name": "m", "image": "i"},
            },
            {"row": "r2", **common, "meta": {"n": 1, "flag": True}},
            {"row": "r3", **common, "meta": {"n": "one", "flag": False}},
        ],
    )
    lines = [json.loads(line) for line in write_metadata(out).read_text().splitlines()]
    assert [line["seed"] for line in lines] == [0, 1, 2]  # the task's seed, not meta's
    assert lines[0]["meta_seed"] == "s"
    assert lines[0]["meta_filename"] == "f"
    assert lines[0]["meta_mask_filename"] == "m"
    assert lines[0]["meta_image"] == "i"
    assert [line["n"] for line in lines] == [None, "1", "one"]
    assert [line["flag"] for line in lines] == [None, True, False]
    ds = load("imagefolder", tmp_path, data_dir=str(out))
    assert ds.num_rows == 3 and ds[0]["meta_filename"] == "f"
    written = export_dataset(out, "parquet", to=str(tmp_path / "pq"))
    table = load("parquet", tmp_path, data_files=written)
    assert table["meta_seed"] == ["s", None, None] and table["seed"] == [0, 1, 2]


def test_vanished_inputs_and_escaping_names_are_left_out(tmp_path, caplog):
    """An output whose local input is gone is skipped, loudly; a ledger naming ../ is ignored."""
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "out"
    source = make_image(tmp_path / "in" / "a.png")
    common = {"image": "in/a.png", "image_path": str(source)}
    fabricate(
        out,
        [
            {"row": "by.dot", **common},
            {"row": "gone", "image": "x.png", "image_path": str(tmp_path / "missing.png")},
            {"row": "evil", "outputs": ["../escape.png"], **common},
        ],
    )
    make_image(tmp_path / "escape.png")
    with caplog.at_level(logging.WARNING, logger="wsbatch.export"):
        written = export_dataset(out, "parquet", to=str(tmp_path / "pq"))
    assert "1 output(s) left out" in caplog.text and "gone.png" in caplog.text
    assert load("parquet", tmp_path, data_files=written)["row"] == ["by.dot"]

    shards = export_dataset(out, "webdataset", to=str(tmp_path / "wds"))
    samples = list(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["by%2Edot"]
    # metadata.jsonl lists every existing output (it needs no input bytes), never ../
    lines = [json.loads(x) for x in write_metadata(out).read_text().splitlines()]
    assert [x["edited_image_file_name"] for x in lines] == ["by.dot.png", "gone.png"]
    assert lines[1]["input_image_file_name"] is None


def test_ids_with_split_words_get_a_warning_and_a_workaround_that_loads(tmp_path, caplog):
    """Output names the imagefolder loader would read as splits are flagged, with a fix."""
    source = make_image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    rows = [{"row": r, "image": "in/a.png", "image_path": str(source)} for r in ("a", "cat-test-1")]
    fabricate(out, rows)
    with caplog.at_level(logging.WARNING, logger="wsbatch.export"):
        write_metadata(out)
    assert "1 output name(s) hold a split word (first: cat-test-1.png)" in caplog.text
    ds = load("imagefolder", tmp_path, data_files={"train": f"{out}/**"})
    assert sorted(ds["row"]) == ["a", "cat-test-1"]


def test_a_parquet_export_into_a_visible_folder_of_out_dir_warns(tmp_path, caplog):
    """--to a visible folder inside OUT_DIR warns that imagefolder would see its splits."""
    out = tmp_path / "out"
    source = make_image(tmp_path / "a.png")
    fabricate(out, [{"row": "a", "image": "a.png", "image_path": str(source)}])
    with caplog.at_level(logging.WARNING, logger="wsbatch.export"):
        export_dataset(out, "parquet", to=str(out / ".hidden" / "pq"))
        assert "inside" not in caplog.text
        export_dataset(out, "parquet", to=str(out / "export"))
    assert "would take its train-* files for a split" in caplog.text


def test_missing_export_dependencies_name_the_extra_to_install(tmp_path, monkeypatch):
    """Without pyarrow, a Parquet export says to `pip install 'wsbatch[export]'`."""
    fabricate(tmp_path / "out", [{"row": "a", "image": "https://example.com/a.png"}])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UsageError, match=r"pip install 'wsbatch\[export\]'"):
        export_dataset(tmp_path / "out", "parquet")
    with pytest.raises(UsageError, match="no ledger"):
        export_dataset(tmp_path, "webdataset")
    assert DEFAULT_EXPORT_DIR.startswith(".")  # the imagefolder loader skips hidden folders
