"""The HTML report: built from the ledger alone, escaped, and rendered by a real browser."""

from __future__ import annotations

import ast
import html
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batch.report
from batch.errors import UsageError
from batch.report import write_report
from tests.conftest import simple_rows

XSS_PROMPT = '<script>window.__xss = 1</script><b>bold</b> & "quoted" <img src=x onerror=alert(1)>'
MODERATION = "flagged by moderation"


def run_batch(emulator, images, write_manifest, cli, tmp_path: Path) -> Path:
    """A real run: row-0000 fails moderation, row-0002 has an HTML prompt, two outputs each."""
    emulator.config.latency = (0.02, 0.2)
    emulator.config.outputs_per_task = 2
    rows = simple_rows(images, 6)
    rows[2]["prompt"] = XSS_PROMPT
    rows[3]["output_format"] = "webp"
    # Concurrency 1 submits in manifest order, so the forced failure lands on row-0000.
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
    )
    assert result.code == 1, result.err  # one failed row
    return out


def ledger_events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def write_ledger(out: Path, events: list[dict[str, Any]], name: str = "ledger.jsonl") -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a") as fh:
        for event in events:
            fh.write(json.dumps(event) + "\n")


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
            "ts": f"2026-01-01T00:00:{second:02d}.000Z",
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


# -- a real run against the emulator ------------------------------------------


def test_report_lists_every_row_output_failure_and_latency(
    emulator, images, write_manifest, cli, tmp_path
):
    """The report of a real run shows every output, the escaped prompt, the failure and latency."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    report = write_report(out)
    assert report == out / "report.html"
    page = report.read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".report-")]  # no temp left

    # User text is escaped: the prompt shows as text and injects no element.
    assert html.escape(XSS_PROMPT) in page
    assert "<script" not in page and "<b>bold" not in page and "<img src=x" not in page

    # Every output file of every completed row is both linked and shown.
    events = ledger_events(out)
    outputs = [name for e in events if e["event"] == "completed" for name in e["outputs"]]
    assert len(outputs) == 10  # 5 completed rows x 2 outputs
    for name in outputs:
        assert f'href="{name}"' in page and f'src="{name}"' in page
    # Inputs link relatively from the report's folder to the manifest's images.
    assert 'src="../images/a.png"' in page and 'src="../images/c.webp"' in page
    assert page.count('loading="lazy"') == 16  # 6 inputs (the failed row too) + 10 outputs

    # The failure is grouped by cause, with its count and row.
    group = re.search(r'<li class="group">(.*?)</li>', page)
    assert group is not None
    assert "1200" in group[1] and MODERATION in group[1] and "row-0000" in group[1]
    assert "Failures by cause (1)" in page

    # Failed rows come first, then by id.
    order = re.findall(r'<tr id="row-(row-\d+)"', page)
    assert order == [f"row-{i:04d}" for i in range(6)]
    assert re.search(r'<tr id="row-row-0000" class="failed">', page)

    # Totals and the histogram.
    assert re.search(r'<div class="n">5</div><div class="l">completed</div>', page)
    assert re.search(r'<div class="n">6</div><div class="l">submits</div>', page)
    assert "$0.1440" in page  # 6 submits at $0.024
    svg = re.search(r'<svg class="hist".*?</svg>', page, re.S)
    assert svg is not None and len(re.findall(r'<rect class="bar"', svg[0])) >= 1
    assert "latency: completed" in svg[0] and 'class="xtick"' in svg[0]
    assert "wavespeed-ai/hidream-e1-full" in page and str(out) in page


def test_report_written_elsewhere_links_back_to_the_outputs(
    emulator, images, write_manifest, cli, tmp_path
):
    """A report written outside OUT_DIR links outputs and inputs relative to its own folder."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    dest = write_report(out, tmp_path / "reports" / "run.html")
    page = dest.read_text()
    assert not (out / "report.html").exists()
    assert 'src="../out/row-0001-1.jpg"' in page
    assert 'src="../images/b.jpg"' in page


# -- synthetic ledgers --------------------------------------------------------


def test_report_without_a_ledger_is_a_usage_error(tmp_path):
    """`wsbatch report` on a folder without a ledger says so instead of writing an empty page."""
    with pytest.raises(UsageError, match="no ledger"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_remote_inputs_are_linked_and_unsafe_references_are_not(tmp_path, monkeypatch):
    """http(s) inputs show as thumbnails; a javascript: reference never becomes a link."""
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
    page = write_report(out).read_text()
    assert 'src="https://cdn.example.com/a.png?x=1&amp;y=2"' in page
    assert 'href="javascript:' not in page and 'src="javascript:' not in page
    assert "input: javascript:alert(1)" in page  # shown as text, for the record


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
    assert re.findall(r'<tr id="row-(\w)"', page) == ["c", "b", "a"]  # failed, in flight, done
    assert 'class="thumb nsfw"' in page and "NSFW #1" in page
    assert re.search(r'<div class="n">1</div><div class="l">NSFW flagged</div>', page)
    assert re.search(r'<div class="n">1</div><div class="l">in flight</div>', page)
    assert re.search(r'<div class="n">2</div><div class="l">not started</div>', page)
    assert "upload &lt;too&gt; large" in page and "HTTP 413" in page
    # Each ledger prices its submits at its own run's announced price, else the default.
    assert "$0.5480" in page  # 1 x $0.50 + 2 x $0.024


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
    """A 10k-row ledger becomes a report quickly, without opening any image."""
    out = tmp_path / "out"
    events: list[dict[str, Any]] = []
    for n in range(10_000):
        events += completed(f"row-{n:05d}", n % 60, image_path=f"/data/in/{n}.png")
    write_ledger(out, events)
    started = time.perf_counter()
    page = write_report(out).read_text()
    elapsed = time.perf_counter() - started
    assert page.count("<tr id=") == 10_000
    assert elapsed < 3.0, f"report took {elapsed:.2f} s"


def test_report_module_imports_only_the_ledger_side():
    """The report reads the ledger alone: it never imports the client, runner, CLI or aiohttp."""
    # Read statically: the package's __init__ may import more, which says nothing of this module.
    tree = ast.parse(Path(batch.report.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in modules if m and m.startswith(("batch", "aiohttp"))} <= {
        "batch.errors",
        "batch.files",
        "batch.ledger",
        "batch.state",
    }


# -- a real browser -----------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt-get when missing and root."""

    def found() -> tuple[str | None, str | None]:
        return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which(
            "chromedriver"
        )

    binary, driver = found()
    if binary is None or driver is None:
        if os.geteuid() != 0:
            pytest.skip("chromium/chromedriver missing and not root to apt-get install them")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "chromium", "chromium-driver"],
        ):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"could not install chromium: {' '.join(cmd)}: {exc}")
            if done.returncode != 0:
                pytest.skip(f"could not install chromium: {' '.join(cmd)}: {done.stderr[-400:]}")
        binary, driver = found()
        if binary is None or driver is None:
            pytest.skip("apt-get installed chromium but chromium/chromedriver are not on PATH")
    return binary, driver


@pytest.fixture(scope="session")
def browser(chromium, tmp_path_factory) -> Iterator[Any]:
    """One headless Chromium for the session, started without selenium-manager."""
    selenium = pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,4000",  # tall: every lazy thumbnail of the test page is in view
        f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}",
    ):
        options.add_argument(flag)

    def no_manager(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("selenium-manager was asked to resolve (and maybe download) a driver")

    # selenium-manager is the part that goes to the network; prove it is never consulted.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", no_manager)
        chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    assert selenium.__version__.startswith("4.")
    try:
        yield chrome
    finally:
        chrome.quit()


def wait_for(browser, script: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = browser.execute_script(script)
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_report_renders_in_headless_chromium(
    browser, emulator, images, write_manifest, cli, tmp_path
):
    """Opened from disk in Chromium, every thumbnail loads, the prompt is text, bars are drawn."""
    out = run_batch(emulator, images, write_manifest, cli, tmp_path)
    report = write_report(out)
    browser.get(report.resolve().as_uri())
    assert wait_for(browser, "return document.readyState === 'complete'")
    browser.execute_script("document.querySelectorAll('img').forEach(i => i.scrollIntoView())")
    loaded = wait_for(
        browser,
        "const imgs = [...document.images];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
    )
    broken = browser.execute_script(
        "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'))"
    )
    assert loaded, f"images that did not render: {broken}"
    assert browser.execute_script("return document.images.length") == 16

    prompt = browser.execute_script(
        "const p = document.querySelector('#row-row-0002 .prompt');"
        "return {text: p.textContent, children: p.children.length};"
    )
    assert prompt == {"text": XSS_PROMPT, "children": 0}
    assert browser.execute_script("return window.__xss === undefined")
    assert browser.execute_script("return document.scripts.length") == 0

    bars = browser.execute_script(
        "return [...document.querySelectorAll('svg.hist rect.bar')].map(r => r.getBBox().height);"
    )
    assert bars and all(h > 0 for h in bars)
    failure = browser.execute_script("return document.querySelector('.groups').innerText")
    assert MODERATION in failure and "row-0000" in failure
