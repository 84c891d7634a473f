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


def test_reward_models_run_in_the_run_precision_unless_their_dtype_says_otherwise(tmp_path):
    """dtype = 'auto' (the default) puts a reward model in the run's precision; an explicit dtype wins."""
    from rewardkit_clip.rewards import CLIPScore
    from rewardkit_hps import HPS
    from rewardkit_imagereward import ImageReward
    from tiny_rewards import save_tiny_clip, save_tiny_hps, save_tiny_imagereward

    from rewardkit.generators.pixels import Pixels

    hps, ir = HPS(**save_tiny_hps(tmp_path / "hps")), ImageReward(**save_tiny_imagereward(tmp_path / "ir"))
    clip = CLIPScore(**save_tiny_clip(tmp_path / "clip")[0], dtype="float32")
    run = {"dir": str(tmp_path / "run"), "steps": 1, "batch_size": 2, "mixed_precision": "bf16", "trackers": [], "progress": False, "sample_every": 0}
    Optimizer(Pixels(height=32, width=32), {"hps": hps, "clip": clip, "ir": ir}, prompts=["a red cat", "a dog"], run=run).fit()
    assert {p.dtype for p in hps.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ir.net.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ir.net.mlp.parameters()} == {torch.float32}  # its head stays float32
    assert {p.dtype for p in clip.model.parameters()} == {torch.float32}  # dtype = 'float32' overrides the run


@pytest.mark.parametrize("name", ["hps", "clip_score", "laion_aesthetic", "imagereward"])
def test_reward_scores_in_bf16_stay_within_the_rounding_of_float32(tmp_path, name):
    """Scores of a reward rebuilt in bfloat16 (as under a bf16 run, autocast on) against the same model in float32.

    Bound, first order: each of the m linear maps (Linear, Conv2d, attention's input projection) rounds its input
    and its weights to bfloat16, a relative error of at most u = 2^-8 each, so the output's relative error is at
    most 2 m u, relative to the score's scale: the cosine's range (scale) for CLIP-type scores, the head's output
    before any affine normalization for the heads."""
    from rewardkit_clip.rewards import CLIPScore, LAIONAesthetic
    from rewardkit_hps import HPS
    from rewardkit_imagereward import ImageReward
    from rewardkit_imagereward.model import MEAN, STD
    from tiny_rewards import save_tiny_clip, save_tiny_hps, save_tiny_imagereward

    build = {
        "hps": lambda **kw: HPS(**save_tiny_hps(tmp_path / "hps"), **kw),
        "clip_score": lambda **kw: CLIPScore(**save_tiny_clip(tmp_path / "clip")[0], **kw),
        "laion_aesthetic": lambda **kw: LAIONAesthetic(**save_tiny_clip(tmp_path / "clip")[1], **kw),
        "imagereward": lambda **kw: ImageReward(**save_tiny_imagereward(tmp_path / "ir"), **kw),
    }[name]
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "a dog on the beach", "a blue house", "the sky"]
    reference = build(dtype="float32")
    s32 = reference(images, prompts)
    reward = build()
    reward.use_precision(torch.bfloat16)
    assert next(reward.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16 = reward(images, prompts)
    assert s16.dtype == torch.float32
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)) for m in reward.modules())
    if name == "imagereward":
        scale = (s32 * STD + MEAN).abs().max().item() / STD
    else:
        scale = reward.options.scale if hasattr(reward.options, "scale") else s32.abs().max().item()
    err = (s16 - s32).abs().max().item()
    assert err <= 2 * layers * 2**-8 * scale, (err, layers, scale)
    assert not torch.equal(s16, s32)  # it did run in bfloat16


def test_rebuilding_a_reward_in_bf16_leaves_models_other_rewards_hold_untouched(tmp_path):
    """Models are cached per process; 'auto' rebuilds in the run's dtype instead of casting the shared copy."""
    from rewardkit_clip.rewards import CLIPScore, LAIONAesthetic
    from tiny_rewards import save_tiny_clip

    clip_options, aesthetic_options = save_tiny_clip(tmp_path / "clip")
    fixed, auto = CLIPScore(**clip_options, dtype="float32"), CLIPScore(**clip_options)
    fixed_aes, auto_aes = LAIONAesthetic(**aesthetic_options, dtype="float32"), LAIONAesthetic(**aesthetic_options)
    assert auto.model is fixed.model and auto_aes.head is fixed_aes.head  # one float32 copy while both are float32
    before = {k: v.clone() for r in (fixed, fixed_aes) for k, v in r.state_dict(prefix=r.name + ".").items()}
    auto.use_precision(torch.bfloat16)
    auto_aes.use_precision(torch.bfloat16)
    assert next(auto.model.parameters()).dtype == torch.bfloat16 and {p.dtype for p in auto_aes.head.parameters()} == {torch.float32}
    after = {k: v for r in (fixed, fixed_aes) for k, v in r.state_dict(prefix=r.name + ".").items()}
    assert before.keys() == after.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
