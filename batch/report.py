"""The HTML report of an output folder, built from its ledger alone.

``wsbatch report OUT_DIR`` writes one static page that opens straight from disk
(file://, no network): run history, totals, failures by cause with the command that
retries them and a latency histogram at the top, then every row grouped by its input
image (the original once, its edits beside it), with search, filters, sorting, pages
and a lightbox. The rows travel as one JSON blob that a small inline script renders,
one page at a time, so 10,000 rows stay fast.

Row data comes from the ledger and nothing else (``batch.ledger.read_ledgers``); the
only files opened are the images the ledger names, to make small thumbnails once
(``batch.thumbs``). ``self_contained`` embeds those as data: URIs, for a page that
can be mailed.

Everything from the ledger is user or server text (prompts, error messages, ids,
paths): the HTML parts go through ``html.escape``, the JSON blob escapes ``<``, ``>``
and ``&`` so no string can close its script element, and the script only ever sets
``textContent``. Links are relative paths to files inside the output folder (outputs,
thumbnails, inputs kept there) or http(s) URLs; an input outside the folder is shown
by its thumbnail and its name as the manifest wrote it, so no machine path is written
into the page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batch.errors import UsageError
from batch.files import write_atomic_sync
from batch.ledger import ledger_paths, read_ledgers
from batch.report_assets import CSS, LIGHTBOX_HTML, SCRIPT
from batch.state import LedgerState, RowState, RowStatus, parse_ts
from batch.thumbs import THUMB_DIR, Source, data_uri, ensure_thumbs, file_key, output_key

REPORT_NAME = "report.html"
# Order of the rows by default: what needs attention first.
STATUS_ORDER = {"failed": 0, "in flight": 1, "not started": 2, "completed": 3}
# The report shows a submit in doubt as in flight: the next run settles it either way.
STATUS_LABELS = {
    RowStatus.COMPLETED: "completed",
    RowStatus.FAILED: "failed",
    RowStatus.IN_FLIGHT: "in flight",
    RowStatus.IN_DOUBT: "in flight",
    RowStatus.NOT_STARTED: "not started",
}
# Typographic marks as escapes: ruff flags the literal characters as look-alikes.
DASH, MINUS, TIMES, ELLIPSIS = "\u2013", "\u2212", "\u00d7", "\u2026"
# The script may run only if it is ours, byte for byte.
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
CSP = (
    "default-src 'none'; img-src 'self' file: data: blob:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{SCRIPT_HASH}'"
)


def write_report(out_dir: Path, dest: Path | None = None, *, self_contained: bool = False) -> Path:
    """Write the HTML report of ``out_dir`` (default ``out_dir/report.html``); return its path.

    Thumbnails are made (once) in ``out_dir/.thumbs``; ``self_contained`` embeds them in
    the page. Raises ``UsageError`` when ``out_dir`` has no ledger.
    """
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger.jsonl: not a wsbatch output folder")
    state = read_ledgers(paths)
    dest = dest if dest is not None else out_dir / REPORT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    page = render_report(state, out_dir, dest.parent, self_contained=self_contained)
    write_atomic_sync(dest, page.encode("utf-8"))
    return dest


# -- reading the ledger -------------------------------------------------------


# A failure cause: code, message, and whether the next run retries it by itself.
Cause = tuple[str, str, bool]


@dataclass(slots=True)
class _Row:
    id: str
    status: str
    state: RowState
    latency: float | None = None
    inference_s: float | None = None


@dataclass(slots=True)
class _Totals:
    manifest_rows: int | None
    known: int
    completed: int = 0
    failed: int = 0
    permanent: int = 0
    in_flight: int = 0
    outputs: int = 0
    nsfw: int = 0
    causes: Counter[Cause] = field(default_factory=Counter)


def _num(value: Any) -> float | None:
    # bool is an int in Python; a ledger value of true is not a duration.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _rows(state: LedgerState) -> list[_Row]:
    rows: list[_Row] = []
    for row_id, row in state.rows.items():
        item = _Row(row_id, STATUS_LABELS[row.status], row)
        if item.status != "in flight":
            start, end = parse_ts(row.submitted_at), parse_ts(row.last.get("ts"))
            if start is not None and end is not None and end >= start:
                item.latency = end - start
        inference = _num(row.last.get("inference_ms")) if item.status == "completed" else None
        item.inference_s = inference / 1000 if inference is not None else None
        rows.append(item)
    rows.sort(key=lambda r: (STATUS_ORDER[r.status], r.id))
    return rows


def _cause(row: RowState) -> Cause:
    return _text(row.code) or "no code", row.error or "no message", bool(row.retryable)


def _nsfw_flags(row: RowState) -> list[bool]:
    flags = row.last.get("nsfw")
    return [flag is True for flag in flags] if isinstance(flags, list) else []


def _totals(state: LedgerState, rows: list[_Row]) -> _Totals:
    last_run = state.runs[-1] if state.runs else {}
    manifest_rows = last_run.get("rows")
    totals = _Totals(
        manifest_rows=manifest_rows if isinstance(manifest_rows, int) else None,
        known=len(rows),
    )
    for item in rows:
        if item.status == "completed":
            totals.completed += 1
            totals.outputs += len(item.state.outputs)
            totals.nsfw += sum(_nsfw_flags(item.state))
        elif item.status == "failed":
            totals.failed += 1
            cause = _cause(item.state)
            totals.permanent += not cause[2]
            totals.causes[cause] += 1
        elif item.status == "in flight":
            totals.in_flight += 1
    return totals


# -- formatting helpers -------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return DASH
    if value < 10:
        return f"{value:.2f} s"
    if value < 600:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _when(ts: Any) -> str:
    text = _text(ts)
    return text.replace("T", " ").replace("Z", " UTC") if text else DASH


def _percentile(ordered: list[float], q: float) -> float:
    # Nearest rank: a value that was actually observed, which is what a user compares.
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[min(index, len(ordered) - 1)]


def _relative(path: str | Path, report_dir: Path) -> str | None:
    """A link from the report's folder to a local file: relative, so the folder can move.

    None where no relative path exists (another drive on Windows): the page never
    carries a machine-absolute path.
    """
    try:
        rel = os.path.relpath(path, report_dir)
    except ValueError:
        return None
    return quote(Path(rel).as_posix(), safe="/")


def _prefix(folder: str | Path, report_dir: Path) -> str | None:
    """The relative link prefix of a folder: "" for the report's own, else ending in /."""
    rel = _relative(folder, report_dir)
    if rel is None:
        return None
    return "" if rel in ("", ".") else rel.rstrip("/") + "/"


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (both absolute), by their real locations."""
    try:
        real = os.path.realpath(path)
        return os.path.commonpath([real, folder]) == folder
    except ValueError:  # another drive on Windows, or a relative path
        return False


def _local_href(
    image_path: str, root: str, report_dir: Path, prefixes: dict[str, str | None]
) -> str | None:
    """The report's link to a local input: only for one inside ``root`` (the page shows no
    path outside the folder it reports on). ``prefixes`` caches each folder's prefix."""
    folder, name = os.path.split(image_path)
    if folder not in prefixes:
        prefixes[folder] = _prefix(folder, report_dir) if _inside(folder, root) else None
    prefix = prefixes[folder]
    return None if prefix is None else prefix + quote(name, safe="")


def _is_web(ref: str) -> bool:
    # Only web URLs become links: a ledger line must not smuggle in javascript: or data:.
    return ref.lower().startswith(("http://", "https://"))


def _shown_path(ref: str) -> str:
    """A path as the page shows it: as typed when relative, its name alone when absolute."""
    if _is_web(ref):
        return ref
    return Path(ref).name if os.path.isabs(ref) or ref.startswith(("/", "\\")) else ref


def _shown_folder(out_dir: Path) -> str:
    """The output folder as a command line would name it, never machine-absolute."""
    if not out_dir.is_absolute():
        return out_dir.as_posix()
    try:
        rel = os.path.relpath(out_dir, Path.cwd())
    except (ValueError, OSError):  # another drive; a working folder that was deleted
        return out_dir.name
    return out_dir.name if rel.startswith("..") else Path(rel).as_posix()


def _json_for_html(data: Any) -> str:
    """JSON that is safe inside a <script> element: no string can end it or open a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


# -- what to run next -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Commands:
    """The commands that pick the folder up again, as the user would type them."""

    rerun: str  # retries retryable failures, polls rows in flight, submits the rest
    retry_failed: str  # also resubmits permanent failures (paid again)
    note: str = ""  # for --images runs: the flags the ledger does not keep


def commands(state: LedgerState, out_dir: Path) -> Commands:
    """The rerun commands of this folder, from its last run's manifest."""
    runs = state.runs
    last = runs[-1] if runs else {}
    folder = _shown_folder(out_dir)
    manifest = _text(last.get("manifest"))
    from_flags = (
        bool(runs)
        and not last.get("manifest_path")
        and (not manifest or Path(manifest).name == "command-line")
    )
    quoted = _shell_word(folder)
    if from_flags or not manifest:
        base = f"wsbatch run --images {ELLIPSIS} --prompt {ELLIPSIS} --out {quoted}"
        note = "with the same --images and --prompt as the first run" if from_flags else ""
        if not runs:
            note = "with the manifest the folder was run with"
            base = f"wsbatch run MANIFEST --out {quoted}"
        return Commands(base, base + " --retry-failed", note)
    base = f"wsbatch run {_shell_word(_shown_path(manifest))} --out {quoted}"
    return Commands(base, base + " --retry-failed")


def _shell_word(text: str) -> str:
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=+,@%")
    if text and all(c in safe for c in text):
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _hint(cause: Cause, cmds: Commands) -> tuple[str, str]:
    """What a failure needs: (what to do, the exact command)."""
    if cause[2]:
        return "retryable: a plain rerun tries these rows again", cmds.rerun
    return (
        "permanent: a rerun skips these rows; --retry-failed submits them again (paid again)",
        cmds.retry_failed,
    )


# -- the rows as data -----------------------------------------------------------


def _row_data(
    state: LedgerState, rows: list[_Row], out_dir: Path, report_dir: Path, self_contained: bool
) -> dict[str, Any]:
    """The JSON blob the page renders: rows, their input groups, causes and thumbnails."""
    report_dir = report_dir.resolve()
    out_abs = out_dir.resolve()
    out_prefix = _prefix(out_abs, report_dir)
    out_str = os.path.realpath(out_abs)
    cmds = commands(state, out_dir)
    runs = state.runs
    default_model = next((_text(r.get("model")) for r in reversed(runs) if r.get("model")), "")

    models: dict[str, int] = {}
    causes: dict[Cause, int] = {}
    groups: dict[tuple[str, str], int] = {}
    group_list: list[list[Any]] = []
    folder_prefix: dict[str, str | None] = {}  # input folder -> its link prefix, if linked
    sources: list[Source] = []
    group_source: list[str | None] = []
    out_records: list[tuple[list[Any], str | None]] = []  # (output entry, key)
    records: list[dict[str, Any]] = []

    for item in rows:
        row, last = item.state, item.state.last
        rec: dict[str, Any] = {"id": item.id, "st": item.status}
        raw_path = last.get("image_path")
        image_path = raw_path if isinstance(raw_path, str) else ""
        ref = _text(last.get("image"))
        if image_path:
            gkey = ("p", image_path)
        elif ref:
            gkey = ("u", ref)
        else:
            gkey = ("r", item.id)
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = len(group_list)
            label = _shown_path(ref) if ref else (Path(image_path).name if gkey[0] == "p" else "")
            href: str | None = None
            key: str | None = None
            if gkey[0] == "p":
                # The original is linked only from inside the output folder: the page shows
                # no path outside it, and its thumbnail (in .thumbs/) stands for it.
                href = _local_href(image_path, out_str, report_dir, folder_prefix)
                key = file_key(image_path)
                if key is not None:
                    sources.append(Source(key, image_path))
            elif gkey[0] == "u" and _is_web(ref):
                href = ref
            # [label, link to the original, thumbnail (filled in below), remote?]
            group_list.append([label, href, None, 1 if gkey[0] == "u" and href else 0])
            group_source.append(key)
        rec["g"] = g
        model = _text(last.get("model")) or default_model
        if model:
            rec["m"] = models.setdefault(model, len(models))
        prompt = last.get("prompt")
        if isinstance(prompt, str):
            rec["p"] = prompt
        if row.seed is not None:
            rec["seed"] = row.seed
        if item.latency is not None:
            rec["lat"] = round(item.latency, 3)
        if item.inference_s is not None:
            rec["inf"] = round(item.inference_s, 3)
        if row.prediction_id:
            rec["pid"] = row.prediction_id
        if row.submits > 1:
            rec["sub"] = row.submits
        if row.damaged:
            rec["dmg"] = 1
        meta = last.get("meta")
        if isinstance(meta, dict) and meta:
            rec["meta"] = " ".join(f"{k}={_text(v)}" for k, v in meta.items())
        if item.status == "failed":
            rec["c"] = causes.setdefault(_cause(row), len(causes))
        elif item.status == "in flight" and row.submitted_at:
            rec["at"] = _when(row.submitted_at)
        if item.status == "completed" and row.outputs:
            flags = _nsfw_flags(row)
            shas = last.get("sha256")
            shas = shas if isinstance(shas, list) else []
            outs = []
            for n, name in enumerate(row.outputs):
                entry: list[Any] = [name, None, 1 if n < len(flags) and flags[n] else 0]
                key = output_key(shas[n]) if n < len(shas) else None
                path = os.path.join(out_str, name)
                key = key or file_key(path)
                if key is not None:
                    sources.append(Source(key, path))
                out_records.append((entry, key))
                outs.append(entry)
            rec["o"] = outs
        records.append(rec)

    thumbs = ensure_thumbs(out_abs, sources)
    used: set[str] = set()
    for entry, key in out_records:
        if key is not None and key in thumbs:
            entry[1] = thumbs[key]
            used.add(thumbs[key])
    for g, key in enumerate(group_source):
        if key is not None and key in thumbs:
            group_list[g][2] = thumbs[key]
            used.add(thumbs[key])

    data: dict[str, Any] = {
        "outDir": out_prefix,  # null: outputs cannot be linked from where the report is
        "thumbDir": None if out_prefix is None else out_prefix + THUMB_DIR + "/",
        "models": list(models),
        "groups": group_list,
        "causes": [
            {
                "code": c[0],
                "msg": c[1],
                "retryable": c[2],
                "hint": _hint(c, cmds)[0],
                "cmd": _hint(c, cmds)[1],
            }
            for c in causes
        ],
        "rerun": cmds.rerun,
        "rows": records,
    }
    if self_contained:
        thumb_dir = out_abs / THUMB_DIR
        embedded = {name: data_uri(thumb_dir, name) for name in sorted(used)}
        data["embedded"] = {k: v for k, v in embedded.items() if v is not None}
    return data


# -- page sections ------------------------------------------------------------


def _header(state: LedgerState, out_dir: Path) -> str:
    runs = state.runs
    last = runs[-1] if runs else {}
    models = list(dict.fromkeys(_text(r.get("model")) for r in runs if r.get("model")))
    model = ", ".join(models) or "unknown model"
    latest = max(
        (
            str(e["ts"])
            for e in [*runs, *state.finished, *(r.last for r in state.rows.values())]
            if e.get("ts")
        ),
        default="",
    )
    manifest = _text(last.get("manifest"))
    if runs and not last.get("manifest_path") and Path(manifest).name == "command-line":
        manifest = "command line (--images, --prompt)"
    facts = [
        ("model", model),
        ("manifest", _shown_path(manifest) if manifest else DASH),
        ("API", _text(last.get("base_url")) or DASH),
        ("runs", str(len(runs))),
        ("ledger as of", _when(latest)),
    ]
    items = "".join(f"<span><b>{escape(k)}</b> {escape(v)}</span>" for k, v in facts)
    notes = []
    if state.corrupt_lines:
        notes.append(
            f"{state.corrupt_lines} damaged ledger line(s) were skipped; rows they name are "
            f"held from new submits. See them with: wsbatch repair {_shown_folder(out_dir)}"
        )
    if state.torn_tail:
        notes.append("The ledger ends in a torn line (a run was killed while writing).")
    warning = "".join(f'<p class="warn">{escape(n)}</p>' for n in notes)
    return (
        f"<header><h1>wsbatch report <code>{escape(_shown_folder(out_dir))}</code></h1>"
        f'<p class="facts">{items}</p>{warning}</header>'
    )


def _cards(state: LedgerState, totals: _Totals) -> str:
    not_started = (
        max(totals.manifest_rows - totals.known, 0) if totals.manifest_rows is not None else None
    )
    cards = [
        ("rows known", str(totals.known), "", ""),
        ("completed", str(totals.completed), "ok", "completed"),
        ("failed", str(totals.failed), "bad" if totals.failed else "", "failed"),
        ("in flight", str(totals.in_flight), "busy" if totals.in_flight else "", "in flight"),
    ]
    if not_started:
        cards.append(("not started", str(not_started), "", ""))
    cards += [
        ("submits", str(state.submits), "", ""),
        (
            "possible duplicates",
            str(state.possible_duplicates),
            "bad" if state.possible_duplicates else "",
            "",
        ),
        ("spend", f"${state.spend:,.2f}" if state.spend >= 1 else f"${state.spend:.4f}", "", ""),
        ("outputs", str(totals.outputs), "", ""),
        ("NSFW flagged", str(totals.nsfw), "bad" if totals.nsfw else "", ""),
    ]
    body = "".join(
        f'<div class="card {css}"{f" data-status={escape(status, True)!r}" if status else ""}>'
        f'<div class="n">{escape(value)}</div><div class="l">{escape(label)}</div></div>'
        for label, value, css, status in cards
    )
    return f'<section class="cards">{body}</section>'


def _next_steps(state: LedgerState, totals: _Totals, out_dir: Path) -> str:
    """What to run next, with the exact command: the first thing a failed night needs."""
    cmds = commands(state, out_dir)
    not_started = (
        max(totals.manifest_rows - totals.known, 0) if totals.manifest_rows is not None else 0
    )
    pending = totals.failed - totals.permanent + totals.in_flight + not_started
    pending += sum(1 for r in state.rows.values() if r.status is RowStatus.NOT_STARTED)
    steps = []
    if pending:
        steps.append(
            (
                f"{pending} row(s) retryable, in flight or not started: a plain rerun "
                "polls, retries and submits them",
                cmds.rerun,
            )
        )
    if totals.permanent:
        steps.append(
            (
                f"{totals.permanent} row(s) failed permanently: a rerun skips them; "
                "--retry-failed submits them again (paid again)",
                cmds.retry_failed,
            )
        )
    if state.corrupt_lines:
        folder = _shell_word(_shown_folder(out_dir))
        steps.append(
            ("damaged ledger lines hold rows from new submits", f"wsbatch repair {folder}")
        )
    if not steps:
        return ""
    note = f' <span class="muted">({escape(cmds.note)})</span>' if cmds.note else ""
    items = "".join(
        f"<li>{escape(text)}{note if cmd.startswith('wsbatch run') else ''}"
        f"<div><code class=cmd>{escape(cmd)}</code></div></li>"
        for text, cmd in steps
    )
    return f'<section class="next"><h2>Next</h2><ul>{items}</ul></section>'


def _runs_section(state: LedgerState) -> str:
    if not state.runs:
        return ""
    finished = {f.get("run_id"): f.get("summary") for f in state.finished if f.get("run_id")}
    lines = []
    for run in reversed(state.runs):  # newest first
        summary = finished.get(run.get("run_id"))
        if isinstance(summary, dict):
            outcome = (
                f"{_text(summary.get('completed'))} completed, {_text(summary.get('failed'))} "
                f"failed, {_text(summary.get('submitted'))} submits, "
                f"{_seconds(_num(summary.get('elapsed_s')))}, "
                f"exit {_text(summary.get('exit_code'))}"
            )
        else:
            outcome = "no summary (killed, or still running)"
        cells = [
            _when(run.get("ts")),
            _text(run.get("run_id")),
            _text(run.get("version")),
            _text(run.get("shard")) or DASH,
            _text(run.get("rows")),
            _text(run.get("concurrency")),
            outcome,
        ]
        lines.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    shown, hidden = lines[:5], lines[5:]
    more = (
        f'<details><summary>{len(hidden)} earlier run(s)</summary><table class="runs">'
        f"<tbody>{''.join(hidden)}</tbody></table></details>"
        if hidden
        else ""
    )
    return (
        f"<section><h2>Runs ({len(lines)}, newest first)</h2><table class='runs'><thead><tr>"
        "<th>started</th><th>run</th><th>version</th><th>shard</th><th>rows</th>"
        "<th>concurrency</th><th>outcome</th></tr></thead>"
        f"<tbody>{''.join(shown)}</tbody></table>{more}</section>"
    )


def _failures_section(totals: _Totals, cause_index: dict[Cause, int], cmds: Commands) -> str:
    if not totals.causes:
        return ""
    groups = []
    for cause, count in totals.causes.most_common():
        code, message, _ = cause
        what, cmd = _hint(cause, cmds)
        groups.append(
            f'<li class="cause"><span class="count">{count}{TIMES}</span> '
            f'<code class="code">{escape(code)}</code> '
            f'<span class="err">{escape(message)}</span>'
            f'<div class="hint">{escape(what)}: <code class=cmd>{escape(cmd)}</code></div>'
            f'<button type="button" class="show" data-cause="{cause_index[cause]}">'
            "show these rows</button></li>"
        )
    return (
        f"<section><h2>Failures by cause ({totals.failed})</h2>"
        f'<ul class="causes">{"".join(groups)}</ul></section>'
    )


# -- latency histogram ----------------------------------------------------------


def _nice_step(raw: float) -> float:
    """Round a bin width up to 1, 2, 2.5 or 5 times a power of ten: readable axis labels."""
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * power * (1 + 1e-9):
            return factor * power
    return 10.0 * power


def _label(value: float) -> str:
    return f"{value:g}" if value < 1000 else f"{value:,.0f}"


def _histogram(latencies: list[float]) -> str:
    if not latencies:
        return '<p class="muted">No completed row with a submit time yet.</p>'
    ordered = sorted(latencies)
    lo_val, hi_val = ordered[0], ordered[-1]
    bins_wanted = min(30, max(5, math.ceil(math.sqrt(len(ordered)))))
    step = _nice_step((hi_val - lo_val) / bins_wanted if hi_val > lo_val else hi_val / 5 or 1)
    lo = math.floor(lo_val / step) * step
    # Bins are half-open [start, end): the maximum gets a bin of its own edge if need be.
    nbins = int((hi_val - lo) / step) + 1
    counts = [0] * nbins
    for value in ordered:
        counts[min(int((value - lo) / step), nbins - 1)] += 1
    top = max(counts)
    y_step = _nice_step(top / 4) if top > 4 else 1.0
    y_max = max(y_step * math.ceil(top / y_step), 1.0)

    width, height = 720, 240
    left, right, top_pad, bottom = 48, 16, 12, 44
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    bar_w = plot_w / nbins
    parts = [
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'role="img" aria-label="latency histogram" xmlns="http://www.w3.org/2000/svg">'
    ]
    # Horizontal grid lines with their counts: the y axis.
    y = 0.0
    while y <= y_max + 1e-9:
        py = top_pad + plot_h - plot_h * y / y_max
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{py:.1f}" y2="{py:.1f}"/>'
            f'<text class="ytick" x="{left - 6}" y="{py + 4:.1f}">{_label(y)}</text>'
        )
        y += y_step
    for i, count in enumerate(counts):
        if not count:
            continue
        h = plot_h * count / y_max
        x = left + i * bar_w
        start, end = lo + i * step, lo + (i + 1) * step
        tip = f"{_label(start)}{DASH}{_label(end)} s: {count} row{'s' if count != 1 else ''}"
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{top_pad + plot_h - h:.1f}" '
            f'width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}"><title>{escape(tip)}</title></rect>'
        )
    # Edge labels, thinned so they never overlap.
    every = max(1, math.ceil(nbins / 10))
    for i in range(0, nbins + 1, every):
        x = left + i * bar_w
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{top_pad + plot_h}" '
            f'y2="{top_pad + plot_h + 4}"/>'
            f'<text class="xtick" x="{x:.1f}" y="{top_pad + plot_h + 17}">'
            f"{_label(lo + i * step)}</text>"
        )
    median = _percentile(ordered, 0.5)
    mx = left + plot_w * (median - lo) / (nbins * step)
    # Near the right edge the label goes left of its line, so it is never clipped.
    label_at = (
        f'x="{mx - 4:.1f}" text-anchor="end"' if mx > left + plot_w * 0.85 else f'x="{mx + 4:.1f}"'
    )
    parts.append(
        f'<line class="median" x1="{mx:.1f}" x2="{mx:.1f}" y1="{top_pad}" '
        f'y2="{top_pad + plot_h}"/>'
        f'<text class="mlabel" {label_at} y="{top_pad + 10}">median</text>'
        f'<line class="axis" x1="{left}" x2="{width - right}" y1="{top_pad + plot_h}" '
        f'y2="{top_pad + plot_h}"/>'
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top_pad}" y2="{top_pad + plot_h}"/>'
        f'<text class="atitle" x="{left + plot_w / 2:.1f}" y="{height - 6}">'
        f"latency: completed {MINUS} submitted (s)</text>"
        f'<text class="atitle" transform="translate(13 {top_pad + plot_h / 2:.1f}) rotate(-90)">'
        "rows</text></svg>"
    )
    return "".join(parts)


def _latency_section(rows: list[_Row]) -> str:
    latencies = [r.latency for r in rows if r.status == "completed" and r.latency is not None]
    inference = sorted(r.inference_s for r in rows if r.inference_s is not None)
    stats = ""
    if latencies:
        ordered = sorted(latencies)
        pairs = [
            ("rows", str(len(ordered))),
            ("min", _seconds(ordered[0])),
            ("median", _seconds(_percentile(ordered, 0.5))),
            ("p90", _seconds(_percentile(ordered, 0.9))),
            ("p99", _seconds(_percentile(ordered, 0.99))),
            ("max", _seconds(ordered[-1])),
        ]
        if inference:
            pairs.append(("median inference", _seconds(_percentile(inference, 0.5))))
        stats = '<dl class="stats">' + "".join(
            f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in pairs
        )
        stats += "</dl>"
    return (
        f'<section><details class="latency" open><summary><h2>Latency</h2></summary>{stats}'
        f"{_histogram(latencies)}</details></section>"
    )


BROWSER = (
    """
<section id="rows"><h2>Rows by input image</h2>
<div class="controls">
<input id="q" type="search" placeholder="search prompt, file name or row id" autocomplete="off">
<select id="f-status" aria-label="status"><option value="">any status</option>
<option value="failed">failed</option><option value="in flight">in flight</option>
<option value="not started">not started</option><option value="completed">completed</option>
</select>
<select id="f-model" aria-label="model"><option value="">any model</option></select>
<select id="f-nsfw" aria-label="NSFW"><option value="">NSFW or not</option>
<option value="1">NSFW flagged</option><option value="0">not flagged</option></select>
<select id="f-cause" aria-label="failure cause"><option value="">any failure cause</option>
</select>
<select id="sort" aria-label="sort"><option value="attention">failed first</option>
<option value="name">input name</option><option value="id">row id</option>
<option value="slow">slowest first</option><option value="fast">fastest first</option>
</select>
<button type="button" id="reset">reset</button>
</div>
<div class="pager" id="pager-top"></div>
<div id="groups"><p class="muted">The rows need JavaScript to show.</p></div>
<div class="pager" id="pager-bottom"></div>
</section>
"""
    + LIGHTBOX_HTML
)


def render_report(
    state: LedgerState, out_dir: Path, report_dir: Path, *, self_contained: bool = False
) -> str:
    """The report page for a ledger state; links are relative to ``report_dir``."""
    rows = _rows(state)
    totals = _totals(state, rows)
    data = _row_data(state, rows, out_dir, report_dir, self_contained)
    cause_index = {(c["code"], c["msg"], c["retryable"]): n for n, c in enumerate(data["causes"])}
    models = [_text(r.get("model")) for r in state.runs if r.get("model")]
    title = f"wsbatch · {out_dir.resolve().name} · {models[-1] if models else 'report'}"
    footer = (
        "thumbnails are embedded: this file travels alone"
        if self_contained
        else f"thumbnails in {THUMB_DIR}/ beside the outputs"
    )
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # Only our own script runs, and nothing but images loads.
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
            _header(state, out_dir),
            _cards(state, totals),
            _next_steps(state, totals, out_dir),
            _runs_section(state),
            _failures_section(totals, cause_index, commands(state, out_dir)),
            _latency_section(rows),
            BROWSER,
            f"<footer>Written by wsbatch from the ledger alone; {escape(footer)}; full-size "
            "images are linked relative to this page.</footer>",
            f'<script id="wsbatch-data" type="application/json">{_json_for_html(data)}</script>',
            f"<script>{SCRIPT}</script></body></html>\n",
        ]
    )
