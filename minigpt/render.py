"""Show an `Inspection`: terminal table and heatmap (rich), PNG grid, HTML viewer, JSON.

Every file is written atomically (`minigpt.atomic`), so a failed render never
leaves a half-written output behind. The HTML file is self-contained (inline CSS,
JS and SVG, no network) and stores each head's causal attention rows quantised to
uint8 (base64): one byte per weight and only the lower triangle, so the file
stays small for long prompts.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minigpt.atomic import atomic_path, write_text_atomic
from minigpt.errors import MinigptError
from minigpt.heads import ROLES, Inspection

HEATMAP_MAX_TOKENS = 64
"""The terminal heatmap shows at most this many tokens (the first ones)."""
PNG_LABEL_MAX_TOKENS = 24
"""PNG cells get token labels on their axes up to this prompt length."""
SHADES = " ·░▒▓█"
"""Unicode shading from 0 to 1 attention, in equal steps."""

ROLE_COLOURS = {
    "induction": "#d62728",
    "previous-token": "#1f77b4",
    "duplicate-token": "#9467bd",
    "first-token": "#7f7f7f",
    "local": "#2ca02c",
    "broad": "#ff7f0e",
    "mixed": "#8c564b",
}


def check_writable(path: str | Path, param: str | None = None) -> Path:
    """Fail early (before any model work) if `path` cannot be written.

    param: the argument that gave the path (e.g. html_file), named by the error about
    an empty path; the other errors name the path itself.
    """
    if str(path) == "":  # Path("") is ".", the working directory: never what was meant
        raise MinigptError(
            f"{param or 'the output file'} needs a file name, got an empty one",
            hint="pass a file name, or leave the option out",
            param=param,
        )
    path = Path(path)
    if path.is_dir():
        raise MinigptError(f"{path} is a directory, not a file", hint="pass a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MinigptError(
            f"cannot write {path}: {parent} is not a writable folder",
            hint="choose an output path in a folder you can write to",
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise MinigptError(f"cannot write {path}: it is read-only", hint="choose another path")
    return path


def outputs(html: str | None, png: str | None, json_file: str | None, savers: tuple) -> list:
    """(save, path) for each of --html, --png and --json given, with its saver from
    `savers` (html's, png's, json's): each path checked before any model work, so a
    bad one fails at once."""
    paths = ((html, "html_file"), (png, "png_file"), (json_file, "json_file"))
    return [
        (save, check_writable(path, param))
        for save, (path, param) in zip(savers, paths, strict=True)
        if path is not None
    ]


def _mean(values: list[float]) -> float:
    """Mean of the values that are not NaN (NaN when none are)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------------------- terminal


def print_table(console: Console, inspection: Inspection) -> None:
    """One row per (layer, head): role and metrics; then a per-layer overview."""
    has_probe = inspection.repeated is not None
    has_importance = inspection.importance_source is not None
    table = Table(
        title=f"attention heads: {inspection.source}",
        caption="prev/ind/dup/first: attention on the previous token / the token after its "
        "earlier copy / the earlier copy / token 0; H/Hmax: normalised entropy; dist: mean "
        "attention distance (tokens); conf: mean max weight"
        + ("; Δloss: loss rise when zeroed; |grad|: |dL/dgate|" if has_importance else "")
        + "; nearest: the most similar head and its JS divergence in bits",
        caption_justify="left",
    )
    table.add_column("head", no_wrap=True)
    table.add_column("role", no_wrap=True)
    columns = ["prev"] + (["ind", "dup"] if has_probe else []) + ["first", "H/Hmax", "dist", "conf"]
    if has_importance:
        columns += ["Δloss", "|grad|"]
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("nearest", no_wrap=True)
    for h in inspection.heads:
        values = [_fmt(h.previous_token)]
        if has_probe:
            values += [_fmt(h.induction), _fmt(h.duplicate_token)]
        values += [
            _fmt(h.first_token),
            _fmt(h.norm_entropy),
            _fmt(h.mean_distance, 1),
            _fmt(h.confidence),
        ]
        if has_importance:
            values += [_fmt(h.importance, 3), _fmt(h.grad_importance, 3)]
        nearest = "-" if h.nearest is None else f"L{h.nearest[0]}H{h.nearest[1]} {h.nearest_js:.2f}"
        role = Text(h.role, style=ROLE_COLOURS.get(h.role, ""))
        table.add_row(h.name, role, *values, nearest, end_section=h.head == inspection.n_head - 1)
    console.print(table)
    console.print(layer_overview(inspection))


def layer_overview(inspection: Inspection) -> str:
    """A few lines: per layer, its roles, mean normalised entropy and most important head."""
    lines = ["per layer:"]
    for layer in range(inspection.n_layer):
        heads = inspection.heads[layer * inspection.n_head : (layer + 1) * inspection.n_head]
        counts = {role: sum(h.role == role for h in heads) for role in ROLES}
        roles = ", ".join(f"{n} {role}" for role, n in counts.items() if n)
        entropy = _mean([h.norm_entropy for h in heads])
        distance = _mean([h.mean_distance for h in heads])
        line = f"  layer {layer}: {roles}; mean H/Hmax {_fmt(entropy)}, mean distance {_fmt(distance, 1)}"
        if inspection.importance_source is not None:
            top = max(heads, key=lambda h: h.importance)
            line += f"; most important {top.name} (Δloss {top.importance:+.3f})"
        lines.append(line)
    if inspection.base_loss is not None:
        lines.append(
            f"  loss with every head on: {inspection.base_loss:.4f} ({inspection.importance_source})"
        )
    return "\n".join(lines)


def print_heatmap(
    console: Console,
    inspection: Inspection,
    layer: int,
    head: int,
    max_tokens: int = HEATMAP_MAX_TOKENS,
) -> None:
    """One head's attention matrix as unicode shading: rows are queries, columns keys."""
    A = inspection.attention[layer, head].numpy()  # (T, T)
    tokens = inspection.tokens
    T = len(tokens)
    shown = min(T, max_tokens)
    metrics = inspection.head(layer, head)
    console.print(
        f"[bold]L{layer}H{head}[/bold] ({metrics.role}) on the first sequence, rows = queries, columns = keys"
    )
    if shown < T:
        console.print(f"[yellow]note:[/yellow] showing the first {shown} of {T} tokens")
    width = max(1, min(8, max(len(t) for t in tokens[:shown])))
    header = " " * (width + 5) + "".join((t[:1] if len(t) == 1 else "·") for t in tokens[:shown])
    console.print(Text(header, style="dim"))
    for i in range(shown):
        row = Text(f"{i:>3} {tokens[i][:width]:>{width}} ", style="dim")
        for j in range(shown):
            if j > i:
                row.append(" ")
                continue
            row.append(*shade(float(A[i, j])))
        console.print(row)
    console.print(Text(f"shading {SHADES!r}: attention 0 to 1", style="dim"))


def shade(value: float) -> tuple[str, str]:
    """One heatmap cell for a value in [0, 1]: (a shading character, its rich style).
    NaN (damaged weights) shows as 0; a tiny value as a dot rather than nothing."""
    value = 0.0 if math.isnan(value) else min(1.0, max(0.0, value))
    char = SHADES[min(len(SHADES) - 1, int(value * (len(SHADES) - 1) + 0.5))]
    green = int(80 + 175 * value)
    return (char if char != " " else "·" if value > 0.01 else " "), f"rgb(40,{green},{255 - green // 2})"


def write_output(path: str | Path, text: str | None = None, figure=None) -> None:
    """Write an output file atomically, text or a matplotlib figure (PNG); a machine
    that refuses the write is one clear error."""
    try:
        if figure is None:
            write_text_atomic(path, text)
        else:
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png")
    except OSError as err:
        raise MinigptError(
            f"cannot write {path}: {err.strerror or err}", hint="choose another output path"
        ) from err


# ---------------------------------------------------------------------------- PNG


def save_png(path: str | Path, inspection: Inspection) -> None:
    """A grid (layers x heads) of every head's attention on the first sequence."""
    # Imported here: matplotlib is slow to import, and only --png needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L, H = inspection.n_layer, inspection.n_head
    T = len(inspection.tokens)
    labels = T <= PNG_LABEL_MAX_TOKENS
    cell = 2.6 if labels else 2.0
    fig = Figure(figsize=(cell * H + 0.6, cell * L + 0.6), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(L, H, squeeze=False)
    plain = {"parse_math": False}  # tokens are text: '$' must not start matplotlib's math
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            metrics = inspection.head(layer, head)
            ax.imshow(
                inspection.attention[layer, head].numpy(),
                cmap="viridis",
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
            ax.set_title(
                f"L{layer}H{head} {metrics.role}",
                fontsize=9,
                color=ROLE_COLOURS.get(metrics.role, "black"),
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if labels and layer == L - 1:  # keys under the bottom row only
                ax.set_xticks(range(T), inspection.tokens, fontsize=7, rotation=90, **plain)
            if labels and head == 0:  # queries beside the first column only
                ax.set_yticks(range(T), inspection.tokens, fontsize=7, **plain)
    fig.suptitle(
        f"attention, rows = queries, columns = keys: {inspection.source}", fontsize=9, **plain
    )
    write_output(path, figure=fig)


# ---------------------------------------------------------------------------- JSON


def json_safe(value):
    """`value` as strict JSON data: NaN and infinities become null (JSON has no such
    numbers, and Python's `NaN` literal breaks other readers), tensors and numpy
    values plain lists and numbers, tuples lists; at any depth."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def strict_json(data, **options) -> str:
    """json.dumps of json_safe(data); anything still not JSON raises instead of writing it."""
    return json.dumps(json_safe(data), allow_nan=False, **options)


def save_json(path: str | Path, inspection: Inspection) -> None:
    """Everything computed: metrics, roles, thresholds, similarity, tokens, attention."""
    write_output(path, strict_json(inspection.to_dict(), ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- HTML


def quantised_attention(inspection: Inspection) -> str:
    """Every head's causal rows (row i holds keys 0..i), uint8 (weight * 255), base64.

    Heads are stored in (layer, head) order, each as T (T + 1) / 2 bytes.
    """
    L, H, T, _ = inspection.attention.shape
    rows, cols = np.tril_indices(T)
    A = inspection.attention.numpy()[:, :, rows, cols]  # (L, H, T (T + 1) / 2)
    A = np.nan_to_num(A, nan=0.0)  # damaged weights: show nothing rather than wrapped bytes
    q = np.clip(np.rint(A * 255.0), 0, 255).astype(np.uint8)
    return base64.b64encode(q.tobytes()).decode("ascii")


def html_document(inspection: Inspection) -> str:
    """The self-contained viewer as one string."""
    heads = [
        {
            "name": h.name,
            "layer": h.layer,
            "head": h.head,
            "role": h.role,
            "prev": h.previous_token,
            "ind": h.induction,
            "dup": h.duplicate_token,
            "first": h.first_token,
            "ent": h.norm_entropy,
            "dist": h.mean_distance,
            "conf": h.confidence,
            "imp": h.importance,
            "grad": h.grad_importance,
            "nearest": None if h.nearest is None else f"L{h.nearest[0]}H{h.nearest[1]}",
            "js": h.nearest_js,
        }
        for h in inspection.heads
    ]
    data = {
        "L": inspection.n_layer,
        "H": inspection.n_head,
        "tokens": inspection.tokens,
        "heads": heads,
        "colours": ROLE_COLOURS,
        "attention": quantised_attention(inspection),
    }
    payload = script_json(data)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in inspection.notes)
    info = (
        f"{inspection.n_layer} layers x {inspection.n_head} heads; metrics are means over "
        f"{inspection.n_sequences} sequence(s); pictures show the first sequence "
        f"({len(inspection.tokens)} tokens)."
    )
    if inspection.importance_source:
        info += f" Importance measured on {inspection.importance_source}."
    fills = {
        "TITLE": html.escape(f"minigpt heads: {inspection.source}"),
        "INFO": html.escape(info),
        "RULES": html.escape(inspection.thresholds.describe()),
        "NOTES": notes,
        "DATA": payload,
    }
    # One pass: a placeholder's text inside a filled-in value (a note, a token) stays text.
    return _PLACEHOLDER.sub(lambda m: fills[m.group(1)], _HTML_TEMPLATE)


_PLACEHOLDER = re.compile(r"__(TITLE|INFO|RULES|NOTES|DATA)__")

_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def script_json(data) -> str:
    """`data` as a JS expression that is safe inside <script>...</script>.

    Escaping `</` is not enough: in a script element `<!--` followed by `<script`
    switches the HTML parser into a state where `</script>` no longer ends it, and
    the rest of the page is swallowed. So no `<` (nor `>`, `&`) appears at all:
    inside JSON strings, the only place they can occur, they become \\u003c etc.,
    which JSON and JS read back as the same characters. U+2028/U+2029 are escaped
    for older JS engines, where they end a line even inside a string.
    """
    payload = strict_json(data, ensure_ascii=False, default=str)
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group(0)], payload)


def save_html(path: str | Path, inspection: Inspection) -> None:
    """Write the self-contained HTML viewer."""
    write_output(path, html_document(inspection))


_HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:18px;margin:0 0 4px}
.info{color:#555;margin:0 0 8px}
#wrap{display:flex;gap:18px;align-items:flex-start;flex-wrap:wrap}
.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
#tokens{max-width:620px;line-height:1.9;font-family:ui-monospace,monospace;white-space:pre-wrap}
#tokens span{padding:1px 2px;border-radius:3px;cursor:default;border:1px solid transparent}
#tokens span.q{border-color:#d62728}
table{border-collapse:collapse;font-size:12px}
td,th{padding:2px 6px;text-align:right;border-bottom:1px solid #eee}
td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}
tr.sel{background:#ffe9a8}
tbody tr{cursor:pointer}
#grid rect{cursor:pointer;stroke:#fff;stroke-width:2}
#grid rect.sel{stroke:#000}
#readout{font-family:ui-monospace,monospace;min-height:1.4em;color:#333}
canvas{image-rendering:pixelated;border:1px solid #ccc}
.legend span{display:inline-block;margin-right:10px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}
small{color:#666}
.next{margin-top:10px;padding-top:6px;border-top:1px solid #eee;max-width:640px}
.next p{margin:6px 0;color:#555} .next code{color:#222}
</style></head><body>
<h1>__TITLE__</h1>
<p class="info">__INFO__</p>
<ul>__NOTES__</ul>
<div id="wrap">
 <div class="panel">
  <div>layer <select id="layer"></select> head <select id="head"></select></div>
  <svg id="grid"></svg>
  <div class="legend" id="legend"></div>
  <canvas id="heat" width="320" height="320"></canvas>
  <div id="readout"></div>
  <small>heatmap: rows = queries, columns = keys</small>
 </div>
 <div class="panel"><b>hover a token</b> to see where the selected head attends from it
  <div id="tokens"></div></div>
 <div class="panel"><table id="metrics"><thead></thead><tbody></tbody></table>
  <small>__RULES__</small>
  <div class="next"><b>Next, on the same run</b> (RUN: its directory; docs/circuits.md shows how to read each):
   <p><code>minigpt lens RUN --prompt TEXT</code><br>which layer first predicts each next token (the logit lens)</p>
   <p><code>minigpt attribute RUN --prompt TEXT --answer TOK</code><br>how much each head and MLP pushes TOK's logit up at the prompt's end (direct logit attribution)</p>
   <p><code>minigpt patch RUN --clean TEXT --corrupt TEXT2 --answer A --versus B</code><br>which heads the answer flows through: the share of logit(A) - logit(B) each restores when copied from the clean run into the corrupted one (activation patching)</p>
  </div></div>
</div>
<script>
const D = __DATA__;
const T = D.tokens.length, TRI = T * (T + 1) / 2;
const raw = atob(D.attention), Q = new Uint8Array(raw.length);
for (let i = 0; i < raw.length; i++) Q[i] = raw.charCodeAt(i);
let cur = 0;
const w = (h, i, j) => j > i ? 0 : Q[h * TRI + i * (i + 1) / 2 + j] / 255;
const $ = id => document.getElementById(id);
const fmt = (v, d) => v === null || v === undefined ? "-" : Number(v).toFixed(d);
for (let l = 0; l < D.L; l++) $("layer").add(new Option(l, l));
for (let h = 0; h < D.H; h++) $("head").add(new Option(h, h));
$("layer").onchange = $("head").onchange = () => select(+$("layer").value * D.H + +$("head").value);
const NS = "http://www.w3.org/2000/svg", S = 26, grid = $("grid");
grid.setAttribute("width", D.H * S + 30); grid.setAttribute("height", D.L * S + 4);
D.heads.forEach((h, k) => {
  const r = document.createElementNS(NS, "rect");
  r.setAttribute("x", 30 + h.head * S); r.setAttribute("y", h.layer * S);
  r.setAttribute("width", S); r.setAttribute("height", S); r.setAttribute("fill", D.colours[h.role]);
  const t = document.createElementNS(NS, "title"); t.textContent = h.name + " " + h.role; r.appendChild(t);
  r.onclick = () => select(k); grid.appendChild(r);
});
for (let l = 0; l < D.L; l++) {
  const t = document.createElementNS(NS, "text"); t.setAttribute("x", 0); t.setAttribute("y", l * S + 17);
  t.textContent = "L" + l; grid.appendChild(t);
}
$("legend").innerHTML = Object.entries(D.colours).map(([r, c]) => `<span><i style="background:${c}"></i>${r}</span>`).join("");
const cols = [["head", "name"], ["role", "role"], ["prev", "prev", 2], ["ind", "ind", 2], ["dup", "dup", 2],
  ["first", "first", 2], ["H/Hmax", "ent", 2], ["dist", "dist", 1], ["conf", "conf", 2],
  ["Δloss", "imp", 3], ["|grad|", "grad", 3], ["nearest", "nearest"], ["JS", "js", 2]];
$("metrics").tHead.innerHTML = "<tr>" + cols.map(c => `<th>${c[0]}</th>`).join("") + "</tr>";
const body = $("metrics").tBodies[0];
D.heads.forEach((h, k) => {
  const tr = body.insertRow();
  cols.forEach(c => { const td = tr.insertCell(); td.textContent = c.length > 2 ? fmt(h[c[1]], c[2]) : (h[c[1]] ?? "-"); });
  tr.cells[1].style.color = D.colours[h.role]; tr.onclick = () => select(k);
});
const spans = D.tokens.map((tok, i) => {
  const s = document.createElement("span"); s.textContent = tok;
  s.onmouseenter = () => show(i); $("tokens").appendChild(s); return s;
});
$("tokens").onmouseleave = () => show(-1);
function show(q) {
  spans.forEach((s, j) => {
    const a = q < 0 ? 0 : w(cur, q, j);
    s.style.background = a > 0 ? `rgba(214,39,40,${Math.min(1, a * 1.5)})` : "";
    s.className = j === q ? "q" : ""; s.title = q < 0 ? "" : `attention from token ${q}: ${a.toFixed(3)}`;
  });
  if (q >= 0) {
    let best = 0; for (let j = 0; j <= q; j++) if (w(cur, q, j) > w(cur, q, best)) best = j;
    $("readout").textContent = `query ${q} ${JSON.stringify(D.tokens[q])} attends most to ${best} ${JSON.stringify(D.tokens[best])} (${w(cur, q, best).toFixed(3)})`;
  }
}
function draw() {
  const c = $("heat"), ctx = c.getContext("2d"), img = ctx.createImageData(T, T);
  for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) {
    const a = w(cur, i, j), p = 4 * (i * T + j);
    img.data[p] = 255 - 220 * a; img.data[p + 1] = 255 - 180 * a; img.data[p + 2] = 255 - 90 * a; img.data[p + 3] = 255;
  }
  const off = document.createElement("canvas"); off.width = off.height = T;
  off.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false; ctx.clearRect(0, 0, c.width, c.height);
  ctx.drawImage(off, 0, 0, c.width, c.height);
}
$("heat").onmousemove = e => {
  const r = e.target.getBoundingClientRect();
  const i = Math.floor((e.clientY - r.top) / r.height * T), j = Math.floor((e.clientX - r.left) / r.width * T);
  if (i >= 0 && i < T && j >= 0 && j < T) {
    $("readout").textContent = `query ${i} ${JSON.stringify(D.tokens[i])} -> key ${j} ${JSON.stringify(D.tokens[j])}: ${w(cur, i, j).toFixed(3)}`;
    show(i);
  }
};
function select(k) {
  cur = k; const h = D.heads[k];
  $("layer").value = h.layer; $("head").value = h.head;
  [...grid.querySelectorAll("rect")].forEach((r, n) => r.classList.toggle("sel", n === k));
  [...body.rows].forEach((r, n) => r.classList.toggle("sel", n === k));
  draw(); show(-1);
}
select(0);
</script></body></html>
"""


def print_inspection(inspection: Inspection, layer: int | None, head: int | None) -> None:
    """inspect-heads' table of every head, then layer `layer`'s heatmaps (all of its
    heads, or only `head`), on stdout; wide enough for the table in a pipe or a log."""
    terminal = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    print_table(terminal, inspection)
    if layer is not None:
        for each in [head] if head is not None else range(inspection.n_head):
            print_heatmap(terminal, inspection, layer, each)
