"""Damaged ledgers: a line that cannot be read never causes a payment, never a crash.

A garbled line, or a known event with broken fields, may be the only record that a
row was paid for. Runs hold the rows it may concern; read-only commands report
around it; `wsbatch repair` lists it and, when told, moves it out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_ledger_lines, simple_rows


def rewrite(out: Path, edit) -> None:
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(edit(lines)))


def line_of(out: Path, event: str, row: str) -> int:
    for n, e in enumerate(read_ledger_lines(out), 1):
        if e["event"] == event and e.get("row") == row:
            return n
    raise AssertionError(f"no {event} line for {row}")


def submitted_once(out: Path, path: Path, run, emulator, tmp_path):
    """Submit every row, then forget the completions: rows are in flight, paid for."""
    first = run(path)
    assert first.code == 0, first.err
    lines = [e for e in read_ledger_lines(out) if e["event"] != "completed"]
    (out / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    for f in out.glob("row-*"):
        f.unlink()


@pytest.mark.parametrize(
    "damage",
    [
        lambda line: line[: len(line) // 2] + "\n",  # garbled JSON, the row still readable
        lambda line: line.replace('"prediction_id":', '"prediction_id":null,"x":'),
        lambda line: line.replace('"seed":', '"seed":"seven","y":'),
    ],
    ids=["garbled", "null-id", "wrong-type"],
)
def test_a_damaged_submitted_line_holds_its_row_instead_of_paying_again(
    run, cli, images, write_manifest, emulator, tmp_path, damage
):
    """The row whose `submitted` line is damaged is held: not submitted again, named in
    the summary with its file:line; the other rows go on."""
    path = write_manifest(simple_rows(images, 3))
    out = tmp_path / "out"
    submitted_once(out, path, run, emulator, tmp_path)
    n = line_of(out, "submitted", "row-0001")
    rewrite(out, lambda lines: [damage(x) if i == n - 1 else x for i, x in enumerate(lines)])
    paid = emulator.stats.submits_accepted
    result = run(path)
    assert emulator.stats.submits_accepted == paid  # nothing paid again
    assert result.code == 1 and result.summary["held"] == 1
    assert f"ledger.jsonl:{n}" in result.summary["damaged_lines"]
    assert result.summary["completed"] == 2
    status = json.loads(cli("status", out, "--json").out)
    assert status["damaged_lines"] == [f"ledger.jsonl:{n}"]


def test_outputs_null_breaks_no_command(run, cli, images, write_manifest, emulator, tmp_path):
    """A `completed` line with outputs: null: run, status, validate, report and export
    all work and say where the damage is."""
    path = write_manifest(simple_rows(images, 3))
    out = tmp_path / "out"
    assert run(path).code == 0
    n = line_of(out, "completed", "row-0002")
    rewrite(
        out,
        lambda lines: [
            x.replace('"outputs":[', '"outputs":null,"was":[') if i == n - 1 else x
            for i, x in enumerate(lines)
        ],
    )
    paid = emulator.stats.submits_accepted
    again = run(path)
    assert emulator.stats.submits_accepted == paid
    assert again.code in (0, 1), again.err
    assert "Traceback" not in again.err
    for args in (("status", out), ("status", out, "--json"), ("validate", path, "--out", out),
                 ("report", out), ("export", out, "--format", "parquet")):  # fmt: skip
        result = cli(*args)
        assert result.code == 0, (args, result.err)
    assert "wsbatch repair" in cli("status", out).out


def test_a_line_naming_no_row_holds_every_unfinished_row(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """Garbage that names no row could be about any row: no row is paid for until the
    user decides; finished rows stay finished."""
    rows = simple_rows(images, 4)
    path = write_manifest(rows[:2])
    out = tmp_path / "out"
    assert run(path).code == 0
    rewrite(out, lambda lines: [*lines[:3], "%%% not json %%%\n", *lines[3:]])
    paid = emulator.stats.submits_accepted
    result = run(write_manifest(rows))  # the same manifest, grown by two rows
    assert emulator.stats.submits_accepted == paid
    assert result.summary["held"] == 2 and result.summary["completed"] == 2
    assert result.code == 1 and "ledger.jsonl:4" in result.summary["damaged_lines"]


def test_repair_lists_then_drops_damage_and_the_rows_run_again(
    run, cli, images, write_manifest, emulator, tmp_path
):
    """`repair` names each damaged line and exits 1; `repair --drop` moves them to
    ledger.damaged.jsonl, and the next run plans the rows from what is left."""
    path = write_manifest(simple_rows(images, 2))
    out = tmp_path / "out"
    submitted_once(out, path, run, emulator, tmp_path)
    n = line_of(out, "submitted", "row-0000")
    rewrite(out, lambda lines: [x[:-3] + "\n" if i == n - 1 else x for i, x in enumerate(lines)])
    listed = cli("repair", out)
    assert listed.code == 1 and f"ledger.jsonl:{n}" in listed.out and "row-0000" in listed.out
    dropped = cli("repair", out, "--drop")
    assert dropped.code == 0, dropped.err
    assert (out / "ledger.damaged.jsonl").read_text().count("\n") == 1
    assert cli("repair", out).code == 0
    result = run(path)
    assert result.code == 0 and result.summary["held"] == 0


def test_a_torn_last_line_is_cut_not_held(run, images, write_manifest, emulator, tmp_path):
    """A last line without its newline is a crash mid-write, not damage: it is cut and
    the run goes on."""
    path = write_manifest(simple_rows(images, 2))
    out = tmp_path / "out"
    assert run(path).code == 0
    with open(out / "ledger.jsonl", "a") as fh:
        fh.write('{"ts":"2026-01-01T00:00:00Z","event":"submi')
    result = run(path)
    assert result.code == 0 and result.summary["held"] == 0
    assert (out / "ledger.jsonl").read_text().endswith("\n")


DAMAGES = {
    "garbled": lambda line: line[: len(line) // 2] + "\n",
    "outputs-null": lambda line: line.replace('"outputs":[', '"outputs":null,"x":['),
    "row-number": lambda line: line.replace('"row":"row-0000"', '"row":7'),
    "event-list": lambda line: line.replace('"event":"completed"', '"event":["completed"]'),
    "nan-seed": lambda line: line.replace('"seed":', '"seed":NaN,"was":'),
    "binary": lambda line: "\x00\x01\x02garbage\xff\n",
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_ledgers_through_every_command_as_subprocesses(
    kind, images, write_manifest, emulator, tmp_path
):
    """Each kind of damage: status, validate, report and run (real processes) end
    without a traceback, name the damaged line, and no submit is sent."""
    from tests.conftest import run_subprocess

    path = write_manifest(simple_rows(images, 2))
    out = tmp_path / "out"
    url = emulator.base_url
    first = run_subprocess("run", path, "--base-url", url, "--out", out, "--no-progress")
    assert first.returncode == 0, first.stderr
    n = line_of(out, "completed", "row-0000")
    compact = [json.dumps(e, separators=(",", ":")) + "\n" for e in read_ledger_lines(out)]
    compact[n - 1] = DAMAGES[kind](compact[n - 1])
    (out / "ledger.jsonl").write_text("".join(compact))
    paid = emulator.stats.submits_accepted
    for args, codes in (
        (("status", out), {0}),
        (("validate", path, "--out", out), {0}),
        (("report", out), {0}),
        (("run", path, "--base-url", url, "--out", out, "--no-progress"), {0, 1}),
    ):
        result = run_subprocess(*args)
        assert result.returncode in codes, (args, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
    assert emulator.stats.submits_accepted == paid
    listed = run_subprocess("repair", out)
    assert listed.returncode == 1 and f"ledger.jsonl:{n}" in listed.stdout
