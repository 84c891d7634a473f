"""`flux`: a K-step sampler on a FluxPipeline: FLUX.1 [dev] and [schnell] (and fine-tunes of them).

The flow-matching schedule is rewardkit.generators.flow_matching: [dev]'s
scheduler shifts dynamically with the number of image tokens (its pipeline's
`calculate_shift`), [schnell]'s not at all. What is FLUX's own:

- Packed latents: the transformer sees 2x2 patches of the 16-channel latents
  as tokens (`pack` / `unpack`, diffusers' `_pack_latents` layout) with their
  row / column positions as rotary ids; the sampler, the noise and the VAE keep
  the unpacked (16, H/8, W/8) latents.
- Guidance embedding: [dev] is guidance-distilled, and its transformer takes
  the guidance scale as an input (`generator.guidance`, the pipeline's
  `guidance_scale`, default 3.5): one network call per step. rewardkit's
  `guidance_scale` is true classifier-free guidance on top (two calls per step,
  the pipeline's `true_cfg_scale` with `negative_prompt`).
- Text: T5 (text_encoder_2, `max_sequence_length` tokens) for the sequence and
  CLIP's pooled output for the vector conditioning.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveFloat

from rewardkit.errors import UserError
from rewardkit.generators.flow_matching import FlowMatchingGenerator, FlowMatchingOptions


class FluxOptions(FlowMatchingOptions):
    max_sequence_length: int = Field(default=512, ge=1, le=512)
    """T5 prompt length in tokens (FluxPipeline's default and its maximum; [schnell] was trained with 256)."""
    guidance: PositiveFloat | None = None
    """The embedded guidance of guidance-distilled models (FLUX.1 [dev]): default 3.5, as FluxPipeline's
    guidance_scale. Models without guidance embedding ([schnell]) refuse it."""


class PackedLatents:
    """What FLUX-like families share (mixed in before FlowMatchingGenerator): the transformer sees 2x2 latent patches
    packed as tokens, with rotary (row, column) ids; the pipeline has a fixed default size."""

    def _patch_size(self) -> int:
        return 2  # the 2x2 latent patches of one token

    def _native_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def noise_shape(self) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (self.transformer.config.in_channels // 4, self.height // f, self.width // f)

    @staticmethod
    def rotary_ids(text_tokens: int, h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids, image ids) for latents of h x w: text tokens at 0, image tokens at their (row, column) of the
        patch grid, as the pipelines' _prepare_latent_image_ids lay them out."""
        image_ids = torch.zeros(h // 2, w // 2, 3, device=device)
        image_ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
        image_ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
        return torch.zeros(text_tokens, 3, device=device, dtype=dtype), image_ids.reshape(-1, 3).to(dtype)


class Flux(PackedLatents, FlowMatchingGenerator):
    name = "flux"
    Options = FluxOptions
    pipeline_class = "FluxPipeline"
    supported_pipelines = ("FluxPipeline",)
    denoiser_name = "transformer"
    shift_defaults = FlowMatchingGenerator.shift_defaults | {"max_shift": 1.15}  # FluxPipeline's

    def _check_pipeline(self, pipe) -> None:
        super()._check_pipeline(pipe)
        embeds = pipe.transformer.config.guidance_embeds
        if self.options.guidance is not None and not embeds:
            raise UserError(
                f"generator.guidance = {self.options.guidance}: {self.options.model!r} has no guidance embedding (FLUX.1 [schnell] "
                "is not guidance-distilled); leave generator.guidance out, or use generator.guidance_scale for classifier-free guidance"
            )
        self.embedded_guidance = (3.5 if self.options.guidance is None else self.options.guidance) if embeds else None

    def sampling_settings(self) -> dict:
        # FluxPipeline(guidance_scale=embedded guidance, true_cfg_scale=guidance_scale, max_sequence_length=...)
        return super().sampling_settings() | {
            "embedded_guidance": self.embedded_guidance,
            "max_sequence_length": self.options.max_sequence_length,
        }

    def pipeline_call(self) -> dict:
        call = super().pipeline_call() | {"max_sequence_length": self.options.max_sequence_length}
        # FluxPipeline's guidance_scale is the embedded guidance; classifier-free guidance is its true_cfg_scale
        call["true_cfg_scale"] = call.pop("guidance_scale")
        if self.embedded_guidance is not None:
            call["guidance_scale"] = self.embedded_guidance
        return call

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        rows = [*negative, *prompts]  # [negative; prompts]: T5 and CLIP encode each prompt on its own
        embeds, pooled, _ = self.pipe.encode_prompt(rows, None, device=device, max_sequence_length=self.options.max_sequence_length)
        dtype = self.denoiser_dtype  # a float32 (fully trained) transformer next to bf16 text encoders
        return embeds.to(dtype), pooled.to(dtype)

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, pooled = cond
        b, _, h, w = x.shape
        text_ids, image_ids = self.rotary_ids(embeds.shape[1], h, w, x.device, embeds.dtype)
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((b,), self.embedded_guidance, device=x.device, dtype=torch.float32)
        out = self._call_denoiser(
            base, hidden_states=pack(self._denoiser_input(x)), timestep=timesteps / 1000, guidance=guidance,
            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        return unpack(out.float(), h, w)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, as diffusers' FluxPipeline._pack_latents lays them out."""
    from einops import rearrange

    return rearrange(latents, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from einops import rearrange

    return rearrange(tokens, "b (h w) (c p q) -> b c (h p) (w q)", h=h // 2, w=w // 2, p=2, q=2)
