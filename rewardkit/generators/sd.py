"""`sd`: a K-step sampler on a StableDiffusionPipeline (SD 1.x / 2.x and fine-tunes).

eps- and v-prediction UNets. The schedule is the model's own noise schedule
(alpha-bar from its scheduler config); the K timesteps are evenly spaced
"trailing" ones by default (K = 4: 999, 749, 499, 249), so the first step
starts from (almost) pure noise, as it does at inference. The update is R0's
DDIM form (rewardkit.sampler). With eta = 0 this is diffusers'
DDIMScheduler with timestep_spacing="trailing" and set_alpha_to_one=True,
which is the scheduler an exported pipeline carries.
"""

from __future__ import annotations

import torch
from pydantic import field_validator

from rewardkit.errors import UserError
from rewardkit.generators.diffusion import DiffusionGenerator, DiffusionOptions

PREDICTION_TYPES = ("epsilon", "v_prediction")


class SDOptions(DiffusionOptions):
    timesteps: list[int] | None = None
    """The K training-scale timesteps (0..T-1), strictly decreasing; default: evenly spaced, trailing."""

    @field_validator("timesteps")
    @classmethod
    def _decreasing(cls, v):
        if v is not None and (not v or any(a <= b for a, b in zip(v, v[1:])) or v[-1] < 0):
            raise ValueError("timesteps must be a non-empty, strictly decreasing list of non-negative integers")
        return v


class StableDiffusion(DiffusionGenerator):
    name = "sd"
    Options = SDOptions
    pipeline_class = "StableDiffusionPipeline"
    supported_pipelines = ("StableDiffusionPipeline",)
    denoiser_name = "unet"

    def _load_kwargs(self) -> dict:
        # The safety checker is an output filter, not part of the sampler: not loaded.
        return {"safety_checker": None, "requires_safety_checker": False}

    def _check_pipeline(self, pipe) -> None:
        from diffusers import DDIMScheduler

        if type(pipe).__name__ not in self.supported_pipelines:
            self._check_class(type(pipe).__name__)
        kind = pipe.scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise UserError(
                f"generator.model {self.options.model!r} predicts {kind!r}; the sd generator supports prediction types "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        self.prediction_type = kind
        # alpha-bar of the model's training schedule, whatever scheduler class it ships with.
        self.train_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        T = self.train_scheduler.config.num_train_timesteps
        ts = self.options.timesteps
        if ts is not None and ts[0] >= T:
            raise UserError(f"generator.timesteps must be below num_train_timesteps = {T}; got {ts}")
        if ts is not None and len(ts) != self.options.num_steps:
            raise UserError(f"generator.timesteps has {len(ts)} entries but generator.num_steps = {self.options.num_steps}")

    def timesteps(self, steps: int) -> list[int]:
        """The K timesteps: the recipe's, or evenly spaced trailing ones (diffusers' formula)."""
        if self.options.timesteps is not None:
            if steps != len(self.options.timesteps):
                raise UserError(f"{steps} sampler steps asked for, but generator.timesteps lists {len(self.options.timesteps)}")
            return list(self.options.timesteps)
        T = self.train_scheduler.config.num_train_timesteps
        return [int(round(T - k * T / steps)) - 1 for k in range(steps)]

    def schedule(self, steps: int, device) -> dict[str, torch.Tensor]:
        t = torch.tensor(self.timesteps(steps), dtype=torch.long)
        abar = self.train_scheduler.alphas_cumprod[t].float()
        return {"timesteps": t.to(device), "alpha": (abar**0.5).to(device), "sigma": ((1 - abar) ** 0.5).to(device)}

    def noise_levels(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Levels u in [0, 1] of the training schedule (0: clean, 1: its noisiest timestep T - 1), as `schedule` gives them."""
        T = self.train_scheduler.config.num_train_timesteps
        t = (u.float().cpu() * (T - 1)).round().long()
        abar = self.train_scheduler.alphas_cumprod[t].float()
        return {"timesteps": t.to(u.device), "alpha": (abar**0.5).to(u.device), "sigma": ((1 - abar) ** 0.5).to(u.device)}

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        cond, uncond = self.pipe.encode_prompt(prompts, device, 1, bool(negative), negative_prompt=negative or None)
        return self._guided_rows((cond,), (uncond,) if negative else None)[0]

    control = None  # a rewardkit.controlnet.Control while sampling with a ControlNet (`rewardkit sample --controlnet`)

    def _network(self, x, timesteps, cond, base: bool = False):
        x = self._denoiser_input(x)
        extra = self.control.residuals(x, timesteps, cond) if self.control is not None else {}
        return self._call_denoiser(base, x, timesteps, encoder_hidden_states=cond, return_dict=False, **extra)[0].float()

    def _x0_eps(self, x, out, alpha, sigma):
        if self.prediction_type == "v_prediction":
            return alpha * x - sigma * out, sigma * x + alpha * out
        return (x - sigma * out) / alpha, out

    def _latents_to_vae(self, latents):
        return latents / self.vae.config.scaling_factor

    def _vae_to_latents(self, z):
        return z * self.vae.config.scaling_factor

    def export_scheduler(self):
        """DDIM whose default `num_inference_steps=K` timesteps and final step match this sampler."""
        from diffusers import DDIMScheduler

        if self.options.timesteps is not None:
            import logging

            logging.getLogger("rewardkit").warning(
                "custom generator.timesteps: diffusers' DDIMScheduler cannot take them; the exported scheduler "
                "reproduces the evenly spaced trailing schedule only (see rewardkit_export.json for the timesteps)"
            )
        return DDIMScheduler.from_config(
            self.pipe.scheduler.config,
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            steps_offset=0,
            clip_sample=False,
            thresholding=False,
            prediction_type=self.prediction_type,
        )
