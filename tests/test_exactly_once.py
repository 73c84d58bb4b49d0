"""Exactly once, for real: every billed task is recorded, no row pays twice, no id is lost.

Each test here reproduces a way the first build paid twice, lost a prediction or
mis-counted spend, against the emulator over real sockets.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from batch.api import Ledger
from batch.errors import LockedError
from batch.lock import OutDirLock
from tests.conftest import (
    age_submits,
    last_events,
    read_ledger_lines,
    run_subprocess,
    simple_rows,
    status_json,
    subprocess_env,
    wsbatch_cmd,
)

PRICE = 0.024


def recorded(cli, out: Path) -> tuple[int, int]:
    """(billed submits with an id, possible duplicates) as `status` reports them; a submit
    in doubt (sent, outcome never written) is a possible duplicate too."""
    info = status_json(cli, out)
    return info["submits"], info["possible_duplicates"] + info["in_doubt"]


def assert_money_recorded(cli, out: Path, emulator) -> None:
    """Every task the server billed is in the ledger: by id, or as a possible duplicate."""
    submits, possible = recorded(cli, out)
    billed = emulator.stats.submits_accepted
    assert submits <= billed <= submits + possible
    info = status_json(cli, out)
    assert info["spend_usd"] == pytest.approx((submits + possible) * PRICE, abs=1e-6)


def drop_row_endings(out: Path) -> None:
    """Forget every completed line: rows look submitted and in flight again."""
    lines = [e for e in read_ledger_lines(out) if e["event"] != "completed"]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


# -- 1. a 404 right after a submit is the store lagging, not a lost task ------------------


def test_a_young_404_is_polled_again_never_resubmitted(run, images, write_manifest, emulator):
    """New tasks that answer 404 for their first moments are waited for, not paid again."""
    emulator.config.visibility_delay = 0.6
    emulator.config.latency = (0.1, 0.2)
    result = run(write_manifest(simple_rows(images, 2)), "--concurrency", "2")
    assert result.code == 0, result.err
    assert emulator.stats.invisible_polls > 0
    assert emulator.stats.submits_accepted == 2


def test_a_gone_task_is_paid_again_once_then_failed(run, cli, images, write_manifest, emulator):
    """A known prediction the server deleted long ago is resubmitted once, never twice."""
    path = write_manifest(simple_rows(images, 2))
    out = path.parent / "out"
    assert run(path).code == 0
    for _ in range(2):
        drop_row_endings(out)
        age_submits(out, 3600)
        for pid in list(emulator.predictions):
            emulator.delete_prediction(pid)
        result = run(path)
    # Run 2 paid once per row; run 3 found the new tasks gone too and paid nothing.
    assert emulator.stats.submits_accepted == 4
    assert result.code == 1 and result.summary["submitted"] == 0
    ends = last_events(out)
    assert all(e["event"] == "failed" and e["code"] == "gone" for e in ends.values())
    assert all(e["retryable"] is False for e in ends.values())


# -- 2. outputs that cannot be written -----------------------------------------------


def test_unwritable_output_keeps_the_prediction_and_stops_paying(
    run, images, write_manifest, emulator
):
    """A write failure records the row with its id, stops submitting; the next run fetches."""
    path = write_manifest(simple_rows(images, 6))
    out = path.parent / "out"
    (out / "row-0000.jpg").mkdir(parents=True)  # a directory where the output goes
    first = run(path, "--concurrency", "1", "--queue-ahead", "0")  # one task at a time
    assert first.code == 1
    assert "cannot write row-0000.jpg" in first.summary["stop_reason"]
    assert emulator.stats.submits_accepted == 1
    failed = last_events(out)["row-0000"]
    assert failed["event"] == "failed" and failed["prediction_id"] and failed["live"]
    (out / "row-0000.jpg").rmdir()
    again = run(path)
    assert again.code == 0
    assert emulator.stats.submits_accepted == 6  # row-0000 fetched by id, not paid again


def noisy_png(path: Path, size: int = 320) -> Path:
    """An image whose edits do not compress: outputs of a few hundred KB."""
    rng = random.Random(7)
    img = Image.frombytes(
        "RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size**2 * 3))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path


def test_full_disk_stops_submitting_and_loses_no_prediction(
    cli, tmp_path, write_manifest, emulator
):
    """With writes refused (EFBIG, as a full disk would), the run stops paying; ids are kept."""
    noisy_png(tmp_path / "images" / "n.png")
    rows = [
        {"id": f"r{i}", "image": "images/n.png", "prompt": f"p{i}", "seed": i} for i in range(8)
    ]
    path = write_manifest(rows)
    out = tmp_path / "out"
    limit = 64 * 1024  # the ledger stays far below it; every output is above it

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out, "--json",
                    "--no-progress", "--concurrency", "2"),
        capture_output=True, text=True, timeout=60, env=subprocess_env(),
        preexec_fn=small_disk, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and "cannot write" in summary["stop_reason"]
    billed = emulator.stats.submits_accepted
    # The failing row, and at most one submit already under way per other worker (two
    # running, one queued ahead).
    assert billed <= 4
    ends = last_events(out)
    assert all(e["prediction_id"] for e in ends.values())
    again = cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress")
    assert again.code == 0
    assert emulator.stats.submits_accepted == 8  # nothing paid twice


# -- 3. a lost submit answer is settled only by a full match --------------------------


@pytest.mark.parametrize(
    "rows",
    [
        # A parameter sweep: same prompt, image and seed, different output format.
        [
            {"id": "jpg", "image": "images/a.png", "prompt": "p", "seed": 5},
            {"id": "png", "image": "images/a.png", "prompt": "p", "seed": 5,
             "output_format": "png"},
        ],
        # Repeat copies with a fixed seed: identical requests, two rows.
        [{"image": "images/a.png", "prompt": "p", "seed": 5, "repeat": 2}],
    ],
    ids=["sweep", "repeat"],
)  # fmt: skip
def test_a_lost_answer_never_adopts_another_rows_task(
    run, cli, images, write_manifest, emulator, tmp_path, rows
):
    """Rows that differ only in params, or repeat copies, never share one prediction."""
    emulator.config.listing_inputs = True
    path = write_manifest(rows)
    first = run(path, "--max-tasks", "1")
    assert first.summary["submitted"] == 1
    emulator.script("submit", "drop")  # the next submit is lost before it creates anything
    second = run(path)
    assert second.code == 0, second.err
    pids = [e["prediction_id"] for e in last_events(tmp_path / "out").values()]
    assert len(pids) == 2 and len(set(pids)) == 2
    assert emulator.stats.submits_accepted == 2


def test_a_lost_answer_with_a_full_match_is_adopted(run, images, write_manifest, emulator):
    """Where the listing carries inputs, a task created by a lost answer is followed, not
    paid again."""
    emulator.config.listing_inputs = True
    emulator.script("submit", "drop_after")
    result = run(write_manifest(simple_rows(images, 3)), "--concurrency", "1")
    assert result.code == 0
    assert result.summary["reconciled"] == 1 and result.summary["possible_duplicates"] == 0
    assert emulator.stats.submits_accepted == 3


# -- 4 and 5. shards ---------------------------------------------------------------


def test_shards_of_different_counts_never_share_a_folder(tmp_path):
    """Shards split rows by their count: K/N beside K'/N' (or 0/1) would run rows twice."""
    with OutDirLock(tmp_path, shard=(0, 2)), OutDirLock(tmp_path, shard=(1, 2)):
        for other in [(0, 3), (2, 3), (0, 1)]:
            with pytest.raises(LockedError, match="same N"):
                OutDirLock(tmp_path, shard=other).acquire()
    with OutDirLock(tmp_path, shard=(0, 3)):  # once the 2-way shards are gone, 3 may run
        pass


def test_budget_caps_the_folder_across_shards_and_resumes(images, write_manifest, emulator):
    """Four shards with --budget 0.10 together bill at most $0.10; a resume adds nothing."""
    emulator.config.latency = (0.2, 0.4)
    path = write_manifest(simple_rows(images, 20))
    out = path.parent / "out"

    def shard(k: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                        "--shard", f"{k}/4", "--budget", "0.10", "--price", str(PRICE),
                        "--no-progress", "--concurrency", "3"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=subprocess_env(), stdin=subprocess.DEVNULL,
        )  # fmt: skip

    procs = [shard(k) for k in range(4)]
    for proc in procs:
        proc.communicate(timeout=60)
    assert emulator.stats.submits_accepted * PRICE <= 0.10 + 1e-9
    assert emulator.stats.submits_accepted == 4  # the budget buys four tasks, and it did
    again = run_subprocess("run", path, "--base-url", emulator.base_url, "--out", out,
                           "--budget", "0.10", "--price", str(PRICE), "--no-progress")  # fmt: skip
    assert again.returncode == 1 and "budget $0.10 reached" in again.stdout
    assert emulator.stats.submits_accepted == 4


# -- 6 and 7. answers without an id, and stops ---------------------------------------


def test_a_created_task_answered_without_an_id_is_counted(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """A 200 that is not the envelope, data null, 202 or 500 after creation: each is a
    possible duplicate in the summary, the ledger and the spend."""
    emulator.script("submit", "html_after", "null_after", "accepted_after", "500_after")
    result = run(write_manifest(simple_rows(images, 4)), "--concurrency", "1")
    assert result.code == 0, result.err
    assert result.summary["possible_duplicates"] == 4
    assert emulator.stats.submits_accepted == 8
    lost = [e for e in read_ledger_lines(tmp_path / "out") if e["event"] == "submit_unknown"]
    assert len(lost) == 4
    assert_money_recorded(cli, tmp_path / "out", emulator)
    assert result.summary["spend_usd"] == pytest.approx(8 * PRICE)


def test_max_tasks_stop_keeps_the_record_of_lost_answers(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """--max-tasks ending a run mid-retry still leaves every lost answer counted."""
    emulator.script("submit", "500_after", "500_after")
    result = run(write_manifest(simple_rows(images, 4)), "--max-tasks", "2")
    assert result.summary["stop_reason"].startswith("--max-tasks 2")
    assert_money_recorded(cli, tmp_path / "out", emulator)
    assert status_json(cli, tmp_path / "out")["possible_duplicates"] == 2


def test_ctrl_c_during_backoff_keeps_lost_answers_counted(
    cli, images, write_manifest, emulator, tmp_path
):
    """SIGINT while a submit waits to retry a lost answer: the lost one stays recorded."""
    emulator.script("submit", *["500_after"] * 3)
    path = write_manifest(simple_rows(images, 2))
    out = tmp_path / "out"
    env = subprocess_env()
    env.pop("WSBATCH_ZERO_BACKOFF", None)  # real backoff: seconds to catch it in
    proc = subprocess.Popen(
        wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                    "--no-progress", "--concurrency", "1", "--queue-ahead", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ledger = out / "ledger.jsonl"
        if ledger.exists() and "submit_unknown" in ledger.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert_money_recorded(cli, out, emulator)
    assert status_json(cli, out)["possible_duplicates"] >= 1


# -- 8. kill -9 between sending a submit and recording its answer ---------------------


def test_kill_9_at_concurrency_12_never_hides_a_billed_task(
    cli, tmp_path, images, write_manifest, emulator
):
    """Kills at random moments: every billed task is recorded, every row done once."""
    emulator.config.latency = (0.05, 0.3)
    emulator.config.response_delay = 0.02  # a window between sending and the answer
    path = write_manifest(simple_rows(images, 60))
    out = tmp_path / "out"
    rng = random.Random(12)
    for _ in range(5):
        proc = subprocess.Popen(
            wsbatch_cmd("run", path, "--base-url", emulator.base_url, "--out", out,
                        "--no-progress", "--concurrency", "12"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.4, 1.2))
        proc.kill()
        proc.wait()
        if not (out / "ledger.jsonl").exists():  # killed while starting, on a busy machine
            assert emulator.stats.submits_accepted == 0
            continue
        assert_money_recorded(cli, out, emulator)
    final = cli("run", path, "--base-url", emulator.base_url, "--out", out, "--no-progress")
    assert final.code == 0
    assert_money_recorded(cli, out, emulator)
    ends = last_events(out)
    assert len(ends) == 60 and all(e["event"] == "completed" for e in ends.values())
    for e in ends.values():
        assert (out / e["outputs"][0]).read_bytes() == emulator.output_bytes(e["prediction_id"])[0]


# -- 9. waiting for a submit slot is not the task's time ------------------------------


def test_waiting_for_a_rate_slot_does_not_count_against_the_deadline(
    run, images, write_manifest, emulator
):
    """--timeout starts when the server has the task, not while the row waits its turn."""
    emulator.config.latency = (0.2, 0.2)
    result = run(
        write_manifest(simple_rows(images, 5)),
        "--rate", "120", "--concurrency", "5", "--timeout", "1.2",
    )  # fmt: skip
    assert result.code == 0, result.summary
    assert emulator.stats.submits_accepted == 5


# -- 10. one definition of a row's status ------------------------------------------


def test_summary_status_and_ledger_agree_after_a_timeout(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """A timed-out task is "in flight" to the summary, `status` and the Python Ledger alike."""
    emulator.config.latency = (3.0, 3.0)
    result = run(write_manifest(simple_rows(images, 3)), "--timeout", "0.3")
    out = tmp_path / "out"
    info = status_json(cli, out)
    ledger = Ledger(out)
    assert result.summary["in_flight"] == info["in_flight"] == len(ledger.in_flight()) == 3
    assert result.summary["failed"] == info["failed"] == len(ledger.failed()) == 0


def test_max_tasks_is_a_hard_cap_beside_a_budget(run, images, write_manifest, emulator):
    """--max-tasks holds with --budget too, however many workers wait for the folder lock."""
    result = run(
        write_manifest(simple_rows(images, 8)),
        "--concurrency", "4", "--max-tasks", "1", "--budget", "100",
    )  # fmt: skip
    assert result.summary["stop_reason"].startswith("--max-tasks 1")
    assert emulator.stats.submits_accepted == 1
