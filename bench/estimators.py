"""Claim (h): the two gradient estimators on the embedded digits testbed, at equal wall time.

    python bench/estimators.py                       # 3 seeds, 2 processes; writes its block of docs/results.md
    python bench/estimators.py --seeds 0 1 2 --steps 100 --per-digit 15 --jobs 2

Every run is recipes/grpo_testbed.toml (LoRA rank 4 on the 4-step teacher,
eta 0.7, Adam, KL 0.01 to the teacher) with its rewards changed (and R0's
regularizers, below), run through the public
API and judged by the independent evaluator (rewardkit.testbed.evaluate),
sampling as trained (eta 0.7):

- R0: the classifier's log p (capped at p = 0.9, as the quick start's), a
  differentiable reward, by the pathwise estimator (gradients normalized; no
  KL penalty, which acts on a policy gradient's rollouts); and R0 with its
  own regularizers (weight L2 1 on the LoRA delta, random eta U[0, 1]);
- GRPO: the classifier's argmax verdict (`digit_correct`, 0 or 1), by the
  score-function estimator, groups of 8;
- both: the two in one step (the log p pathwise, the verdict by GRPO).

GRPO runs `--steps` steps; the others get GRPO's training time (the sum of
its steps' times), converted to steps from a short probe of each. The
untrained teacher, sampled the same way, is the starting point. Mean +-
sample standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from paper_claims import _write_block, ms, table, train_and_evaluate, worker_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "grpo_testbed.toml"
BEGIN, END = "<!-- estimators:begin -->", "<!-- estimators:end -->"
METHODS = {"r0": "R0: log p, pathwise", "r0_regularized": "R0 with its regularizers (weight L2 1, random eta)",
           "grpo": "GRPO: 0 / 1 verdict, score function", "both": "both in one step"}
LATER = ("r0", "r0_regularized", "both")  # given GRPO's training time


def recipe_for(method: str, seed: int, steps: int, batch: int, run_dir: Path) -> dict:
    r = tomllib.loads(RECIPE.read_text())
    r["run"].update(dir=str(run_dir), seed=seed, steps=steps, batch_size=batch, progress=False, trackers=[],
                    sample_every=0, checkpoint_every=steps, keep_checkpoints=1)
    r["generator"]["report"] = False
    log_p = {"digit_classifier": {"confidence": 0.9}}
    if method in ("r0", "r0_regularized"):  # (the KL penalty acts on a policy gradient's rollouts: R0 has none)
        r["rewards"] = log_p
        r["regularizers"] = {"normalize_gradients": {}}
        if method == "r0_regularized":
            r["regularizers"] = {"weight_l2": {"weight": 1.0}, "random_eta": {"low": 0.0, "high": 1.0}, "normalize_gradients": {}}
        del r["policy_gradient"]
    elif method == "both":
        r["rewards"] = log_p | r["rewards"]
        r["regularizers"]["normalize_gradients"] = {}
    return r


def job(task: dict):
    """One run (or the teacher's evaluation) in a worker process of one thread."""
    reference = worker_reference()
    from rewardkit.testbed.evaluate import EVAL_SEED, evaluate_generator, teacher

    seed, per_digit = task["seed"], 1 if task.get("probe") else task["per_digit"]
    if task["method"] == "teacher":
        eta = tomllib.loads(RECIPE.read_text())["generator"]["eta"]
        return evaluate_generator(teacher(4, 1.0, eta=eta), reference, per_digit, seed=EVAL_SEED + seed)
    run_dir = Path(task["root"]) / f"{task['method']}_{seed}_{task['steps']}{'_probe' if task.get('probe') else ''}"
    recipe = recipe_for(task["method"], seed, task["steps"], task["batch"], run_dir)
    return train_and_evaluate(recipe, reference, per_digit, EVAL_SEED + seed, False)[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="GRPO's training steps (the others get its training time)")
    p.add_argument("--batch", type=int, default=32, help="batch size (the recipe's 32: 4 prompts x 8)")
    p.add_argument("--per-digit", type=int, default=15, help="evaluation images per digit")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = p.parse_args(argv)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = Path(tempfile.mkdtemp(prefix="rk-estimators-"))
    t_start = time.perf_counter()
    base = {"root": str(root), "batch": args.batch, "per_digit": args.per_digit}

    def run(pool, tasks):
        out = list(pool.map(job, tasks))
        for t, row in zip(tasks, out):
            if not t.get("probe"):
                print(f"[{time.perf_counter() - t_start:6.0f} s] {t['method']} seed {t['seed']} ({t['steps']} steps): "
                      f"accuracy {row['accuracy']:.3f}", file=sys.stderr, flush=True)
        return out

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        first = [base | {"method": "grpo", "seed": s, "steps": args.steps} for s in args.seeds]
        first += [base | {"method": "teacher", "seed": s, "steps": 0} for s in args.seeds]
        first += [base | {"method": m, "seed": args.seeds[0], "steps": 5, "probe": True} for m in (*LATER, "grpo")]
        done = run(pool, first)
        rows = {"grpo": done[: len(args.seeds)], "teacher": done[len(args.seeds): 2 * len(args.seeds)]}
        probes = dict(zip((*LATER, "grpo"), done[2 * len(args.seeds):]))
        budget = statistics.fmean(r["train_seconds"] for r in rows["grpo"])
        # the probes ran alongside other runs, as the measured ones do: their per-step ratio to GRPO's sets the steps
        per_step = {m: probes[m]["train_seconds"] / 5 for m in probes}
        steps = {m: max(1, round(args.steps * per_step["grpo"] / per_step[m])) for m in LATER}
        later = [base | {"method": m, "seed": s, "steps": steps[m]} for m in LATER for s in args.seeds]
        out = run(pool, later)
        for i, m in enumerate(LATER):
            rows[m] = out[i * len(args.seeds): (i + 1) * len(args.seeds)]

    head = ["generator", "training steps", "train seconds", "digit correct (training, last 10 steps)", "evaluator accuracy",
            "Frechet distance", "diversity", "ms / image"]
    body = [["teacher, 4 steps, eta 0.7, untrained", "0", "-", "-"] + [ms([r[k] for r in rows["teacher"]]) for k in ("accuracy", "frechet", "diversity", "ms_per_image")]]
    for m in METHODS:
        n = steps.get(m, args.steps)
        body.append([METHODS[m], str(n), ms([r["train_seconds"] for r in rows[m]]), ms([r.get("train_digit_correct") for r in rows[m]])]
                    + [ms([r[k] for r in rows[m]]) for k in ("accuracy", "frechet", "diversity", "ms_per_image")])
    total = time.perf_counter() - t_start
    cmd = ("python bench/estimators.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    block = "\n".join([
        f"<!-- written by `{cmd}` in {total / 60:.1f} min -->",
        f"Seeds {args.seeds}, batch {args.batch}, {10 * args.per_digit} evaluation images per run, {args.jobs} worker processes of "
        f"one thread each. Equal wall time: the R0 runs and the combined one got GRPO's training time ({budget:.0f} s on average), "
        f"converted to steps by a 5-step probe of each ({', '.join(f'{m} {1000 * t:.0f} ms' for m, t in per_step.items())} per step).",
        "", table(head, body), ""])
    print(block)
    if args.out:
        _write_block(args.out, block, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
