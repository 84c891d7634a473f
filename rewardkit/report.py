"""`rewardkit report`: one self-contained HTML page for one or more run directories.

Everything on the page is read from the run's own files - metrics.jsonl (the
curves), recipe.toml (which settings the runs differ in: the legend),
samples/step_*.png (the grids over training), summary.json and the markdown
tables the run directory holds (testbed-report's testbed_report.md, `rewardkit
eval --out RUN_DIR/...`'s results.md) - never from the code that trained it.
plotly.js is embedded inline and the images as data URIs, so the page opens
offline; matplotlib draws PNG copies of the same curves beside it
(FILE_files/*.png) for papers. docs/evaluation.md ("Run reports") describes
the page and the reward-hacking check.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rewardkit.durable import atomic_write, writable_file, write_text_atomic
from rewardkit.errors import UserError
from rewardkit.metrics import read_metrics
from rewardkit.rundir import recipe_table, sample_grids

log = logging.getLogger("rewardkit")

SECTIONS = (("Rewards", "reward/"), ("Held-out evaluation", "eval/"), ("Penalties", "penalty/"), ("Gradient norms", "grad_norm/"))
"""The curves drawn, by section: each a metrics.jsonl key prefix (param_grad_norm joins the gradient norms)."""
TOTAL, EVAL = "reward/total", "eval/"
MAX_GRIDS = 12
"""Sample grids shown per run, evenly spaced over training (first and last always): a page of every grid of a long
run would weigh hundreds of MB."""
MAX_GRID_PX = 1024
"""Wider grids are embedded down-scaled to this width (the file on disk is the full-size one)."""
MIN_DISPLAY_PX = 256
"""Small grids (the quick start's are 64 px) are shown enlarged by a whole factor to at least this many CSS px, with
nearest-neighbour scaling, so every pixel stays a crisp square."""
MAX_DISPLAY_PX = 640
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
"""One colour per run, the same in every plot and in the PNG copies."""
SKIPPED_DIRS = {"checkpoints", "tensorboard", "samples", "images"}
"""Folders of a run directory searched for no tables: weights, event files, pictures."""
LEGEND_KEYS, LEGEND_VALUE_CHARS = 3, 40
"""A legend shows at most this many differing keys, each value cut to this length (the page's table has them all)."""

HACKING_RULE = (
    "For each run that logs both reward/total and held-out metrics (eval/*, rewards: higher is better), take a robust "
    "start and end estimate of each series: the mean of the first quarter and of the last quarter of its logged points "
    "(at least one point each). The trained reward rose when its end estimate is above its start estimate. A held-out "
    "metric fell when its end estimate is below its start estimate by more than its own step-to-step noise: the median "
    "absolute difference between consecutive logged values. The page warns for every held-out metric that fell while "
    "the trained reward rose. A metric with fewer than 3 logged points is not judged (one difference cannot tell a "
    "trend from noise)."
)


@dataclass
class Run:
    """One run directory as the report reads it."""

    path: Path
    records: list[dict]
    recipe: dict = field(default_factory=dict)
    """recipe.toml as read ({} where the file is missing or does not parse)."""
    summary: dict | None = None
    grids: list[tuple[int, Path]] = field(default_factory=list)
    """samples/step_NNNNNN.png, by step."""
    other_images: list[Path] = field(default_factory=list)
    """The other PNGs of samples/ (testbed-report's grids of its table's rows: eval_*.png)."""
    name: str = ""
    """The legend's name of the run (legend_names)."""

    def series(self, key: str) -> tuple[list[int], list[float | None]]:
        """(steps, values) of every record that logged `key` as a number; a non-finite value is a gap (None)."""
        steps, values = [], []
        for record in self.records:
            value, step = record.get(key), record.get("step")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(step, int):
                steps.append(step)
                values.append(float(value) if math.isfinite(value) else None)
        return steps, values


def load_run(path: str | Path) -> Run:
    """Read a run directory; UserError when it is not one (no folder, no metrics.jsonl, no complete record)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a run directory (a folder with metrics.jsonl)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path} has no metrics.jsonl: not a run directory, or its run has not logged a step yet")
    try:
        records = read_metrics(metrics)
    except OSError as exc:
        raise UserError(f"{metrics} cannot be read ({exc.strerror or exc})") from None
    if not records:
        raise UserError(f"{metrics} holds no complete record yet: nothing to report")
    run = Run(path, records, recipe=recipe_table(path), summary=_read_json(path / "summary.json"))
    run.grids = sample_grids(path)
    run.other_images = sorted(p for p in (path / "samples").glob("*.png") if p not in {g for _, g in run.grids})
    return run


def load_runs(run_dirs) -> list[Run]:
    """The runs of `run_dirs`, each named for the legends (legend_names)."""
    runs = [load_run(p) for p in run_dirs]
    for run, name in zip(runs, legend_names(runs)):
        run.name = name
    return runs


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s does not parse (%s); its table is left out", path, exc)
        return None
    return data if isinstance(data, dict) else None


MISSING = object()
"""A recipe key one run does not have."""


def differences(runs: list[Run]) -> list[tuple[str, list]]:
    """(dotted recipe key, each run's value) for the keys whose values differ between the runs (a key one run lacks
    differs). A table some runs lack whole is one entry, not one per key inside it (`regularizers.random_eta`
    present or unset). run.dir is left out: it always differs, and the directory name already says it."""
    if len(runs) < 2:
        return []
    return [(k, v) for k, v in _differences([run.recipe for run in runs], "") if k != "run.dir"]


def _differences(tables: list, prefix: str) -> list[tuple[str, list]]:
    out = []
    for key in sorted({k for t in tables for k in t}):
        values = [t.get(key, MISSING) for t in tables]
        present = [v for v in values if v is not MISSING]
        if all(isinstance(v, dict) for v in present) and (
            len(present) == len(values) or len({tuple(v) for v in present}) == 1 and len(present[0]) == 1
        ):  # into tables all runs have, and into a lone table the others lack (`regularizers.random_eta`, not `regularizers`)
            out += _differences([{} if v is MISSING else v for v in values], f"{prefix}{key}.")
        elif len({_show(v) for v in values}) > 1:
            out.append((f"{prefix}{key}", values))
    return out


def _show(value) -> str:
    if value is MISSING:
        return "(unset)"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same number: 1e-05, 0.001
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, bool, int)):
        return json.dumps(value)
    return str(value)  # TOML dates and times


def legend_names(runs: list[Run]) -> list[str]:
    """Each run's name in the legends: the recipe keys in which the runs differ (`optimizer.lr=0.001, run.seed=1`; the
    first LEGEND_KEYS of them); the directory name for a single run, for runs whose recipes differ in nothing else, or
    where those names clash."""
    keys = differences(runs)
    names = []
    for i in range(len(runs)):
        parts = []
        for k, values in keys[:LEGEND_KEYS]:
            text = _show(values[i])
            parts.append(f"{k}={text if len(text) <= LEGEND_VALUE_CHARS else text[: LEGEND_VALUE_CHARS - 3] + '...'}")
        names.append(", ".join(parts) + (f" (+{len(keys) - LEGEND_KEYS} more keys)" if len(keys) > LEGEND_KEYS else ""))
    if not keys or len(set(names)) < len(names):
        names = [run.path.name or str(run.path) for run in runs]
        if len(set(names)) < len(names):
            names = [str(run.path) for run in runs]
    return names


def curve_keys(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(section title, keys) of the curves to draw, in the order the runs first logged them (reward/total first)."""
    seen: dict[str, None] = {}
    for run in runs:
        for record in run.records:
            seen.update(dict.fromkeys(record))
    out = []
    for title, prefix in SECTIONS:
        keys = [k for k in seen if k.startswith(prefix) and any(run.series(k)[0] for run in runs)]
        if prefix == "grad_norm/" and "param_grad_norm" in seen and any(run.series("param_grad_norm")[0] for run in runs):
            keys.append("param_grad_norm")
        if prefix == "reward/" and TOTAL in keys:
            keys.remove(TOTAL)
            keys.insert(0, TOTAL)
        if keys:
            out.append((title, keys))
    return out


# --- the reward-hacking check -----------------------------------------------------------
@dataclass(frozen=True)
class Trend:
    """A series' start and end estimates (means of its first and last quarter) and its step-to-step noise."""

    points: int
    start: float
    end: float
    noise: float

    @property
    def change(self) -> float:
        return self.end - self.start


def trend(values: list[float | None]) -> Trend | None:
    """The Trend of the finite values, in logged order; None with fewer than 3 (no noise estimate)."""
    v = [x for x in values if x is not None]
    if len(v) < 3:
        return None
    q = max(1, len(v) // 4)
    noise = statistics.median(abs(b - a) for a, b in zip(v, v[1:]))
    return Trend(len(v), statistics.fmean(v[:q]), statistics.fmean(v[-q:]), noise)


@dataclass(frozen=True)
class HackingCheck:
    metric: str
    reward: Trend
    heldout: Trend | None

    @property
    def warns(self) -> bool:
        """HACKING_RULE: the trained reward rose and the held-out metric fell by more than its own noise."""
        return self.heldout is not None and self.reward.change > 0 and -self.heldout.change > self.heldout.noise


def hacking_checks(run: Run) -> list[HackingCheck]:
    """One check per eval/* metric of the run ([] without reward/total or without eval/* metrics)."""
    reward = trend(run.series(TOTAL)[1])
    if reward is None:
        return []
    keys = dict.fromkeys(k for record in run.records for k in record if k.startswith(EVAL))
    return [HackingCheck(k, reward, trend(run.series(k)[1])) for k in keys if run.series(k)[0]]


# --- the figures ------------------------------------------------------------------------
def figures(runs: list[Run], warned: dict[str, list[str]] | None = None) -> dict[str, object]:
    """{metric key: plotly Figure}: one trace per run that logged the key, with exactly its logged (step, value)
    pairs; the key is the title and layout.meta.metric. `warned`: _warned(runs), when the caller has it."""
    import plotly.graph_objects as go

    warned = _warned(runs) if warned is None else warned
    out = {}
    for _, keys in curve_keys(runs):
        for key in keys:
            fig = go.Figure()
            for i, run in enumerate(runs):
                steps, values = run.series(key)
                if steps:
                    fig.add_trace(go.Scatter(
                        x=steps, y=values, name=run.name, mode="lines+markers" if len(steps) <= 60 else "lines",
                        line={"color": COLORS[i % len(COLORS)]}, marker={"size": 5}, connectgaps=False,
                    ))
            title = {"text": key}
            if key in warned:
                title["subtitle"] = {"text": f"falls while {TOTAL} rises: {', '.join(warned[key])}", "font": {"color": "#b00020"}}
            fig.update_layout(  # styled here, not by a named template: each figure would carry (and copy) its 6 KB
                title=title, meta={"metric": key}, template="none", height=340, showlegend=True, font={"family": "system-ui, sans-serif"},
                paper_bgcolor="white", plot_bgcolor="white", hovermode="x unified",
                margin={"l": 60, "r": 20, "t": 70 if key in warned else 50, "b": 60},
                xaxis={"title": {"text": "step"}, "gridcolor": "#e8e8e8", "zeroline": False, "showline": True, "linecolor": "#999"},
                yaxis={"gridcolor": "#e8e8e8", "zerolinecolor": "#bbb", "showline": True, "linecolor": "#999"},
                legend={"orientation": "h", "yanchor": "top", "y": -0.25},
            )
            out[key] = fig
    return out


def _warned(runs: list[Run]) -> dict[str, list[str]]:
    """{eval key: names of the runs whose check warns on it}."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for check in hacking_checks(run):
            if check.warns:
                out.setdefault(check.metric, []).append(run.name)
    return out


def _png(runs: list[Run], key: str, warned: list[str] | None, path: Path) -> None:
    """The same curve as figures()[key], drawn by matplotlib (Agg) for papers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # a Figure on an Agg canvas, not pyplot: no global backend switched under a caller's notebook, nothing to close
    fig = Figure(figsize=(6.4, 3.6), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        steps, values = run.series(key)
        if steps:
            y = [math.nan if v is None else v for v in values]  # a gap, as in the page
            ax.plot(steps, y, color=COLORS[i % len(COLORS)], label=run.name, marker="o" if len(steps) <= 60 else None, markersize=3, linewidth=1.4)
    ax.set_title(key + (f"\nfalls while {TOTAL} rises" if warned else ""), color="#b00020" if warned else "black", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.subplots_adjust(left=0.11, right=0.97, top=0.86, bottom=0.14)  # fixed margins: tight_layout costs a draw per plot
    with atomic_write(path, f"report plot {path}") as tmp:
        fig.savefig(tmp, format="png")


def _slug(key: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "metric"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}_{n}", n + 1
    taken.add(slug)
    return slug


# --- images and tables ------------------------------------------------------------------
def pick_grids(grids: list, k: int = MAX_GRIDS) -> list:
    """At most k grids, evenly spaced, the first and the last always among them."""
    if len(grids) <= k:
        return list(grids)
    return [grids[i] for i in sorted({round(j * (len(grids) - 1) / (k - 1)) for j in range(k)})]


def embed_image(path: Path) -> tuple[str, int, int, int] | None:
    """(data URI, embedded width, height, display width in CSS px) of a PNG; None (warned) for a file that does not
    decode: one damaged grid should not cost the whole page."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width > MAX_GRID_PX:
                height = max(1, round(height * MAX_GRID_PX / width))
                width = MAX_GRID_PX
                buffer = io.BytesIO()
                image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS).save(buffer, format="PNG")
                data = buffer.getvalue()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        log.warning("%s is not a readable image (%s); the report leaves it out", path, exc)
        return None
    scale = max(1, math.ceil(MIN_DISPLAY_PX / width))
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), width, height, min(width * scale, MAX_DISPLAY_PX)


def markdown_tables(run: Run) -> list[tuple[Path, list[list[list[str]] | str]]]:
    """(file, blocks) of every markdown file in the run directory holding a pipe table; a block is a table (rows of
    cells, the first the header) or a line of text between tables (a table's title)."""
    out = []
    for path in sorted(run.path.rglob("*.md")):
        rel = path.relative_to(run.path)
        if any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts[:-1]) or len(rel.parts) > 4:
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        blocks: list = []
        for line in lines:
            line = line.strip()
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
                    continue  # the header's rule
                if not blocks or not isinstance(blocks[-1], list):
                    blocks.append([])
                blocks[-1].append(cells)
            elif line:
                blocks.append(line.lstrip("#").strip())
        if any(isinstance(b, list) for b in blocks):
            out.append((rel, blocks))
    return out


# --- the page ---------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1em 2em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
.meta { color: #666; font-size: 0.9em; }
.warning { background: #fdecea; border: 2px solid #b00020; color: #600; padding: 0.8em 1.2em; border-radius: 6px; margin: 1em 0; }
.warning h2 { border: none; margin: 0 0 0.4em 0; color: #b00020; }
.ok { background: #edf7ed; border: 1px solid #4caf50; padding: 0.6em 1.2em; border-radius: 6px; margin: 1em 0; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
.plot { border: 1px solid #eee; border-radius: 4px; padding: 4px; }
.plot .png { font-size: 0.8em; color: #666; margin: 0 0.5em; }
.strip { display: flex; flex-wrap: wrap; gap: 1em; padding-bottom: 0.5em; align-items: flex-start; }
figure { margin: 0; } figcaption { text-align: center; font-size: 0.85em; color: #444; }
img.grid { border: 1px solid #ccc; height: auto; display: block; }
img.pixelated { image-rendering: pixelated; image-rendering: crisp-edges; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.rule { background: #f8f8f8; border-left: 4px solid #999; padding: 0.5em 1em; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f'<td class="num">{html.escape(f"{value:.6g}")}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def build_report(run_dirs: list[str | Path], out: str | Path | None = None, progress: bool = True) -> Path:
    """Write the report of `run_dirs` to `out` (default RUN_DIR/report.html for one run) and its PNG curves to
    OUT's stem + "_files/"; returns the HTML file's path. UserError for bad input."""
    from rewardkit.images import progress_bar

    if not run_dirs:
        raise UserError("rewardkit report needs at least one RUN_DIR")
    if len({Path(p).resolve() for p in run_dirs}) < len(run_dirs):
        raise UserError("a RUN_DIR is given twice; name each run once")
    if out is None:
        if len(run_dirs) > 1:
            raise UserError(f"{len(run_dirs)} runs: say where their report goes with --out FILE.html")
        out = Path(run_dirs[0]) / "report.html"
    out = Path(out)
    runs = load_runs(run_dirs)  # bad input is reported before anything is written
    writable_file(out, "--out")
    files = out.with_name(out.stem + "_files")
    if files.exists() and not files.is_dir():
        raise UserError(f"{files} is a file; the report writes its PNG curves into a folder of that name (move the file, or choose another --out)")
    warned = _warned(runs)
    figs = figures(runs, warned)
    shown = [pick_grids(run.grids) for run in runs]
    bar = progress_bar(2 * len(figs) + sum(map(len, shown)) + 1, "report", "part", enabled=progress)
    try:
        parts = [_header(runs, warned)]
        plots, taken, first = [], set(), True
        for title, keys in curve_keys(runs):
            plots.append(f"<h3>{html.escape(title)}</h3><div class=\"plots\">")
            for key in keys:
                slug = _slug(key, taken)
                _png(runs, key, warned.get(key), files / f"{slug}.png")
                bar.update(1)
                div = figs[key].to_html(full_html=False, include_plotlyjs=first, div_id=f"plot-{slug}",
                                        config={"displaylogo": False, "responsive": True})
                first = False  # plotly.js inline once, before the first plot
                plots.append(f'<div class="plot" data-metric="{html.escape(key)}">{div}'
                             f'<a class="png" href="{html.escape(files.name)}/{slug}.png">PNG</a></div>')
                bar.update(1)
            plots.append("</div>")
        parts.append('<section id="curves"><h2>Curves</h2>' + ("".join(plots) or "<p>No rewards, penalties or gradient norms logged.</p>") + "</section>")
        parts.append(_hacking_section(runs))
        parts.append(_samples_section(runs, shown, bar))
        parts.append(_tables_section(runs))
        names = ", ".join(run.name for run in runs)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>rewardkit report: {html.escape(names)}</title><style>{CSS}</style></head><body>"
                + "\n".join(parts) + "</body></html>\n")
        write_text_atomic(out, page, f"report {out}")
        bar.update(1)
    finally:
        bar.close()
    return out


def _header(runs: list[Run], warned: dict[str, list[str]]) -> str:
    from rewardkit import __version__

    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = ["<h1>rewardkit report</h1>", f'<p class="meta">{len(runs)} run(s); written {when} by rewardkit {__version__}</p>']
    if warned:
        items = "".join(f"<li><b>{html.escape(k)}</b> falls while {TOTAL} rises: {html.escape(', '.join(names))}</li>" for k, names in warned.items())
        parts.append(f'<div class="warning hacking-warning" role="alert"><h2>&#9888; Possible reward hacking</h2><ul>{items}</ul>'
                     '<p>A held-out metric fell by more than its own step-to-step noise while the trained reward rose '
                     '(<a href="#hacking">the rule and the numbers</a>).</p></div>')
    rows = []
    for run in runs:
        steps = [r["step"] for r in run.records if isinstance(r.get("step"), int)]
        rows.append([run.name, str(run.path), len(run.records), max(steps) if steps else None, len(run.grids)])
    parts.append('<section id="runs"><h2>Runs</h2>' + _table(["legend", "run directory", "records", "last step", "sample grids"], rows))
    keys = differences(runs)
    if keys:
        parts.append("<h3>Recipe keys in which the runs differ</h3>"
                     + _table(["key", *[run.name for run in runs]], [[k, *map(_show, values)] for k, values in keys]))
    parts.append("</section>")
    return "\n".join(parts)


def _hacking_section(runs: list[Run]) -> str:
    parts = ['<section id="hacking"><h2>Reward-hacking check</h2>', f'<p class="rule">{html.escape(HACKING_RULE)}</p>']
    for run in runs:
        checks = hacking_checks(run)
        label = f"<h3>{html.escape(run.name)}</h3>"
        if not checks:
            why = "logs no held-out metrics (eval/*): add an [eval] section to the recipe (docs/evaluation.md)" if trend(run.series(TOTAL)[1]) \
                else f"has fewer than 3 logged values of {TOTAL}"
            parts.append(f"{label}<p>Not checked: the run {why}.</p>")
            continue
        r = checks[0].reward
        rows = [[TOTAL, r.points, _fmt(r.start), _fmt(r.end), _fmt(r.change), _fmt(r.noise), "rose" if r.change > 0 else "did not rise"]]
        for c in checks:
            h = c.heldout
            verdict = "not judged: fewer than 3 points" if h is None else ("WARNING: fell while the reward rose" if c.warns else
                      ("fell by more than its noise" if -h.change > h.noise else "no fall beyond its noise"))
            rows.append([c.metric, *(["", "", "", "", ""] if h is None else [h.points, _fmt(h.start), _fmt(h.end), _fmt(h.change), _fmt(h.noise)]), verdict])
        parts.append(label + _table(["series", "points", "start (first quarter)", "end (last quarter)", "change", "step-to-step noise", "verdict"], rows, "hacking"))
    parts.append("</section>")
    return "\n".join(parts)


def _image_figure(path: Path, alt: str, caption: str, attributes: str = "") -> str | None:
    """A <figure> with the image embedded at its display width (pixelated where enlarged); None for an unreadable one."""
    if (embedded := embed_image(path)) is None:
        return None
    uri, width, _, display = embedded
    cls = "grid pixelated" if display > width else "grid"
    return (f'<figure><img class="{cls}" src="{uri}" alt="{html.escape(alt)}"{attributes} width="{display}" '
            f'style="width:{display}px"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _samples_section(runs: list[Run], shown: list[list[tuple[int, Path]]], bar) -> str:
    parts = ['<section id="samples"><h2>Sample grids over training</h2>',
             "<p>The grids of samples/, drawn on the same prompts and noise at each step; small grids are enlarged "
             "by a whole factor with nearest-neighbour scaling.</p>"]
    for run, grids in zip(runs, shown):
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        if not grids:
            parts.append("<p>No sample grids (samples/step_*.png) in this run directory.</p>")
            continue
        if len(grids) < len(run.grids):
            parts.append(f"<p>{len(grids)} of {len(run.grids)} grids, evenly spaced.</p>")
        figures_ = []
        for step, path in grids:
            bar.update(1)
            figure = _image_figure(path, f"samples at step {step}", f"step {step}", f' data-step="{step}"')
            figures_.append(figure or f"<figure><p>{html.escape(path.name)}: not a readable image</p></figure>")
        parts.append('<div class="strip">' + "".join(figures_) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _tables_section(runs: list[Run]) -> str:
    parts = ['<section id="tables"><h2>End-of-run tables</h2>']
    with_summary = [run for run in runs if run.summary]
    if with_summary:
        finals = [run.summary.get("final_metrics") if isinstance(run.summary.get("final_metrics"), dict) else {} for run in with_summary]
        keys = [k for k in dict.fromkeys(k for f in finals for k in f) if k != "step"]  # summary's own step row says it
        rows = [["step", *[run.summary.get("step") for run in with_summary]]]
        rows += [[k, *[f.get(k) for f in finals]] for k in keys]
        rows.append(["checkpoint", *[run.summary.get("checkpoint") for run in with_summary]])
        parts.append("<h3>Final metrics (summary.json)</h3>" + _table(["", *[run.name for run in with_summary]], rows, "summary"))
    else:
        parts.append("<p>No summary.json: the runs have not finished.</p>")
    for run in runs:
        if run.other_images:
            shown = [f for f in (_image_figure(path, path.name, path.name) for path in run.other_images) if f is not None]
            parts.append(f"<h3>{html.escape(run.name)}: other images in samples/</h3><div class=\"strip\">{''.join(shown)}</div>")
        for rel, blocks in markdown_tables(run):
            parts.append(f"<h3>{html.escape(run.name)}: {html.escape(str(rel))}</h3>")
            for block in blocks:
                if isinstance(block, str):
                    parts.append(f"<p>{html.escape(block)}</p>")
                else:
                    width = max(map(len, block))
                    rows = [row + [""] * (width - len(row)) for row in block]
                    parts.append(_table(rows[0], rows[1:], "markdown"))
    parts.append("</section>")
    return "\n".join(parts)
