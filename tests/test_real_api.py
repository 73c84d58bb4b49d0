"""Against the documented API, not a kinder one: lost answers settled from a listing
without inputs, the live price and the balance before spending, and `audit`.

The emulator serves the vendor's documented shapes by default (listing items
without inputs, 429s without Retry-After); tests that need the kinder service
say so with ``listing_inputs``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from batch.events import (
    ABSENT,
    ORPHAN,
    SubmitSettled,
    Submitted,
    Submitting,
    SubmitUnknown,
)
from batch.state import LedgerState, RowStatus, apply
from tests.conftest import (
    age_submits,
    read_ledger_lines,
    simple_rows,
    status_json,
    subprocess_env,
    wsbatch_cmd,
)

PRICE = 0.024


def row_tasks(out: Path) -> list[str]:
    """The prediction each row ended with."""
    last: dict[str, str] = {}
    for e in read_ledger_lines(out):
        if e["event"] in ("submitted", "completed") and e.get("prediction_id"):
            last[e["row"]] = e["prediction_id"]
    return list(last.values())


# -- the reducer ----------------------------------------------------------------------


def _state(*events) -> LedgerState:
    state = LedgerState()
    for n, event in enumerate(events):
        apply(state, event, {"ts": f"2026-11-27T00:00:{n:02d}.000Z"})
    return state


def test_a_lost_answer_proven_absent_is_no_possible_duplicate():
    """submit_unknown then submit_settled(absent): nothing was created, nothing counted."""
    state = _state(
        Submitting("r", 1, "i1", PRICE),
        SubmitUnknown("r", "i1", "dropped"),
        SubmitSettled("r", "i1", ABSENT),
    )
    assert state.possible_duplicates == 0 and state.spend == 0
    assert not state.doubts and state.rows["r"].status is RowStatus.NOT_STARTED


def test_an_open_intent_settled_as_orphan_counts_once_with_its_id():
    """A kill's open intent claimed with an orphan id: one possible duplicate, no more."""
    state = _state(
        Submitting("r", 1, "i1", PRICE),
        SubmitSettled("r", "i1", ORPHAN, "p-orphan"),
        SubmitSettled("r", "i1", ORPHAN, "p-orphan"),  # a repeated line changes nothing
    )
    assert state.possible_duplicates == 1
    assert state.spend == pytest.approx(PRICE)
    assert state.orphans == {"p-orphan": "r"} and state.in_doubt == 0


def test_an_adopted_lost_answer_is_billed_not_duplicated():
    """submit_unknown then submitted with the same intent: one billed task, no duplicate."""
    state = _state(
        Submitting("r", 1, "i1", PRICE),
        SubmitUnknown("r", "i1", "dropped"),
        Submitted("r", "p1", 1, 1, intent="i1", price=PRICE),
    )
    assert state.possible_duplicates == 0 and state.submits == 1
    assert state.spend == pytest.approx(PRICE)
    assert state.rows["r"].status is RowStatus.IN_FLIGHT


# -- lost answers, documented listing (no inputs) and kinder ------------------------------


@pytest.mark.parametrize("inputs", [False, True], ids=["documented", "with-inputs"])
def test_answers_lost_after_creation_are_counted_never_shared(
    run, cli, images, write_manifest, emulator, tmp_path, inputs
):
    """Drops after the task exists: possible duplicates >= real ones, no row shares a
    task; where the listing carries inputs, every lost task is adopted instead."""
    emulator.config.listing_inputs = inputs
    emulator.config.latency = (0.05, 0.3)
    emulator.script("submit", *["drop_after"] * 8)
    result = run(write_manifest(simple_rows(images, 40)), "--concurrency", "8")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    real = emulator.stats.submits_accepted - 40
    status = status_json(cli, out)
    pids = row_tasks(out)
    assert len(pids) == 40 and len(set(pids)) == 40
    assert status["possible_duplicates"] + status["in_doubt"] >= real
    assert status["spend_usd"] == pytest.approx(
        (status["submits"] + status["possible_duplicates"] + status["in_doubt"]) * PRICE
    )
    if inputs:
        assert real == 0 and result.summary["reconciled"] == 8
        assert status["possible_duplicates"] == 0
    else:
        assert real == 8
        orphans = {
            e["prediction_id"]
            for e in read_ledger_lines(out)
            if e["event"] == "submit_settled" and e["outcome"] == "orphan"
        }
        created = set(emulator.stats.created_ids)
        assert orphans <= created - set(pids)  # every claimed id is a real unused task


@pytest.mark.parametrize("inputs", [False, True], ids=["documented", "with-inputs"])
def test_answers_lost_before_creation_are_proven_absent(
    run, cli, images, write_manifest, emulator, tmp_path, inputs
):
    """Drops before anything exists: the listing proves it, 0 possible duplicates."""
    emulator.config.listing_inputs = inputs
    emulator.script("submit", *["drop"] * 8)
    result = run(write_manifest(simple_rows(images, 40)), "--concurrency", "8")
    assert result.code == 0, result.err
    assert emulator.stats.submits_accepted == 40
    assert status_json(cli, tmp_path / "out")["possible_duplicates"] == 0
    settled = [e for e in read_ledger_lines(tmp_path / "out") if e["event"] == "submit_settled"]
    assert len(settled) == 8 and all(e["outcome"] == "absent" for e in settled)


def test_a_listing_that_has_not_caught_up_proves_nothing(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """Tasks the listing shows only after a delay are never declared absent early."""
    emulator.config.visibility_delay = 0.5  # ten times the settle delay the tests use
    emulator.config.latency = (0.05, 0.1)
    emulator.script("submit", "drop_after", "drop_after")
    result = run(write_manifest(simple_rows(images, 6)), "--concurrency", "1")
    assert result.code == 0, result.err
    status = status_json(cli, tmp_path / "out")
    assert emulator.stats.submits_accepted == 8
    assert status["possible_duplicates"] + status["in_doubt"] >= 2


def test_a_kill_between_send_and_answer_is_settled_by_the_next_run(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """kill -9 while a submit waits for its answer: the next run settles that intent from
    the listing (here: nothing was created) instead of counting it forever."""
    emulator.script("submit", "slow")  # the answer would take 5 s
    path = write_manifest(simple_rows(images, 4))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                    "--no-progress", "--concurrency", "1", "--queue-ahead", "0"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ledger = out / "ledger.jsonl"
        if ledger.exists() and '"submitting"' in ledger.read_text():
            break
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert status_json(cli, out)["in_doubt"] == 1
    result = run(path, "--concurrency", "1")
    assert result.code == 0, result.err
    status = status_json(cli, out)
    assert status["in_doubt"] == 0
    assert status["possible_duplicates"] == emulator.stats.submits_accepted - 4


# -- money before spending ------------------------------------------------------------


@pytest.mark.parametrize("shape", ["current", "legacy"])
def test_the_live_price_counts_in_the_budget(
    run, images, write_manifest, emulator, tmp_path, shape
):
    """At a live $0.05 (either pricing shape), --budget 0.10 bills at most $0.10."""
    emulator.config.price = 0.05
    emulator.config.price_shape = shape
    result = run(write_manifest(simple_rows(images, 6)), "--budget", "0.10")
    assert emulator.stats.submits_accepted * 0.05 <= 0.10 + 1e-9
    assert emulator.stats.submits_accepted == 2
    assert result.code == 1 and "budget $0.10 reached" in result.summary["stop_reason"]
    assert "$0.05 live price" in result.err
    prices = {e["price"] for e in read_ledger_lines(tmp_path / "out") if e["event"] == "submitted"}
    assert prices == {0.05}


def test_without_a_price_endpoint_the_flag_price_is_used_and_said(
    run, images, write_manifest, emulator
):
    """No price answer (an outage): the estimate says it uses --price."""
    emulator.config.fault_endpoints.add("account")
    emulator.script("account", "503", "503", "503")
    result = run(write_manifest(simple_rows(images, 2)), "--price", "0.03")
    assert result.code == 0, result.err
    assert "$0.03 from --price" in result.err


def test_a_balance_stops_submissions_at_what_it_covers(
    run, images, write_manifest, emulator, tmp_path
):
    """A balance of $0.07 at $0.024 a task buys two tasks, then stops with exit 4."""
    emulator.config.enforce_balance = True
    emulator.config.balance = 0.07
    result = run(write_manifest(simple_rows(images, 6)))
    assert emulator.stats.submits_accepted == 2
    assert emulator.stats.submits_rejected == 0  # never asked the server to refuse
    assert result.code == 4
    assert "exceeds the account's balance $0.07" in result.err
    assert "balance $0.07 is used up" in result.summary["stop_reason"]


def test_validate_online_shows_live_price_and_balance(cli, images, write_manifest, emulator):
    """`validate --online` prices the plan live and shows the balance; it submits nothing."""
    emulator.config.price = 0.05
    emulator.config.balance = 0.12
    path = write_manifest(simple_rows(images, 4))
    result = cli("validate", path, "--online", "--base-url", emulator.base_url)
    assert result.code == 0, result.err
    assert "estimated cost $0.20 (4 at $0.05 live price)" in result.out
    assert "balance $0.12" in result.out and "exceeds the account's balance" in result.out
    assert emulator.stats.submits_accepted + emulator.stats.submits_rejected == 0


# -- audit ------------------------------------------------------------------------------


def _forget_outcomes(out: Path) -> None:
    """Drop every lost answer's outcome lines, as a kill right after sending leaves them."""
    lines = [
        e for e in read_ledger_lines(out) if e["event"] not in ("submit_unknown", "submit_settled")
    ]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


@pytest.mark.parametrize("inputs", [False, True], ids=["documented", "with-inputs"])
def test_audit_finds_every_orphan_the_emulator_billed(
    run, cli, images, write_manifest, emulator, tmp_path, inputs
):
    """Orphans no ledger knows (outcomes lost to a kill) are all found, with their cost;
    audit submits nothing."""
    emulator.config.listing_inputs = inputs
    emulator.script("submit", "drop_after", "html_after", "500_after", "drop_after")
    path = write_manifest(simple_rows(images, 10))
    assert run(path, "--concurrency", "1").code == 0
    out = tmp_path / "out"
    _forget_outcomes(out)
    accepted = emulator.stats.submits_accepted
    result = cli("audit", out, "--json", "--base-url", emulator.base_url)
    info = json.loads(result.out)
    expected = set(emulator.stats.created_ids) - set(row_tasks(out))
    assert len(expected) == (0 if inputs else 4)  # with inputs, every lost task was adopted
    assert {o["prediction_id"] for o in info["orphans"]} == expected
    assert info["unrecorded_orphans"] == len(expected)
    assert result.code == (1 if expected else 0)
    assert info["billed_spend"] == pytest.approx(len(emulator.stats.created_ids) * PRICE)
    assert info["recorded_spend"] >= info["billed_spend"] - 1e-9
    assert emulator.stats.submits_accepted == accepted


def test_audit_adopt_settles_old_doubts_and_records_their_orphans(
    cli, run, images, write_manifest, emulator, tmp_path
):
    """`audit --adopt` settles what a kill left in doubt once the listing must show it:
    each orphan then has its id in the ledger, and the next audit finds none unknown."""
    emulator.script("submit", "drop_after", "drop_after")
    path = write_manifest(simple_rows(images, 4))
    assert run(path, "--concurrency", "1").code == 0
    out = tmp_path / "out"
    _forget_outcomes(out)
    age_submits(out, 3600)  # an hour ago: the listing has long caught up
    first = cli("audit", out, "--json", "--adopt", "--base-url", emulator.base_url)
    assert json.loads(first.out)["settled"] == 2
    second = json.loads(cli("audit", out, "--json", "--base-url", emulator.base_url).out)
    assert second["unrecorded_orphans"] == 0 and second["in_doubt"] == 0
    assert len(second["orphans"]) == 2
    assert status_json(cli, out)["possible_duplicates"] == 2


def test_a_row_whose_retries_are_lost_too_counts_each_task(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """One row's identical retries all lost after creation, the listing lagging: each
    task is counted, none is taken for a sibling's and dropped."""
    emulator.config.listing_inputs = True
    emulator.config.visibility_delay = 0.3
    emulator.config.latency = (0.05, 0.1)
    emulator.script("submit", "drop_after", "drop_after", "drop_after")
    result = run(write_manifest(simple_rows(images, 3)), "--concurrency", "1")
    assert result.code == 0, result.err
    status = status_json(cli, tmp_path / "out")
    billed = emulator.stats.submits_accepted
    assert billed > 3
    assert status["submits"] + status["possible_duplicates"] + status["in_doubt"] >= billed


def test_forty_large_uploads_at_once_arrive_whole(run, write_manifest, emulator, tmp_path):
    """40 distinct images of about 300 KB uploaded together all arrive byte for byte, and
    every row completes (the first emulator refused over half of them)."""
    import random

    from PIL import Image

    rng = random.Random(7)
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    rows = []
    for n in range(40):
        path = folder / f"big-{n}.png"
        Image.frombytes("RGB", (320, 320), rng.randbytes(320 * 320 * 3)).save(path)
        rows.append({"id": f"big-{n}", "image": f"images/{path.name}", "prompt": "p", "seed": n})
    assert min((folder / f"big-{n}.png").stat().st_size for n in range(40)) > 270_000
    result = run(write_manifest(rows), "--concurrency", "40")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    urls = {
        e["file"]: e["download_url"] for e in read_ledger_lines(out) if e["event"] == "uploaded"
    }
    assert len(urls) == 40
    for name, url in urls.items():
        assert emulator.uploaded_bytes(url) == (tmp_path / name).read_bytes()


def test_the_next_run_adopts_a_killed_submits_task_on_a_full_match(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """A kill right after the send leaves an open intent; where the listing carries
    inputs, the next run's start adopts that task and pays nothing again."""
    emulator.config.listing_inputs = True
    path = write_manifest(simple_rows(images, 1))
    out = tmp_path / "out"
    assert run(path).code == 0
    # As a kill just after sending leaves it: the intent, and nothing after it.
    kept = [e for e in read_ledger_lines(out) if e["event"] in ("run", "uploaded", "submitting")]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    for f in out.glob("row-*"):
        f.unlink()
    assert status_json(cli, out)["in_doubt"] == 1
    again = run(path)
    assert again.code == 0, again.err
    assert emulator.stats.submits_accepted == 1
    assert again.summary["submitted"] == 1 and again.summary["possible_duplicates"] == 0
    assert row_tasks(out) == emulator.stats.created_ids
