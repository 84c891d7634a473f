"""The score-function estimator's quantities on a real diffusion generator: each stochastic update's log-probability.

At eta > 0 every update of R0's sampler is a Gaussian with a known mean and
standard deviation (rewardkit.sampler.transition), so a trajectory's
log-probability is exact. Checked here on a tiny SD 1.x pipeline against
diffusers' own DDIMScheduler.step (its mean at eta, its variance), and the
recomputation from a recorded trajectory against the values recorded while
sampling: equal bit for bit, so a policy-gradient method's first importance
ratio is exactly 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny_sd  # noqa: E402

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.generators.base import Rollout  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog", "a blue car"]
ETA = 0.7


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


def build(model, **options):
    gen = StableDiffusion(model=model, lora_rank=4, **options)
    gen.setup(PROMPTS, 0)
    with torch.no_grad():  # LoRA B starts at 0, which hides A's gradient: move off it
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    return gen


def test_log_probs_are_ddim_posteriors_and_recompute_bit_for_bit(tiny_sd):
    from diffusers import StableDiffusionPipeline

    gen = build(tiny_sd, guidance_scale=2.0)
    noise = torch.randn((len(PROMPTS), *gen.noise_shape()), generator=torch.Generator().manual_seed(0))
    rollout = Rollout()
    options = gen.sample_options().replace(eta=ETA, rollout=rollout)
    with torch.no_grad():
        images = gen(PROMPTS, noise, options)
    assert images.shape == (3, 3, 32, 32) and len(rollout.trajectory) == 4 and len(rollout.log_probs) == 3
    recorded = torch.stack(rollout.log_probs, 1)

    # recomputed from the trajectory with gradient, as a policy-gradient update does: the same values exactly
    again = gen(PROMPTS, noise, options.replace(score_steps=(0, 1, 2)))
    assert again.shape == (3, 3) and torch.equal(again.detach(), recorded)
    again[:, 1].sum().backward()
    grads = [p.grad for n, p in gen.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)

    # the independent computation: the generator's network, the pipeline's prompt encoding, guidance by hand and
    # DDIMScheduler.step (eta, no fresh noise: the mean) with its own variance, on the recorded states; the density
    # in float64
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    scheduler = gen.export_scheduler()
    scheduler.set_timesteps(4)
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 3)
    for k, (t, s) in enumerate(zip(scheduler.timesteps[:3], scheduler.timesteps[1:])):
        x_t, x_s = rollout.trajectory[k], rollout.trajectory[k + 1]
        with torch.no_grad():
            eps_u, eps_c = gen.unet(torch.cat([x_t, x_t]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        eps = eps_u + 2.0 * (eps_c - eps_u)
        mean = scheduler.step(eps, t, x_t, eta=ETA, variance_noise=torch.zeros_like(x_t)).prev_sample.double()
        std = ETA * scheduler._get_variance(t, s).double().sqrt()
        expected = torch.distributions.Normal(mean, std).log_prob(x_s.double()).flatten(1).sum(1)
        z = (x_s.double() - mean) / std
        # float32 means (about 1e-6 of their size off) and states: log p is off by about sum |z| * 1e-6 * (1 + |mean|) / std
        tol = 4e-6 * (z.abs() * (1 + mean.abs()) / std).flatten(1).sum(1).max().item()
        torch.testing.assert_close(recorded[:, k], expected, rtol=0, atol=tol)


def test_log_probs_need_stochastic_updates_and_trained_weights(tiny_sd):
    gen = build(tiny_sd)
    noise = torch.randn((1, *gen.noise_shape()), generator=torch.Generator().manual_seed(2))
    with pytest.raises(UserError, match="needs eta above 0 at every update of the sampler"), torch.no_grad():
        gen(PROMPTS[:1], noise, gen.sample_options().replace(eta=0.0, rollout=Rollout()))
    with pytest.raises(ValueError, match="needs the rollout of a sampling pass"):
        gen(PROMPTS[:1], noise, gen.sample_options().replace(eta=ETA, score_steps=(0,)))
    frozen = StableDiffusion(model=tiny_sd, training="noise")
    frozen.setup(PROMPTS[:1], 0)
    with pytest.raises(UserError, match="with training = 'noise' nothing it reaches is trained"):
        frozen(PROMPTS[:1], noise, frozen.sample_options().replace(eta=ETA, rollout=Rollout(), score_steps=(0,)))
