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
from tiny_models import save_tiny_sd, save_tiny_sd3  # noqa: E402

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.generators.base import Rollout  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402
from rewardkit.generators.sd3 import StableDiffusion3  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog", "a blue car"]
ETA = 0.7


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


def build(model, move=0.01, **options):
    gen = StableDiffusion(model=model, lora_rank=4, **options)
    gen.setup(PROMPTS, 0)
    with torch.no_grad():  # LoRA B starts at 0, which hides A's gradient: move off it
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, move, generator=torch.Generator().manual_seed(1))
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
    with pytest.raises(UserError, match="needs eta above 0 at every update it trains"), torch.no_grad():
        gen(PROMPTS[:1], noise, gen.sample_options().replace(eta=0.0, rollout=Rollout()))
    with pytest.raises(ValueError, match="needs the rollout of a sampling pass"):
        gen(PROMPTS[:1], noise, gen.sample_options().replace(eta=ETA, score_steps=(0,)))
    frozen = StableDiffusion(model=tiny_sd, training="noise")
    frozen.setup(PROMPTS[:1], 0)
    with pytest.raises(UserError, match="with training = 'noise' nothing it reaches is trained"):
        frozen(PROMPTS[:1], noise, frozen.sample_options().replace(eta=ETA, rollout=Rollout(), score_steps=(0,)))


def test_the_kl_to_the_reference_is_that_of_the_ddim_posteriors_of_the_trained_and_the_base_unet(tiny_sd):
    """forward(score_reference=True) gives, besides log p, KL(p_theta || p_theta_0) of each update per element. The
    independent computation: DDIMScheduler.step means of the LoRA-trained UNet and of a base UNet loaded afresh from
    the model folder (no adapters anywhere), torch.distributions' KL of the two Gaussians. At theta_0 it is 0."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipeline

    untrained = StableDiffusion(model=tiny_sd, lora_rank=4)
    untrained.setup(PROMPTS, 0)
    gen = build(tiny_sd, move=1.0)
    noise = torch.randn((len(PROMPTS), *gen.noise_shape()), generator=torch.Generator().manual_seed(3))
    rollout = Rollout()
    options = gen.sample_options().replace(eta=ETA, rollout=rollout)
    with torch.no_grad():
        gen(PROMPTS, noise, options)
    log_p, kl = gen(PROMPTS, noise, options.replace(score_steps=(0, 2), score_reference=True))
    assert torch.equal(log_p.detach(), torch.stack(rollout.log_probs, 1)[:, [0, 2]]) and kl.shape == (3, 2)
    _, kl_start = untrained(PROMPTS, noise, options.replace(score_steps=(0, 2), score_reference=True))
    assert torch.equal(kl_start, torch.zeros_like(kl_start))  # LoRA's B = 0: the model is theta_0

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    scheduler = DDIMScheduler.from_config(gen.export_scheduler().config)
    scheduler.set_timesteps(4)
    cond = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    for j, k in enumerate((0, 2)):
        t, s = scheduler.timesteps[k], scheduler.timesteps[k + 1]
        x_t = rollout.trajectory[k]
        with torch.no_grad():
            means = [scheduler.step(unet(x_t, t, encoder_hidden_states=cond).sample, t, x_t, eta=ETA,
                                    variance_noise=torch.zeros_like(x_t)).prev_sample.double() for unet in (gen.unet, base)]
        std = ETA * scheduler._get_variance(t, s).double().sqrt()
        expected = torch.distributions.kl_divergence(*(torch.distributions.Normal(m, std) for m in means)).flatten(1).mean(1)
        # float32 means, each about 1e-6 of its size off: their difference d is off by about 2e-6 (1 + |mean|), so
        # KL = mean d^2 / (2 std^2) by about mean 2 |d| 2e-6 (1 + |mean|) / (2 std^2)
        d = (means[0] - means[1]).abs()
        tol = (4e-6 * d * (1 + means[0].abs()) / (2 * std**2)).flatten(1).mean(1).max().item() + 1e-12
        assert expected.min() > 100 * tol  # a KL far above the rounding: the adapters moved the model
        torch.testing.assert_close(kl[:, j].detach(), expected, rtol=0, atol=tol)
    kl.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in gen.named_parameters() if "lora_" in n)


def test_sd3_with_flow_grpos_sde_samples_and_scores_its_gaussian_steps(tmp_path):
    """stochastic_update = 'flow_sde' on a tiny SD3: each recorded log p(x_s | x_t) is the density of Flow-GRPO's SDE
    step computed here from the pipeline's parts (its prompt encoding, the transformer's velocity, the scheduler's
    shifted sigmas), and recomputes bit for bit; at eta = 0 the images are the DDIM form's (both are Euler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    folder = str(save_tiny_sd3(tmp_path / "sd3"))
    gen = StableDiffusion3(model=folder, num_steps=3, lora_rank=4, stochastic_update="flow_sde")
    gen.setup(PROMPTS, 0)
    noise = torch.randn((len(PROMPTS), *gen.noise_shape()), generator=torch.Generator().manual_seed(4))
    rollout = Rollout()
    options = gen.sample_options().replace(eta=ETA, rollout=rollout)
    with torch.no_grad():
        gen(PROMPTS, noise, options)
    recorded = torch.stack(rollout.log_probs, 1)
    assert torch.equal(gen(PROMPTS, noise, options.replace(score_steps=(0, 1))).detach(), recorded)

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3, sigmas=[1.0, 2 / 3, 1 / 3])
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    sig = scheduler.sigmas.double()
    for k in range(2):
        x_t, x_s = rollout.trajectory[k], rollout.trajectory[k + 1]
        with torch.no_grad():
            v = gen.transformer(hidden_states=x_t, timestep=scheduler.timesteps[k].expand(3), encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0].double()
        t, s, x = sig[k], sig[k + 1], x_t.double()
        var = ETA**2 * t / (1 - (sig[1] if t == 1 else t))
        mean = x + (v + var / (2 * t) * (x + (1 - t) * v)) * (s - t)
        std = torch.sqrt(var * (t - s))
        expected = torch.distributions.Normal(mean, std).log_prob(x_s.double()).flatten(1).sum(1)
        z = (x_s.double() - mean) / std
        tol = 4e-6 * (z.abs() * (1 + mean.abs()) / std).flatten(1).sum(1).max().item()
        torch.testing.assert_close(recorded[:, k], expected, rtol=0, atol=tol)

    ddim = StableDiffusion3(model=folder, num_steps=3, lora_rank=4)
    ddim.setup(PROMPTS, 0)
    with torch.no_grad():
        a, b = (g(PROMPTS, noise, g.sample_options()) for g in (gen, ddim))
        c = gen(PROMPTS, noise, gen.sample_options().replace(eta=ETA))
        d = ddim(PROMPTS, noise, ddim.sample_options().replace(eta=ETA))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (c - d).abs().max() > 1e-3  # the two stochastic updates differ
