"""Show a `Lens`, an `Attribution` or a `Patching`: terminal, PNG, HTML, JSON.

Each result is one grid of numbers (streams x positions, layers x heads, layers x
positions) plus a few lines that say what it means, so one `Grid` carries it to
every output. The pieces are inspect-heads' (`minigpt.render`): the shading, the
atomic writes, strict JSON, and a self-contained HTML file that needs no network.
"""

from __future__ import annotations

import html
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from minigpt import console, render
from minigpt.lens import Attribution, Lens
from minigpt.patching import Patching
from minigpt.render import (
    HEATMAP_MAX_TOKENS,
    PNG_LABEL_MAX_TOKENS,
    shade,
    strict_json,
    write_output,
)

NUMBER_COLUMNS = 16
"""Grids this wide or narrower print their numbers; wider ones print shading."""
RANKED = 10
"""How many components the terminal lists, largest first."""


@dataclass
class Grid:
    """Values (rows x columns) with their labels and how to read them."""

    title: str
    rows: list[str]
    columns: list[str]
    values: list[list[float]]
    caption: str
    diverging: bool = False
    """Values around 0 (red up, blue down) rather than a share from 0 to 1."""
    tips: list[list[str]] | None = None
    """A sentence per cell for the HTML page's tooltips."""
    lines: list[str] = field(default_factory=list)
    """What to print before the grid: the figures the grid is made of."""
    ranked: list[tuple[str, float]] = field(default_factory=list)
    """(name, value) listed under the grid, largest first."""

    @property
    def scale(self) -> float:
        """The value that gets the strongest colour."""
        if not self.diverging:
            return 1.0
        finite = [abs(v) for row in self.values for v in row if math.isfinite(v)]
        return max(finite, default=1.0) or 1.0


# ---------------------------------------------------------------------------- grids


def lens_grid(lens: Lens, position: int) -> Grid:
    """Streams x positions: the probability of the token that follows each position."""
    T = len(lens.tokens)
    tips = [
        [
            f"after {stream}, at {t} '{lens.tokens[t]}': next '{lens.tokens[t + 1]}' "
            f"p={lens.next_probs[s, t]:.3f}, rank {int(lens.next_ranks[s, t])}; top: "
            + ", ".join(
                f"'{tok}' {p:.2f}"
                for tok, p in zip(lens.top_tokens[s][t], lens.top_probs[s, t].tolist(), strict=True)
            )
            for t in range(T - 1)
        ]
        for s, stream in enumerate(lens.streams)
    ]
    return Grid(
        title=f"logit lens: {lens.source}",
        rows=lens.streams,
        columns=lens.tokens[: T - 1],
        values=lens.next_probs.tolist(),
        caption="each cell: the probability a stream (rows: embed = after the embeddings, "
        "Ln = after block n) gives the token that follows the position (columns: the token there)",
        tips=tips,
        lines=_lens_lines(lens, position),
    )


def _lens_lines(lens: Lens, position: int) -> list[str]:
    """At one position, per stream: the true next token's probability and rank (lined
    up, to read down the layers), then the top-K predictions."""
    T, K = len(lens.tokens), lens.top_ids.size(-1)
    here = f"at position {position} '{lens.tokens[position]}'"
    if position < T - 1:
        ranks = [int(rank) for rank in lens.next_ranks[:, position]]
        width = len(str(max(ranks)))
        lines = [f"{here}, each stream's p and rank of the next token "
                 f"'{lens.tokens[position + 1]}', then its top {K}:"]  # fmt: skip
    else:
        lines = [f"{here} (the last), each stream's top {K}:"]
    for s, stream in enumerate(lens.streams):
        top = ", ".join(
            f"'{tok}' {p:.2f}"
            for tok, p in zip(
                lens.top_tokens[s][position], lens.top_probs[s, position].tolist(), strict=True
            )
        )
        truth = ""
        if position < T - 1:
            truth = f"p={lens.next_probs[s, position]:.3f} rank {ranks[s]:<{width}}   "
        lines.append(f"  {stream:>6}  {truth}{top}")
    return lines


def attribution_grid(result: Attribution) -> Grid:
    """Layers x (heads, MLP): each component's direct contribution."""
    what = f"logit('{result.answer}')" + (
        f" - logit('{result.versus}')" if result.versus is not None else ""
    )
    L, H = result.heads.shape
    return Grid(
        title=f"direct logit attribution to {what}: {result.source}",
        rows=[f"L{layer}" for layer in range(L)],
        columns=[f"H{h}" for h in range(H)] + ["MLP"],
        values=[
            row + [mlp]
            for row, mlp in zip(result.heads.tolist(), result.mlps.tolist(), strict=True)
        ],
        caption=f"each head's and MLP's direct contribution to {what} at the last "
        "position, through the final norm with its scale frozen",
        diverging=True,
        lines=[
            f"{what} at the last position '{result.tokens[-1]}' = {result.logit_diff:.4f}, "
            "from the model's logits",
            f"sum of the terms = {result.total:.4f}: embed {result.embed:+.4f}, "
            f"biases {result.biases:+.4f}, heads {float(result.heads.sum()):+.4f}, "
            f"MLPs {float(result.mlps.sum()):+.4f}",
        ],
        ranked=result.components,
    )


def patching_grid(result: Patching) -> Grid:
    """Layers x (heads, MLP) or layers x positions: the share of LD each patch restores."""
    by_head = result.by == "head"
    values = result.restored.tolist()
    names = (
        [
            f"{row}{col}" if col != "MLP" else f"{row} MLP"
            for row in result.rows
            for col in result.columns
        ]
        if by_head
        else [
            f"{row} @{t} '{result.clean_tokens[t]}'"
            for row in result.rows
            for t in range(len(result.columns))
        ]
    )
    flat = [v for row in values for v in row]
    what = f"logit('{result.answer}') - logit('{result.versus}')"
    return Grid(
        title=f"activation patching by {result.by}: {result.source}",
        rows=result.rows,
        columns=result.columns if by_head else result.clean_tokens,
        values=values,
        caption=(
            "each head's context and each MLP's output, at every position"
            if by_head
            else "the residual stream (rows: embed = after the embeddings, Ln = after block n) "
            "at one position (columns: the clean prompt's tokens)"
        )
        + f", taken from the clean run into the corrupted one: the share of {what} restored",
        diverging=True,
        lines=[
            f"{what}: clean {result.clean_diff:.4f}, corrupted {result.corrupt_diff:.4f}",
            _differences(result.clean_tokens, result.corrupt_tokens),
            "restored = (patched - corrupted) / (clean - corrupted): 0 nothing, 1 all of it",
        ]
        + (
            [
                f"{', '.join(result.together)} patched together restore {result.together_restored:.3f}"
            ]
            if result.together
            else []
        ),
        ranked=sorted(zip(names, flat, strict=True), key=lambda item: -item[1]),
    )


def _differences(clean: list[str], corrupt: list[str], shown: int = 4) -> str:
    """Where the corrupted prompt differs from the clean one, token by token."""
    changed = [t for t, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b]
    listed = ", ".join(f"{t} '{clean[t]}' -> '{corrupt[t]}'" for t in changed[:shown])
    more = f", and {len(changed) - shown} more" if len(changed) > shown else ""
    if not changed:
        return "the prompts have the same tokens"
    return f"the prompts differ at {len(changed)} position(s): {listed}{more}"


# ---------------------------------------------------------------------------- terminal


def print_grid(grid: Grid, terminal: Console | None = None) -> None:
    """The grid's lines, the grid (numbers when narrow, shading when wide), the ranking."""
    terminal = terminal or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    terminal.print(f"[bold]{grid.title}[/bold]")
    for line in grid.lines:
        terminal.print(Text(line))
    table = _number_table(grid) if len(grid.columns) <= NUMBER_COLUMNS else None
    wide = terminal.options.update_width(10**4)  # the table's own width, not the terminal's
    if table is not None and terminal.measure(table, options=wide).maximum <= terminal.width:
        terminal.print(table)
        terminal.print(Text(grid.caption, style="dim"))
    else:  # too many columns for numbers, or a terminal too narrow to show them whole
        _print_shading(terminal, grid)
    if grid.ranked:
        terminal.print(f"largest {min(RANKED, len(grid.ranked))}:")
        for name, value in grid.ranked[:RANKED]:
            terminal.print(Text(f"  {name:<24} {value:+.4f}"))


def _number_table(grid: Grid) -> Table:
    table = Table()
    table.add_column("", no_wrap=True)
    for column in grid.columns:
        table.add_column(column, justify="right", no_wrap=True)
    scale = grid.scale
    for row, values in zip(grid.rows, grid.values, strict=True):
        cells = [
            Text(
                f"{v:+.3f}" if grid.diverging else f"{v:.3f}",
                style=_style(v, scale, grid.diverging),
            )
            for v in values
        ]
        table.add_row(row, *cells)
    return table


def _style(value: float, scale: float, diverging: bool) -> str:
    if not math.isfinite(value):
        return "dim"
    if not diverging:
        return shade(value)[1]
    strength = min(1.0, abs(value) / scale)
    return (
        "bold red"
        if value > 0 and strength > 0.5
        else "red"
        if value > 0 and strength > 0.1
        else (
            "bold blue"
            if value < 0 and strength > 0.5
            else "blue"
            if value < 0 and strength > 0.1
            else ""
        )
    )


def _print_shading(console: Console, grid: Grid, max_columns: int = HEATMAP_MAX_TOKENS) -> None:
    shown = min(len(grid.columns), max_columns)
    if shown < len(grid.columns):
        console.print(
            f"[yellow]note:[/yellow] showing the first {shown} of {len(grid.columns)} columns"
        )
    width = max(len(row) for row in grid.rows)
    header = "".join(c[:1] if len(c) == 1 else "·" for c in grid.columns[:shown])
    console.print(Text(" " * (width + 1) + header, style="dim"))
    scale = grid.scale
    for row, values in zip(grid.rows, grid.values, strict=True):
        line = Text(f"{row:>{width}} ", style="dim")
        for v in values[:shown]:
            if grid.diverging and math.isfinite(v):
                line.append(*shade(abs(v) / scale)[:1], style="red" if v > 0 else "blue")
            else:
                line.append(*shade(v))
        console.print(line)
    legend = "█ the largest |value|, red up, blue down" if grid.diverging else "blank 0 to █ 1"
    console.print(
        Text(f"{grid.caption}; shading: {legend} (--html or --json: every number)", style="dim")
    )


# ---------------------------------------------------------------------------- files


def outputs(html: str | None, png: str | None, json_file: str | None) -> list:
    """(save, path) for each of --html, --png and --json given, checked (`render.outputs`)."""
    return render.outputs(html, png, json_file, (save_html, save_png, save_json))


def show(result: Lens | Attribution | Patching, grid: Grid, outputs: list) -> None:
    """Print the grid, then write the files asked for: the JSON holds everything
    computed (`result`), the PNG and HTML show the grid."""
    print_grid(grid)
    for save, path in outputs:
        save(path, result if save is save_json else grid)
        console.note(f"wrote {path}")


def save_json(path: str | Path, result: Lens | Attribution | Patching) -> None:
    """Everything computed, as strict JSON."""
    write_output(path, strict_json(result.to_dict(), ensure_ascii=False) + "\n")


def save_png(path: str | Path, grid: Grid) -> None:
    """The grid as a coloured image, labelled, with numbers in the cells when they fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(grid.rows), len(grid.columns)
    width = min(2 + 0.45 * n_cols, 30)  # inches
    fig = Figure(figsize=(width, 1.5 + 0.45 * n_rows), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    scale = grid.scale
    image = ax.imshow(
        grid.values, aspect="auto", interpolation="nearest",
        cmap="RdBu_r" if grid.diverging else "viridis",
        vmin=-scale if grid.diverging else 0.0, vmax=scale,
    )  # fmt: skip
    fig.colorbar(image, ax=ax, shrink=0.8)
    plain = {"parse_math": False}  # tokens are text: '$' must not start matplotlib's math
    ax.set_yticks(range(n_rows), grid.rows, fontsize=8, **plain)
    if n_cols <= PNG_LABEL_MAX_TOKENS * 3:
        rotation = 90 if n_cols > NUMBER_COLUMNS else 0
        ax.set_xticks(range(n_cols), grid.columns, fontsize=7, rotation=rotation, **plain)
    if n_cols <= NUMBER_COLUMNS:
        for i, row in enumerate(grid.values):
            for j, v in enumerate(row):
                # dark cells: RdBu's two ends, viridis' low end
                dark = abs(v) / scale > 0.6 if grid.diverging else v < 0.5
                colour = "white" if math.isfinite(v) and dark else "black"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(grid.title, fontsize=9, **plain)
    # wrapped here: matplotlib's wrap=True measures the text as math, parse_math or not
    ax.set_xlabel(textwrap.fill(grid.caption, int(16 * width)), fontsize=7, **plain)
    write_output(path, figure=fig)


def html_document(grid: Grid) -> str:
    """The grid as a self-contained page: a coloured table whose cells say their value
    (and, for the lens, the top predictions) on hover; no script, no network."""
    scale = grid.scale
    head = "".join(f"<th>{html.escape(c)}</th>" for c in grid.columns)
    body = []
    for i, (row, values) in enumerate(zip(grid.rows, grid.values, strict=True)):
        cells = []
        for j, v in enumerate(values):
            tip = grid.tips[i][j] if grid.tips else f"{row} {grid.columns[j]}: {v:.4f}"
            text = f"{v:.2f}" if len(grid.columns) <= NUMBER_COLUMNS * 2 else ""
            style = f"background:{_colour(v, scale, grid.diverging)}"
            strength = abs(v) / scale if grid.diverging else v
            style += ";color:#fff" if math.isfinite(v) and strength > 0.6 else ""  # on dark cells
            cells.append(f'<td style="{style}" title="{html.escape(tip)}">{text}</td>')
        body.append(f"<tr><th>{html.escape(row)}</th>{''.join(cells)}</tr>")
    ranked = "".join(f"<li>{html.escape(n)}: {v:+.4f}</li>" for n, v in grid.ranked[:RANKED])
    return _PAGE.format(
        title=html.escape(grid.title),
        lines="".join(f"<p>{html.escape(line)}</p>" for line in grid.lines),
        head=head,
        body="".join(body),
        caption=html.escape(grid.caption),
        ranked=f"<h2>largest {min(RANKED, len(grid.ranked))}</h2><ol>{ranked}</ol>"
        if ranked
        else "",
    )


def save_html(path: str | Path, grid: Grid) -> None:
    write_output(path, html_document(grid))


def _colour(value: float, scale: float, diverging: bool) -> str:
    if not math.isfinite(value):
        return "#eee"
    if not diverging:
        a = min(1.0, max(0.0, value))
        return f"rgb({int(255 - 220 * a)},{int(255 - 180 * a)},{int(255 - 90 * a)})"
    a = min(1.0, abs(value) / scale)
    fade = int(255 - 200 * a)
    return f"rgb(255,{fade},{fade})" if value > 0 else f"rgb({fade},{fade},255)"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}}
h1{{font-size:18px}} h2{{font-size:15px}} p{{margin:2px 0;font-family:ui-monospace,monospace;white-space:pre-wrap}}
table{{border-collapse:collapse;font-size:11px;margin:10px 0}}
td,th{{padding:3px 5px;text-align:right;border:1px solid #fff;white-space:pre}}
td{{min-width:14px;cursor:default}} caption{{caption-side:bottom;text-align:left;color:#555}}
</style></head><body>
<h1>{title}</h1>
{lines}
<table><caption>{caption}</caption><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>
{ranked}
</body></html>
"""
