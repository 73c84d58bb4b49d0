"""Surviving a real API: retries, Retry-After, rate limits, timeouts, failed tasks, bad keys."""

from __future__ import annotations

import itertools
import time

import pytest

from batch.retry import Backoff, parse_retry_after
from tests.conftest import API_KEY, last_events, read_ledger_lines, simple_rows


@pytest.fixture
def manifest(images, write_manifest):
    """Six rows over the four test images."""
    return write_manifest(simple_rows(images, 6))


def submit_times(emulator):
    """When each submit (POST /api/v3/{model}) arrived; account calls are not submits."""
    account = ("/api/v3/media/", "/api/v3/model/", "/api/v3/billings/", "/api/v3/predictions")
    return [
        r.time
        for r in emulator.requests
        if r.origin == "api" and r.method == "POST" and not r.path.startswith(account)
    ]


# -- account errors stop the run ------------------------------------------------


def test_wrong_key_exits_4_with_advice_and_without_the_key(run, manifest, emulator, monkeypatch):
    """A refused key stops the run with exit 4, says what to check, never prints the key."""
    monkeypatch.setenv("WAVESPEED_API_KEY", "wrong-key-777")
    result = run(manifest)
    assert result.code == 4
    assert "WAVESPEED_API_KEY" in result.err and "401" in result.err
    assert "wrong-key-777" not in result.err + result.out
    assert emulator.stats.submits_accepted == 0


def test_suspended_account_exits_4(run, manifest, emulator):
    """HTTP 403 (suspended account) stops the whole run at once with exit 4."""
    emulator.config.suspended = True
    result = run(manifest)
    assert result.code == 4 and "403" in result.err


def test_out_of_credit_exits_4(run, manifest, emulator):
    """A balance that covers no task stops before any submit: exit 4, top up."""
    emulator.config.enforce_balance = True
    emulator.config.balance = 0.0
    result = run(manifest)
    assert result.code == 4 and "top up" in result.err.lower()
    assert emulator.stats.submits_accepted + emulator.stats.submits_rejected == 0


def test_out_of_credit_answer_exits_4(run, manifest, emulator):
    """Where the balance cannot be read, the server's no-credit answer is an account
    error: exit 4, top up."""
    emulator.config.enforce_balance = True
    emulator.config.balance = 0.0
    emulator.config.fault_endpoints.add("account")
    emulator.script("account", "500", "500")  # neither the price nor the balance answers
    result = run(manifest)
    assert result.code == 4 and "Top up" in result.err


def test_auth_failure_mid_run_leaves_in_flight_rows_resumable(run, manifest, emulator, tmp_path):
    """A key revoked mid-run stops at once; rows already submitted are polled by the next run."""
    emulator.config.latency = (0.3, 0.3)
    emulator.script("result", "401")
    assert run(manifest).code == 4
    submitted = emulator.stats.submits_accepted
    assert submitted >= 1
    again = run(manifest)
    assert again.code == 0
    assert emulator.stats.submits_accepted == 6  # nothing submitted twice


# -- transient faults are retried ----------------------------------------------


def test_retry_after_on_429_pauses_every_worker(run, images, write_manifest, emulator):
    """After a 429 with Retry-After: 1, no new submit leaves from any worker for a second."""
    emulator.config.retry_after = 1
    emulator.config.send_retry_after = True
    emulator.script("submit", "429")
    path = write_manifest(simple_rows(images, 6))
    started = time.monotonic()
    result = run(path, "--concurrency", "2")
    assert result.code == 0
    assert result.summary["rate_limited"] == 1
    times = submit_times(emulator)
    limited = times[0]
    later = [t for t in times if t > limited + 0.05]
    assert later and min(later) >= limited + 0.9  # arrival jitter under load
    assert time.monotonic() - started >= 1.0


def test_rate_cap_spaces_submissions(run, images, write_manifest, emulator):
    """--rate N keeps submissions at least 60/N seconds apart, with no initial burst."""
    path = write_manifest(simple_rows(images, 5))
    assert run(path, "--rate", "300", "--concurrency", "5").code == 0
    times = sorted(submit_times(emulator))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.2 s apart when sent; arrival jitter on a busy machine moves single gaps, not the
    # span of all five, and a burst would give gaps of about 0.
    assert len(times) == 5 and times[-1] - times[0] >= 0.75 and min(gaps) >= 0.1


def test_server_errors_and_drops_on_poll_and_download_are_retried(run, manifest, emulator):
    """5xx and dropped connections while polling or downloading never fail a row."""
    emulator.script("result", "500", "502", "503", "drop", "drop")
    emulator.script("download", "500", "drop", "drop")
    emulator.script("upload", "503")
    result = run(manifest)
    assert result.code == 0, result.err
    assert result.summary["completed"] == 6 and result.summary["submitted"] == 6
    assert emulator.stats.submits_accepted == 6


def test_submit_answer_lost_after_creation_is_reconciled(run, manifest, emulator):
    """A submit whose answer was lost after the task was created adopts that task, not a copy."""
    emulator.config.listing_inputs = True
    emulator.script("submit", "drop_after")
    result = run(manifest)
    assert result.code == 0
    assert emulator.stats.submits_created_then_dropped == 1
    assert emulator.stats.submits_accepted == 6
    assert result.summary["reconciled"] == 1 and result.summary["possible_duplicates"] == 0


def test_submit_with_unknown_outcome_is_retried_and_settled(run, manifest, emulator, tmp_path):
    """A dropped submit that created nothing is recorded as lost, proven absent from the
    listing, and retried: no possible duplicate remains."""
    emulator.script("submit", "drop", "500")
    result = run(manifest)
    assert result.code == 0
    assert result.summary["possible_duplicates"] == 0
    lines = read_ledger_lines(tmp_path / "out")
    lost = [e for e in lines if e["event"] == "submit_unknown"]
    settled = [e for e in lines if e["event"] == "submit_settled"]
    assert len(lost) == 2
    assert sorted(e["intent"] for e in settled) == sorted(e["intent"] for e in lost)
    assert all(e["outcome"] == "absent" for e in settled)
    assert emulator.stats.submits_accepted == 6


def test_garbage_download_is_retried_then_recovered(run, manifest, emulator):
    """A download that is not an image, or is truncated, is fetched again."""
    emulator.script("download", "garbage", "truncate")
    result = run(manifest)
    assert result.code == 0
    assert emulator.stats.submits_accepted == 6


def test_persistently_bad_download_fails_then_next_run_refetches(run, manifest, emulator):
    """Bad bytes past --retries end the attempt with the prediction kept (in flight, counted
    as a failure cause); the next run re-downloads, no resubmit."""
    emulator.script("download", *["garbage"] * 3)
    first = run(manifest, "--retries", "2", "--concurrency", "1", "--queue-ahead", "0")
    assert first.code == 1
    assert first.summary["in_flight"] == 1 and first.summary["failed"] == 0
    assert any(cause.startswith("output") for cause in first.summary["failures"])
    again = run(manifest)
    assert again.code == 0 and again.summary["submitted"] == 0


# -- failures that are the row's own --------------------------------------------


def test_permanent_task_failure_is_recorded_and_kept(run, manifest, emulator, tmp_path):
    """A moderated task fails its row (HTTP 200, status failed); reruns keep it unless asked."""
    emulator.fail_next_tasks(1200, "content flagged by moderation")
    first = run(manifest, "--concurrency", "1")
    assert first.code == 1
    assert first.summary["failed"] == 1 and first.summary["completed"] == 5
    assert any("1200" in cause for cause in first.summary["failures"])
    [failed] = [e for e in last_events(tmp_path / "out").values() if e["event"] == "failed"]
    assert failed["code"] == 1200 and failed["retryable"] is False
    assert failed["error"] == "content flagged by moderation" and failed["prediction_id"]
    rerun = run(manifest)
    assert rerun.code == 1 and rerun.summary["submitted"] == 0
    retried = run(manifest, "--retry-failed")
    assert retried.code == 0 and retried.summary["submitted"] == 1


def test_transient_task_failure_is_resubmitted_within_the_run(run, manifest, emulator, tmp_path):
    """A task failing with a 5xxx code is submitted again (with backoff) and completes."""
    emulator.fail_next_tasks(5000, "internal error")
    result = run(manifest, "--concurrency", "1")
    assert result.code == 0
    assert emulator.stats.submits_accepted == 7
    lines = read_ledger_lines(tmp_path / "out")
    # The task that failed may be any row's: the run keeps one task queued ahead.
    [row] = {e["row"] for e in lines if e["event"] == "failed"}
    events = [e["event"] for e in lines if e.get("row") == row]
    assert events == [
        "submitting",
        "submitted",
        "failed",
        "submitting",
        "submitted",
        "completed",
    ]


def test_refused_submit_fails_only_that_row(run, manifest, emulator):
    """A submit refused with 4xx is not repeated; that row fails, the others complete."""
    emulator.script("submit", "404")
    result = run(manifest, "--concurrency", "1")
    assert result.code == 1
    assert result.summary["failed"] == 1 and result.summary["completed"] == 5
    assert emulator.stats.fault_count("404", "submit") == 1


def test_task_deadline_records_retryable_failure_and_resume_polls(
    run, manifest, emulator, tmp_path
):
    """Past --timeout a task is failed retryably with its id; the next run polls, never resends."""
    emulator.config.latency = (2.0, 2.0)
    first = run(manifest, "--timeout", "0.3", "--concurrency", "6")
    assert first.code == 1
    states = last_events(tmp_path / "out")
    assert all(
        s["event"] == "failed" and s["retryable"] and s["prediction_id"] for s in states.values()
    )
    assert all(s["code"] == "timeout" for s in states.values())
    for pred in emulator.predictions.values():
        pred.start_mono = pred.finish_mono = time.monotonic()
    again = run(manifest)
    assert again.code == 0 and again.summary["submitted"] == 0
    assert emulator.stats.submits_accepted == 6


def test_five_hundred_rows_under_a_storm_of_faults(run, images, write_manifest, emulator):
    """10% 429, 8% 5xx, 4% drops, 5% failed tasks: exactly the failed tasks fail, rerun is idle."""
    cfg = emulator.config
    cfg.p_429, cfg.p_5xx, cfg.p_drop, cfg.p_fail_task = 0.10, 0.08, 0.04, 0.05
    cfg.listing_inputs = True
    cfg.send_retry_after = True
    cfg.fail_codes = [1200, 1401, 1402]
    cfg.retry_after = 0
    path = write_manifest(simple_rows(images, 500))
    result = run(path, "--concurrency", "50")
    s = result.summary
    injected = {pid for pid, _ in emulator.stats.failed_tasks}
    assert result.code == 1
    assert s["failed"] == len(injected) > 0
    assert s["completed"] == 500 - len(injected)
    assert emulator.stats.fault_count("429") > 0 and emulator.stats.fault_count("drop") > 0
    # Submits past the 500 are only those whose outcome was unknown.
    assert emulator.stats.submits_accepted - 500 <= s["possible_duplicates"]
    accepted = emulator.stats.submits_accepted
    cfg.p_429 = cfg.p_5xx = cfg.p_drop = cfg.p_fail_task = 0.0
    rerun = run(path)
    assert rerun.code == 1 and rerun.summary["submitted"] == 0
    assert emulator.stats.submits_accepted == accepted


# -- the retry arithmetic -------------------------------------------------------


def test_retry_after_parses_seconds_and_http_dates():
    """Retry-After is honoured as delta-seconds or as an HTTP date."""
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert Backoff().delay(4, retry_after=2.5) == 2.5


def test_backoff_is_jittered_and_capped(monkeypatch):
    """Backoff grows exponentially with full jitter and never exceeds its cap."""
    monkeypatch.delenv("WSBATCH_ZERO_BACKOFF")
    backoff = Backoff(base=1.0, cap=8.0)
    delays = [backoff.delay(10) for _ in range(200)]
    assert max(delays) <= 8.0 and min(delays) >= 0.0 and len(set(delays)) > 100
    assert all(backoff.delay(0) <= 1.0 for _ in range(50))


def test_key_never_appears_in_a_failure_message(run, manifest, emulator, tmp_path):
    """Errors recorded in the ledger and summary never carry the key."""
    emulator.fail_next_tasks(1401, f"bad parameter near {API_KEY}")
    result = run(manifest)
    assert API_KEY not in (tmp_path / "out" / "ledger.jsonl").read_text()
    assert API_KEY not in result.out + result.err


def test_submit_read_timeout_is_retried_and_settled(emulator, images, write_manifest, tmp_path):
    """A submit that times out after sending is retried, and its outcome settled from the
    listing: a possible duplicate exactly when the server made a task of it."""
    import asyncio

    from batch.client import Client, Timeouts
    from batch.manifest import load_manifest
    from batch.runner import Runner, RunOptions

    emulator.script("submit", "slow")  # answers after 5 s, long after the client gave up

    async def go():
        timeouts = Timeouts(submit=1.0, poll=5.0)
        async with Client(emulator.base_url, API_KEY, timeouts=timeouts) as client:
            manifest = load_manifest(write_manifest(simple_rows(images, 1)))
            options = RunOptions(out_dir=tmp_path / "out", handle_signals=False, settle_delay=0.05)
            return await Runner(manifest, client, options).run()

    summary = asyncio.run(go())
    assert summary.completed == 1 and summary.submitted == 1
    assert summary.possible_duplicates == emulator.stats.submits_accepted - 1
    assert emulator.stats.fault_count("slow", "submit") == 1
