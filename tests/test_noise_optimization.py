"""Test-time noise optimization (ReNO-style): generator.training = "noise" and `noise_norm`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny_sd, save_tiny_sd3  # noqa: E402

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.export import export_generator  # noqa: E402
from rewardkit.generators.base import SampleOptions  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402
from rewardkit.generators.sd3 import StableDiffusion3  # noqa: E402
from rewardkit.images import optimized_images  # noqa: E402
from rewardkit.regularizers.noise_norm import NoiseNorm, chi_square_nll  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog", "a red cat"]  # a repeated prompt gets its own noise


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"sd": (StableDiffusion, str(save_tiny_sd(root / "sd"))), "sd3": (StableDiffusion3, str(save_tiny_sd3(root / "sd3")))}


def build(models, family, **options):
    cls, model = models[family]
    gen = cls(model=model, training="noise", **options)
    gen.setup(PROMPTS, 0)
    return gen


@pytest.mark.parametrize("family", ["sd", "sd3"])
@pytest.mark.parametrize("supervise", [None, 0])
def test_gradient_reaches_the_batch_noise_and_nothing_else(models, family, supervise):
    gen = build(models, family, num_steps=3, eta=0.5)
    assert [n for n, p in gen.named_parameters() if p.requires_grad] == ["noise_table"]
    index = torch.tensor([2, 0])
    # R0+'s supervised step must still reach the noise: every earlier step keeps its gradient.
    options = SampleOptions(num_steps=3, prompt_index=index, supervise_step=None if supervise is None else torch.tensor([0, 2]))
    images = gen([PROMPTS[2], PROMPTS[0]], torch.zeros(2, *gen.noise_shape()), options)
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    grad = gen.noise_table.grad
    assert torch.isfinite(grad).all()
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0  # the two rows in the batch
    assert grad[1].abs().sum() == 0  # the row not drawn
    assert all(p.grad is None for n, p in gen.named_parameters() if n != "noise_table")


def test_outside_training_prompts_use_their_optimized_noise(models):
    gen = build(models, "sd", num_steps=2)
    options = gen.sample_options()
    given = torch.randn(2, *gen.noise_shape(), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        gen.noise_table.mul_(0.5)  # as if optimized
        looked_up = gen(["a red cat", "an unseen prompt"], given, options)
        by_index = gen(["a red cat"], given[:1], options.replace(prompt_index=torch.tensor([0])))
        frozen = gen.decode(gen.sample_latents(["an unseen prompt"], given[1:], options))
        slots = optimized_images(gen, PROMPTS)
    torch.testing.assert_close(looked_up[:1], by_index)  # a training prompt: its first slot's noise
    torch.testing.assert_close(looked_up[1:], frozen)  # any other prompt: the noise given, frozen model
    assert slots.shape[0] == len(PROMPTS)
    assert (slots[0] - slots[2]).abs().max() > 1e-3  # the repeated prompt's two noises give two images


def test_noise_training_refuses_truncated_gradients_and_export(models, tmp_path):
    cls, model = models["sd"]
    gen = cls(model=model, training="noise", grad_steps=1)
    with pytest.raises(UserError, match="grad_steps"):
        gen.setup(PROMPTS, 0)
    gen = build(models, "sd")
    with pytest.raises(UserError, match="no model to export"):
        export_generator(gen, tmp_path / "out", "diffusers")


def test_chi_square_nll_is_the_chi_square_law():
    from scipy.stats import chi2

    d = 48
    z = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 1.5, 6).view(-1, 1, 1, 1)
    nll = chi_square_nll(z).double()
    r = z.flatten(1).pow(2).sum(1).double().numpy()
    expected = -(chi2.logpdf(r, d) - chi2.logpdf(d - 2, d))  # the law's NLL, 0 at its mode
    torch.testing.assert_close(nll, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)  # float32 sums
    assert (nll >= 0).all()


def test_noise_norm_needs_a_noise_generator(models):
    cls, model = models["sd"]
    gen = cls(model=model, training="lora", lora_rank=4)
    gen.setup(PROMPTS, 0)
    with pytest.raises(UserError, match="training = 'noise'"):
        NoiseNorm().setup(gen)


def _testbed_recipe(run_dir, prompts, steps, norm_weight):
    return {
        "run": {"dir": str(run_dir), "steps": steps, "batch_size": 10, "sample_every": 0, "checkpoint_every": 0, "progress": False, "trackers": []},
        "prompts": {"train": prompts},
        "generator": {"type": "testbed", "num_steps": 2, "training": "noise"},
        "optimizer": {"name": "adam", "lr": 0.05},
        "rewards": {"digit_classifier": {}},
        "regularizers": {"noise_norm": {"weight": norm_weight}, "normalize_gradients": {}},
    }


def test_noise_optimization_on_the_testbed_raises_the_reward_and_writes_images(tmp_path):
    """ReNO end to end on a real (packaged) model: the reward rises, weights stay, images per prompt."""
    from rewardkit.checkpoint import load_checkpoint
    from rewardkit.optimizer import Optimizer
    from rewardkit.testbed import data
    from rewardkit.testbed.plugins import DigitClassifier

    prompts = [data.prompt(d) for d in range(10)]
    opt = Optimizer.from_recipe(_testbed_recipe(tmp_path / "run", prompts, 15, 10.0))
    reward = DigitClassifier().eval()
    gen = opt.generator
    gen.setup(prompts, 0)
    before_weights = {n: p.detach().clone() for n, p in gen.named_parameters() if n != "noise_table"}
    before = reward(optimized_images(gen, prompts), prompts).mean().item()
    result = opt.fit()
    after = reward(optimized_images(gen, prompts), prompts).mean().item()
    assert after > before + 0.1, (before, after)  # log p of the right digit, about -0.20 -> -0.04
    assert all(torch.equal(p, before_weights[n]) for n, p in gen.named_parameters() if n != "noise_table")
    z = gen.noise_table.detach()
    assert abs(z.flatten(1).pow(2).sum(1).mean().item() / z[0].numel() - 1) < 0.1  # still a likely N(0, I) draw
    assert set(load_checkpoint(result.checkpoint)[0]) == {"noise_table"}
    index = [json.loads(line) for line in (tmp_path / "run" / "images" / "index.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in index] == prompts
    assert all((tmp_path / "run" / "images" / row["file"]).is_file() for row in index)
    assert "images" in result.report


def test_resuming_a_noise_run_with_other_prompts_is_refused(tmp_path):
    """The noise table belongs to its prompt list: a changed list must not be silently loaded."""
    from rewardkit.optimizer import Optimizer
    from rewardkit.testbed import data

    prompts = [data.prompt(d) for d in range(10)]
    Optimizer.from_recipe(_testbed_recipe(tmp_path / "run", prompts, 2, 1.0)).fit()
    fewer = Optimizer.from_recipe(_testbed_recipe(tmp_path / "run", prompts[:9], 4, 1.0))
    with pytest.raises(UserError, match=r"noise_table \(10, 4, 8, 8\) \(expected \(9, 4, 8, 8\)\)"):
        fewer.fit(resume=True)


def test_a_resumed_noise_run_matches_an_uninterrupted_one(tmp_path):
    """The noise table and its Adam state survive a checkpoint: 2 + 2 steps equal 4 straight."""
    from safetensors.torch import load_file

    from rewardkit.optimizer import Optimizer
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe
    from rewardkit.testbed import data

    prompts = [data.prompt(d) for d in range(10)]

    def recipe(run_dir, steps):
        r = _testbed_recipe(run_dir, prompts, steps, 1.0)
        r["run"]["checkpoint_every"] = 2
        return load_recipe(r, registry=load_registry())

    Optimizer.from_recipe(recipe(tmp_path / "straight", 4)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 2)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 4)).fit(resume=True)
    table = lambda run: load_file(tmp_path / run / "checkpoints" / "step_000004" / "generator.safetensors")["noise_table"]  # noqa: E731
    assert not torch.equal(table("straight"), torch.randn(table("straight").shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(table("resumed"), table("straight"), rtol=0, atol=0)
