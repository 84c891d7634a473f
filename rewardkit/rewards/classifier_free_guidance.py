"""`classifier_free_guidance`: the base model's guidance direction as one more reward gradient.

Classifier-free guidance read as an implicit classifier (Ho & Salimans 2022;
Diff-Instruct++ trains a one-step generator with it): the denoiser's
conditional and unconditional predictions give

    grad_{x_t} log p(c | x_t) = -(eps(x_t, c) - eps(x_t, negative)) / sigma_t

For each generated image this reward encodes it with the generator's VAE
(z0, the posterior's mean), noises it to a level u ~ U[levels] of the
model's training schedule (x_t = alpha_u z0 + sigma_u eps), takes the
frozen base model's direction there, and pulls alpha_u times it back to the
image through the encoder: the image gradient of E_u[log p(c | x_t)]. The
optimizer then normalizes and weights it like any other reward's gradient.
It has no score, so it trains and never evaluates.

The base model is the generator's own denoiser, run as theta_0: its LoRA
adapters disabled, or (full fine-tuning) with the reference weights that
weight L2 keeps (taken here, once, if no weight L2 is configured: the one
copy of the trainable weights weight L2 would hold). No second denoiser is
built. Each image's level and noise are drawn from a generator seeded by a
hash of the image, so they do not depend on the batch, the number of
processes, or anything else that uses torch's RNG (and a resumed run draws
what the uninterrupted one would). Not yet under FSDP (refused).
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from rewardkit.distributed import fsdp_wrapped
from rewardkit.errors import UserError
from rewardkit.rewards.base import Reward, RewardOptions
from rewardkit.sampler import rng_of


class ClassifierFreeGuidanceOptions(RewardOptions):
    levels: list[float] = Field(default_factory=lambda: [0.02, 0.98])
    """[low, high]: the noise level is drawn uniformly from this range of the training schedule
    (0: clean, 1: its noisiest level; for flow matching, before the model's time shift)."""
    negative_prompt: str | None = None
    """The unconditional prompt (default: the generator's negative_prompt)."""

    @field_validator("levels")
    @classmethod
    def _range(cls, v):
        if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"levels must be [low, high] with 0 < low <= high <= 1; got {v}")
        return v


class ClassifierFreeGuidance(Reward):
    """The frozen base model's classifier-free guidance direction, as an image gradient (no score)."""

    name = "classifier_free_guidance"
    Options = ClassifierFreeGuidanceOptions

    @classmethod
    def check(cls, options, generator, where: str) -> list[str]:
        from rewardkit.generators.diffusion import DiffusionGenerator

        if where.startswith("eval"):
            return [f"{where}: classifier_free_guidance gives an image gradient, not a score, so it cannot evaluate; use it under [rewards]"]
        if options.estimator == "score_function":
            return [f"{where}.estimator: classifier_free_guidance gives an image gradient, not a score, so it trains pathwise only"]
        if not issubclass(generator.cls, DiffusionGenerator):
            return [f"{where}: classifier_free_guidance needs a diffusion generator (sd, sd3, testbed) whose base model guides; '{generator.cls.name}' has none"]
        own = options.negative_prompt
        if getattr(generator.options, "text_encoders", "keep") == "free" and own is not None and own != generator.options.negative_prompt:
            return [f"{where}.negative_prompt: the generator frees its text encoders (generator.text_encoders = 'free') after encoding the run's "
                    "prompts and its own negative_prompt; leave this unset (the generator's is used) or keep the encoders"]
        missing = [m for m in ("noise_levels", "_network", "_x0_eps", "_vae_to_latents") if getattr(generator.cls, m) is getattr(DiffusionGenerator, m)]
        if missing:
            return [f"{where}: generator '{generator.cls.name}' does not implement {', '.join(missing)}, which classifier_free_guidance needs (docs/plugin-api.md)"]
        return []

    def setup(self, generator) -> None:
        from rewardkit.generators.diffusion import DiffusionGenerator

        if not isinstance(generator, DiffusionGenerator):
            raise UserError(f"reward 'classifier_free_guidance' needs a diffusion generator whose base model guides; '{generator.name}' has none")
        if generator.options.training == "full" and generator._reference is None:
            generator.snapshot_reference()  # theta_0, as weight L2 keeps it (taken before any checkpoint loads)
        self._generator = (generator,)  # a tuple, not an attribute Module: the reward must not own, move or freeze it

    def forward(self, images, prompts):
        raise UserError("reward 'classifier_free_guidance' gives an image gradient, not a score: it trains, it does not score images")

    def score_and_gradient(self, images, prompts):
        if not hasattr(self, "_generator"):
            raise RuntimeError("classifier_free_guidance.setup(generator) was not called")
        (gen,) = self._generator
        if fsdp_wrapped(gen):
            raise UserError("reward 'classifier_free_guidance' does not run under FSDP yet (it would not see theta_0 there); use the 'ddp' accelerate config")
        low, high = self.options.levels
        negative = gen.options.negative_prompt if self.options.negative_prompt is None else self.options.negative_prompt
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            z0 = gen.encode(x)
            draws = [rng_of(image) for image in images]  # per image: independent of batch, processes and torch's RNG
            u = torch.stack([low + (high - low) * torch.rand((), generator=g) for g in draws]).to(z0.device)
            noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in draws]).to(z0.device)
            direction = gen.guidance_direction(z0.detach(), u, noise, prompts, negative)  # alpha_u included: d/d z0
            (g,) = torch.autograd.grad(z0, x, grad_outputs=direction)
        return None, g
