"""rewardkit-mygenerator: a template generator plugin. Copy this folder, then rename (see README.md).

The example family is Chroma (diffusers' ChromaPipeline; lodestones/Chroma1-HD,
Apache-2.0): a FLUX.1-schnell-derived rectified-flow transformer conditioned
on T5 alone, with an attention mask over the prompt's tokens. It is a
complete plugin: R0's K-step sampler on the model, LoRA / full / noise
training, every option the built-in generators have, export to diffusers. A
family is three decisions:

1. the base class: `rewardkit.generators.flow_matching.FlowMatchingGenerator`
   for rectified-flow models (velocity, FlowMatchEulerDiscreteScheduler: the
   schedule, its shift and the export come with it), or
   `rewardkit.generators.sd.StableDiffusion` for models on a DDPM noise
   schedule (epsilon or v prediction, trailing DDIM);
2. the text conditioning: `_encode`, what the pipeline's encode_prompt gives,
   as a tensor or a tuple of tensors whose first dimension is the batch
   ([negative; prompts] under guidance); rewardkit caches it per prompt;
3. the network call: `_network`, the denoiser's raw output (float32) for
   latents x at `timesteps`, through `self._call_denoiser(base, ...)`.

docs/writing-a-generator-plugin.md in rewardkit walks through each.
"""

from __future__ import annotations

from pydantic import PositiveInt

import rewardkit
from rewardkit.generators.flow_matching import FlowMatchingGenerator, FlowMatchingOptions
from rewardkit.generators.flux import PackedLatents, pack, unpack

__version__ = "0.1.0"


class MyGeneratorOptions(FlowMatchingOptions):
    """Every key a recipe may set under [generator] (inherited: model, num_steps, eta, training, sigmas, ...)."""

    max_sequence_length: PositiveInt = 512
    """T5 prompt length in tokens (ChromaPipeline's default)."""


class MyGenerator(PackedLatents, FlowMatchingGenerator):  # packed 2x2 latent tokens, as FLUX
    name = "mygenerator"  # [generator] type = "mygenerator"
    Options = MyGeneratorOptions
    pipeline_class = "ChromaPipeline"  # the diffusers class that loads the model
    supported_pipelines = ("ChromaPipeline",)
    denoiser_name = "transformer"  # the pipeline component that is trained
    shift_defaults = FlowMatchingGenerator.shift_defaults | {"max_shift": 1.15}  # ChromaPipeline's, where a config has none
    fsdp_blocks = FlowMatchingGenerator.fsdp_blocks + ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")  # FSDP's shard units

    def pipeline_call(self) -> dict:
        # ChromaPipeline guides whenever guidance_scale > 1, with negative_prompt (default "")
        return super().pipeline_call() | {"max_sequence_length": self.options.max_sequence_length}

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        negative = self._negative_prompts(len(prompts)) if negative is None else negative
        embeds, _, mask, neg_embeds, _, neg_mask = self.pipe.encode_prompt(
            prompts, negative_prompt=negative or None, device=device, do_classifier_free_guidance=bool(negative),
            max_sequence_length=self.options.max_sequence_length,
        )
        # [negative; prompts] (the order the sampler's guidance expects), in the denoiser's dtype (the float mask too)
        return self._guided_rows((embeds, mask), (neg_embeds, neg_mask) if negative else None)

    def _network(self, x, timesteps, cond, base: bool = False):
        embeds, mask = cond
        b, _, h, w = x.shape
        text_ids, image_ids = self.rotary_ids(embeds.shape[1], h, w, x.device, embeds.dtype)
        out = self._call_denoiser(
            base, hidden_states=pack(self._denoiser_input(x)), timestep=timesteps / 1000, encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=image_ids,
            attention_mask=self.pipe._prepare_attention_mask(b, (h // 2) * (w // 2), embeds.dtype, mask), return_dict=False,
        )[0]
        return unpack(out.float(), h, w)


@rewardkit.hookimpl
def register_generators(register):
    register(MyGenerator)
