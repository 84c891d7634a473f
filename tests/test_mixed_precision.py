"""The training loop under bf16 and fp16 autocast, on CPU (torch supports both there), resumed exactly.

fp16 carries state besides the weights: the GradScaler's loss scale, which decides which steps overflow
and are skipped. The scaler here grows every step (growth_interval = 1), so the scale at the resume point
differs from a fresh scaler's unless the checkpoint restored it.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rewardkit import Optimizer
from rewardkit.metrics import read_metrics


class FastGrowingScaler(torch.amp.GradScaler):
    def __init__(self, device="cpu", **kwargs):
        super().__init__(device, growth_interval=1, **kwargs)


def recipe(run_dir, precision, steps) -> dict:
    return {
        "run": {"dir": str(run_dir), "steps": steps, "batch_size": 4, "mixed_precision": precision, "checkpoint_every": 1,
                "keep_checkpoints": 5, "trackers": [], "progress": False, "sample_every": 0},
        "prompts": {"train": [f"a handwritten digit {d}" for d in range(10)]},
        "generator": {"type": "testbed", "num_steps": 2, "training": "lora", "lora_rank": 4, "report": False},
        "optimizer": {"lr": 1e-3},
        "rewards": {"digit_classifier": {}, "digit_prototype": {}},
        "regularizers": {"weight_l2": {"weight": 10.0}, "random_eta": {}, "normalize_gradients": {}},
    }


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_run_resumes_exactly(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(torch.amp, "GradScaler", FastGrowingScaler)
    Optimizer.from_recipe(recipe(tmp_path / "straight", precision, 3)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", precision, 1)).fit()  # stopped after step 1's checkpoint
    Optimizer.from_recipe(recipe(tmp_path / "resumed", precision, 3)).fit(resume=True)

    a = load_file(tmp_path / "straight" / "checkpoints" / "step_000003" / "generator.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "step_000003" / "generator.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    keys = ["reward/digit_classifier", "loss", "skipped"] + (["grad_scale"] if precision == "fp16" else [])
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    if precision == "fp16":
        assert straight[0]["grad_scale"] != 2.0**16, straight  # the scale moved in step 1: a fresh scaler at step 2 would differ
    else:
        assert "grad_scale" not in straight[0]
