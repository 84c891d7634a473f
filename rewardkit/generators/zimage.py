"""`zimage`: a K-step sampler on a ZImagePipeline: Z-Image-Turbo and Z-Image (Tongyi-MAI, November 2025).

Z-Image is a 6B single-stream DiT (text and image tokens in one sequence)
with a Qwen3-4B language model as its text encoder and FLUX.1's VAE;
Z-Image-Turbo is its few-step (8 network calls) distilled release, under
Apache-2.0. The flow-matching schedule is rewardkit.generators.flow_matching
(Turbo's scheduler: static shift 3). What is Z-Image's own:

- Text: each prompt, put in the Qwen chat template, is encoded by the language
  model (its second-to-last hidden states) and only its real tokens reach the
  transformer: a list of sequences of different lengths. rewardkit keeps them
  padded to max_sequence_length with their lengths (so that the prompt cache
  can stack them) and cuts them back for the transformer.
- The transformer takes a list of (C, 1, H, W) latents and the time as
  progress (1000 - t) / 1000, and predicts minus the velocity.
- Classifier-free guidance is written cond + s (cond - uncond) in the pipeline:
  its guidance_scale s is rewardkit's guidance_scale - 1 (Turbo: 0, unguided;
  rewardkit's 1). `cfg_normalization` and `cfg_truncation` are the pipeline's.
"""

from __future__ import annotations

import torch
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator

from rewardkit.errors import UserError
from rewardkit.generators.diffusion import FSDP_BLOCKS
from rewardkit.generators.flow_matching import FlowMatchingGenerator, FlowMatchingOptions


class ZImageOptions(FlowMatchingOptions):
    max_sequence_length: PositiveInt = 512
    """Prompt length in tokens, chat template included (ZImagePipeline's default; the transformer's rotary table
    bounds it: 1,504 tokens for the published model)."""
    cfg_normalization: NonNegativeFloat = 0.0
    """With c > 0, a guided velocity longer than c times the conditional one is scaled back to that length (per image,
    the pipeline's cfg_normalization); 0: off."""
    cfg_truncation: float = Field(default=1.0, ge=0, le=1)
    """Guide only the steps whose progress 1 - t is at most this (the pipeline's cfg_truncation); 1: every step."""

    @field_validator("guidance_scale")
    @classmethod
    def _expressible(cls, v):
        if v < 1:
            raise ValueError("must be at least 1: ZImagePipeline guides only with its guidance_scale (rewardkit's - 1) "
                             "above 0, and 1 is unguided, as Z-Image-Turbo is sampled")
        return v


class ZImage(FlowMatchingGenerator):
    name = "zimage"
    Options = ZImageOptions
    pipeline_class = "ZImagePipeline"
    supported_pipelines = ("ZImagePipeline",)
    denoiser_name = "transformer"
    fsdp_blocks = FSDP_BLOCKS + ("ZImageTransformerBlock", "Qwen3DecoderLayer")
    shift_defaults = FlowMatchingGenerator.shift_defaults | {"max_shift": 1.15}  # ZImagePipeline's

    def _check_pipeline(self, pipe) -> None:
        super()._check_pipeline(pipe)
        # text positions 1 .. L rounded up to the transformer's 32-token blocks, then the image's: all in the rotary table
        L, positions = self.options.max_sequence_length, pipe.transformer.config.axes_lens[0]
        if -(-L // 32) * 32 + 1 >= positions:
            raise UserError(f"generator.max_sequence_length = {L}: this transformer's rotary table holds {positions} text "
                            f"positions; give at most {(positions - 2) // 32 * 32}")

    def _patch_size(self) -> int:
        return self.pipe.transformer.config.all_patch_size[0]

    def _native_size(self) -> int:
        return 1024  # ZImagePipeline's default height and width

    def sampling_settings(self) -> dict:
        return super().sampling_settings() | {
            "max_sequence_length": self.options.max_sequence_length,
            "cfg_normalization": self.options.cfg_normalization,
            "cfg_truncation": self.options.cfg_truncation,
        }

    def pipeline_call(self) -> dict:
        call = super().pipeline_call() | {"max_sequence_length": self.options.max_sequence_length}
        call["guidance_scale"] = self.options.guidance_scale - 1  # the pipeline's cond + s (cond - uncond)
        if self.options.guidance_scale != 1:
            call |= {"cfg_normalization": self.options.cfg_normalization, "cfg_truncation": self.options.cfg_truncation}
        return call

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        rows = [*negative, *prompts]
        # the pipeline's own encoding (chat template, padding to max_sequence_length, the real tokens' hidden states);
        # a copy of the list: the pipeline rewrites the one it is given
        embeds, _ = self.pipe.encode_prompt(list(rows), device=device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.options.max_sequence_length)
        lengths = torch.tensor([len(e) for e in embeds], device=device)
        padded = torch.zeros(len(embeds), self.options.max_sequence_length, embeds[0].shape[-1], device=device, dtype=self.denoiser_dtype)
        for i, e in enumerate(embeds):
            padded[i, : len(e)] = e
        return padded, lengths

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, lengths = cond
        captions = [e[:n] for e, n in zip(embeds, lengths.tolist())]
        latents = list(self._denoiser_input(x).unsqueeze(2).unbind(0))  # (C, 1, H, W): one frame
        out = self._call_denoiser(base, latents, (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # the transformer predicts minus the velocity

    def _guided_at(self, schedule, k):
        return float((1000 - schedule["timesteps"][k]) / 1000) <= self.options.cfg_truncation  # the pipeline's t_norm: 1 - t

    def _guide(self, uncond, cond):
        guided = super()._guide(uncond, cond)
        c = self.options.cfg_normalization
        if c > 0:
            dims = tuple(range(1, cond.dim()))
            limit = c * torch.linalg.vector_norm(cond, dim=dims, keepdim=True)
            norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            guided = torch.where(norm > limit, guided * (limit / norm), guided)
        return guided
