"""`sd3`: a K-step sampler on a StableDiffusion3Pipeline (MMDiT, rectified flow): SD3 Medium, SD3.5 Medium / Large.

The flow-matching schedule is rewardkit.generators.flow_matching. SD3.5
changes nothing here: its transformers are SD3Transformer2DModel with their
own configs (SD3.5 Medium: MMDiT-X, dual attention in the first 13 layers,
QK normalization; Large: 38 layers of width 2432) behind the same pipeline.

The T5 encoder (4.7B parameters) is optional: with text_encoder_3 = false it
is not loaded and its embeddings are zeros, as diffusers allows.
"""

from __future__ import annotations

from pydantic import Field

from rewardkit.generators.flow_matching import FlowMatchingGenerator, FlowMatchingOptions


class SD3Options(FlowMatchingOptions):
    text_encoder_3: bool = True
    """Load the T5 encoder; false drops it to save memory (its embeddings become zeros)."""
    max_sequence_length: int = Field(default=256, ge=1, le=512)
    """T5 prompt length in tokens (the pipeline refuses more than 512)."""


class StableDiffusion3(FlowMatchingGenerator):
    name = "sd3"
    Options = SD3Options
    pipeline_class = "StableDiffusion3Pipeline"
    supported_pipelines = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"

    def _load_kwargs(self) -> dict:
        return {} if self.options.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}

    def _patch_size(self) -> int:
        return self.pipe.transformer.config.patch_size

    def sampling_settings(self) -> dict:
        # the text conditioning too: without T5 its embeddings are zeros (load the pipeline with text_encoder_3=None),
        # and the T5 prompt length changes the images (pass max_sequence_length to the pipeline call)
        return super().sampling_settings() | {
            "text_encoder_3": self.options.text_encoder_3,
            "max_sequence_length": self.options.max_sequence_length,
        }

    def pipeline_call(self) -> dict:
        return super().pipeline_call() | {"max_sequence_length": self.options.max_sequence_length}

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
            prompts, None, None, device=device, do_classifier_free_guidance=bool(negative),
            negative_prompt=negative or None, max_sequence_length=self.options.max_sequence_length,
        )
        return self._guided_rows((embeds, pooled), (neg_embeds, neg_pooled) if negative else None)

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, pooled = cond
        return self._call_denoiser(
            base, hidden_states=self._denoiser_input(x), timestep=timesteps, encoder_hidden_states=embeds,
            pooled_projections=pooled, return_dict=False,
        )[0].float()
