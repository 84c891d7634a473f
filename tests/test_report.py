"""`rewardkit report`: the page shows what the run directory's files hold.

Run directories are built by hand (metrics.jsonl lines, recipe.toml, PNG grids,
summary.json): every expectation below is computed from those files, never
from the report code. The last test opens the page in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import tomli_w
from PIL import Image

from rewardkit.cli import main
from rewardkit.report import build_report, figures, legend_names, load_run, load_runs

PLOTTED = ("reward/", "eval/", "penalty/", "grad_norm/")


def plotted(key: str) -> bool:
    return key.startswith(PLOTTED) or key == "param_grad_norm"


def make_records(steps: int = 12, eval_every: int = 4, reward=lambda s: 0.1 * s, heldout=lambda s: 0.5 + 0.01 * s) -> list[dict]:
    """Lines as the optimizer logs them: reward/*, grad_norm/*, penalty/*, param_grad_norm, and keys the report does
    not draw (loss, lr, time/*); eval/* on some steps only; one step's param_grad_norm is NaN (a skipped step)."""
    records = []
    for s in range(1, steps + 1):
        r = {"step": s, "reward/total": reward(s), "reward/color": reward(s) / 2 + 0.003 * (s % 3), "grad_norm/color": 1.0 / s,
             "penalty/weight_l2": 0.01 * s * s, "loss": -reward(s), "param_grad_norm": math.nan if s == 5 else 2.0 + 0.1 * (s % 4),
             "lr": 0.05, "skipped": s == 5, "time/step": 0.01}
        if s == 1 or s % eval_every == 0:
            r["eval/heldout"] = heldout(s)
        records.append(r)
    return records


def minimal_records(steps: int = 6) -> list[dict]:
    """One curve only: for the tests about grids and tables (each plotted key costs a PNG)."""
    return [{"step": s, "reward/total": 0.1 * s} for s in range(1, steps + 1)]


def grid_png(size: int, seed: int) -> bytes:
    """A PNG whose pixels differ per seed (so a grid shown under another step's label would be caught)."""
    image = Image.new("RGB", (size, size))
    image.putdata([((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_run(path: Path, records: list[dict], lr: float = 0.05, grids: dict[int, int] | None = None, summary: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = {"run": {"dir": str(path), "steps": len(records), "seed": 0}, "generator": {"type": "pixels", "height": 16},
              "optimizer": {"name": "adam", "lr": lr}, "rewards": {"color": {"weight": 1.0}}}
    (path / "recipe.toml").write_text(tomli_w.dumps(recipe))
    for step, size in (grids if grids is not None else {0: 64, 6: 64, 12: 64}).items():
        (path / "samples").mkdir(exist_ok=True)
        (path / "samples" / f"step_{step:06d}.png").write_bytes(grid_png(size, step))
    if summary:
        last = records[-1]
        (path / "summary.json").write_text(json.dumps({"step": last["step"], "final_metrics": last, "checkpoint": None}))
    return path


def expected_curves(records: list[dict]) -> dict[str, tuple[list, list]]:
    """{key: (steps, values)} straight from the lines: NaN is a gap (null in plotly's JSON)."""
    out: dict[str, tuple[list, list]] = {}
    for r in records:
        for k, v in r.items():
            if plotted(k) and isinstance(v, (int, float)) and not isinstance(v, bool):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(r["step"])
                ys.append(None if math.isnan(v) else v)
    return out


def plots_in(page: str) -> dict[str, dict]:
    """{metric: {"data": traces, "layout": layout}} of every Plotly.newPlot call in the page."""
    decoder, out = json.JSONDecoder(), {}
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page):
        data, end = decoder.raw_decode(page, m.end())
        layout, _ = decoder.raw_decode(page, re.compile(r",\s*").match(page, end).end())
        out[layout["meta"]["metric"]] = {"data": data, "layout": layout}
    return out


def test_every_logged_curve_is_a_trace_of_exactly_the_logged_values(tmp_path, capsys):
    records = make_records()
    run = write_run(tmp_path / "quick", records)
    assert main(["report", str(run)]) == 0  # default --out: RUN_DIR/report.html
    out = run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    plots = plots_in(page)
    expected = expected_curves(records)
    assert set(plots) == set(expected) == {"reward/total", "reward/color", "eval/heldout", "grad_norm/color", "penalty/weight_l2", "param_grad_norm"}
    for key, (xs, ys) in expected.items():
        (trace,) = plots[key]["data"]
        assert trace["name"] == "quick"  # one run: its directory's name
        assert trace["x"] == xs and trace["y"] == ys, key
    assert plots["eval/heldout"]["data"][0]["x"] == [1, 4, 8, 12]
    assert None in plots["param_grad_norm"]["data"][0]["y"]
    assert "loss" not in plots and "lr" not in plots
    # the figures the module returns are the ones embedded
    built = figures(load_runs([run]))
    assert {k: [list(t.x) for t in f.data] for k, f in built.items()} == {k: [p["data"][0]["x"]] for k, p in plots.items()}
    # plotly.js inline once, nothing fetched from elsewhere
    assert page.count("<script") >= len(plots) and not re.search(r'<script[^>]+src=|<link[^>]+href="http', page)
    # a PNG copy of each curve beside the page
    pngs = sorted((run / "report_files").glob("*.png"))
    assert len(pngs) == len(expected)
    for png in pngs:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 600


def test_changing_a_logged_value_changes_the_plot(tmp_path):
    records = only(make_records(), "reward/total", "reward/color")
    run = write_run(tmp_path / "r", records)
    before = plots_in(build_report([run], progress=False).read_text())
    records[6]["reward/total"] = 123.25
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    after = plots_in(build_report([run], progress=False).read_text())
    assert before["reward/total"]["data"][0]["y"][6] == pytest.approx(0.7)
    assert after["reward/total"]["data"][0]["y"][6] == 123.25
    assert after["reward/color"] == before["reward/color"]


def test_runs_that_differ_in_the_learning_rate_are_named_by_it(tmp_path):
    a = write_run(tmp_path / "a", make_records(reward=lambda s: 0.1 * s), lr=0.001)
    b = write_run(tmp_path / "b", make_records(reward=lambda s: 0.2 * s), lr=0.0001)
    out = build_report([a, b], tmp_path / "out" / "both.html", progress=False)
    plots = plots_in(out.read_text())
    traces = {t["name"]: t for t in plots["reward/total"]["data"]}
    assert set(traces) == {"optimizer.lr=0.001", "optimizer.lr=0.0001"}  # run.dir differs too, and is left out
    assert traces["optimizer.lr=0.001"]["y"] == [0.1 * s for s in range(1, 13)]
    assert traces["optimizer.lr=0.0001"]["y"] == [0.2 * s for s in range(1, 13)]
    assert all(len(p["data"]) == 2 for p in plots.values())
    assert (tmp_path / "out" / "both_files" / "reward_total.png").is_file()
    # recipes that differ in nothing but run.dir: the directory names
    c = write_run(tmp_path / "c", make_records(), lr=0.001)
    assert legend_names([load_run(a), load_run(c)]) == ["a", "c"]
    # a table one run lacks whole is one key (an ablation: a regularizer added)
    recipe = (c / "recipe.toml").read_text() + '\n[regularizers.random_eta]\nlow = 0.0\nhigh = 1.0\n'
    (c / "recipe.toml").write_text(recipe)
    assert legend_names([load_run(a), load_run(c)]) == ["regularizers.random_eta=(unset)", "regularizers.random_eta={low=0.0, high=1.0}"]


def only(records: list[dict], *keys: str) -> list[dict]:
    """The records cut down to `keys` (fewer curves, fewer PNGs to draw: the tests stay quick)."""
    return [{k: r[k] for k in ("step", *keys) if k in r} for r in records]


def hacking_run(path: Path, heldout) -> Path:
    # the trained reward climbs with some step-to-step jitter; eval/heldout every 4 steps over 40 steps
    records = make_records(steps=40, reward=lambda s: 0.05 * s + 0.2 * ((s * 7) % 3 - 1), heldout=heldout)
    return write_run(path, only(records, "reward/total", "eval/heldout"))


def test_a_held_out_metric_falling_while_the_reward_rises_is_warned_about(tmp_path):
    hacked = hacking_run(tmp_path / "hacked", lambda s: 0.9 - 0.01 * s + 0.005 * (s % 2))
    healthy = hacking_run(tmp_path / "healthy", lambda s: 0.5 + 0.01 * s)
    # a held-out metric that wobbles and drifts down by less than its step-to-step noise: no warning
    noisy = hacking_run(tmp_path / "noisy", lambda s: 0.6 + (0.1 if (s // 4) % 2 else -0.1) - 0.0005 * s)
    page = build_report([hacked, healthy, noisy], tmp_path / "report.html", progress=False).read_text()
    warning = re.search(r'<div class="warning hacking-warning" role="alert">(.*?)</div>', page, re.S).group(1)
    assert "<li><b>eval/heldout</b> falls while reward/total rises: hacked</li>" in warning  # the hacked run alone
    subtitle = plots_in(page)["eval/heldout"]["layout"]["title"]["subtitle"]["text"]
    assert subtitle == "falls while reward/total rises: hacked"
    assert "mean of the first quarter and of the last quarter" in page  # the rule is on the page
    # the numbers on the page: start and end are the means of the first and last quarter of the 11 logged points
    values = [0.9 - 0.01 * s + 0.005 * (s % 2) for s in [1, *range(4, 41, 4)]]
    start, end = sum(values[:2]) / 2, sum(values[-2:]) / 2
    assert f"<td>eval/heldout</td><td>11</td><td>{start:.4g}</td><td>{end:.4g}</td>" in page.replace('<td class="num">', "<td>")
    assert page.count("WARNING: fell while the reward rose") == 1
    # a healthy run alone: no warning box, no subtitle
    page = build_report([healthy], progress=False).read_text()
    assert "hacking-warning" not in page and "subtitle" not in plots_in(page)["eval/heldout"]["layout"]["title"]


def test_sample_grids_are_embedded_in_step_order_and_enlarged(tmp_path):
    run = write_run(tmp_path / "r", minimal_records(), grids={12: 64, 0: 64, 6: 300})
    page = build_report([run], progress=False).read_text()
    imgs = re.findall(r'<img class="([^"]+)" src="data:image/png;base64,([^"]+)" alt="samples at step (\d+)" data-step="\d+" width="(\d+)"', page)
    assert [int(step) for _, _, step, _ in imgs] == [0, 6, 12]
    for cls, data, step, width in imgs:
        assert base64.b64decode(data) == (run / "samples" / f"step_{int(step):06d}.png").read_bytes()
    assert imgs[0][0] == "grid pixelated" and imgs[0][3] == "256"  # 64 px, 4x with nearest-neighbour
    assert imgs[1][0] == "grid" and imgs[1][3] == "300"  # big enough as it is
    # a damaged grid is left out with a note; the others still show
    (run / "samples" / "step_000018.png").write_bytes(b"not a png")
    page = build_report([run], progress=False).read_text()
    assert "step_000018.png: not a readable image" in page and len(re.findall(r'alt="samples at step', page)) == 3
    # a long run: 12 grids, evenly spaced, the first and the last among them
    many = write_run(tmp_path / "many", minimal_records(), grids={s: 16 for s in range(0, 1000, 10)})
    steps = [int(s) for s in re.findall(r'alt="samples at step (\d+)"', build_report([many], progress=False).read_text())]
    assert len(steps) == 12 and steps[0] == 0 and steps[-1] == 990 and steps == sorted(steps)


def test_the_end_of_run_tables_are_shown(tmp_path):
    records = minimal_records()
    run = write_run(tmp_path / "r", records)
    (run / "testbed_report.md").write_text("| generator | evaluator accuracy |\n|---|---|\n| teacher, 25 steps | 0.950 |\n| trained (r), 4 steps | 0.957 |\n")
    (run / "samples" / "eval_trained.png").write_bytes(grid_png(40, 99))
    page = build_report([run], progress=False).read_text()
    summary = page[page.index("Final metrics (summary.json)"):]
    assert f'<td>reward/total</td><td class="num">{records[-1]["reward/total"]:.6g}</td>' in summary
    assert "<th>generator</th><th>evaluator accuracy</th>" in page and "<td>trained (r), 4 steps</td><td>0.957</td>" in page
    assert base64.b64encode((run / "samples" / "eval_trained.png").read_bytes()).decode() in page


@pytest.mark.parametrize("case", ["missing", "file", "no_metrics", "empty_metrics", "two_runs_no_out", "out_is_a_folder", "out_under_a_file"])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, case):
    run = write_run(tmp_path / "run", minimal_records(3))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "nometrics").mkdir()
    (tmp_path / "nometrics" / "metrics.jsonl").write_text("")
    argv, says = {
        "missing": (["report", str(tmp_path / "nope")], "no such run directory"),
        "file": (["report", str(tmp_path / "afile")], "is a file, not a run directory"),
        "no_metrics": (["report", str(tmp_path / "empty")], "has no metrics.jsonl"),
        "empty_metrics": (["report", str(tmp_path / "nometrics")], "holds no complete record"),
        "two_runs_no_out": (["report", str(run), str(run.parent / "run2")], "--out FILE.html"),
        "out_is_a_folder": (["report", str(run), "--out", str(tmp_path / "empty")], "is a folder"),
        "out_under_a_file": (["report", str(run), "--out", str(tmp_path / "afile" / "r.html")], "is a file, not a folder"),
    }[case]
    if case == "two_runs_no_out":
        write_run(run.parent / "run2", minimal_records(3))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewardkit: error:") and says in err and "Traceback" not in err
    assert not (tmp_path / "empty" / "report.html").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or next((p for p in ("/usr/bin/chromium",) if Path(p).is_file()), None)


@pytest.mark.skipif(chromium() is None and not os.environ.get("REWARDKIT_REQUIRE_BROWSER"),
                    reason="no chromium executable (Debian: apt-get install -y chromium); CI installs it and requires this test")
def test_the_report_renders_in_a_real_browser(tmp_path):
    assert chromium() is not None, "REWARDKIT_REQUIRE_BROWSER is set but there is no chromium (apt-get install -y chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright (the Python package) is needed to drive chromium: pip install playwright (no browser download)")
    keys = ("reward/total", "eval/heldout", "param_grad_norm")  # param_grad_norm has a gap (a NaN)
    a = write_run(tmp_path / "a", only(make_records(steps=40, reward=lambda s: 0.05 * s, heldout=lambda s: 0.9 - 0.01 * s), *keys), lr=0.001)
    b = write_run(tmp_path / "b", only(make_records(steps=40), *keys), lr=0.01, grids={0: 40, 40: 74})
    out = build_report([a, b], tmp_path / "report.html", progress=False)
    expected = {"optimizer.lr=0.001": expected_curves(load_run(a).records), "optimizer.lr=0.01": expected_curves(load_run(b).records)}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium())
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length === 3 && "
                                   "[...document.querySelectorAll('.js-plotly-plot')].every(g => g._fullLayout)")
            plots = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(g => ({
                metric: g.layout.meta.metric,
                traces: g.data.map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)})),
                drawn: [...g.querySelectorAll('.scatterlayer .trace')].map(t => ({
                    line: [...t.querySelectorAll('path.js-line')].map(l => (l.getAttribute('d') || '').length).reduce((a, b) => a + b, 0),
                    points: t.querySelectorAll('path.point').length})),
                width: g.getBoundingClientRect().width}))""")
            images = page.evaluate("""() => [...document.querySelectorAll('img.grid')].map(i => ({
                complete: i.complete, natural: i.naturalWidth, width: i.getBoundingClientRect().width}))""")
            warning = page.locator(".hacking-warning").inner_text()
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # it needs nothing from a network
    assert sorted(p["metric"] for p in plots) == sorted(expected["optimizer.lr=0.01"])
    for plot in plots:
        assert {t["name"] for t in plot["traces"]} == set(expected)
        for t in plot["traces"]:
            xs, ys = expected[t["name"]][plot["metric"]]
            assert t["x"] == xs and t["y"] == ys
        assert len(plot["drawn"]) == 2 and all(d["line"] > 20 and d["points"] > 0 for d in plot["drawn"]), plot["metric"]
        assert plot["width"] >= 400
    assert len(images) == 5 and all(i["complete"] and i["natural"] > 0 and i["width"] >= 256 for i in images), images
    assert "eval/heldout" in warning and "optimizer.lr=0.001" in warning
