"""The side-by-side report of a `--model A --model B` run: one grid, lines matched by row id.

The first test reads the grid's JSON blob from synthetic ledgers; the second runs a real
two-model comparison against the emulator and opens its report in headless Chromium
(the fixtures of tests/test_report_browser.py).
"""

from __future__ import annotations

import time

import pytest

import tests.test_report_browser as rb
from batch.cli import model_folder
from tests.conftest import simple_rows
from tests.test_report import completed, failed, report_data, run_event, write_ledger

# The browser fixtures, shared with the folder report's browser tests.
chromium = rb.chromium
browser = rb.browser

FIRST, SECOND = "zeta/first", "alpha/second"  # run in this order; alphabetically the other


def test_grid_matches_rows_by_id_with_each_models_cost_and_a_row_missing(cli, tmp_path):
    """Lines match by row id (derived ids by request); costs per model; a missing row is null."""
    root = tmp_path / "cmp"
    where = {"image": "images/a.png", "image_path": str(tmp_path / "images" / "a.png")}
    first = [run_event(model=FIRST, price=0.024, rows=4)]
    first += completed("r1", 3, model=FIRST, **where)
    first += failed("r2", 1200, "flagged by moderation", False, **where)
    first += completed("r3", 5, model=FIRST, **where)
    first += completed("derived-a", 4, model=FIRST, prompt="same request", seed=9, **where)
    second = [run_event(model=SECOND, price=0.027, rows=4, ts="2026-01-01T01:00:00Z")]
    second += completed("r1", 7, model=SECOND, **where)
    second += completed("r3", 2, model=SECOND, **where)
    second += completed("r4", 6, model=SECOND, **where)
    second += completed("derived-b", 8, model=SECOND, prompt="same request", seed=9, **where)
    write_ledger(root / model_folder(FIRST), first)
    write_ledger(root / model_folder(SECOND), second)

    result = cli("report", root)
    assert result.code == 0, result.err
    assert "comparison of 2 models" in result.out
    page = (root / "report.html").read_text()
    assert str(tmp_path) not in page  # no machine path
    data = report_data(page)

    # Columns in the order the models ran, each with its own ledger's spend and counts.
    models = data["models"]
    assert [m["id"] for m in models] == [FIRST, SECOND]
    assert models[0]["spend"] == pytest.approx(4 * 0.024)
    assert models[1]["spend"] == pytest.approx(4 * 0.027)
    assert models[0]["spendText"] == "$0.0960" and models[1]["spendText"] == "$0.1080"
    assert (models[0]["tasks"], models[0]["completed"], models[0]["failed"]) == (4, 3, 1)
    assert (models[1]["tasks"], models[1]["completed"], models[1]["failed"]) == (4, 4, 0)
    assert models[0]["median"] == 4.0 and models[1]["median"] == 6.0  # nearest rank

    lines = {line["id"]: line["c"] for line in data["lines"]}
    assert sorted(lines) == ["derived-a", "r1", "r2", "r3", "r4"]
    assert [c["st"] for c in lines["r1"]] == ["completed", "completed"]
    assert [c["lat"] for c in lines["r3"]] == [5.0, 2.0]
    assert lines["r2"][0]["st"] == "failed" and lines["r2"][1] is None  # never ran on SECOND
    assert data["causes"][lines["r2"][0]["c"]]["msg"] == "flagged by moderation"
    assert lines["r4"][0] is None and lines["r4"][1]["st"] == "completed"
    # Ids derived from the request differ per model: the same request is one line.
    assert "id" not in lines["derived-a"][0] and lines["derived-a"][1]["id"] == "derived-b"
    # Outputs are linked inside their model folder; the rerun names both models in order.
    assert models[1]["dir"] == model_folder(SECOND) + "/"
    assert data["rerun"].endswith(f"--model {FIRST} --model {SECOND}")
    # Each model folder still gets its own report.
    assert cli("report", root / model_folder(SECOND)).code == 0
    own = report_data((root / model_folder(SECOND) / "report.html").read_text())
    assert sorted(r["id"] for r in own["rows"]) == ["derived-b", "r1", "r3", "r4"]


def test_a_real_two_model_comparison_shows_its_grid_in_headless_chromium(
    browser, cli, emulator, images, write_manifest, tmp_path
):
    """10 rows on two models: 10 lines x 2 models, both costs, a failed-model filter, lightbox."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    models = ["wavespeed-ai/hidream-e1-full", "bytedance/seedream-v4/edit"]
    assert cli("models", "--refresh", "--base-url", emulator.base_url).code == 0
    emulator.config.latency = (0.02, 0.1)
    out = tmp_path / "out"
    run = ["run", write_manifest(simple_rows(images, 10)), "--out", out]
    run += ["--base-url", emulator.base_url, "--no-progress", "--model", models[0]]
    emulator.fail_next_tasks(1200, "flagged by moderation")  # one row of the first model
    assert cli(*run, "--model", models[1]).code == 1

    started = time.perf_counter()
    assert cli("report", out).code == 0
    written = time.perf_counter() - started
    rb.open_report(browser, out / "report.html")
    images_shown = "return [...document.querySelectorAll('#lines img')]"
    assert rb.wait_for(browser, images_shown + ".every(i => i.complete && i.naturalWidth > 0)")
    assert browser.execute_script(images_shown + ".length") == 29  # 10 inputs, 19 edits
    count = "return document.querySelectorAll('#lines .line').length"
    assert browser.execute_script(count) == 10
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#lines .line')]"
        ".map(l => l.querySelectorAll('.cell.completed img').length)"
    )
    assert sorted(cells) == [1] + [2] * 9  # each line: one edit per model, but one failed
    assert browser.find_element(By.ID, "pager-top").text.startswith("10 rows \u00d7 2 models")
    head = browser.find_element(By.ID, "cmp-head").text
    assert head.index(models[0]) < head.index(models[1])
    assert "$0.2400" in head and "$0.2700" in head and "10 tasks" in head

    # Search by prompt narrows the grid to one line; a model-failed filter to none.
    box = browser.find_element(By.ID, "q")
    box.send_keys("number 7")
    assert rb.wait_for(browser, "return document.querySelectorAll('#lines .line').length === 1")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    show = Select(browser.find_element(By.ID, "f-show"))
    show.select_by_value("failed")
    assert rb.wait_for(browser, "return document.querySelectorAll('#lines .line').length === 1")
    failed_cell = browser.find_element(By.CSS_SELECTOR, "#lines .cell.failed").text
    assert "1200" in failed_cell and "flagged by moderation" in failed_cell
    show.select_by_value("failed:1")  # the second model failed nothing
    assert rb.wait_for(browser, "return document.querySelectorAll('#lines .line').length === 0")
    show.select_by_value("")

    # The lightbox opens on a model's edit and steps to the other model's with an arrow key.
    line = browser.execute_script(
        "return [...document.querySelectorAll('#lines .line')]"
        ".find(l => l.querySelectorAll('.cell.completed').length === 2).id"
    )
    browser.find_element(By.CSS_SELECTOR, f"#{line} .cell [data-lb]").click()
    assert rb.wait_for(browser, "return !document.getElementById('lightbox').hidden")
    caption = "return document.querySelector('#lightbox figcaption').textContent"
    assert browser.execute_script(caption).startswith(f"{models[0]} \u00b7 {line[4:]}")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    assert rb.wait_for(browser, caption + f".startsWith({models[1]!r})")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert rb.wait_for(browser, "return document.getElementById('lightbox').hidden")
    assert written < 5, f"writing the comparison took {written:.2f} s"
