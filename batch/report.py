"""A self-contained HTML report of an output folder, built from its ledger alone.

The report is one static file (inline CSS and SVG, no script) that opens straight
from disk: each row's input next to its outputs, prompts, seeds, timings, NSFW
flags, failures grouped by cause and a latency histogram. It reads the ledger and
nothing else: no image is opened and no request is sent, so it is cheap for 10k
rows and safe to run while a batch is still writing.

Everything that comes from the ledger is user or server text (prompts, error
messages, ids, paths), so every value goes through ``html.escape`` and every link
is either a relative file path we build ourselves or an http(s) URL.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from batch.errors import UsageError
from batch.files import write_atomic_sync
from batch.ledger import ledger_paths, read_ledgers
from batch.state import LedgerState, RowState, RowStatus, parse_ts

REPORT_NAME = "report.html"
# Failure groups list their rows inline; past this many, a count keeps the page small.
GROUP_ROW_LIMIT = 50
# Order of the rows table: what needs attention first.
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
DASH, MINUS, TIMES = "\u2013", "\u2212", "\u00d7"


def write_report(out_dir: Path, dest: Path | None = None) -> Path:
    """Write the HTML report of ``out_dir`` (default ``out_dir/report.html``); return its path.

    Raises ``UsageError`` when ``out_dir`` has no ledger.
    """
    paths = ledger_paths(out_dir)
    if not paths:
        raise UsageError(f"{out_dir} has no ledger.jsonl: not a wsbatch output folder")
    state = read_ledgers(paths)
    dest = dest if dest is not None else out_dir / REPORT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    page = render_report(state, out_dir, dest.parent)
    write_atomic_sync(dest, page.encode("utf-8"))
    return dest


# -- reading the ledger -------------------------------------------------------


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
    in_flight: int = 0
    outputs: int = 0
    nsfw: int = 0
    causes: Counter[tuple[str, str]] = field(default_factory=Counter)


def _num(value: Any) -> float | None:
    # bool is an int in Python; a ledger value of true is not a duration.
    if isinstance(value, bool) or not isinstance(value, int | float):
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


def _cause(row: RowState) -> tuple[str, str]:
    return _text(row.code) or "no code", row.error or "no message"


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
            nsfw = item.state.last.get("nsfw")
            totals.nsfw += sum(1 for flag in nsfw if flag is True) if isinstance(nsfw, list) else 0
        elif item.status == "failed":
            totals.failed += 1
            totals.causes[_cause(item.state)] += 1
        else:
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


def _file_href(path: str, report_dir: Path) -> str:
    """A link from the report's folder to a local file: relative, so the folder can move."""
    try:
        rel = os.path.relpath(path, report_dir)
    except ValueError:  # another drive on Windows: no relative path exists
        return Path(path).resolve().as_uri()
    return quote(Path(rel).as_posix(), safe="/")


def _input_href(row: RowState, report_dir: Path, cache: dict[str, str]) -> str | None:
    local = row.last.get("image_path")
    if isinstance(local, str) and local:
        # relpath per folder, not per file: inputs of a big batch sit in a few folders.
        folder, name = os.path.split(local)
        prefix = cache.get(folder)
        if prefix is None:
            prefix = _file_href(folder or ".", report_dir)
            prefix = cache[folder] = "" if prefix == "." else prefix.rstrip("/") + "/"
        return prefix + quote(name, safe="")
    ref = row.last.get("image")
    # Only web URLs become links: a ledger line must not smuggle in javascript: or data:.
    if isinstance(ref, str) and ref.lower().startswith(("http://", "https://")):
        return ref
    return None


def _thumb(href: str, alt: str, css: str = "") -> str:
    cls = f"thumb {css}".strip()
    h, a = escape(href), escape(alt)
    return (
        f'<a class="{cls}" href="{h}" target="_blank" rel="noopener" title="{a}">'
        f'<img src="{h}" alt="{a}" loading="lazy" decoding="async" width="128" height="128">'
        "</a>"
    )


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
    facts = [
        ("model", model),
        ("manifest", _text(last.get("manifest")) or DASH),
        ("API", _text(last.get("base_url")) or DASH),
        ("runs", str(len(runs))),
        ("ledger as of", _when(latest)),
    ]
    items = "".join(f"<span><b>{escape(k)}</b> {escape(v)}</span>" for k, v in facts)
    notes = []
    if state.corrupt_lines:
        notes.append(f"{state.corrupt_lines} unreadable ledger line(s) were skipped.")
    if state.torn_tail:
        notes.append("The ledger ends in a torn line (a run was killed while writing).")
    warning = "".join(f'<p class="warn">{escape(n)}</p>' for n in notes)
    return (
        f"<header><h1>wsbatch report <code>{escape(str(out_dir))}</code></h1>"
        f'<p class="facts">{items}</p>{warning}</header>'
    )


def _cards(state: LedgerState, totals: _Totals) -> str:
    not_started = (
        max(totals.manifest_rows - totals.known, 0) if totals.manifest_rows is not None else None
    )
    cards = [
        ("rows known", str(totals.known), ""),
        ("completed", str(totals.completed), "ok"),
        ("failed", str(totals.failed), "bad" if totals.failed else ""),
        ("in flight", str(totals.in_flight), "busy" if totals.in_flight else ""),
    ]
    if not_started:
        cards.append(("not started", str(not_started), ""))
    cards += [
        ("submits", str(state.submits), ""),
        (
            "possible duplicates",
            str(state.possible_duplicates),
            "bad" if state.possible_duplicates else "",
        ),
        ("spend", f"${state.spend:,.2f}" if state.spend >= 1 else f"${state.spend:.4f}", ""),
        ("outputs", str(totals.outputs), ""),
        ("NSFW flagged", str(totals.nsfw), "bad" if totals.nsfw else ""),
    ]
    body = "".join(
        f'<div class="card {css}"><div class="n">{escape(value)}</div>'
        f'<div class="l">{escape(label)}</div></div>'
        for label, value, css in cards
    )
    return f'<section class="cards">{body}</section>'


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
    return f"<section><h2>Latency</h2>{stats}{_histogram(latencies)}</section>"


def _row_links(ids: Iterable[str]) -> str:
    return ", ".join(f'<a href="#row-{escape(i)}">{escape(i)}</a>' for i in ids)


def _failures_section(rows: list[_Row], totals: _Totals) -> str:
    if not totals.causes:
        return ""
    members: dict[tuple[str, str], list[str]] = {}
    for item in rows:
        if item.status == "failed":
            members.setdefault(_cause(item.state), []).append(item.id)
    groups = []
    for (code, message), count in totals.causes.most_common():
        ids = members[(code, message)]
        shown = _row_links(ids[:GROUP_ROW_LIMIT])
        more = len(ids) - GROUP_ROW_LIMIT
        if more > 0:
            shown += f" <span class=muted>and {more} more</span>"
        groups.append(
            f'<li class="group"><span class="count">{count}{TIMES}</span> '
            f'<code class="code">{escape(code)}</code> '
            f'<span class="err">{escape(message)}</span>'
            f'<div class="members">{shown}</div></li>'
        )
    return (
        f"<section><h2>Failures by cause ({totals.failed})</h2>"
        f'<ul class="groups">{"".join(groups)}</ul></section>'
    )


def _row_html(item: _Row, out_prefix: str, report_dir: Path, hrefs: dict[str, str]) -> str:
    row, last = item.state, item.state.last
    rid = escape(item.id)
    status_cls = item.status.replace(" ", "-")
    status = f'<span class="pill {status_cls}">{escape(item.status)}</span>'
    if item.status == "failed":
        status += (
            f'<div class="small">{"retryable" if row.retryable else "permanent"}</div>'
            if row.retryable is not None
            else ""
        )

    href = _input_href(row, report_dir, hrefs)
    ref = _text(last.get("image"))
    if href is not None:
        images = _thumb(href, f"input {ref or item.id}")
    else:
        images = '<span class="nothumb">input not in ledger</span>'
    images += '<span class="arrow">→</span>'
    flags_raw = last.get("nsfw")
    nsfw: list[Any] = flags_raw if isinstance(flags_raw, list) else []
    outputs = row.outputs if item.status == "completed" else []
    for n, name in enumerate(outputs):
        flagged = n < len(nsfw) and nsfw[n] is True
        images += _thumb(out_prefix + quote(name, safe=""), name, "nsfw" if flagged else "")
    if not outputs:
        images += '<span class="nothumb">no output</span>'

    if item.status == "failed":
        text = (
            f'<div class="err"><code class="code">{escape(_text(row.code) or "no code")}</code> '
            f"{escape(row.error or 'no message')}</div>"
        )
    elif item.status == "in flight":
        text = f'<div class="muted">submitted {escape(_when(row.submitted_at))}</div>'
    else:
        text = ""
    prompt = last.get("prompt")
    if isinstance(prompt, str):
        text = f'<div class="prompt">{escape(prompt)}</div>' + text
    meta = last.get("meta")
    if isinstance(meta, dict) and meta:
        pairs = " ".join(f"{escape(str(k))}={escape(_text(v))}" for k, v in meta.items())
        text += f'<div class="small">{pairs}</div>'
    if ref and href is None:
        text += f'<div class="small">input: {escape(ref)}</div>'

    flags = [f"#{n + 1}" for n, flag in enumerate(nsfw) if flag is True]
    nsfw_cell = (
        f'<span class="pill failed">NSFW {escape(" ".join(flags))}</span>'
        if flags
        else ("no" if nsfw else DASH)
    )
    timings = f"<div>latency {escape(_seconds(item.latency))}</div>"
    if item.inference_s is not None:
        timings += f'<div class="small">inference {escape(_seconds(item.inference_s))}</div>'
    if row.submits > 1:
        timings += f'<div class="small">{row.submits} submits</div>'
    pid = escape(_text(row.prediction_id)) or DASH
    seed = escape(_text(row.seed)) or DASH
    return (
        f'<tr id="row-{rid}" class="{status_cls}"><td>{status}</td>'
        f'<td class="id"><a href="#row-{rid}">{rid}</a><div class="pid">{pid}</div></td>'
        f'<td class="imgs">{images}</td><td class="text">{text}</td>'
        f'<td class="num">{seed}</td><td class="num">{timings}</td><td>{nsfw_cell}</td></tr>'
    )


def _rows_section(rows: list[_Row], out_dir: Path, report_dir: Path) -> str:
    # Outputs sit in out_dir; from the default report location the prefix is empty.
    # Resolved once: realpath costs system calls, and 10k rows share one report folder.
    report_dir = report_dir.resolve()
    prefix = _file_href(str(out_dir.resolve()), report_dir)
    prefix = "" if prefix in ("", ".") else prefix.rstrip("/") + "/"
    hrefs: dict[str, str] = {}  # input folder -> its relative link prefix
    body = [_row_html(item, prefix, report_dir, hrefs) for item in rows]
    if not body:
        return "<section><h2>Rows</h2><p class=muted>No row events in the ledger yet.</p></section>"
    return (
        f"<section><h2>Rows ({len(rows)})</h2><table class='rows'><thead><tr>"
        "<th>status</th><th>row / prediction</th><th>input → output</th><th>prompt</th>"
        "<th>seed</th><th>timings</th><th>NSFW</th></tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></section>"
    )


def _runs_section(state: LedgerState) -> str:
    if not state.runs:
        return ""
    finished = {f.get("run_id"): f.get("summary") for f in state.finished if f.get("run_id")}
    lines = []
    for run in state.runs:
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
            _text(run.get("rows")),
            _text(run.get("concurrency")),
            outcome,
        ]
        lines.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (
        "<section><h2>Runs</h2><table class='runs'><thead><tr><th>started</th><th>run</th>"
        "<th>version</th><th>rows</th><th>concurrency</th><th>outcome</th></tr></thead>"
        f"<tbody>{''.join(lines)}</tbody></table></section>"
    )


CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;
--ok:#15803d;--bad:#b91c1c;--busy:#b45309;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 6px}h1 code{font-size:18px;color:var(--accent)}
h2{font-size:16px;margin:28px 0 10px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.facts{margin:0;display:flex;flex-wrap:wrap;gap:4px 18px;color:var(--muted)}
.facts b{color:var(--fg);font-weight:600}
.warn{background:#fef3c7;border:1px solid #f59e0b;padding:6px 10px;border-radius:6px}
.muted{color:var(--muted)}.small{font-size:12px;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:10px;
margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .n{font-size:22px;font-weight:650}.card .l{color:var(--muted);font-size:12px}
.card.ok .n{color:var(--ok)}.card.bad .n{color:var(--bad)}.card.busy .n{color:var(--busy)}
section>svg.hist,.groups,table{background:var(--card);border:1px solid var(--line);
border-radius:8px}
svg.hist{display:block;max-width:100%;height:auto}
.hist .bar{fill:var(--accent);opacity:.85}.hist .bar:hover{opacity:1}
.hist .grid{stroke:var(--line)}.hist .axis{stroke:var(--muted)}
.hist .median{stroke:var(--bad);stroke-dasharray:4 3}
.hist text{font-size:11px;fill:var(--muted)}.hist .ytick{text-anchor:end}
.hist .xtick,.hist .atitle{text-anchor:middle}.hist .atitle{fill:var(--fg);font-size:12px}
.hist .mlabel{fill:var(--bad);paint-order:stroke;stroke:#fff;stroke-width:3px}
.stats{display:flex;flex-wrap:wrap;gap:6px 22px;margin:0 0 10px}
.stats div{display:flex;gap:6px}.stats dt{color:var(--muted)}.stats dd{margin:0;font-weight:600}
.groups{list-style:none;margin:0;padding:0}
.group{padding:10px 14px;border-top:1px solid var(--line)}.group:first-child{border-top:0}
.group .count{font-weight:700;color:var(--bad)}.members{font-size:12px;margin-top:4px}
.code{background:#fee2e2;color:var(--bad);padding:1px 6px;border-radius:4px;font-size:12px}
.err{color:var(--bad);overflow-wrap:anywhere}
table{border-collapse:separate;border-spacing:0;width:100%}
th,td{text-align:left;vertical-align:top;padding:8px 10px;border-top:1px solid var(--line)}
thead th{position:sticky;top:0;background:#eef0f4;border-top:0;font-size:12px;
color:var(--muted);font-weight:600;z-index:1}
tr.failed td{background:#fff7f7}
td.id{font-weight:600;overflow-wrap:anywhere;min-width:120px;max-width:200px}
.pid{font:11px ui-monospace,monospace;color:var(--muted);font-weight:400}
td.imgs{white-space:nowrap}
.thumb{display:inline-block;width:128px;height:128px;border:1px solid var(--line);
border-radius:6px;overflow:hidden;vertical-align:middle;margin-right:6px;
background:repeating-conic-gradient(#f1f2f4 0 25%,#fff 0 50%) 0 0/16px 16px}
.thumb img{width:100%;height:100%;object-fit:contain;display:block}
.thumb.nsfw img{filter:blur(10px)}.thumb.nsfw:hover img{filter:none}
.thumb.nsfw{outline:2px solid var(--bad)}
.arrow{color:var(--muted);margin:0 8px 0 2px;vertical-align:middle}
.nothumb{display:inline-flex;width:128px;height:128px;align-items:center;justify-content:center;
border:1px dashed var(--line);border-radius:6px;color:var(--muted);font-size:12px;
vertical-align:middle;text-align:center;padding:8px;white-space:normal}
td.text{min-width:220px;max-width:460px}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:9em;overflow:auto}
td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.pill{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;
white-space:nowrap}
.pill.completed{background:#dcfce7;color:var(--ok)}.pill.failed{background:#fee2e2;
color:var(--bad)}.pill.in-flight{background:#fef3c7;color:var(--busy)}
table.runs td{font-size:13px}
footer{margin-top:24px;color:var(--muted);font-size:12px}
"""


def render_report(state: LedgerState, out_dir: Path, report_dir: Path) -> str:
    """The report page for a ledger state; links are relative to ``report_dir``."""
    rows = _rows(state)
    totals = _totals(state, rows)
    models = [_text(r.get("model")) for r in state.runs if r.get("model")]
    title = f"wsbatch · {out_dir.resolve().name} · {models[-1] if models else 'report'}"
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # No script runs and nothing but images loads: the page is inert by construction.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            "img-src * data: blob: file:; style-src 'unsafe-inline'\">",
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
            _header(state, out_dir),
            _cards(state, totals),
            _latency_section(rows),
            _failures_section(rows, totals),
            _rows_section(rows, out_dir, report_dir),
            _runs_section(state),
            "<footer>Written by wsbatch from the ledger alone; images are linked, not copied."
            "</footer></body></html>\n",
        ]
    )
