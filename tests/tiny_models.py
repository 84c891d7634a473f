"""Tiny random-weight SD 1.x, SDXL, SD3 / SD3.5, FLUX.1 and Z-Image pipelines, built offline from small configs.

Nothing is downloaded: the networks come from configs, the tokenizers are
built in memory (a byte-level CLIP BPE vocabulary with no merges, a small
T5 unigram vocabulary, a byte-level Qwen BPE with a chat template). `save_tiny` (and `save_tiny_sd` / `save_tiny_sd3`) write a diffusers
folder with `save_pretrained`, which the generators then load like any
local model. At 16-32 px a 4-step sample takes tens of milliseconds on CPU.
"""

from __future__ import annotations

from pathlib import Path


def _clip_tokenizer():
    # Byte-level BPE with every byte as a token, alone and word-final: every
    # string tokenizes with no merges file (2 + 512 tokens < vocab_size).
    from rewardkit.testbed.models import clip_tokenizer

    return clip_tokenizer(max_length=16)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    pieces += [("\u2581" + w, -1.5) for w in ("a", "the", "of", "red", "blue", "cat", "dog", "photo")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=16)


def _clip_text_config(projection_dim: int | None = None, hidden_size: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        vocab_size=600,
        max_position_embeddings=16,
        projection_dim=projection_dim or hidden_size,
    )


# The 2-level UNet and VAE of the SD-like tiny pipelines (32 px -> 16x16 latents).
UNET = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4, norm_num_groups=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
VAE = dict(block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, sample_size=32)


# The 1-level VAE of the flow-matching tiny pipelines (16 px -> 16x16 latents), without quant convs as SD3's and FLUX's.
FLOW_VAE = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline with a 2-level UNet, a 2-level VAE (32 px -> 16x16 latents)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET, cross_attention_dim=32, attention_head_dim=4)
    vae = AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(_clip_text_config())
    # SD 1.5's scheduler config (scaled_linear betas), with prediction_type as asked.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def tiny_sd3_pipeline(seed: int = 0, sd35: bool = False):
    """A StableDiffusion3Pipeline: 1-layer MMDiT, 1-level VAE (16 px -> 16x16 latents, patch 2).

    sd35: SD3.5 Medium's transformer features, MMDiT-X (a second, image-only attention in the block) and QK RMS norm."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2 if sd35 else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        **({"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}),
    )
    vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.0609, scaling_factor=1.5035)  # SD3's latent statistics
    # Two CLIPs of width 16 concatenate to 32 = T5 width = joint_attention_dim;
    # their projections (32 each) concatenate to pooled_projection_dim = 64.
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(projection_dim=32, hidden_size=16))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(projection_dim=32, hidden_size=16))
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=_t5_tokenizer(),
    )
    return pipe


def save_tiny_sd(folder: str | Path, **kwargs) -> Path:
    folder = Path(folder)
    tiny_sd_pipeline(**kwargs).save_pretrained(folder)
    return folder


def save_tiny_sd3(folder: str | Path, **kwargs) -> Path:
    folder = Path(folder)
    tiny_sd3_pipeline(**kwargs).save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A StableDiffusionXLPipeline: SDXL's text-time UNet conditioning, two CLIPs (the second with a projection)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=16 + 6 * 4,  # pooled projection + 6 micro-conditioning numbers
        cross_attention_dim=32,  # the two encoders' widths, concatenated
    )
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025)
    # SDXL base 1.0's scheduler config (EulerDiscrete, scaled_linear betas)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config(hidden_size=16)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(projection_dim=16, hidden_size=16)).eval(),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline: 1 double + 1 single stream block, 1-level VAE (16 px -> 16x16 latents -> 8x8 tokens).

    guidance_embeds and a dynamic shift as FLUX.1 [dev]; guidance_embeds=False with a static shift 1 as [schnell]."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x the 2x2 packing
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKL(**FLOW_VAE, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's latent statistics
    # FLUX.1 [dev]'s scheduler config / [schnell]'s
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096)
                 if guidance_embeds else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(_clip_text_config()).eval(),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)).eval(),
        tokenizer_2=_t5_tokenizer(),
    )


def tiny_zimage_pipeline(seed: int = 0):
    """A ZImagePipeline: a 1 + 1 + 1 layer single-stream transformer, a 2-layer Qwen3 text encoder, the 1-level VAE
    (16 px -> 16x16 latents -> 8x8 tokens), Z-Image-Turbo's scheduler (static shift 3)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from rewardkit.testbed.models import qwen_tokenizer

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 4, 8], axes_lens=[256, 64, 64],
    )
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=260, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=8, max_position_embeddings=64)).eval()
    return ZImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=AutoencoderKL(**FLOW_VAE, shift_factor=0.1159, scaling_factor=0.3611),  # FLUX.1's VAE statistics
        text_encoder=text_encoder,
        tokenizer=qwen_tokenizer(max_length=64),
    )


def save_tiny(kind: str, folder: str | Path, **kwargs) -> Path:
    """Write one of the tiny pipelines (kind: 'sd', 'sdxl', 'sd3', 'flux', 'zimage') as a diffusers folder."""
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
                "zimage": tiny_zimage_pipeline}
    folder = Path(folder)
    builders[kind](**kwargs).save_pretrained(folder)
    return folder
