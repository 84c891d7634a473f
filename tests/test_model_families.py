"""The model families beyond SD 1.x and SD3: SDXL, SD3.5, FLUX.1 and Z-Image, against their own diffusers pipelines.

At eta = 0 each generator's images are its family pipeline's, called as a
user would call it (tiny random models built from configs, offline); the
family's own conditioning (SDXL's micro-conditioning and zero unconditional
prompt, FLUX's embedded guidance and packed latents, Z-Image's prompts of
their own lengths and its guidance options) reaches the network; the
published architectures, built from bench/configs on the meta device, have
the published parameter counts. What every family shares (gradients in each
training mode, R0+, the prompt cache, a short run raising a reward) is in
test_sd_generators.py, parametrized over the families.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny, tiny_sd3_pipeline  # noqa: E402

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.generators.flux import Flux, pack  # noqa: E402
from rewardkit.generators.sd3 import StableDiffusion3  # noqa: E402
from rewardkit.generators.sdxl import StableDiffusionXL  # noqa: E402
from rewardkit.generators.zimage import ZImage  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]
CONFIGS = Path(__file__).parent.parent / "bench" / "configs"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {
        "sdxl": save_tiny("sdxl", root / "sdxl"),
        "sdxl_v": save_tiny("sdxl", root / "sdxl_v", prediction_type="v_prediction"),
        "flux_dev": save_tiny("flux", root / "flux_dev"),
        "flux_schnell": save_tiny("flux", root / "flux_schnell", guidance_embeds=False),
        "zimage": save_tiny("zimage", root / "zimage"),
    }
    tiny_sd3_pipeline(sd35=True).save_pretrained(root / "sd35")
    out["sd35"] = root / "sd35"
    return {k: str(v) for k, v in out.items()}


def build(cls, model, **options):
    gen = cls(model=model, **options)
    gen.setup(PROMPTS, 0)
    return gen


def noise_for(gen, seed=0):
    return torch.randn((len(PROMPTS), *gen.noise_shape()), generator=torch.Generator().manual_seed(seed))


def close(ours, ref):
    """Equal to float32 rounding: images in [0, 1] to 1e-5; latents to 1e-5 of their largest magnitude."""
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


# --- eta = 0: the families' own pipelines ------------------------------------------------------
@pytest.mark.parametrize("variant,guidance,negative", [("sdxl", 1.0, ""), ("sdxl", 3.0, ""), ("sdxl", 3.0, "blurry"), ("sdxl_v", 3.0, "")])
def test_sdxl_matches_its_pipeline(folders, variant, guidance, negative):
    """SDXL's pipeline with the exported trailing DDIM: guidance with the zero unconditional embedding (no negative
    prompt given, SDXL's force_zeros_for_empty_prompt) and with a real negative prompt; eps and v prediction."""
    from diffusers import StableDiffusionXLPipeline

    gen = build(StableDiffusionXL, folders[variant], guidance_scale=guidance, negative_prompt=negative)
    noise = noise_for(gen)
    with torch.no_grad():
        latents = gen.sample_latents(PROMPTS, noise, gen.sample_options())
        images = gen.decode(latents)
    pipe = StableDiffusionXLPipeline.from_pretrained(folders[variant])
    pipe.scheduler = gen.export_scheduler()
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=4, guidance_scale=guidance, negative_prompt=[negative] * 2 if negative else None,
                latents=noise, height=32, width=32)
    close(latents, pipe(PROMPTS, output_type="latent", **call).images)
    close(images, pipe(PROMPTS, output_type="pt", **call).images)
    assert images.std() > 0.01


def test_sdxl_micro_conditioning_reaches_the_unet(folders):
    """original_size / crop_top_left are the pipeline's original_size / crops_coords_top_left, and they matter."""
    from diffusers import StableDiffusionXLPipeline

    plain = build(StableDiffusionXL, folders["sdxl"])
    told = build(StableDiffusionXL, folders["sdxl"], original_size=(512, 384), crop_top_left=(16, 0))
    noise = noise_for(plain)
    with torch.no_grad():
        a = plain.sample_latents(PROMPTS, noise, plain.sample_options())
        b = told.sample_latents(PROMPTS, noise, told.sample_options())
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    pipe.scheduler = told.export_scheduler()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, latents=noise, output_type="latent", height=32, width=32,
               original_size=(512, 384), crops_coords_top_left=(16, 0)).images
    close(b, ref)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    assert told.pipeline_call()["original_size"] == (512, 384) and told.pipeline_call()["crops_coords_top_left"] == (16, 0)


def test_sdxl_in_float16_decodes_in_float32(folders):
    """SDXL's VAE overflows in float16 (its config says force_upcast): it stays float32 under fp16 weights."""
    gen = build(StableDiffusionXL, folders["sdxl"], weights_dtype="float16")
    assert gen.vae.dtype == torch.float32 and gen.unet.dtype == torch.float16 and gen.text_encoder_2.dtype == torch.float16


def test_sd35_matches_its_pipeline(folders):
    """SD3.5's MMDiT-X (dual attention) and QK norm behind the same StableDiffusion3Pipeline and the same generator."""
    from diffusers import StableDiffusion3Pipeline

    gen = build(StableDiffusion3, folders["sd35"], guidance_scale=2.0, num_steps=3)
    assert gen.transformer.transformer_blocks[0].attn2 is not None  # the tiny model has what SD3.5 adds
    assert gen.transformer.transformer_blocks[0].attn.norm_q is not None
    noise = noise_for(gen)
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())
    pipe = StableDiffusion3Pipeline.from_pretrained(folders["sd35"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=3, sigmas=[1.0, 2 / 3, 1 / 3], guidance_scale=2.0, latents=noise,
               output_type="pt", height=16, width=16).images
    close(ours, ref)
    assert ours.std() > 0.01


@pytest.mark.parametrize("variant,true_cfg,size", [("flux_dev", 1.0, (16, 16)), ("flux_dev", 2.0, (16, 32)), ("flux_schnell", 1.0, (32, 16)),
                                                  ("flux_schnell", 2.0, (16, 16))])  # non-square: rows and columns of the tokens
def test_flux_matches_its_pipeline(folders, variant, true_cfg, size):
    """FLUX.1 [dev] (guidance embedding, resolution-dependent shift) and [schnell] (neither) against FluxPipeline, whose
    `latents` are the packed noise and whose default sigmas are rewardkit's trailing ones; guidance_scale here is
    true classifier-free guidance, the pipeline's true_cfg_scale."""
    from diffusers import FluxPipeline

    height, width = size
    gen = build(Flux, folders[variant], height=height, width=width, num_steps=3, guidance_scale=true_cfg, max_sequence_length=16)
    noise = noise_for(gen)
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())
    pipe = FluxPipeline.from_pretrained(folders[variant])
    pipe.set_progress_bar_config(disable=True)
    packed = FluxPipeline._pack_latents(noise, *noise.shape)
    ref = pipe(PROMPTS, num_inference_steps=3, true_cfg_scale=true_cfg, negative_prompt="" if true_cfg != 1 else None,
               latents=packed, output_type="pt", height=height, width=width, max_sequence_length=16).images
    close(ours, ref)
    assert ours.std() > 0.01 and ours.shape[-2:] == size
    torch.testing.assert_close(pack(noise), packed, rtol=0, atol=0)


def test_flux_dev_guidance_is_the_pipelines_guidance_scale_and_schnell_refuses_it(folders):
    from diffusers import FluxPipeline

    gen = build(Flux, folders["flux_dev"], height=16, width=16, num_steps=2, guidance=6.0, max_sequence_length=16)
    default = build(Flux, folders["flux_dev"], height=16, width=16, num_steps=2, max_sequence_length=16)
    assert default.embedded_guidance == 3.5  # FluxPipeline's default guidance_scale
    noise = noise_for(gen)
    with torch.no_grad():
        ours, other = gen(PROMPTS, noise, gen.sample_options()), default(PROMPTS, noise, default.sample_options())
    pipe = FluxPipeline.from_pretrained(folders["flux_dev"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=6.0, latents=FluxPipeline._pack_latents(noise, *noise.shape),
               output_type="pt", height=16, width=16, max_sequence_length=16).images
    close(ours, ref)
    assert (ours - other).abs().max() > 1e-4
    with pytest.raises(UserError, match="no guidance embedding"):
        build(Flux, folders["flux_schnell"], height=16, width=16, guidance=3.5)


def test_flux_dev_shift_grows_with_the_image(folders):
    """[dev]'s dynamic shift: the same unshifted level is noisier at a larger size (more image tokens)."""
    small = build(Flux, folders["flux_dev"], height=16, width=16, max_sequence_length=16)
    large = build(Flux, folders["flux_dev"], height=64, width=64, max_sequence_length=16)
    u = torch.tensor([0.5])
    assert large.noise_levels(u)["sigma"] > small.noise_levels(u)["sigma"] > 0.5
    schnell = build(Flux, folders["flux_schnell"], height=16, width=16, max_sequence_length=16)
    torch.testing.assert_close(schnell.noise_levels(u)["sigma"], u)  # shift 1: the level itself


@pytest.mark.parametrize("guidance,normalization,truncation,size", [(1.0, 0.0, 1.0, (16, 16)), (3.0, 0.0, 1.0, (16, 32)),
                                                                  (3.0, 1.0, 1.0, (16, 16)), (3.0, 0.0, 0.3, (32, 16))])
def test_zimage_matches_its_pipeline(folders, guidance, normalization, truncation, size):
    """Z-Image against ZImagePipeline called with the recorded pipeline_call: prompts of different lengths (each reaches
    the transformer with its own tokens only), guidance in the pipeline's form (its guidance_scale is rewardkit's - 1),
    with the renormalization (it clips every step here) and the truncation (the last step of three, at progress 0.4,
    goes unguided and runs the conditional rows alone)."""
    from diffusers import ZImagePipeline

    height, width = size
    options = dict(height=height, width=width, num_steps=3, guidance_scale=guidance, max_sequence_length=48)
    gen = build(ZImage, folders["zimage"], **options, cfg_normalization=normalization, cfg_truncation=truncation)
    noise = noise_for(gen)
    rows = []
    gen.denoiser.register_forward_pre_hook(lambda m, args: rows.append(len(args[0])))
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())
    call = gen.pipeline_call()
    assert call["guidance_scale"] == guidance - 1 and call["sigmas"] == [1.0, 2 / 3, 1 / 3]
    if "negative_prompt" in call:
        call["negative_prompt"] = [call["negative_prompt"]] * len(PROMPTS)  # the pipeline wants one per prompt
    pipe = ZImagePipeline.from_pretrained(folders["zimage"])
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(list(PROMPTS), latents=noise, output_type="pt", **call).images  # (a copy: the pipeline rewrites its prompt list)
    close(ours, ref)
    assert ours.std() > 0.01 and ours.shape[-2:] == size
    assert rows == [2 * len(PROMPTS) if guidance != 1 else len(PROMPTS)] * (2 if truncation < 1 else 3) + [len(PROMPTS)] * (truncation < 1)
    lengths = gen._conditioning(PROMPTS, "cpu")[1][-2:]  # (after the negative prompts, if guided)
    assert 0 < lengths[0] < lengths[1] < 48  # the two prompts' own token counts (with the chat template)
    if normalization or truncation < 1:  # the option matters here, so the comparison above tests it
        plain = build(ZImage, folders["zimage"], **options)
        with torch.no_grad():
            assert (plain(PROMPTS, noise, plain.sample_options()) - ours).abs().max() > 1e-3


def test_zimage_options_refuse_what_its_pipeline_cannot_do(folders):
    from rewardkit.errors import RecipeError

    with pytest.raises(RecipeError, match=r"zimage.guidance_scale: must be at least 1: ZImagePipeline guides only with its guidance_scale \(rewardkit's - 1\) above 0"):
        ZImage(model=folders["zimage"], guidance_scale=0.5)  # at validation, before any model loads
    with pytest.raises(UserError, match="max_sequence_length = 300: this transformer's rotary table holds 256 text positions; give at most 224"):
        build(ZImage, folders["zimage"], height=16, width=16, max_sequence_length=300)


# --- the published architectures ---------------------------------------------------------------
# Parameter counts of the published denoisers: SDXL base 1.0's UNet and FLUX.1's transformer (12B; [schnell] lacks
# [dev]'s guidance embedder, 256 -> 3072 -> 3072: 10,229,760 weights), as diffusers counts them. SD3.5 against
# KerasHub's presets, which count each whole model (CLIP-L, CLIP-G, VAE and the MMDiT with its positional embedding,
# which diffusers keeps as a buffer): their differences to SD3 Medium (2,987,080,931) are the MMDiTs' differences.
KERAS_SD3 = {"sd3_medium": 2_987_080_931, "sd35_medium": 3_371_793_763, "sd35_large": 9_048_410_595}
PUBLISHED = {"sdxl": 2_567_463_684, "flux_dev": 11_901_408_320, "flux_schnell": 11_901_408_320 - 10_229_760}


def _meta_count(folder: str, name: str) -> tuple[int, int]:
    """(parameters, positional-embedding buffer elements) of bench/configs/<folder>/<name>.json on the meta device."""
    import diffusers

    config = json.loads((CONFIGS / folder / f"{name}.json").read_text())
    with torch.device("meta"):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    pos = getattr(getattr(model, "pos_embed", None), "pos_embed", None)
    return sum(p.numel() for p in model.parameters()), (pos.numel() if pos is not None else 0)


@pytest.mark.parametrize("folder,name", [("sdxl", "unet"), ("flux_dev", "transformer"), ("flux_schnell", "transformer")])
def test_published_parameter_counts(folder, name):
    assert _meta_count(folder, name)[0] == PUBLISHED[folder]


def test_zimage_turbo_counts_match_the_published_sizes():
    """Z-Image's transformer: "6B" (6,154,908,736 here), 30 main blocks; its text encoder Qwen3-4B: "4.0B", of which
    "3.6B" are not the embedding (Qwen3-4B's model card). Published to 0.1 B only, so compared at that precision."""
    from transformers import Qwen3Config, Qwen3Model

    params, _ = _meta_count("z_image_turbo", "transformer")
    assert round(params / 1e9) == 6 and params == 6_154_908_736  # (the exact count pins the config file)
    config = {k: v for k, v in json.loads((CONFIGS / "z_image_turbo" / "text_encoder.json").read_text()).items()
              if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        qwen = Qwen3Model(Qwen3Config(**config))
    total = sum(p.numel() for p in qwen.parameters())
    assert (round(total / 1e9, 1), round((total - qwen.embed_tokens.weight.numel()) / 1e9, 1)) == (4.0, 3.6)


@pytest.mark.parametrize("folder", ["sd35_medium", "sd35_large"])
def test_sd35_parameter_counts_match_the_published_presets(folder):
    params, pos = _meta_count(folder, "transformer")
    base_params, base_pos = _meta_count("sd3_medium", "transformer")
    assert (params + pos) - (base_params + base_pos) == KERAS_SD3[folder] - KERAS_SD3["sd3_medium"]


# --- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [StableDiffusionXL, StableDiffusion3, Flux, ZImage])
def test_missing_model_names_it(cls, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        build(cls, f"no-such-org/no-such-{cls.name}")
    assert f"no-such-org/no-such-{cls.name}" in str(err.value) and "huggingface-cli download" in str(err.value)


def test_a_model_given_to_the_wrong_family_names_the_right_type(folders):
    from rewardkit.generators.sd import StableDiffusion

    with pytest.raises(UserError, match="StableDiffusionXLPipeline pipeline.*StableDiffusionXLPipeline: type = 'sdxl'"):
        build(StableDiffusion, folders["sdxl"])
    with pytest.raises(UserError, match="FluxPipeline: type = 'flux'"):
        build(StableDiffusion3, folders["flux_dev"])
    with pytest.raises(UserError, match="is a ZImagePipeline pipeline.*ZImagePipeline: type = 'zimage'"):
        build(Flux, folders["zimage"])
