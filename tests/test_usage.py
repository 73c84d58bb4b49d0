"""Hostile and broken command lines and environments: each is a one-line usage error
(exit 2, or 4 for the key) naming the flag or variable, with no traceback and no request
sent; and `status` never makes a starting run exit 3."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import batch.lock
from batch.api import parse_shard, run_manifest_async
from batch.emulator import EmulatorConfig, start_emulator
from batch.errors import UsageError
from batch.lock import HOLDER_PREFIX, OutDirLock, holders
from tests.conftest import API_KEY, ROOT, run_subprocess, simple_rows, subprocess_env


def assert_usage_error(result, code: int, *names: str) -> None:
    """One line on stderr naming every one of ``names``, the exit code, no traceback."""
    err = result.err.strip()
    assert result.code == code, err
    assert "Traceback" not in err and "internal error" not in err
    assert len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, err


@pytest.fixture
def manifest(images, write_manifest) -> Path:
    return write_manifest(simple_rows(images, 2))


def run_cli(cli, emulator, manifest: Path, out: Path, *extra: str):
    return cli(
        "run", manifest, "--base-url", emulator.base_url, "--out", out, "--no-progress", *extra
    )


# -- the output folder ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_naming_a_file_is_a_usage_error(cli, emulator, manifest, tmp_path, where):
    """`--out` naming an existing file (or a path through one) exits 2 before any request."""
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "sub"
    assert_usage_error(run_cli(cli, emulator, manifest, out), 2, "--out", "not a folder")
    assert_usage_error(cli("validate", manifest, "--out", out), 2, "--out")
    assert emulator.requests == []


def test_out_in_a_read_only_folder_is_a_usage_error(cli, emulator, manifest, tmp_path):
    """`--out` where nothing can be written exits 2 up front, not at the first paid output."""
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("chmod 555 does not stop this user from writing (running as root)")
        result = run_cli(cli, emulator, manifest, locked / "out")
        assert_usage_error(result, 2, "--out", "not writable")
        assert emulator.requests == []
    finally:
        locked.chmod(0o755)


# -- the base URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:99999", "port"),
        ("http://127.0.0.1:0", "port"),
        ("http://127.0.0.1:abc", "port"),
        ("http://[::1", "IPv6"),
        ("http://[zz::1]:8080", "IPv6"),
        ("http://::1:8080", "IPv6"),
        ("https://exa mple.com", "spaces"),
        ("", "http(s) URL"),
    ],
)
def test_bad_base_url_is_a_usage_error(cli, manifest, tmp_path, url, says):
    """A bad port or a malformed IPv6 --base-url exits 2 naming the flag, not a ValueError."""
    result = cli("run", manifest, "--base-url", url, "--out", tmp_path / "out", "--no-progress")
    assert_usage_error(result, 2, "--base-url", says)
    assert not (tmp_path / "out").exists()


def test_bad_base_url_from_the_environment_names_the_variable(cli, manifest, tmp_path, monkeypatch):
    """A bad WAVESPEED_BASE_URL is a usage error naming that variable."""
    monkeypatch.setenv("WAVESPEED_BASE_URL", "http://127.0.0.1:70000")
    result = cli("run", manifest, "--out", tmp_path / "out", "--no-progress")
    assert_usage_error(result, 2, "WAVESPEED_BASE_URL", "port")


def test_an_ipv6_loopback_base_url_works(manifest, tmp_path):
    """http://[::1]:PORT reaches an emulator listening on IPv6 loopback."""
    try:
        socket.socket(socket.AF_INET6).close()
        socket.getaddrinfo("::1", 0, socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on this host")

    async def go():
        emulator = await start_emulator(EmulatorConfig(api_key=API_KEY, seed=1), host="::1")
        try:
            assert emulator.base_url.startswith("http://[::1]:")
            return await run_manifest_async(
                manifest, out_dir=tmp_path / "out", base_url=emulator.base_url
            )
        finally:
            await emulator.close()

    assert asyncio.run(go()).completed == 2


# -- shards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"JOB_COMPLETION_INDEX": "abc"}, "JOB_COMPLETION_INDEX"),
        ({"JOB_COMPLETION_INDEX": "\u0663"}, "JOB_COMPLETION_INDEX"),  # an Arabic-Indic 3
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "1.5"}, "AWS_BATCH_JOB_ARRAY_INDEX"),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "-1"}, "AWS_BATCH_JOB_ARRAY_INDEX"),
        ({"SLURM_ARRAY_TASK_ID": "x"}, "SLURM_ARRAY_TASK_ID"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "x"}, "SLURM_ARRAY_TASK_MIN"),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "5"}, "SLURM_ARRAY_TASK_MIN"),
        ({"JOB_COMPLETION_INDEX": "9"}, "JOB_COMPLETION_INDEX"),
    ],
)
def test_bad_shard_index_variable_is_named(cli, manifest, tmp_path, monkeypatch, env, name):
    """`--shard auto` with a bad scheduler index exits 2 naming the variable."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = cli("run", manifest, "--shard", "auto", "--shards", "4", "--out", tmp_path / "o")
    assert_usage_error(result, 2, name)


def test_bad_slurm_count_is_named():
    """A SLURM_ARRAY_TASK_COUNT that is not a count is named, not ignored."""
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "0"}
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_COUNT"):
        parse_shard("auto", None, env)


def test_shards_beside_an_explicit_shard_must_agree(cli, manifest, tmp_path):
    """`--shard K/N --shards M` with M != N exits 2; the same N is accepted."""
    result = cli("run", manifest, "--shard", "0/2", "--shards", "3", "--out", tmp_path / "o")
    assert_usage_error(result, 2, "--shard", "--shards")
    assert parse_shard("1/2", 2, {}) == (1, 2)


# -- the key ------------------------------------------------------------------------------


def test_a_key_with_a_control_character_stops_at_start_with_exit_4(emulator, manifest, tmp_path):
    """A key that could never be sent stops the run at once (exit 4), unprinted, unsent."""
    out = tmp_path / "out"
    result = run_subprocess(
        "run", manifest, "--base-url", emulator.base_url, "--out", out, "--no-progress",
        WAVESPEED_API_KEY="abc\x01def",
    )  # fmt: skip
    err = result.stderr.strip()
    assert result.returncode == 4, err
    assert "WAVESPEED_API_KEY" in err and "control character" in err
    assert len(err.splitlines()) == 1 and "abc" not in err and "Traceback" not in err
    assert emulator.requests == [] and not out.exists()


@pytest.mark.parametrize(
    ("key", "what"), [("abc def", "whitespace"), ("abc\u201cdef", "non-ASCII")]
)
def test_a_key_with_spaces_or_non_ascii_stops_with_exit_4(
    cli, emulator, manifest, tmp_path, monkeypatch, key, what
):
    """Whitespace inside the key or a non-ASCII character: exit 4, the key not shown."""
    monkeypatch.setenv("WAVESPEED_API_KEY", key)
    result = run_cli(cli, emulator, manifest, tmp_path / "out")
    assert_usage_error(result, 4, "WAVESPEED_API_KEY", what)
    assert "abc" not in result.err and emulator.requests == []


def test_a_malformed_key_file_names_the_file(cli, emulator, manifest, tmp_path):
    """The same check for --api-key-file, naming the flag."""
    key_file = tmp_path / "key"
    key_file.write_text("abc\tdef\n")
    result = run_cli(cli, emulator, manifest, tmp_path / "out", "--api-key-file", key_file)
    assert_usage_error(result, 4, "--api-key-file")
    assert emulator.requests == []


# -- global flags and the environment --------------------------------------------------


def test_global_flags_before_the_emulator_subcommand():
    """`wsbatch --debug emulator --help` reaches the emulator's own parser."""
    result = run_subprocess("--debug", "emulator", "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "wsbatch emulator" in result.stdout and "--port" in result.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WSBATCH_ZERO_BACKOFF", "yes"),
        ("WSBATCH_SETTLE_DELAY", "-1"),
        ("WSBATCH_POLL_FLOOR", "soon"),
    ],
)
def test_bad_environment_variable_is_named(
    cli, emulator, manifest, tmp_path, monkeypatch, name, value
):
    """Every variable wsbatch reads is checked before a request: exit 2 naming it."""
    monkeypatch.setenv(name, value)
    assert_usage_error(run_cli(cli, emulator, manifest, tmp_path / "out"), 2, name)
    assert emulator.requests == []


@pytest.mark.parametrize("flag", [("--grace", "-1"), ("--grace", "nan"), ("--price", "inf")])
def test_non_finite_or_negative_numbers_are_refused(manifest, tmp_path, capsys, flag):
    """--grace below 0 and NaN or infinite amounts are argument errors (exit 2)."""
    from batch.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["run", str(manifest), "--out", str(tmp_path / "out"), *flag])
    assert stopped.value.code == 2 and flag[0] in capsys.readouterr().err


# -- status never stops a run -----------------------------------------------------------


def test_a_stalled_status_cannot_make_a_run_exit_3(tmp_path, monkeypatch):
    """A reader frozen in the middle of its probe leaves every lock a run takes free."""
    with OutDirLock(tmp_path):  # a folder some run used before
        pass
    stale = tmp_path / f"{HOLDER_PREFIX}999999-deadbeef.pid"
    stale.write_text("999999\nwhole\n")  # a killed run's pid file: the reader can lock it
    runner = threading.current_thread()
    stalled = threading.Event()

    class StallingFcntl:
        """fcntl, but the reader thread sleeps holding whatever lock it just took."""

        def __getattr__(self, name: str) -> object:
            return getattr(fcntl, name)

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            fcntl.flock(fd, operation)
            if threading.current_thread() is not runner and not operation & fcntl.LOCK_UN:
                stalled.set()
                time.sleep(0.7)  # longer than a run waits out a probe

    monkeypatch.setattr(batch.lock, "fcntl", StallingFcntl())
    reader = threading.Thread(target=holders, args=(tmp_path,))
    reader.start()
    assert stalled.wait(5)
    start = time.monotonic()
    with OutDirLock(tmp_path):  # raises LockedError if the reader holds the folder's lock
        assert time.monotonic() - start < 0.5
    reader.join()


def test_status_in_a_loop_never_makes_a_starting_run_exit_3(cli, emulator, manifest, tmp_path):
    """50 run starts while another process reads `status` as fast as it can: none exits 3."""
    out = tmp_path / "out"
    assert run_cli(cli, emulator, manifest, out).code == 0
    code = (
        "import sys, pathlib\n"
        "from batch.cli import status_of\n"
        "out = pathlib.Path(sys.argv[1]); print('ready', flush=True)\n"
        "while True: status_of(out)\n"
    )
    reader = subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        codes = [run_cli(cli, emulator, manifest, out).code for _ in range(50)]
    finally:
        reader.kill()
        reader.wait()
    assert codes == [0] * 50
    info = json.loads(cli("status", out, "--json").out)
    assert info["running"] is False
    assert not list(out.glob(f"{HOLDER_PREFIX}*"))  # every run removed its pid file


def _a_finished_folder(tmp_path: Path, rows: int) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    lines = [
        {"ts": "2026-01-01T00:00:00.000Z", "event": "completed", "row": f"r{n}",
         "prediction_id": f"p{n}", "outputs": [f"r{n}.png"]}
        for n in range(rows)
    ]  # fmt: skip
    (out / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("rows", [2, 3000])
def test_a_full_disk_under_standard_output_is_a_clear_error(tmp_path: Path, rows: int):
    """`status --json > /dev/full`, with output smaller and larger than a buffer: one
    line naming the reason, exit 1, no traceback and no "internal error"."""
    out = _a_finished_folder(tmp_path, rows)
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered, as a user's redirected stdout is
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "batch", "status", str(out), "--json"],
            stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
        )  # fmt: skip
    err = done.stderr.strip()
    assert done.returncode == 1, err
    assert "No space left on device" in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err and "ignored" not in err


@pytest.mark.parametrize("rows", [2, 3000])
def test_output_nobody_reads_ends_quietly(tmp_path: Path, rows: int):
    """`wsbatch status --json | head -c 0`: the reader is gone before we write; the
    command ends with exit 1 and says nothing (nothing of ours went wrong)."""
    out = _a_finished_folder(tmp_path, rows)
    env = subprocess_env()
    env.pop("PYTHONUNBUFFERED", None)
    read, write = os.pipe()
    os.close(read)  # the reader left already
    try:
        done = subprocess.run(
            [sys.executable, "-m", "batch", "status", str(out), "--json"],
            stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == ""


def test_an_os_error_without_a_reason_is_an_internal_error(tmp_path: Path, monkeypatch, capsys):
    """A TimeoutError (an OSError with no errno) that got through is not passed off as
    the machine refusing something: it is an internal error, with the --debug hint."""
    from batch import cli

    def times_out(args: Any) -> int:
        raise TimeoutError

    monkeypatch.setattr(cli, "_cmd_status", times_out)
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: TimeoutError" in err and "--debug" in err
