"""optimizer.ema_decay: the moving average of the weights, against its recursion computed by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import pixels_recipe
from rewardkit import Optimizer
from rewardkit.cli import main

DECAY, STEPS = 0.8, 6


def recipe(run_dir, steps=STEPS, **optimizer):
    return pixels_recipe(run_dir, steps=steps, run={"checkpoint_every": 1, "keep_checkpoints": 20},
                         optimizer={"ema_decay": DECAY, **optimizer})


def logits(run_dir, step, name="generator.safetensors"):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / name)["logits"]


@pytest.mark.parametrize("device", ["accelerator", "cpu"])
def test_the_average_is_its_recursion_over_the_saved_weights(tmp_path, device):
    opt = Optimizer.from_recipe(recipe(tmp_path / "run", ema_device=device))
    opt.generator.setup(opt.prompts, 0)
    e = opt.generator.logits.detach().clone()  # e_0 = theta_0
    opt.fit()
    for t in range(1, STEPS + 1):
        d = min(DECAY, (1 + t) / (10 + t))
        e = d * e + (1 - d) * logits(tmp_path / "run", t)
        torch.testing.assert_close(logits(tmp_path / "run", t, "generator_ema.safetensors"), e, rtol=1e-6, atol=1e-6)
    assert float((e - logits(tmp_path / "run", STEPS)).abs().max()) > 1e-3  # the average lags the weights


def test_the_average_resumes_and_is_what_ema_commands_use(tmp_path, capsys):
    Optimizer.from_recipe(recipe(tmp_path / "straight")).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", steps=3)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed")).fit(resume=True)
    ema = logits(tmp_path / "straight", STEPS, "generator_ema.safetensors")
    torch.testing.assert_close(logits(tmp_path / "resumed", STEPS, "generator_ema.safetensors"), ema, rtol=0, atol=0)

    from rewardkit.plugins import load_registry
    from rewardkit.rundir import load_generator

    registry = load_registry()
    torch.testing.assert_close(load_generator(tmp_path / "straight", registry, ema=True)[0].logits.detach(), ema)
    torch.testing.assert_close(load_generator(tmp_path / "straight", registry)[0].logits.detach(), logits(tmp_path / "straight", STEPS))
    assert main(["sample", str(tmp_path / "straight"), "--prompt", "a red square", "-n", "1", "--out", str(tmp_path / "s"), "--ema"]) == 0

    Optimizer.from_recipe(pixels_recipe(tmp_path / "plain", steps=1)).fit()
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "plain"), "--prompt", "a red square", "--out", str(tmp_path / "p"), "--ema"]) == 2
    assert "has no EMA weights: the run did not set optimizer.ema_decay" in capsys.readouterr().err
