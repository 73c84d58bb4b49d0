"""The side-by-side report of a ``wsbatch run --model A --model B`` output folder.

Such a folder (the root) has no ledger of its own: each model ran every row into its
own subfolder, with its own ledger. ``wsbatch report ROOT`` writes ``ROOT/report.html``
as a grid: one line per row, the original once, then each model's edit beside it,
under column heads that give each model's spend, tasks, completed and failed counts
and median latency.

Lines are matched by row id. A row id the manifest did not give is derived from the
request, and the request names the model, so the same manifest row has a different
derived id on each model: rows left unmatched by id are then paired by their input,
prompt and seed, and failing that by input and prompt (a seed of -1 is drawn anew
per model), in ledger order.

Like ``batch.report``, this reads the ledgers alone (plus the images they name, for
thumbnails), escapes the same way and runs one inline script pinned by its hash:
the policy is the report's, with this page's script hash.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from batch.errors import UsageError
from batch.files import write_atomic_sync
from batch.ledger import ledger_paths, read_ledgers
from batch.report import (
    CSP,
    DASH,
    REPORT_NAME,
    SCRIPT_HASH,
    Cause,
    _cause,
    _is_web,
    _json_for_html,
    _local_href,
    _nsfw_flags,
    _percentile,
    _prefix,
    _Row,
    _rows,
    _shell_word,
    _shown_folder,
    _shown_path,
    _text,
    _when,
    commands,
)
from batch.report_assets import COMPARE_CSS, COMPARE_SCRIPT, CSS, LIGHTBOX_HTML
from batch.state import LedgerState
from batch.thumbs import THUMB_DIR, Source, data_uri, ensure_thumbs, file_key, output_key

COMPARE_HASH = base64.b64encode(hashlib.sha256(COMPARE_SCRIPT.encode("utf-8")).digest()).decode(
    "ascii"
)
COMPARE_CSP = CSP.replace(SCRIPT_HASH, COMPARE_HASH)


@dataclass(slots=True)
class Column:
    """One model of the comparison: its folder, its ledger state and its rows."""

    folder: Path
    model: str
    state: LedgerState
    rows: list[_Row]


def read_column(folder: Path) -> Column:
    """A model folder's column, from its ledger; the model id from its last run."""
    paths = ledger_paths(folder)
    if not paths:
        raise UsageError(f"{folder} has no ledger.jsonl: not a wsbatch output folder")
    state = read_ledgers(paths)
    models = [_text(r.get("model")) for r in state.runs if r.get("model")]
    return Column(folder, models[-1] if models else folder.name, state, _rows(state))


def write_comparison(
    root: Path, folders: list[Path], dest: Path | None = None, *, self_contained: bool = False
) -> Path:
    """Write the side-by-side report of the model ``folders`` of ``root``; return its path.

    Input thumbnails go to ``root/.thumbs``, output thumbnails to each model folder's
    own ``.thumbs`` (shared with that folder's own report).
    """
    if not folders:
        raise UsageError(f"{root} has no model folder with a ledger: nothing to compare")
    # Columns in the order the models ran: the order of --model on the command line.
    columns = sorted((read_column(folder) for folder in folders), key=_ran_first)
    dest = dest if dest is not None else root / REPORT_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    page = render_comparison(columns, root, dest.parent, self_contained=self_contained)
    write_atomic_sync(dest, page.encode("utf-8"))
    return dest


def _ran_first(column: Column) -> tuple[str, str]:
    starts = [_text(r.get("ts")) for r in column.state.runs if r.get("ts")]
    return min(starts, default="~"), column.folder.name


# -- matching rows across models ----------------------------------------------------

Line = list[_Row | None]


def _input_of(row: _Row) -> str:
    last = row.state.last
    path = last.get("image_path")
    return path if isinstance(path, str) and path else _text(last.get("image"))


def _strict_key(row: _Row) -> Hashable | None:
    prompt, ref = row.state.last.get("prompt"), _input_of(row)
    if not isinstance(prompt, str) or not ref or row.state.seed is None:
        return None
    return ref, prompt, row.state.seed


def _loose_key(row: _Row) -> Hashable | None:
    prompt, ref = row.state.last.get("prompt"), _input_of(row)
    return (ref, prompt) if isinstance(prompt, str) and ref else None


def match_lines(columns: list[Column]) -> list[Line]:
    """One line per row: each model's row with that id (None where a model has none).

    Lines that lack a model are then merged by request (see the module docstring):
    only lines with no model in common, the earlier line keeping its place.
    """
    count = len(columns)
    by_id: dict[str, int] = {}
    lines: list[Line | None] = []
    for m, column in enumerate(columns):
        for row in column.rows:
            at = by_id.get(row.id)
            if at is None:
                at = by_id[row.id] = len(lines)
                lines.append([None] * count)
            line = lines[at]
            assert line is not None
            line[m] = row
    if count > 1:
        for key in (_strict_key, _loose_key):
            _merge(lines, key)
    return [line for line in lines if line is not None]


def _merge(lines: list[Line | None], key: Callable[[_Row], Hashable | None]) -> None:
    open_lines: dict[Hashable, list[int]] = {}
    for i, line in enumerate(lines):
        if line is None:
            continue
        present = [m for m, row in enumerate(line) if row is not None]
        if len(present) == len(line):
            continue
        keys = {key(row) for row in line if row is not None}
        if len(keys) != 1 or None in keys:
            continue
        k = keys.pop()
        candidates = open_lines.setdefault(k, [])
        for j in candidates:
            target = lines[j]
            if target is not None and all(target[m] is None for m in present):
                for m in present:
                    target[m] = line[m]
                lines[i] = None
                if all(row is not None for row in target):
                    candidates.remove(j)
                break
        else:
            candidates.append(i)


# -- the grid as data -----------------------------------------------------------------


def _money(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"


def _summary(column: Column, report_dir: Path) -> dict[str, Any]:
    rows = column.rows
    latencies = sorted(r.latency for r in rows if r.status == "completed" and r.latency is not None)
    prefix = _prefix(column.folder.resolve(), report_dir)
    return {
        "id": column.model,
        "folder": column.folder.name,
        "dir": prefix,  # null: the folder cannot be linked from where the page is
        "thumbDir": None if prefix is None else prefix + THUMB_DIR + "/",
        "spend": round(column.state.spend, 6),
        "spendText": _money(column.state.spend),
        "tasks": column.state.submits,
        "rows": len(rows),
        "completed": sum(r.status == "completed" for r in rows),
        "failed": sum(r.status == "failed" for r in rows),
        "inFlight": sum(r.status == "in flight" for r in rows),
        "median": round(_percentile(latencies, 0.5), 3) if latencies else None,
    }


def grid_data(
    columns: list[Column], root: Path, report_dir: Path, *, self_contained: bool = False
) -> dict[str, Any]:
    """The JSON blob of the comparison page: models, inputs, causes and one line per row."""
    report_dir = report_dir.resolve()
    root_abs = root.resolve()
    root_str = os.path.realpath(root_abs)
    root_prefix = _prefix(root_abs, report_dir)
    lines = match_lines(columns)
    real_folders = [os.path.realpath(column.folder) for column in columns]

    causes: dict[Cause, int] = {}
    groups: dict[str, int] = {}
    group_list: list[list[Any]] = []
    group_source: list[str | None] = []
    input_sources: list[Source] = []
    out_sources: list[list[Source]] = [[] for _ in columns]
    out_entries: list[list[tuple[list[Any], str]]] = [[] for _ in columns]
    folder_prefix: dict[str, str | None] = {}
    records: list[dict[str, Any]] = []

    for line in lines:
        first = next(row for row in line if row is not None)
        rec: dict[str, Any] = {"id": first.id}
        last = first.state.last
        ref = _input_of(first)
        g = groups.get(ref) if ref else None
        if g is None:
            g = len(group_list)
            if ref:
                groups[ref] = g
            group_list.append(_group(first, folder_prefix, root_str, report_dir))
            raw = last.get("image_path")
            key = file_key(raw) if isinstance(raw, str) and raw else None
            group_source.append(key)
            if key is not None and isinstance(raw, str):
                input_sources.append(Source(key, raw))
        rec["g"] = g
        prompt = next(
            (p for r in line if r is not None and isinstance(p := r.state.last.get("prompt"), str)),
            None,
        )
        if prompt is not None:
            rec["p"] = prompt
        cells: list[dict[str, Any] | None] = []
        for m, row in enumerate(line):
            if row is None:
                cells.append(None)
                continue
            cell: dict[str, Any] = {"st": row.status}
            if row.id != first.id:
                cell["id"] = row.id
            if row.state.seed is not None:
                cell["seed"] = row.state.seed
            if row.latency is not None:
                cell["lat"] = round(row.latency, 3)
            if row.status == "failed":
                cell["c"] = causes.setdefault(_cause(row.state), len(causes))
            if row.status == "completed" and row.state.outputs:
                flags = _nsfw_flags(row.state)
                shas = row.state.last.get("sha256")
                shas = shas if isinstance(shas, list) else []
                folder = real_folders[m]
                outs = []
                for n, name in enumerate(row.state.outputs):
                    entry: list[Any] = [name, None, 1 if n < len(flags) and flags[n] else 0]
                    path = os.path.join(folder, name)
                    out_key = (output_key(shas[n]) if n < len(shas) else None) or file_key(path)
                    if out_key is not None:
                        out_sources[m].append(Source(out_key, path))
                        out_entries[m].append((entry, out_key))
                    outs.append(entry)
                cell["o"] = outs
            cells.append(cell)
        rec["c"] = cells
        records.append(rec)

    # Thumbnails: the inputs' in the root's .thumbs, each model's outputs in its own.
    used: dict[Path, set[str]] = {}
    input_thumbs = ensure_thumbs(root_abs, input_sources) if input_sources else {}
    for g, key in enumerate(group_source):
        if key is not None and key in input_thumbs:
            group_list[g][2] = input_thumbs[key]
            used.setdefault(root_abs / THUMB_DIR, set()).add(input_thumbs[key])
    for m, column in enumerate(columns):
        if not out_sources[m]:
            continue
        thumbs = ensure_thumbs(column.folder.resolve(), out_sources[m])
        for entry, key in out_entries[m]:
            if key in thumbs:
                entry[1] = thumbs[key]
                used.setdefault(column.folder.resolve() / THUMB_DIR, set()).add(thumbs[key])

    cmds = commands(columns[0].state, root)
    model_flags = " ".join(f"--model {_shell_word(c.model)}" for c in columns)
    data: dict[str, Any] = {
        "thumbDir": None if root_prefix is None else root_prefix + THUMB_DIR + "/",
        "models": [_summary(column, report_dir) for column in columns],
        "groups": group_list,
        "causes": [{"code": c[0], "msg": c[1], "retryable": c[2]} for c in causes],
        "rerun": f"{cmds.rerun} {model_flags}",
        "lines": records,
    }
    if self_contained:
        embedded: dict[str, str] = {}
        for thumb_dir, names in used.items():
            for name in sorted(names):
                uri = data_uri(thumb_dir, name)
                if uri is not None:
                    embedded[name] = uri
        data["embedded"] = embedded
    return data


def _group(
    row: _Row, folder_prefix: dict[str, str | None], root_str: str, report_dir: Path
) -> list[Any]:
    """An input as the page shows it: [label, link, thumbnail (filled in later), remote?].

    As in the folder report, a local input is linked only when it lies inside the
    output folder; elsewhere its thumbnail and its name as the manifest wrote it stand
    for it.
    """
    last = row.state.last
    raw = last.get("image_path")
    image_path = raw if isinstance(raw, str) else ""
    ref = _text(last.get("image"))
    label = _shown_path(ref) if ref else Path(image_path).name
    href: str | None = None
    if image_path:
        href = _local_href(image_path, root_str, report_dir, folder_prefix)
    elif _is_web(ref):
        return [label, ref, None, 1]
    return [label, href, None, 0]


# -- the page -------------------------------------------------------------------------

BROWSER = (
    """
<section id="rows"><div class="sticky"><div class="controls">
<input id="q" type="search" placeholder="search prompt, file name or row id" autocomplete="off">
<select id="f-show" aria-label="show"><option value="">every row</option>
<option value="failed">rows where a model failed</option>
<option value="differ">rows where the models differ in status</option>
<option value="ok">rows every model completed</option>
<option value="missing">rows a model has not finished or lacks</option></select>
<select id="sort" aria-label="sort"><option value="id">row id</option>
<option value="name">input name</option><option value="attention">failed first</option>
<option value="slow">slowest first</option><option value="fast">fastest first</option>
</select>
<button type="button" id="reset">reset</button>
</div><div class="cmp-head" id="cmp-head"></div></div>
<div class="pager" id="pager-top"></div>
<div id="lines"><p class="muted">The rows need JavaScript to show.</p></div>
<div class="pager" id="pager-bottom"></div>
</section>
"""
    + LIGHTBOX_HTML
)


def _header(columns: list[Column], root: Path, data: dict[str, Any]) -> str:
    runs = [run for c in columns for run in c.state.runs]
    manifests = list(
        dict.fromkeys(_shown_path(_text(r.get("manifest"))) for r in runs if r.get("manifest"))
    )
    latest = max(
        (
            str(e["ts"])
            for c in columns
            for e in [*c.state.runs, *c.state.finished, *(r.last for r in c.state.rows.values())]
            if e.get("ts")
        ),
        default="",
    )
    total = sum(c.state.spend for c in columns)
    facts = [
        ("models", str(len(columns))),
        ("rows", str(len(data["lines"]))),
        ("spend", _money(total)),
        ("manifest", ", ".join(manifests) or DASH),
        ("ledgers as of", _when(latest)),
    ]
    items = "".join(f"<span><b>{escape(k)}</b> {escape(v)}</span>" for k, v in facts)
    notes = [
        f"{c.folder.name}: {c.state.corrupt_lines} damaged ledger line(s) skipped; see "
        f"wsbatch repair {_shell_word(_shown_folder(c.folder))}"
        for c in columns
        if c.state.corrupt_lines
    ]
    warning = "".join(f'<p class="warn">{escape(n)}</p>' for n in notes)
    pending = any(
        m["failed"] or m["inFlight"] or m["rows"] < len(data["lines"]) for m in data["models"]
    )
    steps = ""
    if pending:
        steps = (
            '<section class="next"><h2>Next</h2><ul><li>failed, in flight or missing rows: a '
            "plain rerun of the comparison polls, retries and submits them (add "
            "--retry-failed to pay for permanent failures again)"
            f"<div><code class=cmd>{escape(data['rerun'])}</code></div></li></ul></section>"
        )
    return (
        f"<header><h1>wsbatch comparison <code>{escape(_shown_folder(root))}</code></h1>"
        f'<p class="facts">{items}</p>{warning}</header>{steps}'
    )


def render_comparison(
    columns: list[Column], root: Path, report_dir: Path, *, self_contained: bool = False
) -> str:
    """The comparison page; links are relative to ``report_dir``."""
    data = grid_data(columns, root, report_dir, self_contained=self_contained)
    title = f"wsbatch · {root.resolve().name} · " + " vs ".join(c.model for c in columns)
    footer = (
        "thumbnails are embedded: this file travels alone"
        if self_contained
        else f"thumbnails in {THUMB_DIR}/ of each model folder"
    )
    one = _shell_word(_shown_folder(columns[0].folder))
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta http-equiv="Content-Security-Policy" content="{COMPARE_CSP}">',
            f"<title>{escape(title)}</title><style>{CSS}{COMPARE_CSS}</style></head><body>",
            _header(columns, root, data),
            BROWSER,
            f"<footer>Written by wsbatch from the ledgers alone; {escape(footer)}; each "
            f"model folder has its own report too (wsbatch report {escape(one)}); "
            "full-size images are linked relative to this page.</footer>",
            f'<script id="wsbatch-data" type="application/json">{_json_for_html(data)}</script>',
            f"<script>{COMPARE_SCRIPT}</script></body></html>\n",
        ]
    )
