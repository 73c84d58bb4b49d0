"""Exports that training code loads as they are (issue 16): InstructPix2Pix's default
columns, mixed jpg/png WebDataset shards, URL inputs embedded as bytes, NSFW skipping,
and no machine path in any file. Output folders are fabricated (no API run): fast."""

from __future__ import annotations

import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batch.export import export_dataset, write_metadata
from tests.conftest import make_image
from tests.test_datasets import fabricate, load, pixels, run_cli


def image_bytes(fmt: str, color: tuple[int, int, int], size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, fmt)
    return out.getvalue()


@dataclass
class Server:
    url: str
    files: dict[str, bytes]
    hits: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def images_server() -> Iterator[Server]:
    """A loopback HTTP server for image URLs: serves `files` by path, 404 otherwise."""
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] = hits.get(self.path, 0) + 1
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_address[1]}", files, hits)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Folder:
    out: Path
    sources: dict[str, bytes]  # row -> the input's bytes
    url_rows: list[str]


@pytest.fixture
def folder(tmp_path: Path, images_server: Server) -> Folder:
    """An output folder of 6 rows: jpg and png local inputs (one named by an absolute path),
    two URL inputs, a jpg output, one NSFW-flagged output, meta fields on every row."""
    photos = tmp_path / "photos"
    locals_ = {
        "a": make_image(photos / "a.jpg", (200, 30, 30)),
        "b": make_image(photos / "b.png", (30, 200, 30)),
        "c": make_image(photos / "c.jpg", (30, 30, 200)),
    }
    images_server.files["/cat.png"] = image_bytes("PNG", (10, 120, 220))
    images_server.files["/dog.jpg"] = image_bytes("JPEG", (240, 200, 10))
    url_of = {"u1": "/cat.png", "u2": "/dog.jpg"}
    rows: list[dict[str, Any]] = []
    for row, path in locals_.items():
        # Row c names its input by an absolute path, as `--images /abs/dir` does.
        reference = str(path) if row == "c" else f"photos/{path.name}"
        rows.append({"row": row, "image": reference, "image_path": str(path)})
    for row, path in url_of.items():
        rows.append({"row": row, "image": images_server.url + path, "image_path": None})
    rows[2]["outputs"] = ["c.jpg"]
    out = tmp_path / "out"
    for n, row in enumerate(rows):
        row["meta"] = {"source": "test", "weight": n}
    fabricate(out, rows)
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    for event in ledger:
        if event.get("row") == "b":
            event["nsfw"] = [True]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    sources = {row: path.read_bytes() for row, path in locals_.items()}
    sources.update({row: images_server.files[path] for row, path in url_of.items()})
    return Folder(out, sources, list(url_of))


# -- diffusers' train_instruct_pix2pix.py, its dataset path ---------------------------------


@dataclass
class TrainArgs:
    """The script's dataset arguments with their argparse defaults."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    cache_dir: str | None = None
    original_image_column: str = "input_image"
    edit_prompt_column: str = "edit_prompt"
    edited_image_column: str = "edited_image"
    resolution: int = 16
    train_batch_size: int = 2


def instruct_pix2pix_batches(args: TrainArgs) -> list[dict[str, Any]]:
    """diffusers' examples/instruct_pix2pix/train_instruct_pix2pix.py from load_dataset to
    its collate_fn, step for step; numpy stands in for torch and a stub for the CLIP
    tokenizer (neither can be had offline here), the column checks are the script's."""
    import numpy as np
    from datasets import load_dataset

    if args.dataset_name is not None:
        dataset = load_dataset(
            args.dataset_name,
            args.dataset_config_name,
            cache_dir=args.cache_dir,
            data_dir=args.train_data_dir,
        )
    else:
        data_files = {"train": str(Path(args.train_data_dir or "") / "**")}
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=args.cache_dir)

    column_names = dataset["train"].column_names
    for column in (
        args.original_image_column,
        args.edit_prompt_column,
        args.edited_image_column,
    ):
        if column not in column_names:
            raise ValueError(f"'{column}' needs to be one of: {', '.join(column_names)}")

    def convert_to_np(image: Any, resolution: int) -> Any:
        image = image.convert("RGB").resize((resolution, resolution))
        return np.array(image).transpose(2, 0, 1)

    def preprocess_images(examples: dict[str, Any]) -> Any:
        original_images = np.concatenate(
            [
                convert_to_np(image, args.resolution)
                for image in examples[args.original_image_column]
            ]
        )
        edited_images = np.concatenate(
            [convert_to_np(image, args.resolution) for image in examples[args.edited_image_column]]
        )
        images = np.stack([original_images, edited_images]).astype(np.float32)
        return 2 * (images / 255) - 1  # the script's train_transforms crop/flip come next

    def tokenize_captions(captions: list[str]) -> Any:
        return np.array([[len(c), *map(ord, c[:4].ljust(4))] for c in captions])

    def preprocess_train(examples: dict[str, Any]) -> dict[str, Any]:
        original_images, edited_images = preprocess_images(examples)
        res = args.resolution
        examples["original_pixel_values"] = original_images.reshape(-1, 3, res, res)
        examples["edited_pixel_values"] = edited_images.reshape(-1, 3, res, res)
        examples["input_ids"] = tokenize_captions(list(examples[args.edit_prompt_column]))
        return examples

    train_dataset = dataset["train"].with_transform(preprocess_train)

    def collate_fn(examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "original_pixel_values": np.stack([e["original_pixel_values"] for e in examples]),
            "edited_pixel_values": np.stack([e["edited_pixel_values"] for e in examples]),
            "input_ids": np.stack([e["input_ids"] for e in examples]),
        }

    size = args.train_batch_size
    items = [train_dataset[i] for i in range(len(train_dataset))]
    return [collate_fn(items[i : i + size]) for i in range(0, len(items), size)]


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The training script passes no cache_dir: keep its cache in tmp_path all the same."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_instruct_pix2pix_trains_on_the_readme_parquet_export_with_default_arguments(
    folder, tmp_path, hf_offline, monkeypatch
):
    """The README's `wsbatch export ... --to data/winter` then `--dataset_name data/winter`
    with every other argument left at its default reaches the training batches."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("export", folder.out, "--format", "parquet", "--to", "data/winter")
    assert code == 0, err
    batches = instruct_pix2pix_batches(TrainArgs(dataset_name="data/winter"))
    assert sum(len(b["input_ids"]) for b in batches) == 5
    first = batches[0]
    assert first["original_pixel_values"].shape == (2, 3, 16, 16)
    assert first["edited_pixel_values"].shape == (2, 3, 16, 16)
    assert -1 <= first["original_pixel_values"].min() <= first["original_pixel_values"].max() <= 1
    # Row "a" (first by output name): its red jpg input, not its edit, is the original.
    red = first["original_pixel_values"][0]
    assert red[0].mean() > 0.5 > red[2].mean()


def test_instruct_pix2pix_trains_on_the_imagefolder_route_after_an_export(
    folder, tmp_path, hf_offline
):
    """After an export, `--train_data_dir OUT_DIR` (imagefolder on metadata.jsonl) gives the
    script input and edited images under its default column names."""
    export_dataset(folder.out, "parquet")
    batches = instruct_pix2pix_batches(TrainArgs(train_data_dir=str(folder.out)))
    assert sum(len(b["input_ids"]) for b in batches) == 5
    ds = load("imagefolder", tmp_path, data_dir=str(folder.out))
    assert ds.column_names[:3] == ["input_image", "edit_prompt", "edited_image"]
    for sample in ds:
        assert pixels(sample["input_image"]) == pixels(folder.sources[sample["row"]])


# -- WebDataset -----------------------------------------------------------------------------


def test_datasets_webdataset_loader_accepts_an_export_mixing_jpg_and_png(folder, tmp_path):
    """load_dataset("webdataset") reads shards whose inputs and outputs mix jpg and png:
    every sample has the same member names, keys are the output names."""
    datasets = pytest.importorskip("datasets")
    shards = export_dataset(folder.out, "webdataset", to=str(tmp_path / "wds"), shard_size=2)
    assert len(shards) == 3
    ds = load("webdataset", tmp_path, data_files={"train": shards})
    assert ds.num_rows == 5
    assert isinstance(ds.features["input.png"], datasets.Image)
    assert isinstance(ds.features["edited.png"], datasets.Image)
    assert sorted(ds.column_names) == ["__key__", "__url__", "edited.png", "input.png", "json"]
    assert ds["__key__"] == ["a", "b", "c", "u1", "u2"]
    for sample in ds:
        row = sample["json"]["row"]
        assert pixels(sample["input.png"]) == pixels(folder.sources[row])
        edited = folder.out / sample["json"]["file_name"]
        assert pixels(sample["edited.png"]) == pixels(edited)


# -- URL inputs -----------------------------------------------------------------------------


def test_url_inputs_are_fetched_once_and_embedded_as_bytes_in_both_exports(
    folder, tmp_path, images_server
):
    """An input given as a URL is fetched once into OUT_DIR/.originals (sha-checked, fetched
    again when damaged) and stored as image bytes in Parquet and in WebDataset."""
    datasets = pytest.importorskip("datasets")
    wds = pytest.importorskip("webdataset")
    written = export_dataset(folder.out, "parquet", to=str(tmp_path / "pq"))
    raw = load("parquet", tmp_path, data_files=written).cast_column(
        "input_image", datasets.Image(decode=False)
    )
    by_row = {sample["row"]: sample for sample in raw}
    for row in folder.url_rows:
        assert by_row[row]["input_image"]["bytes"] == folder.sources[row]
        assert by_row[row]["input_source"].startswith(images_server.url)
    assert images_server.hits == {"/cat.png": 1, "/dog.jpg": 1}

    shards = export_dataset(folder.out, "webdataset", to=str(tmp_path / "wds"))
    samples = {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}
    for row in folder.url_rows:
        assert pixels(samples[row]["input.png"]) == pixels(folder.sources[row])
    assert images_server.hits == {"/cat.png": 1, "/dog.jpg": 1}  # the cache, not the network

    index = json.loads((folder.out / ".originals" / "urls.json").read_text())
    damaged = folder.out / ".originals" / index[images_server.url + "/cat.png"]
    damaged.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    export_dataset(folder.out, "parquet", to=str(tmp_path / "pq"))
    assert images_server.hits["/cat.png"] == 2
    assert damaged.read_bytes() == folder.sources["u1"]


def test_an_unreachable_url_input_leaves_its_pair_out_with_a_warning(
    folder, tmp_path, images_server, caplog
):
    """A URL input that answers 404 is reported and its output left out; the rest export."""
    del images_server.files["/dog.jpg"]
    with caplog.at_level(logging.WARNING, logger="wsbatch.export"):
        written = export_dataset(folder.out, "parquet", to=str(tmp_path / "pq"))
    assert "1 output(s) left out of the export: their input URL could not be fetched" in caplog.text
    assert "HTTP 404" in caplog.text
    rows = load("parquet", tmp_path, data_files=written)["row"]
    assert rows == ["a", "b", "c", "u1"]


# -- NSFW and machine paths -----------------------------------------------------------------


def test_skip_nsfw_leaves_flagged_outputs_out_of_both_exports(folder, tmp_path, hf_offline):
    """`wsbatch export --skip-nsfw` drops NSFW-flagged pairs; without it they stay, flagged."""
    wds = pytest.importorskip("webdataset")
    pq_dest, wds_dest = tmp_path / "pq", tmp_path / "wds"
    code, _, err = run_cli("export", folder.out, "--format", "parquet", "--to", pq_dest)
    assert code == 0, err
    kept = load("parquet", tmp_path, data_dir=str(pq_dest))
    assert dict(zip(kept["row"], kept["nsfw"], strict=True))["b"] is True
    args = ("--to", pq_dest, "--skip-nsfw")
    assert run_cli("export", folder.out, "--format", "parquet", *args)[0] == 0
    assert load("parquet", tmp_path / "2", data_dir=str(pq_dest))["row"] == ["a", "c", "u1", "u2"]
    shards = export_dataset(folder.out, "webdataset", to=str(wds_dest), skip_nsfw=True)
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert keys == ["a", "c", "u1", "u2"]


def every_string(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from every_string(item)
    elif isinstance(value, list):
        for item in value:
            yield from every_string(item)


def test_no_exported_file_holds_an_absolute_path(folder, tmp_path):
    """Parquet, WebDataset and metadata.jsonl name inputs by manifest path, URL or file name,
    never by an absolute path of this machine (even for an input named by one)."""
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("webdataset")
    root = str(tmp_path)
    parquet = export_dataset(folder.out, "parquet", to=str(tmp_path / "pq"))
    shards = export_dataset(folder.out, "webdataset", to=str(tmp_path / "wds"))
    metadata = write_metadata(folder.out)
    files: list[Path] = [*map(Path, parquet + shards), metadata]
    for file in files:
        assert root.encode() not in file.read_bytes(), file
    # Parquet pages are compressed: check the decoded values too.
    strings = list(every_string(pq.read_table(parquet[0]).to_pylist()))
    lines = metadata.read_text().splitlines()
    strings += [s for line in lines for s in every_string(json.loads(line))]
    assert strings and not [s for s in strings if s.startswith(("/", "\\")) or root in s]
    sources = {json.loads(line)["row"]: json.loads(line)["input_source"] for line in lines}
    assert sources["a"] == "photos/a.jpg" and sources["c"] == "c.jpg"
