"""Core benchmarks: CLI start-up time and the optimizer's own overhead per step.

    python bench/core.py            # prints a markdown table (recorded in docs/benchmarks.md)

Start-up: wall time of `rewardkit --help`, `rewardkit plugins` and `import rewardkit`
in fresh processes (median of several runs).

Overhead: the pixels generator with the color reward at 8x8 px does almost no
work, so nearly all of a step's time is the loop itself. Per-step wall time is
measured as (T(N+1 steps) - T(1 step)) / N, so set-up, the first sample grid
and the final checkpoint cancel out; the generator, reward and backward times
logged in metrics.jsonl are subtracted to give the overhead. A bare PyTorch
loop doing the same maths (sigmoid pixels, colour loss, Adam) is the floor.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def median_wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fit_time(steps: int, root: Path, name: str, **run) -> tuple[float, list[dict]]:
    from rewardkit import Optimizer
    from rewardkit.generators.pixels import Pixels
    from rewardkit.metrics import read_metrics
    from rewardkit.regularizers.normalize_gradients import NormalizeGradients
    from rewardkit.regularizers.weight_l2 import WeightL2
    from rewardkit.rewards.color import Color

    opt = Optimizer(
        generator=Pixels(height=8, width=8),
        rewards=[Color()],
        regularizers=[NormalizeGradients(), WeightL2(weight=0.01)],
        prompts=[f"prompt {i}" for i in range(8)],
        run={"dir": str(root / name), "steps": steps, "batch_size": 4, "progress": False, **run},
        optimizer={"lr": 0.01},
    )
    t = time.perf_counter()
    opt.fit()
    return time.perf_counter() - t, read_metrics(root / name / "metrics.jsonl")


def bare_loop_step_time(steps: int) -> float:
    logits = torch.nn.Parameter(torch.randn(8, 3, 8, 8))
    target = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    optim = torch.optim.AdamW([logits], lr=0.01)
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(8)[:4]
        x = torch.sigmoid(logits[idx])
        loss = ((x - target) ** 2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rk = [sys.executable, "-m", "rewardkit"]
    rows = [
        ("`rewardkit --help`", median_wall([*rk, "--help"], args.repeats)),
        ("`python -c 'import rewardkit'`", median_wall([sys.executable, "-c", "import rewardkit"], args.repeats)),
        ("`rewardkit plugins`", median_wall([*rk, "plugins"], args.repeats)),
        ("`python -c 'import torch'` (for scale)", median_wall([sys.executable, "-c", "import torch"], args.repeats)),
    ]
    print("| start-up | median wall time (s) |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} |")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("\n| loop (pixels 8x8, color reward, normalize_gradients + weight_l2, batch 4) | ms / step |\n|---|---|")
        for trackers, label in (([], "no trackers"), (["tensorboard"], "with TensorBoard")):
            t1, _ = fit_time(1, root, f"one-{label}", trackers=trackers)
            tn, history = fit_time(args.steps + 1, root, f"many-{label}", trackers=trackers)
            per_step = (tn - t1) / args.steps
            work = statistics.mean(r["time/generate"] + r["time/rewards"] + r["time/backward"] for r in history[1:])
            print(f"| rewardkit step, wall ({label}) | {per_step * 1e3:.2f} |")
            print(f"| of which generator + rewards + backward ({label}) | {work * 1e3:.2f} |")
            print(f"| **optimizer overhead** ({label}) | **{(per_step - work) * 1e3:.2f}** |")
        print(f"| bare PyTorch loop, same maths (floor) | {bare_loop_step_time(args.steps) * 1e3:.2f} |")
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
