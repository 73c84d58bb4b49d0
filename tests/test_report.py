"""The HTML report: built from the ledger alone, grouped, escaped, with hints and thumbnails.

These tests read the page's HTML and its JSON blob; tests/test_report_browser.py
drives the same pages in headless Chromium.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import batch.report
import batch.report_assets
import batch.thumbs
from batch.errors import UsageError
from batch.report import write_report
from batch.thumbs import THUMB_DIR, THUMB_PX
from tests.conftest import make_image, simple_rows

XSS_PROMPT = '<script>window.__xss = 1</script><b>bold</b> & "quoted" <img src=x onerror=alert(1)>'
MODERATION = "flagged by moderation"
DATA = re.compile(r'<script id="wsbatch-data" type="application/json">(.*?)</script>', re.S)


def run_batch(emulator, images, write_manifest, cli, tmp_path: Path) -> Path:
    """A real run: row-0000 fails moderation, row-0002 has an HTML prompt, two outputs each."""
    emulator.config.latency = (0.02, 0.2)
    emulator.config.outputs_per_task = 2
    rows = simple_rows(images, 6)
    rows[2]["prompt"] = XSS_PROMPT
    rows[3]["output_format"] = "webp"
    # One task at a time, in manifest order, so the forced failure lands on row-0000.
    emulator.fail_next_tasks(1200, MODERATION)
    out = tmp_path / "out"
    result = cli(
        "run",
        write_manifest(rows),
        "--base-url",
        emulator.base_url,
        "--out",
        out,
        "--no-progress",
        "--concurrency",
        "1",
        "--queue-ahead",
        "0",
    )
    assert result.code == 1, result.err  # one failed row
    return out


def report_data(page: str) -> dict[str, Any]:
    """The page's JSON blob, as the script reads it."""
    found = DATA.search(page)
    assert found is not None, "no data blob in the page"
    data: dict[str, Any] = json.loads(found[1])
    return data


def rows_by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in data["rows"]}


def write_ledger(out: Path, events: list[dict[str, Any]], name: str = "ledger.jsonl") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")


def run_event(manifest: str = "manifests/m.yaml", **extra: Any) -> dict[str, Any]:
    return {
        "ts": "2026-01-01T00:00:00Z",
        "event": "run",
        "run_id": "r1",
        "model": "m",
        "manifest": manifest,
        "manifest_path": "/home/someone/project/" + manifest,
        "rows": 1,
        **extra,
    }


def completed(row: str, second: int, **extra: Any) -> list[dict[str, Any]]:
    """A submitted + completed pair for a synthetic ledger, ``second`` seconds apart."""
    return [
        {
            "ts": "2026-01-01T00:00:00.000Z",
            "event": "submitted",
            "row": row,
            "seed": 1,
            "prediction_id": f"p-{row}",
        },
        {
            "ts": f"2026-01-01T00:{second // 60:02d}:{second % 60:02d}.000Z",
            "event": "completed",
            "row": row,
            "prediction_id": f"p-{row}",
            "outputs": [f"{row}.png"],
            "sha256": ["0" * 64],
            "nsfw": [False],
            "inference_ms": 900,
            "seed": 1,
            "model": "m",
            "prompt": f"prompt of {row}",
            "image": "images/a.png",
            "image_path": None,
            **extra,
        },
    ]


def failed(row: str, code: Any, error: str, retryable: bool, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"ts": "2026-01-01T00:00:00Z", "event": "submitted", "row": row, "seed": 2,
         "prediction_id": f"p-{row}"},
        {"ts": "2026-01-01T00:00:05Z", "event": "failed", "row": row, "code": code,
         "error": error, "retryable": retryable, "live": False, "prediction_id": f"p-{row}",
         "prompt": f"prompt of {row}", "image": "images/a.png", **extra},
    ]  # fmt: skip


# -- a real run against the emulator ------------------------------------------


def test_report_of_a_real_run_groups_rows_by_input_with_thumbnails(
    emulator, images, write_manifest, cli, tmp_path
):
    """A real run's report: every row once, grouped by input, every output with a thumbnail."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    report = write_report(out)
    assert report == out / "report.html"
    page = report.read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".report-")]  # no temp left
    data = report_data(page)
    rows = rows_by_id(data)
    assert sorted(rows) == [f"row-{i:04d}" for i in range(6)]

    # One group per input image: a.png and b.jpg have two edits each, c and d one.
    labels = [g[0] for g in data["groups"]]
    assert sorted(labels) == ["images/a.png", "images/b.jpg", "images/c.webp", "images/d.png"]
    by_label = {g[0]: n for n, g in enumerate(data["groups"])}
    assert rows["row-0000"]["g"] == rows["row-0004"]["g"] == by_label["images/a.png"]
    assert rows["row-0001"]["g"] == rows["row-0005"]["g"] == by_label["images/b.jpg"]
    # Each original is shown by its thumbnail; it lies outside the folder, so it is not linked.
    assert {g[1] for g in data["groups"]} == {None}
    thumbs = {p.name for p in (out / THUMB_DIR).iterdir()}
    assert all(g[2] in thumbs for g in data["groups"])

    # Every output file of every completed row is listed with its thumbnail.
    outputs = [o for r in data["rows"] for o in r.get("o", [])]
    assert len(outputs) == 10  # 5 completed rows x 2 outputs
    assert all((out / name).is_file() and thumb in thumbs for name, thumb, _ in outputs)
    assert data["outDir"] == "" and data["thumbDir"] == ".thumbs/"

    # The failure: its cause, the permanent hint and the exact command.
    assert rows["row-0000"]["st"] == "failed"
    (cause,) = data["causes"]
    assert cause["code"] == "1200" and cause["msg"] == MODERATION
    assert cause["cmd"].endswith("--retry-failed") and cause["cmd"].startswith("wsbatch run ")
    assert "Failures by cause (1)" in page and html.escape(cause["cmd"]) in page

    # The prompt travels as data, never as markup.
    assert rows["row-0002"]["p"] == XSS_PROMPT
    assert "<script>window" not in page and "<b>bold" not in page and "<img src=x" not in page
    # Totals and the latency histogram are on the page itself.
    assert re.search(r'<div class="n">6</div><div class="l">submits</div>', page)
    svg = re.search(r'<svg class="hist".*?</svg>', page, re.S)
    assert svg is not None and len(re.findall(r'<rect class="bar"', svg[0])) >= 1


def test_report_written_elsewhere_links_back_to_the_outputs(
    emulator, images, write_manifest, cli, tmp_path
):
    """A report written outside OUT_DIR links outputs and thumbnails relative to itself."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    dest = write_report(out, tmp_path / "reports" / "run.html")
    data = report_data(dest.read_text())
    assert not (out / "report.html").exists()
    assert data["outDir"] == "../out/" and data["thumbDir"] == "../out/.thumbs/"


def test_only_inputs_inside_the_folder_are_linked(tmp_path):
    """An input inside OUT_DIR links relatively; one outside shows by thumbnail and name only."""
    out = tmp_path / "out"
    make_image(out / "inputs" / "in side.png")
    make_image(tmp_path / "elsewhere" / "far.png")
    write_ledger(
        out,
        [
            run_event(rows=2),
            *completed("a", 1, image="inputs/in side.png",
                       image_path=str(out / "inputs" / "in side.png")),
            *completed("b", 2, image=str(tmp_path / "elsewhere" / "far.png"),
                       image_path=str(tmp_path / "elsewhere" / "far.png")),
        ],
    )  # fmt: skip
    page = write_report(out).read_text()
    groups = {g[0]: g for g in report_data(page)["groups"]}
    assert groups["inputs/in side.png"][1] == "inputs/in%20side.png"
    assert groups["far.png"][1] is None  # typed absolute: shown by its name alone
    assert all(g[2] for g in groups.values())  # both have thumbnails
    assert str(tmp_path) not in page


def test_report_cli_self_contained_embeds_every_thumbnail(
    emulator, images, write_manifest, cli, tmp_path
):
    """`wsbatch report --self-contained` embeds each thumbnail the page shows as a data: URI."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    result = cli("report", out, "--self-contained")
    assert result.code == 0, result.err
    data = report_data((out / "report.html").read_text())
    shown = {g[2] for g in data["groups"]} | {o[1] for r in data["rows"] for o in r.get("o", [])}
    assert shown and set(data["embedded"]) == shown
    assert all(
        re.fullmatch(r"data:image/\w+;base64,[\w+/=]+", v) for v in data["embedded"].values()
    )


# -- synthetic ledgers --------------------------------------------------------


def test_report_without_a_ledger_is_a_usage_error(tmp_path):
    """`wsbatch report` on a folder without a ledger says so instead of writing an empty page."""
    with pytest.raises(UsageError, match="no ledger"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_remote_inputs_are_linked_and_unsafe_references_are_not(tmp_path, monkeypatch):
    """http(s) inputs become links (never loaded by the page); javascript: stays text."""
    out = tmp_path / "out"
    write_ledger(
        out,
        completed("remote", 2, image="https://cdn.example.com/a.png?x=1&y=2")
        + completed("evil", 3, image="javascript:alert(1)"),
    )

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the report must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data = report_data(write_report(out).read_text())
    groups = {g[0]: g for g in data["groups"]}
    assert groups["https://cdn.example.com/a.png?x=1&y=2"][1:] == [
        "https://cdn.example.com/a.png?x=1&y=2",
        None,
        1,  # remote: a link, no thumbnail
    ]
    assert groups["javascript:alert(1)"][1] is None  # shown as text, for the record


def test_json_blob_cannot_close_its_script_or_inject_markup(tmp_path):
    """Prompts with </script>, <!--, & and U+2028 stay inside the JSON blob, byte for byte."""
    nasty = "</script><script>window.__xss=1</script><!-- & </SCRIPT > \u2028\u2029 'q' \"dq\""
    out = tmp_path / "out"
    write_ledger(out, completed("x", 1, prompt=nasty, image=nasty, meta={"<k>": "</script>"}))
    page = write_report(out).read_text()
    assert page.count("</script>") == 2  # the blob's and the script's own end tags
    assert "<!--" not in page and "</SCRIPT" not in page and "\u2028" not in page
    data = report_data(page)
    assert data["rows"][0]["p"] == nasty and data["groups"][0][0] == nasty
    assert data["rows"][0]["meta"] == "<k>=</script>"
    # Only our own script may run: the CSP names its hash.
    assert f"script-src 'sha256-{batch.report.SCRIPT_HASH}'" in page
    assert page.count("<script") == 2


def test_script_sets_only_text_never_markup():
    """The page script writes ledger text with textContent only (no innerHTML or eval)."""
    script = batch.report_assets.SCRIPT
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "fetch(" not in script and "XMLHttpRequest" not in script  # no network either


def test_rows_are_grouped_by_input_image(tmp_path):
    """Rows sharing an input form one group (the original once); unknown inputs stand alone."""
    out = tmp_path / "out"
    events = [run_event(rows=6)]
    for n in range(3):
        events += completed(f"a{n}", n, image="images/a.png", image_path="/in/a.png")
    events += completed("b0", 4, image="images/b.png", image_path="/in/b.png")
    events += failed("a3", 400, "bad", False, image_path="/in/a.png")
    events.append(
        {"ts": "2026-01-01T00:00:01Z", "event": "submitted", "row": "flying", "seed": 3,
         "prediction_id": "p-f"}
    )  # fmt: skip
    write_ledger(out, events)
    data = report_data(write_report(out).read_text())
    members: dict[int, list[str]] = {}
    for row in data["rows"]:
        members.setdefault(row["g"], []).append(row["id"])
    grouped = {data["groups"][g][0]: sorted(ids) for g, ids in members.items()}
    assert grouped == {
        "images/a.png": ["a0", "a1", "a2", "a3"],
        "images/b.png": ["b0"],
        "": ["flying"],  # in flight: the ledger has no input for it yet
    }


def test_failure_hints_give_the_exact_command(tmp_path):
    """Permanent failures hint `wsbatch run M --retry-failed`, retryable ones a plain rerun."""
    out = tmp_path / "out"
    write_ledger(
        out,
        [
            run_event(rows=3),
            *failed("perm", 1200, MODERATION, False),
            *failed("temp", 503, "server busy", True),
            *completed("ok", 1),
        ],
    )
    page = write_report(Path(os.path.relpath(out))).read_text()
    data = report_data(page)
    folder = Path(os.path.relpath(out)).as_posix()
    causes = {c["code"]: c for c in data["causes"]}
    assert causes["1200"]["cmd"] == f"wsbatch run manifests/m.yaml --out {folder} --retry-failed"
    assert causes["1200"]["retryable"] is False and "permanent" in causes["1200"]["hint"]
    assert causes["503"]["cmd"] == f"wsbatch run manifests/m.yaml --out {folder}"
    assert causes["503"]["retryable"] is True and "retryable" in causes["503"]["hint"]
    # Both commands lead the page, in the Next box above the rows.
    nxt = re.search(r'<section class="next">.*?</section>', page, re.S)
    assert nxt is not None
    assert "1 row(s) failed permanently" in nxt[0] and "1 row(s) retryable" in nxt[0]
    assert html.escape(causes["1200"]["cmd"]) in nxt[0]
    assert page.index('class="next"') < page.index('id="rows"')


def test_images_runs_show_no_made_up_manifest(tmp_path, monkeypatch):
    """An --images run names no "command-line" manifest; its hint says to repeat the flags."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run = run_event(manifest=str(tmp_path / "command-line"))
    run["manifest_path"] = None
    write_ledger(out, [run, *failed("perm", 1200, MODERATION, False)])
    page = write_report(out).read_text()
    assert "command-line" not in page
    (cause,) = report_data(page)["causes"]
    assert cause["cmd"] == "wsbatch run --images \u2026 --prompt \u2026 --out out --retry-failed"
    assert "same --images and --prompt" in page


def test_page_holds_no_machine_absolute_path(emulator, images, write_manifest, cli, tmp_path):
    """The page never prints a machine path: only the folder's own files, as relative links."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    for self_contained in (False, True):
        page = write_report(out, self_contained=self_contained).read_text()
        assert str(tmp_path) not in page and str(tmp_path.resolve()) not in page
        assert "file://" not in page


def test_shards_nsfw_in_flight_and_failures_are_all_reported(tmp_path):
    """Shard ledgers merge; NSFW outputs are flagged; in-flight and failed rows are counted."""
    out = tmp_path / "out"
    write_ledger(
        out,
        [
            {"ts": "2026-01-01T00:00:00Z", "event": "run", "model": "m", "rows": 5, "price": 0.5},
            *completed("a", 4, nsfw=[True]),
        ],
        name="ledger.shard-1-of-2.jsonl",
    )
    write_ledger(
        out,
        [
            {"ts": "2026-01-01T00:00:01Z", "event": "submitted", "row": "b", "seed": 3,
             "prediction_id": "p-b"},
            {"ts": "2026-01-01T00:00:01Z", "event": "submitted", "row": "c", "seed": 4,
             "prediction_id": "p-c"},
            {"ts": "2026-01-01T00:00:09Z", "event": "failed", "row": "c", "code": "HTTP 413",
             "error": "upload <too> large", "retryable": False},
        ],
        name="ledger.shard-2-of-2.jsonl",
    )  # fmt: skip
    page = write_report(out).read_text()
    data = report_data(page)
    assert [(r["id"], r["st"]) for r in data["rows"]] == [
        ("c", "failed"),
        ("b", "in flight"),
        ("a", "completed"),
    ]  # what needs attention first
    assert rows_by_id(data)["a"]["o"][0][2] == 1  # NSFW flag of output #1
    assert re.search(r'<div class="n">1</div><div class="l">NSFW flagged</div>', page)
    assert re.search(r'<div class="n">1</div><div class="l">in flight</div>', page)
    assert re.search(r'<div class="n">2</div><div class="l">not started</div>', page)
    assert "upload &lt;too&gt; large" in page and "HTTP 413" in page
    # Each ledger prices its submits at its own run's announced price, else the default.
    assert "$0.5480" in page  # 1 x $0.50 + 2 x $0.024


def test_run_history_is_at_the_top_newest_first(tmp_path):
    """Runs are listed above the rows, newest first, each with its outcome."""
    out = tmp_path / "out"
    events = [
        run_event(run_id="first", ts="2026-01-01T00:00:00Z"),
        {"ts": "2026-01-01T00:01:00Z", "event": "finished", "run_id": "first",
         "summary": {"completed": 1, "failed": 0, "submitted": 1, "exit_code": 0}},
        run_event(run_id="second", ts="2026-01-02T00:00:00Z"),
        *completed("a", 1),
    ]  # fmt: skip
    write_ledger(out, events)
    page = write_report(out).read_text()
    assert page.index("<td>second</td>") < page.index("<td>first</td>") < page.index('id="rows"')
    assert "1 completed, 0 failed, 1 submits" in page and "no summary" in page


@pytest.mark.parametrize("seconds", [[], [5], [5, 5, 5], [1, 2, 3, 59]])
def test_histogram_handles_empty_and_degenerate_latencies(tmp_path, seconds):
    """No completed row, one row or identical latencies still give a valid page."""
    out = tmp_path / "out"
    events = [{"ts": "2026-01-01T00:00:00Z", "event": "run", "model": "m", "rows": 1}]
    for n, second in enumerate(seconds):
        events += completed(f"r{n}", second)
    write_ledger(out, events)
    page = write_report(out).read_text()
    bars = re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"', page)
    if seconds:
        assert bars and all(float(h) > 0 for h in bars)
        assert sum(int(n) for n in re.findall(r": (\d+) rows?</title>", page)) == len(seconds)
    else:
        assert "<svg" not in page and "No completed row" in page


def test_ten_thousand_rows_render_quickly(tmp_path):
    """A 10k-row ledger becomes a report of one compact JSON blob in well under 3 s."""
    out = tmp_path / "out"
    events: list[dict[str, Any]] = []
    for n in range(10_000):
        events += completed(f"row-{n:05d}", n % 60, image_path=f"/data/in/{n}.png")
    write_ledger(out, events)
    started = time.perf_counter()
    page = write_report(out).read_text()
    elapsed = time.perf_counter() - started
    assert len(report_data(page)["rows"]) == 10_000
    assert elapsed < 3.0, f"report took {elapsed:.2f} s"
    assert len(page) < 4_000_000, f"{len(page)} bytes"


# -- thumbnails ---------------------------------------------------------------


def test_thumbnails_are_small_made_once_and_reused(tmp_path, monkeypatch):
    """Big images get a small WebP, small ones are their own; a rerun makes none again."""
    out, inputs = tmp_path / "out", tmp_path / "in"
    inputs.mkdir()
    Image.new("RGBA", (900, 600), (10, 200, 30, 128)).save(inputs / "big.png")
    make_image(inputs / "small.jpg", size=64)
    out.mkdir()
    (out / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    make_image(out / "fine.webp", size=48)
    big, small = str(inputs / "big.png"), str(inputs / "small.jpg")
    events = [run_event(rows=42)]
    events += completed("big", 1, image="big.png", image_path=big, outputs=["fine.webp"])
    events += completed("small", 2, image="small.jpg", image_path=small,
                        outputs=["broken.png"], sha256=["1" * 64])  # fmt: skip
    # Forty more rows on one input: the thread pool's path, and one thumbnail for them all.
    for n in range(40):
        events += completed(f"more{n}", 3, image="small.jpg", image_path=small,
                            outputs=["fine.webp"])  # fmt: skip
    write_ledger(out, events)

    data = report_data(write_report(out).read_text())
    made = {p.name: p for p in (out / THUMB_DIR).iterdir()}
    groups = {g[0]: g for g in data["groups"]}
    assert len(data["groups"]) == 2
    with Image.open(made[groups["big.png"][2]]) as im:  # scaled down, transparency kept
        assert im.format == "WEBP" and max(im.size) == THUMB_PX and im.mode == "RGBA"
    assert groups["small.jpg"][2].endswith(".jpg")  # small already: its own thumbnail
    rows = rows_by_id(data)
    assert rows["small"]["o"][0][1] is None  # not an image: no thumbnail, and no crash
    assert rows["big"]["o"][0][1] in made and rows["more7"]["o"] == rows["big"]["o"]
    assert len(made) == 3

    mtimes = {n: p.stat().st_mtime_ns for n, p in made.items()}

    def only_the_broken_one(folder: Path, key: str, path: str) -> None:
        assert path.endswith("broken.png"), f"{path} was made again"

    monkeypatch.setattr(batch.thumbs, "_make", only_the_broken_one)
    again = report_data(write_report(out).read_text())
    assert again["groups"] == data["groups"] and again["rows"] == data["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / THUMB_DIR).iterdir()} == mtimes


def test_report_module_imports_only_the_ledger_side():
    """The report reads the ledger alone: it never imports the client, runner, CLI or aiohttp."""
    allowed = {"batch.errors", "batch.files", "batch.ledger", "batch.state"}
    allowed |= {"batch.report_assets", "batch.thumbs"}
    for module in (batch.report, batch.report_assets, batch.thumbs):
        # Read statically: the package's __init__ may import more, which says nothing here.
        tree = ast.parse(Path(module.__file__).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in names if m and m.startswith(("batch", "aiohttp"))} <= allowed
