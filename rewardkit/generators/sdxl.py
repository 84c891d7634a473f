"""`sdxl`: a K-step sampler on a StableDiffusionXLPipeline (SDXL base 1.0 and its fine-tunes, eps or v prediction).

The schedule and the update are the `sd` generator's (rewardkit.generators.sd:
the model's alpha-bar, evenly spaced trailing timesteps, R0's DDIM form;
eta = 0 is diffusers' trailing DDIM). What is SDXL's own is the conditioning:

- two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), their penultimate
  hidden states concatenated, and the second one's pooled projection;
- size and crop micro-conditioning: `time_ids` = (original size, crop
  top-left, target size), the pipeline's `original_size`,
  `crops_coords_top_left` and (height, width);
- the unconditional prompt of guidance: with SDXL's
  `force_zeros_for_empty_prompt` (the published config) an empty negative
  prompt is the zero embedding, as the pipeline makes it when called without
  one.
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeInt, PositiveInt

from rewardkit.generators.sd import SDOptions, StableDiffusion


class SDXLOptions(SDOptions):
    original_size: tuple[PositiveInt, PositiveInt] | None = None
    """Micro-conditioning: the (height, width) the model is told the training image had; default (height, width)."""
    crop_top_left: tuple[NonNegativeInt, NonNegativeInt] = (0, 0)
    """Micro-conditioning: the crop's top-left corner the model is told of (the pipeline's crops_coords_top_left)."""


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    Options = SDXLOptions
    pipeline_class = "StableDiffusionXLPipeline"
    supported_pipelines = ("StableDiffusionXLPipeline",)

    def _load_kwargs(self) -> dict:
        return {"add_watermarker": False}  # the invisible watermark is an output filter, not part of the sampler

    def setup(self, prompts, seed) -> None:
        super().setup(prompts, seed)
        if self.vae_dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            # SDXL's VAE overflows in float16 (its config says force_upcast; the pipeline decodes in float32 too)
            self.vae.float()
            self.vae_dtype = torch.float32

    def micro_conditioning(self) -> list[int]:
        """time_ids: original size + crop top-left + target size, as the pipeline's _get_add_time_ids lists them."""
        original = self.options.original_size or (self.height, self.width)
        return [*original, *self.options.crop_top_left, self.height, self.width]

    def sampling_settings(self) -> dict:
        return super().sampling_settings() | {
            "original_size": list(self.options.original_size or (self.height, self.width)),
            "crops_coords_top_left": list(self.options.crop_top_left),
        }

    def pipeline_call(self) -> dict:
        call = super().pipeline_call() | {"original_size": tuple(self.micro_conditioning()[:2]),
                                          "crops_coords_top_left": tuple(self.options.crop_top_left)}
        if self._zero_negative(call.get("negative_prompt")):
            del call["negative_prompt"]  # the pipeline's zeros come with no negative prompt given
        return call

    def _zero_negative(self, negative: str) -> bool:
        return negative == "" and bool(self.pipe.config.get("force_zeros_for_empty_prompt", False))

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        zeros = bool(negative) and all(self._zero_negative(n) for n in negative)
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=bool(negative),
            negative_prompt=None if zeros else (negative or None),
        )
        return self._guided_rows((embeds, pooled), (neg_embeds, neg_pooled) if negative else None)

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, pooled = cond
        time_ids = torch.tensor([self.micro_conditioning()], dtype=embeds.dtype, device=x.device).expand(x.shape[0], -1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        x = self._denoiser_input(x)
        extra = self.control.residuals(x, timesteps, embeds, added) if self.control is not None else {}
        return self._call_denoiser(base, x, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False, **extra)[0].float()
