"""The template generator against its family's own diffusers pipeline, on a tiny random model built offline.

Copy these tests with the template: the first one is the exactness test every
family needs (at eta = 0 and the pipeline's schedule, the generator's images
are the pipeline's, to float32 rounding).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# Inside rewardkit's repository the template is not installed (tests/test_generator_template.py
# installs a copy and runs these tests there); in your copy, once installed, this always imports.
MyGenerator = pytest.importorskip("rewardkit_mygenerator", reason="the template package is not installed").MyGenerator

PROMPTS = ["a red cat", "a photo of a dog"]
SIZE = {"height": 16, "width": 16, "max_sequence_length": 16}  # the tiny model's (the pipeline's defaults: 1024 px, 512 tokens)


def tiny_pipeline():
    """A ChromaPipeline from small configs: 1 double + 1 single stream block, 1-level VAE, 2-layer T5."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)
    text_encoder = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # as Chroma1-HD's
    return ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "chroma"
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


def build(model, **options):
    gen = MyGenerator(model=model, **SIZE, **options)
    gen.setup(PROMPTS, 0)
    return gen


def packed(noise):
    from diffusers import ChromaPipeline

    return ChromaPipeline._pack_latents(noise, *noise.shape)  # the pipeline takes its latents packed


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_matches_the_familys_pipeline(model, guidance):
    from diffusers import ChromaPipeline

    gen = build(model, guidance_scale=guidance, negative_prompt="blurry", num_steps=3)
    noise = torch.randn((2, *gen.noise_shape()), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())
    pipe = ChromaPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    negative = ["blurry"] * 2 if guidance != 1 else None
    ref = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=3, guidance_scale=guidance, latents=packed(noise),
               output_type="pt", **SIZE).images
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.std() > 0.01  # not a constant image that would match anything


@pytest.mark.parametrize("training,dtype", [("lora", "float32"), ("full", "bfloat16")])  # bf16 frozen parts, a float32 transformer
def test_gradients_reach_the_trained_weights(model, training, dtype):
    gen = build(model, training=training, lora_rank=4, num_steps=2, eta=0.5, weights_dtype=dtype)
    with torch.no_grad():  # LoRA B starts at 0, which hides A's gradient: move off it
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    noise = torch.randn((2, *gen.noise_shape()), generator=torch.Generator().manual_seed(1))
    images = gen(PROMPTS, noise, gen.sample_options())
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    trained = [p for p in gen.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert sum(bool(p.grad.abs().sum() > 0) for p in trained) >= 0.9 * len(trained)
