"""A pathwise-only recipe and its numbers as the code before the score-function estimator computed them.

tests/data/pathwise_golden.{json,safetensors} were written by this file run against commit 32c811b (the last before
the estimator), from a worktree of it:

    git worktree add /tmp/before 32c811b
    PYTHONPATH=/tmp/before python tests/pathwise_golden.py tests/data

tests/test_policy_gradient.py runs the same recipe with the code of today and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("loss", "reward/digit_classifier", "reward/digit_prototype", "penalty/weight_l2", "param_grad_norm")


def golden_recipe(run_dir: Path) -> dict:
    """Testbed LoRA, 3 steps of 2 micro-batches, R0+ one random step per sample, the EMA, every R0 regularizer."""
    return {
        "run": {"dir": str(run_dir), "steps": 3, "batch_size": 4, "gradient_accumulation_steps": 2, "checkpoint_every": 3,
                "trackers": [], "progress": False, "seed": 3, "sample_every": 0},
        "prompts": {"train": [f"a handwritten digit {d}" for d in range(10)]},
        "generator": {"type": "testbed", "num_steps": 3, "training": "lora", "lora_rank": 4, "report": False},
        "optimizer": {"name": "adam", "lr": 3e-3, "ema_decay": 0.5},
        "rewards": {"digit_classifier": {}, "digit_prototype": {"weight": 0.5}},
        "regularizers": {"weight_l2": {"weight": 10.0}, "random_eta": {},
                         "intermediate_step": {"supervision": "random_step", "per_sample": True}, "normalize_gradients": {}},
    }


def run_golden(run_dir: Path) -> tuple[list[dict], dict]:
    """Train the recipe; its logged numbers per step and its final weights and weights' average (one flat dict)."""
    import torch
    from safetensors.torch import load_file

    from rewardkit.optimizer import Optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order, whatever the machine's cores
    try:
        Optimizer.from_recipe(golden_recipe(run_dir)).fit()
    finally:
        torch.set_num_threads(threads)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = run_dir / "checkpoints" / "step_000003"
    tensors = {f"weights.{k}": v for k, v in load_file(final / "generator.safetensors").items()}
    tensors |= {f"ema.{k}": v for k, v in load_file(final / "generator_ema.safetensors").items()}
    return [{k: h[k] for k in KEYS} for h in history], tensors


if __name__ == "__main__":
    import tempfile

    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    numbers, tensors = run_golden(Path(tempfile.mkdtemp()) / "run")
    save_file(tensors, out / "pathwise_golden.safetensors")
    (out / "pathwise_golden.json").write_text(json.dumps(numbers, indent=1) + "\n")
