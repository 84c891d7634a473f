"""What the flow-matching generators (`sd3`, `flux`, `zimage`) share: the rectified-flow schedule on the model's own scheduler.

x_t = (1 - t) * x0 + t * eps and the network predicts the velocity
v = eps - x0, so x0_hat = x_t - t * v and eps_hat = x_t + (1 - t) * v. The K
noise levels are computed by the model's own FlowMatchEulerDiscreteScheduler
from evenly spaced trailing sigmas 1, (K-1)/K, ..., 1/K (or the recipe's
`sigmas`), time-shifted as the model was trained: by the scheduler's static
`shift` (SD3, FLUX.1 [schnell], Z-Image-Turbo) or, where the scheduler says
use_dynamic_shifting, by a shift that grows with the number of image tokens
(FLUX.1 [dev]: diffusers' `calculate_shift`). The pipelines given
`sigmas=` compute the same levels. With eta = 0 the update is diffusers'
flow-match Euler step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import field_validator

from rewardkit import sampler
from rewardkit.errors import UserError
from rewardkit.generators.diffusion import DiffusionGenerator, DiffusionOptions


class FlowMatchingOptions(DiffusionOptions):
    stochastic_update: Literal[sampler.UPDATES] = "ddim"
    """The update between steps where eta > 0: R0's DDIM form (the Gaussian posterior's noise scaled by eta), or
    'flow_sde', Flow-GRPO's SDE step (noise level eta). Both are the Euler step at eta = 0 and agree to first order
    in the step size (docs/methods.md)."""
    sigmas: list[float] | None = None
    """K unshifted noise levels in (0, 1], decreasing, as diffusers' `sigmas=` argument: the
    scheduler's shift is applied to them. Default: evenly spaced trailing, 1, (K-1)/K, ..., 1/K."""

    @field_validator("sigmas")
    @classmethod
    def _decreasing(cls, v):
        if v is not None and (not v or any(a <= b for a, b in zip(v, v[1:])) or v[-1] <= 0 or v[0] > 1):
            raise ValueError("sigmas must be a non-empty, strictly decreasing list in (0, 1]")
        return v


class FlowMatchingGenerator(DiffusionGenerator):
    """A K-step sampler on a flow-matching pipeline (velocity prediction, FlowMatchEulerDiscreteScheduler).

    Subclasses add the text conditioning (`_encode`, `_network`) and the family pipeline's `shift_defaults`
    (used where a scheduler config leaves them out)."""

    Options = FlowMatchingOptions
    # the family pipeline's defaults for scheduler configs that leave them out (StableDiffusion3Pipeline's)
    shift_defaults = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.16}

    def _check_pipeline(self, pipe) -> None:
        if type(pipe).__name__ not in self.supported_pipelines:
            self._check_class(type(pipe).__name__)
        kind = type(pipe.scheduler).__name__
        if kind != "FlowMatchEulerDiscreteScheduler":
            raise UserError(
                f"generator.model {self.options.model!r} ships a {kind}; the {self.name} generator supports flow-matching "
                "models with FlowMatchEulerDiscreteScheduler (velocity prediction)"
            )
        if self.options.sigmas is not None and len(self.options.sigmas) != self.options.num_steps:
            raise UserError(f"generator.sigmas has {len(self.options.sigmas)} entries but generator.num_steps = {self.options.num_steps}")

    def unshifted_sigmas(self, steps: int) -> list[float]:
        """The recipe's sigmas, or evenly spaced trailing ones: 1, (K-1)/K, ..., 1/K (before the shift).

        Trailing, like the sd generator's timesteps: no step is spent at a level
        that is already almost clean. Pass them as `sigmas=` to diffusers.
        """
        if self.options.sigmas is not None:
            if steps != len(self.options.sigmas):
                raise UserError(f"{steps} sampler steps asked for, but generator.sigmas lists {len(self.options.sigmas)}")
            return list(self.options.sigmas)
        return [(steps - k) / steps for k in range(steps)]

    def stochastic_update(self) -> str:
        return self.options.stochastic_update

    def sampling_settings(self) -> dict:
        return super().sampling_settings() | {"sigmas": self.unshifted_sigmas(self.options.num_steps)}

    def pipeline_call(self) -> dict:
        return super().pipeline_call() | {"sigmas": self.unshifted_sigmas(self.options.num_steps)}

    def schedule(self, steps: int, device) -> dict[str, torch.Tensor]:
        scheduler, kwargs = self._scheduler()
        scheduler.set_timesteps(steps, sigmas=self.unshifted_sigmas(steps), **kwargs)
        t = scheduler.sigmas[:steps].float()
        return {"timesteps": scheduler.timesteps[:steps].float().to(device), "alpha": (1 - t).to(device), "sigma": t.to(device)}

    def noise_levels(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Levels u in [0, 1] of the training schedule (unshifted sigmas), time-shifted as the model was trained
        (the static or dynamic shift; a scheduler's set-wide stretches, shift_terminal and Karras-type spacings, do not
        apply to single levels)."""
        scheduler, kwargs = self._scheduler()
        device, u = u.device, u.float().cpu()
        t = scheduler.time_shift(kwargs["mu"], 1.0, u) if "mu" in kwargs else scheduler.shift * u / (1 + (scheduler.shift - 1) * u)
        T = scheduler.config.num_train_timesteps
        return {"timesteps": (t * T).to(device), "alpha": (1 - t).to(device), "sigma": t.to(device)}

    def image_tokens(self) -> int:
        """The number of image tokens the transformer sees at this size (what the dynamic shift depends on)."""
        _, h, w = self.noise_shape()
        p = self._patch_size()
        return (h // p) * (w // p)

    def _scheduler(self):
        """A fresh copy of the model's scheduler (it computes the levels exactly as the pipeline does), and its set_timesteps
        arguments at this image size (the shift `mu` of dynamically shifted models)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift  # FLUX's is a copy

            c = {k: scheduler.config.get(k, v) for k, v in self.shift_defaults.items()}
            kwargs["mu"] = calculate_shift(self.image_tokens(), c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
        return scheduler, kwargs

    @staticmethod
    def edit_steps(steps: int, strength: float) -> int:
        """K - int(K - K * strength), as diffusers' SD3 / FLUX img2img count them (K = 4, strength 0.6: 3 steps)."""
        return steps - int(steps - steps * strength)

    def _x0_eps(self, x, v, alpha, sigma):
        return x - sigma * v, x + alpha * v  # alpha = 1 - t, sigma = t

    def _latents_to_vae(self, latents):
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor

    def _vae_to_latents(self, z):
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def export_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
