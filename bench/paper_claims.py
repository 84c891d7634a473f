"""The paper's claims, measured on the embedded digits testbed.

    python bench/paper_claims.py                     # all claims, 3 seeds, 2 processes; writes docs/results.md
    python bench/paper_claims.py --seeds 0 1 2 --steps 100 --per-digit 15 --jobs 2 --out docs/results.md

Every training run is the quickstart recipe (recipes/quickstart.toml) with
the changes a claim needs, run through the public API (`Optimizer.from_recipe`
on a recipe dict) for `--steps` steps, then judged by the independent
evaluator (rewardkit.testbed.evaluate): accuracy, Frechet distance to
held-out real digits, diversity, milliseconds per image. Each number is the
mean over seeds, with the sample standard deviation after +-. Runs are
independent and spread over `--jobs` processes of one thread each.

(a) R0 at 4 steps vs the teacher at 25 steps with CFG: quality and speed.
(b) Each regularizer (weight L2, random eta, gradient normalization) removed
    on its own at the same learning rate, with the classifier reward capped
    (as shipped) and uncapped: does the trained reward rise while the
    evaluator's metrics fall?
(c) Normalized vs raw gradients, with two rewards.
(d) One, two and three rewards: as shipped, and in the paper's Fig. 10
    setting (no random eta, small weight L2).
(e) R0 vs R0+ in both readings (every step supervised, the gradient through
    the chain; one random step): evaluator metrics per iteration.
(f) Baselines at R0's training wall time, from the same plugins: DRaFT-K
    (reward backprop through the last step of a 25-step CFG sampler) and
    ReNO (generator.training = "noise": the evaluation images' own noise
    optimized through the frozen 4-step teacher, with noise_norm).
(g) The base model's classifier-free guidance as an implicit reward, added to
    R0 and R0+.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"


# ------------------------------------------------------------------------------ runs
def base_recipe(seed: int, steps: int, batch: int, run_dir: Path, eval_every: int) -> dict:
    r = tomllib.loads(QUICKSTART.read_text())
    r["run"].update(
        dir=str(run_dir), seed=seed, steps=steps, batch_size=batch, progress=False, trackers=[],
        sample_every=0, checkpoint_every=eval_every, keep_checkpoints=1000,
    )
    r["generator"]["report"] = False
    return r


PAPER_LAMBDA = 30.0  # (d) in the paper's Fig. 10 setting: no random eta and "small" weight L2 (a tenth of the quick start's)


def variant(r: dict, name: str) -> dict:
    """The quick start changed as a claim needs; names compose with '+' (e.g. 'no_l2+nocap')."""
    r = copy.deepcopy(r)
    for part in name.split("+"):
        _change(r, part)
    return r


def _change(r: dict, name: str) -> None:
    regs, rewards = r["regularizers"], r["rewards"]
    if name == "r0":
        pass
    elif name == "nocap":  # (b): the classifier's log p uncapped, so hacking is not hidden by the cap
        rewards["digit_classifier"].pop("confidence")
    elif name == "no_l2":  # (b): each regularizer removed on its own, at the same learning rate
        regs.pop("weight_l2")
    elif name == "no_eta":
        regs.pop("random_eta")
    elif name == "raw":  # (b), (c)
        regs.pop("normalize_gradients")
    elif name == "paper_d":  # (d) as in the paper's Fig. 10: no random eta, small weight L2
        regs.pop("random_eta")
        regs["weight_l2"]["weight"] = PAPER_LAMBDA
    elif name == "one_reward":  # (d)
        rewards.pop("digit_prototype")
    elif name == "three_rewards":  # (d)
        rewards["digit_realism"] = {"weight": 1.0}
    elif name in ("r0plus", "r0plus_mean", "r0plus_random"):  # (e): the two readings of R0+ (and deep supervision's weights)
        regs["intermediate_step"] = (
            {"supervision": "random_step", "per_sample": True} if name == "r0plus_random"
            else {"supervision": "every_step", **({"step_weights": [1 / r["generator"]["num_steps"]] * r["generator"]["num_steps"]} if name == "r0plus_mean" else {})}
        )
        regs["normalize_gradients"] = regs.pop("normalize_gradients")  # keep it last
    elif name in ("cfg", "cfg03"):  # (g): the base model's guidance as an implicit reward
        rewards["classifier_free_guidance"] = {"weight": 1.0 if name == "cfg" else 0.3}
    elif name == "draft":  # (f): DRaFT-K, K = 1, through a 25-step CFG sampler, no R0 regularizers
        r["regularizers"] = {}
        r["generator"].update(num_steps=25, guidance_scale=2.0, grad_steps=1)
    elif name == "reno":  # (f): ReNO, the frozen 4-step teacher's input noise, one per evaluation image
        r["generator"]["training"] = "noise"
        r["regularizers"] = {"noise_norm": {"weight": 1.0}, "normalize_gradients": {}}
        r["optimizer"] = {"name": "adam", "lr": 0.05}
    else:
        raise ValueError(name)


def train_and_evaluate(recipe: dict, ref, per_digit: int, eval_seed: int, every_checkpoint: bool) -> list[dict]:
    """Fit, then evaluate the final checkpoint (or every checkpoint): one row per evaluated step."""
    from rewardkit.checkpoint import load_checkpoint
    from rewardkit.metrics import read_metrics
    from rewardkit.optimizer import Optimizer
    from rewardkit.testbed.evaluate import evaluate_generator

    opt = Optimizer.from_recipe(recipe)
    t0 = time.perf_counter()
    opt.fit()
    wall = time.perf_counter() - t0
    history = read_metrics(Path(recipe["run"]["dir"]) / "metrics.jsonl")
    ckpts = sorted((Path(recipe["run"]["dir"]) / "checkpoints").glob("step_*"))
    if not every_checkpoint:
        ckpts = ckpts[-1:]
    gen = opt.generator
    labels = [k for k in history[0] if k.startswith("reward/") and k != "reward/total"]
    rows = []
    for ck in ckpts:
        step = int(ck.name.split("_")[1])
        gen.load_trainable_state_dict(load_checkpoint(ck)[0])
        row = evaluate_generator(gen, ref, per_digit, seed=eval_seed)
        window = [h for h in history if step - 10 < h["step"] <= step]
        row.update(
            step=step,
            train_seconds=sum(h["time/step"] for h in history if h["step"] <= step),
            **{f"train_{k.split('/')[1]}": statistics.fmean(h[k] for h in window) for k in labels},
        )
        rows.append(row)
    rows[-1]["fit_wall_seconds"] = wall
    return rows


def reno_and_evaluate(recipe: dict, ref, per_digit: int) -> list[dict]:
    """ReNO through the same Optimizer: the training prompts are the evaluation prompts, one noise each.

    Its optimization time is counted like R0's training time (the sum of the steps' times, without
    start-up, grids or checkpoints); nothing is amortized, so it is also part of each image's cost.
    """
    from rewardkit.images import optimized_images
    from rewardkit.metrics import read_metrics
    from rewardkit.optimizer import Optimizer

    opt = Optimizer.from_recipe(recipe)
    opt.fit()
    train_seconds = sum(h["time/step"] for h in read_metrics(Path(recipe["run"]["dir"]) / "metrics.jsonl"))
    t0 = time.perf_counter()
    images = optimized_images(opt.generator, opt.prompts, batch_size=100)
    sample_seconds = time.perf_counter() - t0
    row = ref.score(images, torch.arange(10).repeat_interleave(per_digit))
    row.update(step=recipe["run"]["steps"], train_seconds=train_seconds, ms_per_image=1000 * (train_seconds + sample_seconds) / len(images))
    return [row]


def recipe_for(name: str, seed: int, steps: int, args, root: Path) -> dict:
    curve = name in CURVES
    r = variant(base_recipe(seed, steps, args.batch, root / f"{name.replace('+', '-')}_{seed}_{steps}", args.eval_every if curve else steps), name)
    if name == "reno":
        from rewardkit.testbed import data

        r["prompts"] = {"train": [data.prompt(d) for d in range(10) for _ in range(args.per_digit)]}
    return r


CURVES = ("r0", "r0plus", "r0plus_random")  # evaluated at every checkpoint: (e)'s convergence

# ------------------------------------------------------------------------------ jobs
_REFERENCE = None


def worker_reference():
    """Set up a benchmark worker process (one thread, offline) and give its evaluator Reference, built once per process."""
    global _REFERENCE
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rewardkit.testbed.evaluate import Reference

    if _REFERENCE is None:
        _REFERENCE = Reference()
    return _REFERENCE


def job(task: dict):
    """One unit of work, run in a worker process: a training run, a probe, or a teacher evaluation."""
    reference = worker_reference()
    from rewardkit.testbed.evaluate import EVAL_SEED, evaluate_generator, teacher

    args, name, seed = task["args"], task["name"], task["seed"]
    if name.startswith("teacher"):
        _, steps, cfg = name.split(":")
        return evaluate_generator(teacher(int(steps), float(cfg)), reference, args.per_digit, seed=EVAL_SEED + seed)
    recipe = recipe_for(name, seed, task["steps"], args, Path(task["root"]) / ("probes" if task.get("probe") else "runs"))
    if name == "reno":
        return reno_and_evaluate(recipe, reference, args.per_digit)
    per_digit = 1 if task.get("probe") else args.per_digit
    return train_and_evaluate(recipe, reference, per_digit, EVAL_SEED + seed, name in CURVES and not task.get("probe"))


def run_jobs(pool, tasks: list[dict], log, save=None) -> list:
    """Results in task order; the first failure cancels what has not started and is raised."""
    futures = [pool.submit(job, t) for t in tasks]
    out = []
    try:
        for t, f in zip(tasks, futures):
            out.append(f.result())
            rows = out[-1] if isinstance(out[-1], list) else [out[-1]]
            if not t.get("probe"):
                log(f"{t['name']} seed {t['seed']}: accuracy {rows[-1]['accuracy']:.3f}, frechet {rows[-1]['frechet']:.2f}")
                if save:
                    save(t, rows)
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return out


# ------------------------------------------------------------------------------ tables
def ms(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 3 if abs(m) < 10 else 1
    return f"{m:.{digits}f} +- {s:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def metric_row(name, runs, keys=("accuracy", "frechet", "diversity", "ms_per_image")):
    return [name] + [ms([r[k] for r in runs]) for k in keys]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="training steps per run (the quickstart's 100)")
    p.add_argument("--batch", type=int, default=16, help="batch size (the quickstart's 16)")
    p.add_argument("--per-digit", type=int, default=15, help="evaluation images per digit")
    p.add_argument("--eval-every", type=int, default=25, help="checkpoint/evaluation interval of the (e) curves")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default 2)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    p.add_argument("--only", nargs="*", default=None, help="subset of: a b c d e f g")
    args = p.parse_args(argv)
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    logging.basicConfig(level=logging.WARNING)
    from rewardkit.testbed.evaluate import Reference

    claims = set(args.only or "abcdefg")
    root = Path(tempfile.mkdtemp(prefix="rk-claims-"))
    raw: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def tasks(name, **extra):
        return [{"args": args, "name": name, "seed": s, "steps": args.steps, "root": str(root), **extra} for s in args.seeds]

    names = ["r0"]
    names += ["r0plus", "r0plus_random", "r0plus_mean"] if "e" in claims else []
    names += ["nocap", "no_l2", "no_l2+nocap", "no_eta", "no_eta+nocap", "raw+nocap"] if "b" in claims else []
    names += ["raw"] if "b" in claims or "c" in claims else []
    names += ["one_reward", "three_rewards", "paper_d+one_reward", "paper_d", "paper_d+three_rewards"] if "d" in claims else []
    names += ["cfg03", "cfg", "r0plus+cfg03"] + ([] if "e" in claims else ["r0plus"]) if "g" in claims else []
    teachers = {"teacher, 25 steps, CFG 2": "teacher:25:2.0", "teacher, 4 steps, untrained": "teacher:4:1.0"}
    runs: dict[str, list] = {}
    done: list = []

    def save(task, rows):  # keep what is done, should a later run fail
        if args.json:
            done.append({"name": task["name"], "seed": task["seed"], "rows": rows})
            args.json.write_text(json.dumps({"partial": done}, indent=2, default=float))

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # R0 first: the baselines of (f) get its training time.
        batch = [t for n in names for t in tasks(n)] + [t for key in teachers.values() for t in tasks(key)]
        if "f" in claims:  # time per step of each baseline, measured on a short run
            batch += [t | {"steps": 3, "probe": True} for n in ("draft", "reno") for t in tasks(n)[:1]]
        results = run_jobs(pool, batch, log, save)
        for t, rows in zip(batch, results):
            if not t.get("probe"):
                runs.setdefault(t["name"], []).append(rows if isinstance(rows, list) else [rows])
        if "f" in claims:
            r0_time = statistics.fmean(r[-1]["train_seconds"] for r in runs["r0"])
            probes = {t["name"]: rows[-1]["train_seconds"] / 3 for t, rows in zip(batch, results) if t.get("probe")}
            base = [t | {"steps": max(1, int(r0_time / probes[n]))} for n in ("draft", "reno") for t in tasks(n)]
            for t, rows in zip(base, run_jobs(pool, base, log, save)):
                runs.setdefault(t["name"], []).append(rows)
    raw["runs"] = runs
    final = {k: [r[-1] for r in v] for k, v in runs.items() if not k.startswith("teacher")}
    teachers = {label: [r[-1] for r in runs[key]] for label, key in teachers.items()}
    real = Reference().real_row()

    head = ["generator", "evaluator accuracy", "Frechet distance", "diversity", "ms / image"]
    sections = []
    n = len(args.seeds)
    if "a" in claims:
        rows = [metric_row(k, v) for k, v in teachers.items()] + [metric_row(f"R0, 4 steps ({args.steps} steps of training)", final["r0"])]
        rows.append(["real digits (split A), reference", f"{real['accuracy']:.3f}", f"{real['frechet']:.2f}", f"{real['diversity']:.3f}", "-"])
        speed = statistics.fmean(r["ms_per_image"] for r in teachers["teacher, 25 steps, CFG 2"]) / statistics.fmean(r["ms_per_image"] for r in final["r0"])
        sections.append(("(a) R0 at 4 steps vs the teacher at 25 steps with CFG", table(head, rows) + f"\n\nSpeed-up of R0 over the teacher with CFG: {speed:.1f}x per image."))
    if "b" in claims:
        h = ["removed (same learning rate)", "classifier", "trained reward (classifier log p, last 10 steps)", "evaluator accuracy", "Frechet distance", "diversity"]
        rows = []
        for cap in ("", "+nocap"):
            for k, label in (("r0", "nothing (R0)"), ("no_l2", "weight L2"), ("no_eta", "random eta"), ("raw", "gradient normalization")):
                key = (k + cap) if k != "r0" else ("nocap" if cap else "r0")
                rows.append([label, "capped at p = 0.9" if not cap else "uncapped", ms([r["train_digit_classifier"] for r in final[key]])]
                            + [ms([r[m] for r in final[key]]) for m in ("accuracy", "frechet", "diversity")])
        sections.append(("(b) Reward hacking: each regularizer removed on its own, with and without the reward cap", table(h, rows)))
    if "c" in claims:
        h = ["gradients", "evaluator accuracy", "Frechet distance", "diversity", "classifier reward", "prototype reward"]
        rows = [[label] + [ms([r[m] for r in final[k]]) for m in ("accuracy", "frechet", "diversity", "train_digit_classifier", "train_digit_prototype")]
                for k, label in (("r0", "normalized per reward (R0)"), ("raw", "raw (summed as they come)"))]
        sections.append(("(c) Normalized vs raw gradients, two rewards", table(h, rows)))
    if "d" in claims:
        rows = [metric_row(label, final[k]) for k, label in (("one_reward", "1: classifier"), ("r0", "2: + prototype"), ("three_rewards", "3: + realism"))]
        rows += [metric_row(f"{label}, paper's setting", final[k]) for k, label in (
            ("paper_d+one_reward", "1: classifier"), ("paper_d", "2: + prototype"), ("paper_d+three_rewards", "3: + realism"))]
        sections.append(("(d) One, two and three rewards: as shipped, and in the paper's setting "
                         f"(no random eta, weight L2 lambda = {PAPER_LAMBDA:g} instead of 300)", table(head, rows)))
    if "e" in claims:
        steps_e = [r["step"] for r in runs["r0"][0]]
        h = ["iteration"] + [str(s) for s in steps_e]
        rows = []
        for k, label in (("r0", "R0"), ("r0plus", "R0+, every step (deep supervision)"), ("r0plus_random", "R0+, a random step")):
            for m, name in (("accuracy", "accuracy"), ("frechet", "Frechet"), ("diversity", "diversity"), ("train_seconds", "train seconds")):
                rows.append([f"{label}: {name}"] + [ms([run[i][m] for run in runs[k]]) for i in range(len(steps_e))])
        weights = [metric_row(label, final[k]) for k, label in (("r0plus", "every step, weight 1 each (default)"), ("r0plus_mean", "every step, weight 1/4 each"))]
        sections.append(("(e) R0 vs R0+'s two readings, convergence (evaluator, per training iteration)",
                         table(h, rows) + "\n\nDeep supervision's step weights, at the last iteration:\n\n" + table(head, weights)))
    if "g" in claims:
        rows = [metric_row(label, final[k]) for k, label in (
            ("r0", "R0"), ("cfg03", "R0 + guidance reward, weight 0.3"), ("cfg", "R0 + guidance reward, weight 1"),
            ("r0plus", "R0+ (every step)"), ("r0plus+cfg03", "R0+ (every step) + guidance reward, weight 0.3"))]
        sections.append(("(g) Classifier-free guidance as an implicit reward (`classifier_free_guidance`, levels U[0.02, 0.98])", table(head, rows)))
    if "f" in claims:
        rows = [metric_row(label, final[k]) for k, label in (("r0", "R0 (4 steps)"), ("draft", "DRaFT-K, K=1 (25 steps + CFG)"), ("reno", "ReNO, noise optimization (4 steps, frozen)"))]
        steps = {k: [r["step"] for r in final[k]] for k in ("draft", "reno")}
        note = (f"\n\nEqual wall time: each method got R0's training time ({ms([r['train_seconds'] for r in final['r0']])} s). "
                f"DRaFT-K ran {min(steps['draft'])}-{max(steps['draft'])} steps of batch {args.batch} in it; ReNO spent it on the "
                f"evaluation images' own noise ({min(steps['reno'])}-{max(steps['reno'])} steps of batch {args.batch} over {10 * args.per_digit} "
                "noises), so its ms / image includes that optimization.")
        sections.append(("(f) Baselines at equal wall time", table(head, rows) + note))

    total = time.perf_counter() - t_start
    cmd = "python bench/paper_claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = [
        f"<!-- written by `{cmd.strip()}` in {total / 60:.1f} min -->",
        f"Seeds {args.seeds} ({n} runs per row; mean +- sample standard deviation), {args.steps} training steps of batch {args.batch}, "
        f"{10 * args.per_digit} evaluation images per run ({args.per_digit} per digit), {args.jobs} worker processes of one thread each. "
        f"Whole script: {total / 60:.1f} min.",
    ]
    for title, body in sections:
        text += ["", f"### {title}", "", body]
    block = "\n".join(text) + "\n"
    print(block)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2, default=float))
    if args.out:
        _write_block(args.out, block)
    return 0


BEGIN, END = "<!-- paper_claims:begin -->", "<!-- paper_claims:end -->"


def _write_block(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace a measured block of docs/results.md (between `begin` and `end`), keeping the hand-written text around it."""
    text = path.read_text() if path.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    path.write_text(f"{head}{begin}\n{block}{end}{tail}")


if __name__ == "__main__":
    raise SystemExit(main())
