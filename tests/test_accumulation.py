"""Gradient accumulation: batch 4 x 4 micro-batches is batch 16, resumes exactly, and a foreign setting is refused.

SGD, not Adam, so that a mis-scaled gradient (the loss divided by the number of micro-batches once too
often, or not at all) changes the result: Adam's first steps barely depend on the gradient's scale.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import pixels_recipe, run_cli
from rewardkit import Optimizer
from rewardkit.errors import UserError
from rewardkit.metrics import read_metrics


def recipe(run_dir, batch, accumulation, steps=2) -> dict:
    return {
        "run": {"dir": str(run_dir), "steps": steps, "batch_size": batch, "gradient_accumulation_steps": accumulation,
                "checkpoint_every": 1, "keep_checkpoints": 10, "trackers": [], "progress": False, "sample_every": 0},
        "prompts": {"train": [f"a handwritten digit {d}" for d in range(10)]},
        "generator": {"type": "testbed", "num_steps": 3, "training": "full", "report": False},
        "optimizer": {"name": "sgd", "lr": 1e-2},
        "rewards": {"digit_classifier": {}, "digit_prototype": {}},
        # per-sample draws (eta per sample and step, a supervised step per sample) must be split with their samples
        "regularizers": {"weight_l2": {"weight": 30.0}, "random_eta": {},
                         "intermediate_step": {"supervision": "random_step"}, "normalize_gradients": {}},
    }


def weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "generator.safetensors")


def assert_same_weights(a: dict, b: dict, start: dict):
    """Equal updates, up to float32 rounding: of the sums (relative to the update) and of the stored weights
    (a weight w + delta is stored to within |w| 2^-24, so the update read back is exact to a few |w| 2^-24)."""
    for k in start:
        da, db = a[k] - start[k], b[k] - start[k]
        stored = 4 * 2.0**-24 * start[k].abs()
        assert bool(((da - db).abs() <= 1e-4 * db.abs() + 1e-5 * db.abs().max() + stored).all()), k


def test_batch_4_with_4_micro_batches_is_batch_16(tmp_path):
    big = Optimizer.from_recipe(recipe(tmp_path / "big", 16, 1))
    big.generator.setup(big.prompts, 0)
    start = {k: v.clone() for k, v in big.generator.trainable_state_dict().items()}
    big.fit()
    Optimizer.from_recipe(recipe(tmp_path / "acc", 4, 4)).fit()
    for step in (1, 2):
        assert_same_weights(weights(tmp_path / "acc", step), weights(tmp_path / "big", step), start)
    one, acc = read_metrics(tmp_path / "big" / "metrics.jsonl"), read_metrics(tmp_path / "acc" / "metrics.jsonl")
    for key in ("reward/digit_classifier", "reward/digit_prototype", "loss", "penalty/weight_l2", "grad_norm/digit_classifier", "param_grad_norm"):
        assert [r[key] for r in acc] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-7), key
    assert read_metrics(tmp_path / "big" / "metrics.jsonl")[-1]["param_grad_norm"] > 0


def test_an_accumulating_run_resumes_exactly(tmp_path):
    straight = Optimizer.from_recipe(recipe(tmp_path / "straight", 4, 2, steps=4))
    straight.generator.setup(straight.prompts, 0)
    start = {k: v.clone() for k, v in straight.generator.trainable_state_dict().items()}
    straight.fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 4, 2, steps=2)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 4, 2, steps=4)).fit(resume=True)
    assert_same_weights(weights(tmp_path / "resumed", 4), weights(tmp_path / "straight", 4), start)


def test_an_accumulation_set_outside_the_recipe_is_refused(tmp_path, monkeypatch, write_recipe):
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("distributed_type: MULTI_GPU\ngradient_accumulation_steps: 4\n")
    r = pixels_recipe(tmp_path / "run", steps=1, run={"accelerate_config": str(yaml)})
    proc = run_cli("run", str(write_recipe(r)), "--num-processes", "2", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "gradient_accumulation_steps = 4, but the recipe has run.gradient_accumulation_steps = 1" in proc.stderr
    assert not (tmp_path / "run").exists()
    # started by the user's own `accelerate launch`, whose YAML reaches the process as an environment variable
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(UserError, match=r"sets gradient_accumulation_steps = 4 .* run.gradient_accumulation_steps = 1"):
        Optimizer.from_recipe(pixels_recipe(tmp_path / "env", steps=1)).fit()
