"""`sd3`: a K-step sampler on a StableDiffusion3Pipeline (MMDiT, rectified flow).

x_t = (1 - t) * x0 + t * eps and the network predicts the velocity
v = eps - x0, so x0_hat = x_t - t * v and eps_hat = x_t + (1 - t) * v. The K
noise levels are computed by the model's own FlowMatchEulerDiscreteScheduler
from evenly spaced trailing sigmas 1, (K-1)/K, ..., 1/K (or the recipe's
`sigmas`), time-shifted by the scheduler's `shift` as SD3 was trained; the
pipeline given `sigmas=` computes the same levels. With
eta = 0 the update is diffusers' flow-match Euler step.

The T5 encoder (4.7B parameters in SD3) is optional: with text_encoder_3 =
false it is not loaded and its embeddings are zeros, as diffusers allows.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt, field_validator

from rewardkit.errors import UserError
from rewardkit.generators.diffusion import DiffusionGenerator, DiffusionOptions


class SD3Options(DiffusionOptions):
    sigmas: list[float] | None = None
    """K unshifted noise levels in (0, 1], decreasing, as diffusers' `sigmas=` argument: the
    scheduler's shift is applied to them. Default: evenly spaced trailing, 1, (K-1)/K, ..., 1/K."""
    text_encoder_3: bool = True
    """Load the T5 encoder; false drops it to save memory (its embeddings become zeros)."""
    max_sequence_length: PositiveInt = 256
    """T5 prompt length in tokens."""

    @field_validator("sigmas")
    @classmethod
    def _decreasing(cls, v):
        if v is not None and (not v or any(a <= b for a, b in zip(v, v[1:])) or v[-1] <= 0 or v[0] > 1):
            raise ValueError("sigmas must be a non-empty, strictly decreasing list in (0, 1]")
        return v


class StableDiffusion3(DiffusionGenerator):
    name = "sd3"
    Options = SD3Options
    pipeline_class = "StableDiffusion3Pipeline"
    supported_pipelines = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    def _load_kwargs(self) -> dict:
        return {} if self.options.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}

    def _patch_size(self) -> int:
        return self.pipe.transformer.config.patch_size

    def _check_pipeline(self, pipe) -> None:
        if type(pipe).__name__ not in self.supported_pipelines:
            self._check_class(type(pipe).__name__)
        kind = type(pipe.scheduler).__name__
        if kind != "FlowMatchEulerDiscreteScheduler":
            raise UserError(
                f"generator.model {self.options.model!r} ships a {kind}; the sd3 generator supports flow-matching "
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

    def sampling_settings(self) -> dict:
        # the text conditioning too: without T5 its embeddings are zeros (load the pipeline with text_encoder_3=None),
        # and the T5 prompt length changes the images (pass max_sequence_length to the pipeline call)
        return super().sampling_settings() | {
            "sigmas": self.unshifted_sigmas(self.options.num_steps),
            "text_encoder_3": self.options.text_encoder_3,
            "max_sequence_length": self.options.max_sequence_length,
        }

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

    def _scheduler(self):
        """A fresh copy of the model's scheduler (it computes the levels exactly as the pipeline does), and its set_timesteps
        arguments at this image size (the shift `mu` of dynamically shifted models)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = self.noise_shape()
            p = self._patch_size()
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                (h // p) * (w // p), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16)
            )
        return scheduler, kwargs

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=bool(negative),
            negative_prompt=negative or None, max_sequence_length=self.options.max_sequence_length,
        )
        if negative:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        dtype = self.denoiser_dtype  # a float32 (fully trained) transformer next to bf16 text encoders
        return embeds.to(dtype), pooled.to(dtype)

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, pooled = cond
        return self._call_denoiser(
            base, hidden_states=self._denoiser_input(x), timestep=timesteps, encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0].float()

    def _x0_eps(self, x, v, alpha, sigma):
        return x - sigma * v, x + alpha * v  # alpha = 1 - t, sigma = t

    def _latents_to_vae(self, latents):
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor

    def _vae_to_latents(self, z):
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def export_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
