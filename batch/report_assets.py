"""The report page's stylesheet and script, inlined into every report.

The script is plain ES2017 with no dependency: it reads the rows from the JSON blob
in ``<script id="wsbatch-data">``, filters, sorts and groups them by input image, and
renders one page of groups at a time, so a 10,000-row report opens as fast as a small
one. Every ledger string reaches the page through ``textContent`` or as an attribute
value set from the DOM, never as HTML.
"""

from __future__ import annotations

CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e5e7eb;--bg:#f6f7f9;--card:#fff;
--ok:#15803d;--bad:#b91c1c;--busy:#b45309;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;padding:24px 32px;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:22px;margin:0 0 6px}h1 code{font-size:18px;color:var(--accent)}
h2{font-size:16px;margin:24px 0 10px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
button{font:inherit;cursor:pointer}
.facts{margin:0;display:flex;flex-wrap:wrap;gap:4px 18px;color:var(--muted)}
.facts b{color:var(--fg);font-weight:600}
.warn{background:#fef3c7;border:1px solid #f59e0b;padding:6px 10px;border-radius:6px}
.muted{color:var(--muted)}.small{font-size:12px;color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(120px,1fr));gap:10px;
margin-top:18px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card[data-status]{cursor:pointer}.card[data-status]:hover{border-color:var(--accent)}
.card .n{font-size:22px;font-weight:650}.card .l{color:var(--muted);font-size:12px}
.card.ok .n{color:var(--ok)}.card.bad .n{color:var(--bad)}.card.busy .n{color:var(--busy)}
.next ul,.causes{list-style:none;margin:0;padding:0;background:var(--card);
border:1px solid var(--line);border-radius:8px}
.next li,.cause{padding:10px 14px;border-top:1px solid var(--line)}
.next li:first-child,.cause:first-child{border-top:0}
code.cmd{display:inline-block;margin-top:4px;background:#111827;color:#f9fafb;
padding:3px 8px;border-radius:5px;font-size:12.5px;user-select:all;overflow-wrap:anywhere}
.cause .count{font-weight:700;color:var(--bad)}.cause .hint{font-size:12.5px;margin-top:4px}
.cause .show{margin-top:6px;font-size:12px;border:1px solid var(--line);background:#fff;
border-radius:5px;padding:2px 8px}
.code{background:#fee2e2;color:var(--bad);padding:1px 6px;border-radius:4px;font-size:12px}
.err{color:var(--bad);overflow-wrap:anywhere}
table{border-collapse:separate;border-spacing:0;width:100%;background:var(--card);
border:1px solid var(--line);border-radius:8px}
th,td{text-align:left;vertical-align:top;padding:6px 10px;border-top:1px solid var(--line);
font-size:13px}
thead th{background:#eef0f4;border-top:0;font-size:12px;color:var(--muted);font-weight:600}
details summary{cursor:pointer;color:var(--muted);margin:6px 0}
details.latency>summary{list-style:none;color:var(--fg)}
details.latency>summary h2{display:inline-block}
svg.hist{display:block;max-width:100%;height:auto;background:var(--card);
border:1px solid var(--line);border-radius:8px}
.hist .bar{fill:var(--accent);opacity:.85}.hist .bar:hover{opacity:1}
.hist .grid{stroke:var(--line)}.hist .axis{stroke:var(--muted)}
.hist .median{stroke:var(--bad);stroke-dasharray:4 3}
.hist text{font-size:11px;fill:var(--muted)}.hist .ytick{text-anchor:end}
.hist .xtick,.hist .atitle{text-anchor:middle}.hist .atitle{fill:var(--fg);font-size:12px}
.hist .mlabel{fill:var(--bad);paint-order:stroke;stroke:#fff;stroke-width:3px}
.stats{display:flex;flex-wrap:wrap;gap:6px 22px;margin:0 0 10px}
.stats div{display:flex;gap:6px}.stats dt{color:var(--muted)}.stats dd{margin:0;font-weight:600}
.controls{display:flex;flex-wrap:wrap;gap:8px;position:sticky;top:0;z-index:2;
background:var(--bg);padding:8px 0}
.controls input,.controls select,.controls button{font:inherit;padding:5px 8px;
border:1px solid #cbd0d8;border-radius:6px;background:#fff}
.controls input{flex:1 1 260px;min-width:200px}
.pager{display:flex;align-items:center;gap:10px;margin:6px 0;color:var(--muted)}
.pager button{border:1px solid #cbd0d8;background:#fff;border-radius:6px;padding:3px 10px}
.pager button:disabled{opacity:.4;cursor:default}.pager .count{color:var(--fg);font-weight:600}
.group{display:flex;gap:14px;background:var(--card);border:1px solid var(--line);
border-radius:8px;padding:12px;margin-bottom:10px}
.orig{flex:0 0 150px;overflow-wrap:anywhere}.orig .name{font-weight:600;font-size:13px;
margin-top:4px}
.edits{flex:1;display:flex;flex-direction:column;gap:8px;min-width:0}
.edit{display:flex;gap:12px;padding:8px;border:1px solid var(--line);border-radius:6px}
.edit.failed{background:#fff7f7;border-color:#fecaca}.edit.target{outline:3px solid var(--accent)}
.outs{display:flex;gap:6px;flex-wrap:wrap;flex:0 0 auto;max-width:420px}
.info{flex:1;min-width:0}
.head{display:flex;flex-wrap:wrap;gap:4px 12px;align-items:baseline}
.rid{font-weight:600;overflow-wrap:anywhere}
.prompt{white-space:pre-wrap;overflow-wrap:anywhere;max-height:9em;overflow:auto;margin:4px 0}
.tile{display:inline-flex;align-items:center;justify-content:center;width:128px;height:128px;
border:1px solid var(--line);border-radius:6px;overflow:hidden;padding:0;color:var(--muted);
font-size:12px;text-align:center;
background:repeating-conic-gradient(#f1f2f4 0 25%,#fff 0 50%) 0 0/16px 16px}
.tile img{width:100%;height:100%;object-fit:contain;display:block}
.tile.nsfw{outline:2px solid var(--bad)}.tile.nsfw img{filter:blur(10px)}
.tile.nsfw:hover img{filter:none}
.tile.none{border-style:dashed;background:#fafafa;padding:8px}
.pill{display:inline-block;padding:1px 8px;border-radius:999px;font-size:12px;font-weight:600;
white-space:nowrap;background:#eef0f4}
.pill.completed{background:#dcfce7;color:var(--ok)}.pill.failed{background:#fee2e2;
color:var(--bad)}.pill.in-flight{background:#fef3c7;color:var(--busy)}
#lightbox{position:fixed;inset:0;z-index:10;background:rgba(10,12,16,.88);display:flex;
align-items:center;justify-content:center;gap:12px;padding:24px}
#lightbox[hidden]{display:none}
#lightbox figure{margin:0;display:flex;flex-direction:column;align-items:center;
max-width:calc(100vw - 160px)}
#lightbox img{height:calc(100vh - 140px);width:auto;max-width:100%;object-fit:contain;
background:repeating-conic-gradient(#ddd 0 25%,#fff 0 50%) 0 0/16px 16px;image-rendering:auto}
#lightbox img.nsfw{filter:blur(24px);cursor:pointer}
#lightbox figcaption{color:#e5e7eb;margin-top:10px;max-width:900px;white-space:pre-wrap;
overflow-wrap:anywhere;text-align:center}
#lightbox button{background:none;border:0;color:#fff;font-size:42px;line-height:1;
padding:8px 14px}
#lightbox .lb-close{position:absolute;top:8px;right:14px}
footer{margin-top:24px;color:var(--muted);font-size:12px}
"""

# DOM and formatting helpers both report pages use.
_HELPERS = r"""
function $(id) { return document.getElementById(id); }
function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function has(o, k) { return o != null && Object.prototype.hasOwnProperty.call(o, k); }
// Our links are relative paths (no scheme) or http(s) URLs; nothing else is followed.
function safe(href) {
  if (typeof href !== "string" || !href) return null;
  return /^https?:\/\//i.test(href) || !/^[^\/?#]*:/.test(href) ? href : null;
}
function secs(v) {
  if (v == null) return "\u2013";
  if (v < 10) return v.toFixed(2) + " s";
  return v < 600 ? v.toFixed(1) + " s" : (v / 60).toFixed(1) + " min";
}
function cmp(a, b) { return a < b ? -1 : a > b ? 1 : 0; }
// A thumbnail that opens the lightbox at its place in ``items``; a placeholder when
// there is neither a thumbnail nor an image to show.
function imageTile(items, src, href, caption, nsfw, size) {
  if (!src && !href) return el("div", "tile none", "no image");
  var b = el("button", "tile" + (nsfw ? " nsfw" : ""));
  b.type = "button";
  b.title = caption;
  if (src) {
    var img = el("img");
    img.loading = "lazy"; img.decoding = "async"; img.width = size; img.height = size;
    img.alt = caption; img.src = src;
    b.appendChild(img);
  } else {
    b.appendChild(document.createTextNode("no thumbnail"));
  }
  b.setAttribute("data-lb", String(items.length));
  items.push({thumb: src, full: href, caption: caption, nsfw: !!nsfw});
  return b;
}
// Previous / next buttons and "page k of n" (``go`` turns to a page), when there are pages.
function pageButtons(box, page, pages, go) {
  if (pages < 2) return;
  var prev = el("button", "prev", "\u2039 previous"), next = el("button", "next", "next \u203a");
  prev.type = next.type = "button";
  prev.disabled = page === 0;
  next.disabled = page >= pages - 1;
  prev.onclick = function () { go(page - 1); };
  next.onclick = function () { go(page + 1); };
  box.appendChild(prev);
  box.appendChild(el("span", "where", "page " + (page + 1) + " of " + pages));
  box.appendChild(next);
}
// A remote input: a link, never loaded by the page itself.
function remoteTile(href, title) {
  var a = el("a", "tile none", "remote input \u2197");
  a.href = href; a.target = "_blank"; a.rel = "noopener noreferrer"; a.title = title;
  return a;
}
"""


# The lightbox's markup and script, the same on both pages.
LIGHTBOX_HTML = """\
<div id="lightbox" hidden>
<button type="button" class="lb-close" aria-label="close">\u00d7</button>
<button type="button" class="lb-prev" aria-label="previous">\u2039</button>
<figure><img alt=""><figcaption></figcaption></figure>
<button type="button" class="lb-next" aria-label="next">\u203a</button></div>
"""

# The lightbox both pages share: images of a list, stepped with the arrow keys; the
# element whose [data-lb] children open it is named by its id.
_LIGHTBOX = r"""
var lb = $("lightbox"), lbImg = lb.querySelector("img"), lbCap = lb.querySelector("figcaption");
function openLb(i) {
  if (i < 0 || i >= lbItems.length) return;
  lbAt = i;
  var it = lbItems[i];
  lb.hidden = false;
  lbImg.className = it.nsfw ? "nsfw" : "";
  lbImg.alt = it.caption;
  lbCap.textContent = it.caption + (it.nsfw ? "\n(flagged NSFW: click the image to show it)" : "");
  lbImg.src = it.thumb || it.full;
  // The full-size file when it is there (it is not in a mailed copy): the thumbnail stays.
  if (it.full && it.thumb) {
    var full = new Image();
    full.onload = function () { if (lbAt === i) lbImg.src = it.full; };
    full.src = it.full;
  }
}
function closeLb() { lb.hidden = true; lbAt = -1; lbImg.removeAttribute("src"); }
$("%CONTAINER%").addEventListener("click", function (e) {
  var t = e.target.closest ? e.target.closest("[data-lb]") : null;
  if (t) openLb(Number(t.getAttribute("data-lb")));
});
lb.addEventListener("click", function (e) {
  if (e.target === lbImg) { lbImg.classList.remove("nsfw"); return; }
  if (e.target.closest(".lb-prev")) return openLb(lbAt - 1);
  if (e.target.closest(".lb-next")) return openLb(lbAt + 1);
  if (e.target === lb || e.target.closest(".lb-close")) closeLb();
});
document.addEventListener("keydown", function (e) {
  if (lb.hidden) return;
  if (e.key === "Escape") closeLb();
  else if (e.key === "ArrowLeft") openLb(lbAt - 1);
  else if (e.key === "ArrowRight") openLb(lbAt + 1);
});
"""


def _lightbox(container: str) -> str:
    return _LIGHTBOX.replace("%CONTAINER%", container)


SCRIPT = (
    r"""
(function () {
"use strict";
var D = JSON.parse(document.getElementById("wsbatch-data").textContent);
var rows = D.rows, groups = D.groups, causes = D.causes, models = D.models;
var PAGE = 25;
var ORDER = {"failed": 0, "in flight": 1, "not started": 2, "completed": 3};
var byId = Object.create(null), groupSize = new Array(groups.length).fill(0);
var state = {q: "", status: "", model: "", nsfw: "", cause: "", sort: "attention", page: 0};
var shown = [], lbItems = [], lbAt = -1, sorted = Object.create(null);

"""
    + _HELPERS
    + r"""function thumbUrl(name) {
  if (name == null) return null;
  if (D.embedded) return has(D.embedded, name) ? D.embedded[name] : null;
  return D.thumbDir == null ? null : D.thumbDir + name;
}
function outHref(name) { return D.outDir == null ? null : D.outDir + encodeURIComponent(name); }

rows.forEach(function (r, i) {
  r.ix = i;
  byId[r.id] = r;
  groupSize[r.g] += 1;
  var names = (r.o || []).map(function (o) { return o[0]; }).join("\n");
  r.hay = [r.id, r.p || "", groups[r.g][0] || "", names, r.pid || ""].join("\n").toLowerCase();
  r.flag = (r.o || []).some(function (o) { return o[2]; }) ? "1" : "0";
});

var SORTS = {
  attention: function (a, b) { return ORDER[a.st] - ORDER[b.st] || cmp(a.id, b.id); },
  name: function (a, b) {
    return cmp(groups[a.g][0] || "", groups[b.g][0] || "") || cmp(a.id, b.id);
  },
  id: function (a, b) { return cmp(a.id, b.id); },
  slow: function (a, b) {
    return (b.lat == null ? -1 : b.lat) - (a.lat == null ? -1 : a.lat) || cmp(a.id, b.id);
  },
  fast: function (a, b) {
    return (a.lat == null ? Infinity : a.lat) - (b.lat == null ? Infinity : b.lat) ||
      cmp(a.id, b.id);
  }
};
function order(key) {
  if (!sorted[key]) sorted[key] = rows.slice().sort(SORTS[key] || SORTS.attention);
  return sorted[key];
}

function fill(select, labels) {
  labels.forEach(function (label, i) {
    var o = el("option", null, label);
    o.value = String(i);
    select.appendChild(o);
  });
  if (!labels.length) select.hidden = true;
}
fill($("f-model"), models);
if (models.length < 2) $("f-model").hidden = true;
fill($("f-cause"), causes.map(function (c) { return c.code + " \u00b7 " + c.msg; }));

function matches(r, terms) {
  if (state.status && r.st !== state.status) return false;
  if (state.model && String(r.m) !== state.model) return false;
  if (state.nsfw && r.flag !== state.nsfw) return false;
  if (state.cause && String(r.c) !== state.cause) return false;
  for (var i = 0; i < terms.length; i++) if (r.hay.indexOf(terms[i]) < 0) return false;
  return true;
}

// Groups in the order of their first matching row; each group's rows in sort order.
function compute() {
  var terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
  var at = Object.create(null), out = [], list = order(state.sort);
  for (var i = 0; i < list.length; i++) {
    var r = list[i];
    if (!matches(r, terms)) continue;
    var g = at[r.g];
    if (g === undefined) { g = at[r.g] = out.length; out.push({g: r.g, rows: []}); }
    out[g].rows.push(r);
  }
  shown = out;
}

function tile(thumb, full, caption, nsfw) {
  return imageTile(lbItems, thumbUrl(thumb), safe(full), caption, nsfw, 128);
}

function inputTile(g) {
  var label = g[0] || "input", href = safe(g[1]);
  if (g[3] && href) return remoteTile(href, label);
  return tile(g[2], g[1], "input: " + label, false);
}

function renderRow(r) {
  var d = el("div", "edit " + r.st.replace(" ", "-"));
  d.id = "row-" + r.id;
  var outs = el("div", "outs");
  if (r.o && r.o.length) {
    r.o.forEach(function (o, n) {
      var cap = r.id + " \u00b7 " + o[0] + (o[2] ? " \u00b7 NSFW" : "") + (r.p ? "\n" + r.p : "");
      outs.appendChild(tile(o[1], outHref(o[0]), cap, o[2]));
    });
  } else {
    outs.appendChild(el("div", "tile none", r.st === "completed" ? "no output" : r.st));
  }
  d.appendChild(outs);
  var info = el("div", "info"), head = el("div", "head");
  head.appendChild(el("span", "pill " + r.st.replace(" ", "-"), r.st));
  var a = el("a", "rid", r.id);
  a.href = "#row-" + encodeURIComponent(r.id);
  head.appendChild(a);
  var facts = [];
  if (r.seed != null) facts.push("seed " + r.seed);
  if (r.lat != null) facts.push("latency " + secs(r.lat));
  if (r.inf != null) facts.push("inference " + secs(r.inf));
  if (r.sub) facts.push(r.sub + " submits");
  if (models.length > 1 && r.m != null) facts.push(models[r.m]);
  if (r.o && r.o.some(function (o) { return o[2]; })) facts.push("NSFW flagged");
  head.appendChild(el("span", "small", facts.join(" \u00b7 ")));
  info.appendChild(head);
  if (r.p != null) info.appendChild(el("div", "prompt", r.p));
  if (r.st === "failed" && r.c != null) {
    var c = causes[r.c], err = el("div", "err");
    err.appendChild(el("code", "code", c.code));
    err.appendChild(document.createTextNode(" " + c.msg));
    info.appendChild(err);
    var hint = el("div", "small", c.hint + ": ");
    hint.appendChild(el("code", "cmd", c.cmd));
    info.appendChild(hint);
  } else if (r.st === "in flight" || r.st === "not started") {
    var h = el("div", "small", (r.at ? "submitted " + r.at + "; " : "") +
      (r.st === "in flight" ? "a plain rerun polls it: " : "a plain rerun submits it: "));
    h.appendChild(el("code", "cmd", D.rerun));
    info.appendChild(h);
  }
  if (r.dmg) info.appendChild(el("div", "warn",
    "A damaged ledger line names this row: it is held from new submits until wsbatch repair."));
  if (r.meta) info.appendChild(el("div", "small", r.meta));
  if (r.pid) info.appendChild(el("div", "small", "prediction " + r.pid));
  d.appendChild(info);
  return d;
}

function renderGroup(item) {
  var g = groups[item.g], art = el("article", "group"), orig = el("div", "orig");
  orig.appendChild(inputTile(g));
  orig.appendChild(el("div", "name", g[0] || "input not in the ledger yet"));
  var total = groupSize[item.g];
  orig.appendChild(el("div", "small", (item.rows.length < total ? item.rows.length + " of " : "") +
    total + (total === 1 ? " edit" : " edits")));
  art.appendChild(orig);
  var edits = el("div", "edits");
  item.rows.forEach(function (r) { edits.appendChild(renderRow(r)); });
  art.appendChild(edits);
  return art;
}

function pager(box, pages, count) {
  box.textContent = "";
  box.appendChild(el("span", "count", count + (count === 1 ? " row" : " rows") + " in " +
    shown.length + (shown.length === 1 ? " image" : " images")));
  pageButtons(box, state.page, pages, go);
}

function render() {
  var pages = Math.max(1, Math.ceil(shown.length / PAGE));
  state.page = Math.min(Math.max(state.page, 0), pages - 1);
  var count = 0;
  shown.forEach(function (s) { count += s.rows.length; });
  lbItems = [];
  var box = $("groups"), frag = document.createDocumentFragment();
  shown.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (item) {
    frag.appendChild(renderGroup(item));
  });
  box.textContent = "";
  if (!shown.length) box.appendChild(el("p", "muted", rows.length ? "No row matches." :
    "No row events in the ledger yet."));
  box.appendChild(frag);
  pager($("pager-top"), pages, count);
  pager($("pager-bottom"), pages, count);
}

function update() { compute(); state.page = 0; render(); }
function go(page) { state.page = page; render(); $("rows").scrollIntoView(); }

function control(id, key) {
  var c = $(id);
  c.addEventListener("change", function () { state[key] = c.value; update(); });
}
control("f-status", "status"); control("f-model", "model"); control("f-nsfw", "nsfw");
control("f-cause", "cause"); control("sort", "sort");
var timer = 0;
function typed() {
  clearTimeout(timer);
  timer = setTimeout(function () {
    if ($("q").value.trim() !== state.q) { state.q = $("q").value.trim(); update(); }
  }, 120);
}
$("q").addEventListener("input", typed);
$("q").addEventListener("search", typed);
function reset() {
  ["q", "f-status", "f-model", "f-nsfw", "f-cause"].forEach(function (id) { $(id).value = ""; });
  $("sort").value = "attention";
  state = {q: "", status: "", model: "", nsfw: "", cause: "", sort: "attention", page: 0};
  update();
}
$("reset").addEventListener("click", reset);
function setFilter(id, key, value) {
  $(id).value = value; state[key] = value; update(); $("rows").scrollIntoView();
}
Array.prototype.forEach.call(document.querySelectorAll(".card[data-status]"), function (c) {
  c.addEventListener("click", function () {
    setFilter("f-status", "status", c.getAttribute("data-status"));
  });
});
Array.prototype.forEach.call(document.querySelectorAll("button[data-cause]"), function (b) {
  b.addEventListener("click", function () {
    setFilter("f-cause", "cause", b.getAttribute("data-cause"));
  });
});

// A link to #row-ID shows that row: its page, scrolled into view.
function reveal() {
  var id = "";
  try { id = decodeURIComponent(location.hash.slice(1)); } catch (e) { return; }
  if (id.slice(0, 4) !== "row-" || !byId[id.slice(4)]) return;
  var r = byId[id.slice(4)], at = -1;
  for (var pass = 0; pass < 2 && at < 0; pass++) {
    if (pass) reset();
    for (var i = 0; i < shown.length && at < 0; i++) if (shown[i].rows.indexOf(r) >= 0) at = i;
  }
  if (at < 0) return;
  state.page = Math.floor(at / PAGE);
  render();
  var node = document.getElementById("row-" + r.id);
  if (node) { node.classList.add("target"); node.scrollIntoView({block: "center"}); }
}
window.addEventListener("hashchange", reveal);

"""
    + _lightbox("groups")
    + r"""
update();
reveal();
window.wsbatchReady = performance.now();
document.body.setAttribute("data-ready", "1");
})();
"""
)

# The side-by-side page (batch.compare): the report's stylesheet plus these rules.
COMPARE_CSS = """
.sticky{position:sticky;top:0;z-index:2;background:var(--bg);padding-bottom:6px}
.sticky .controls{position:static}
.cmp-head,.line{display:grid;grid-template-columns:170px repeat(var(--n,2),minmax(180px,1fr));
gap:10px}
.cmp-head>div{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:6px 10px;font-size:12.5px;color:var(--muted);overflow-wrap:anywhere}
.cmp-head .mid{font-weight:650;color:var(--fg);font-size:13.5px}
.cmp-head .money{color:var(--fg);font-weight:600}
.cmp-head .bad{color:var(--bad);font-weight:600}
.line{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px;
margin-bottom:8px}
.line.target{outline:3px solid var(--accent)}
.line .orig{overflow-wrap:anywhere;min-width:0}
.line .prompt{font-size:12.5px;max-height:6em}
.cell{min-width:0;padding:6px;border:1px solid var(--line);border-radius:6px}
.cell.failed{background:#fff7f7;border-color:#fecaca}
.cell.missing{border-style:dashed;color:var(--muted);display:flex;align-items:center;
justify-content:center}
.cell .outs{max-width:none}.cell .small{margin-top:4px}
.line .tile{width:160px;height:160px}
"""

COMPARE_SCRIPT = (
    r"""
(function () {
"use strict";
var D = JSON.parse(document.getElementById("wsbatch-data").textContent);
var lines = D.lines, groups = D.groups, causes = D.causes, models = D.models;
var PAGE = 40, N = models.length;
var ORDER = {"failed": 0, "in flight": 1, "not started": 2, "completed": 3};
var byId = Object.create(null), sorted = Object.create(null);
var state = {q: "", show: "", sort: "id", page: 0};
var shown = [], lbItems = [], lbAt = -1;

"""
    + _HELPERS
    + r"""function thumbUrl(dir, name) {
  if (name == null) return null;
  if (D.embedded) return has(D.embedded, name) ? D.embedded[name] : null;
  return dir == null ? null : dir + name;
}

lines.forEach(function (l, i) {
  l.ix = i;
  byId[l.id] = l;
  var hay = [l.id, l.p || "", groups[l.g][0] || ""], worst = 3, slow = null, fast = null;
  var sts = [];
  l.c.forEach(function (c) {
    if (!c) { sts.push("missing"); worst = Math.min(worst, 2); return; }
    sts.push(c.st);
    if (c.id) { hay.push(c.id); byId[c.id] = l; }
    (c.o || []).forEach(function (o) { hay.push(o[0]); });
    worst = Math.min(worst, ORDER[c.st]);
    if (c.lat != null) {
      slow = slow == null ? c.lat : Math.max(slow, c.lat);
      fast = fast == null ? c.lat : Math.min(fast, c.lat);
    }
  });
  l.hay = hay.join("\n").toLowerCase();
  l.worst = worst; l.slow = slow; l.fast = fast;
  l.failed = sts.indexOf("failed") >= 0;
  l.ok = sts.every(function (s) { return s === "completed"; });
  l.differ = sts.some(function (s) { return s !== sts[0]; });
  l.missing = sts.some(function (s) { return s !== "completed" && s !== "failed"; });
});

var SORTS = {
  id: function (a, b) { return cmp(a.id, b.id); },
  name: function (a, b) {
    return cmp(groups[a.g][0] || "", groups[b.g][0] || "") || cmp(a.id, b.id);
  },
  attention: function (a, b) { return a.worst - b.worst || cmp(a.id, b.id); },
  slow: function (a, b) {
    return (b.slow == null ? -1 : b.slow) - (a.slow == null ? -1 : a.slow) || cmp(a.id, b.id);
  },
  fast: function (a, b) {
    return (a.fast == null ? Infinity : a.fast) - (b.fast == null ? Infinity : b.fast) ||
      cmp(a.id, b.id);
  }
};
function order(key) {
  if (!sorted[key]) sorted[key] = lines.slice().sort(SORTS[key] || SORTS.id);
  return sorted[key];
}

// "a model failed", then one "<model> failed" per model.
var show = $("f-show"), after = show.options[2];
models.forEach(function (m, i) {
  var o = el("option", null, "rows where " + m.id + " failed");
  o.value = "failed:" + i;
  show.insertBefore(o, after);
});

function matches(l, terms) {
  var s = state.show;
  if (s === "failed" && !l.failed) return false;
  if (s === "ok" && !l.ok) return false;
  if (s === "differ" && !l.differ) return false;
  if (s === "missing" && !l.missing) return false;
  if (s.slice(0, 7) === "failed:") {
    var c = l.c[Number(s.slice(7))];
    if (!c || c.st !== "failed") return false;
  }
  for (var i = 0; i < terms.length; i++) if (l.hay.indexOf(terms[i]) < 0) return false;
  return true;
}

function compute() {
  var terms = state.q.toLowerCase().split(/\s+/).filter(Boolean);
  shown = order(state.sort).filter(function (l) { return matches(l, terms); });
}

function head() {
  var box = $("cmp-head");
  box.style.setProperty("--n", String(N));
  box.textContent = "";
  box.appendChild(el("div", "mid", "original"));
  models.forEach(function (m) {
    var d = el("div", "model");
    d.appendChild(el("div", "mid", m.id));
    var line = el("div");
    line.appendChild(el("span", "money", m.spendText));
    line.appendChild(document.createTextNode(" \u00b7 " + m.tasks +
      (m.tasks === 1 ? " task" : " tasks")));
    d.appendChild(line);
    var counts = el("div");
    counts.appendChild(document.createTextNode(m.completed + " completed \u00b7 "));
    counts.appendChild(el("span", m.failed ? "bad" : "", m.failed + " failed"));
    if (m.inFlight) {
      counts.appendChild(document.createTextNode(" \u00b7 " + m.inFlight + " in flight"));
    }
    d.appendChild(counts);
    d.appendChild(el("div", null, "median latency " + secs(m.median)));
    box.appendChild(d);
  });
}

function tile(thumb, full, caption, nsfw) {
  return imageTile(lbItems, thumb, safe(full), caption, nsfw, 160);
}

function inputTile(g, caption) {
  var href = safe(g[1]);
  if (g[3] && href) return remoteTile(href, g[0] || "");
  return tile(thumbUrl(D.thumbDir, g[2]), g[1], caption, false);
}

function renderCell(l, c, m) {
  var model = models[m];
  if (!c) return el("div", "cell missing", "not in " + model.folder);
  var d = el("div", "cell " + c.st.replace(" ", "-")), outs = el("div", "outs");
  var rid = c.id || l.id;
  if (c.o && c.o.length) {
    c.o.forEach(function (o) {
      var cap = model.id + " \u00b7 " + rid + (c.o.length > 1 ? " \u00b7 " + o[0] : "") +
        (o[2] ? " \u00b7 NSFW" : "") + (l.p ? "\n" + l.p : "");
      var full = model.dir == null ? null : model.dir + encodeURIComponent(o[0]);
      outs.appendChild(tile(thumbUrl(model.thumbDir, o[1]), full, cap, o[2]));
    });
  } else {
    outs.appendChild(el("div", "tile none", c.st === "completed" ? "no output" : c.st));
  }
  d.appendChild(outs);
  var h = el("div", "head");
  h.appendChild(el("span", "pill " + c.st.replace(" ", "-"), c.st));
  var facts = ["latency " + secs(c.lat)];
  if (c.seed != null) facts.push("seed " + c.seed);
  if (c.id) facts.push(c.id);
  h.appendChild(el("span", "small", facts.join(" \u00b7 ")));
  d.appendChild(h);
  if (c.st === "failed" && c.c != null) {
    var cause = causes[c.c], err = el("div", "err");
    err.appendChild(el("code", "code", cause.code));
    err.appendChild(document.createTextNode(" " + cause.msg));
    d.appendChild(err);
  }
  return d;
}

function renderLine(l) {
  var g = groups[l.g], art = el("article", "line"), orig = el("div", "orig");
  art.id = "row-" + l.id;
  art.style.setProperty("--n", String(N));
  orig.appendChild(inputTile(g, "input: " + (g[0] || "input") + " \u00b7 " + l.id +
    (l.p ? "\n" + l.p : "")));
  var a = el("a", "rid", l.id);
  a.href = "#row-" + encodeURIComponent(l.id);
  orig.appendChild(el("div", "name", g[0] || "input not in the ledger"));
  orig.appendChild(a);
  if (l.p != null) orig.appendChild(el("div", "prompt", l.p));
  art.appendChild(orig);
  l.c.forEach(function (c, m) { art.appendChild(renderCell(l, c, m)); });
  return art;
}

function pager(box, pages) {
  box.textContent = "";
  var n = shown.length;
  box.appendChild(el("span", "count", n + (n === 1 ? " row" : " rows") + " \u00d7 " + N +
    " models"));
  pageButtons(box, state.page, pages, go);
}

function render() {
  var pages = Math.max(1, Math.ceil(shown.length / PAGE));
  state.page = Math.min(Math.max(state.page, 0), pages - 1);
  lbItems = [];
  var box = $("lines"), frag = document.createDocumentFragment();
  shown.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach(function (l) {
    frag.appendChild(renderLine(l));
  });
  box.textContent = "";
  if (!shown.length) box.appendChild(el("p", "muted", lines.length ? "No row matches." :
    "No row events in the ledgers yet."));
  box.appendChild(frag);
  pager($("pager-top"), pages);
  pager($("pager-bottom"), pages);
}

function update() { compute(); state.page = 0; render(); }
function go(page) { state.page = page; render(); $("rows").scrollIntoView(); }

show.addEventListener("change", function () { state.show = show.value; update(); });
$("sort").addEventListener("change", function () { state.sort = $("sort").value; update(); });
var timer = 0;
function typed() {
  clearTimeout(timer);
  timer = setTimeout(function () {
    if ($("q").value.trim() !== state.q) { state.q = $("q").value.trim(); update(); }
  }, 120);
}
$("q").addEventListener("input", typed);
$("q").addEventListener("search", typed);
function reset() {
  $("q").value = ""; show.value = ""; $("sort").value = "id";
  state = {q: "", show: "", sort: "id", page: 0};
  update();
}
$("reset").addEventListener("click", reset);

// A link to #row-ID (any model's id of the row) shows its line.
function reveal() {
  var id = "";
  try { id = decodeURIComponent(location.hash.slice(1)); } catch (e) { return; }
  if (id.slice(0, 4) !== "row-" || !byId[id.slice(4)]) return;
  var l = byId[id.slice(4)], at = shown.indexOf(l);
  if (at < 0) { reset(); at = shown.indexOf(l); }
  if (at < 0) return;
  state.page = Math.floor(at / PAGE);
  render();
  var node = document.getElementById("row-" + l.id);
  if (node) { node.classList.add("target"); node.scrollIntoView({block: "center"}); }
}
window.addEventListener("hashchange", reveal);

"""
    + _lightbox("lines")
    + r"""
head();
update();
reveal();
window.wsbatchReady = performance.now();
document.body.setAttribute("data-ready", "1");
})();
"""
)
