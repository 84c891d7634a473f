"""`classifier_free_guidance`: the frozen base model's guidance direction as a reward's image gradient.

Checked against an independent computation on a freshly loaded diffusers pipeline (the base model, as
published): its VAE, its text encoders, its denoiser, diffusers' own noise schedule. The trained weights
differ from the base in every test, so using them instead of theta_0 would fail.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny  # noqa: E402

from rewardkit.errors import RecipeError  # noqa: E402
from rewardkit.generators.flux import Flux  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402
from rewardkit.generators.sd3 import StableDiffusion3  # noqa: E402
from rewardkit.generators.sdxl import StableDiffusionXL  # noqa: E402
from rewardkit.generators.zimage import ZImage  # noqa: E402
from rewardkit.regularizers.weight_l2 import WeightL2  # noqa: E402
from rewardkit.rewards.classifier_free_guidance import ClassifierFreeGuidance  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]
LEVELS = [0.3, 0.7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: str(save_tiny(family, root / family)) for family in ("sd", "sdxl", "sd3", "flux", "zimage")}


def perturb(gen, training):
    """Move the trained weights away from theta_0, so that the base and the trained model differ."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in gen.named_parameters():
            if p.requires_grad and (training == "full" or "lora_B" in n):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def independent_gradient(family, model, images):
    """The reward's image gradient from a fresh pipeline: z0 = VAE mean, x_t at u ~ U[LEVELS], the base
    denoiser's -(eps(c) - eps(negative)) / sigma, times alpha, pulled back through the encoder."""
    import hashlib

    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, ZImagePipeline

    # the reward's documented draws: per image, a generator seeded by the 8-byte blake2b of its float32 values; u, then eps
    rngs = [torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(im.numpy().tobytes(), digest_size=8).digest(), "little") & (2**63 - 1))
            for im in images.float().contiguous()]
    u = torch.stack([LEVELS[0] + (LEVELS[1] - LEVELS[0]) * torch.rand((), generator=g) for g in rngs])
    x = images.clone().requires_grad_(True)
    neg = ["blurry"] * len(PROMPTS)

    def ddpm_noised(pipe):
        """z0 (the VAE mean, scaled), its level t on the DDPM schedule, alpha, sigma and z_t."""
        z0 = pipe.vae.encode(2 * x - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in rngs])
        t = (u * (pipe.scheduler.config.num_train_timesteps - 1)).round().long()
        abar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return z0, t, alpha, sigma, alpha * z0.detach() + sigma * noise

    def flow_noised(pipe):
        """z0 (the VAE mean, shifted and scaled), its level s on the static-shift flow schedule, alpha, sigma and z_t."""
        cfg = pipe.vae.config
        z0 = (pipe.vae.encode(2 * x - 1).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in rngs])
        shift = pipe.scheduler.config.shift
        s = (shift * u / (1 + (shift - 1) * u)).view(-1, 1, 1, 1)
        return z0, s, 1 - s, s, (1 - s) * z0.detach() + s * noise

    if family == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
        z0, t, alpha, sigma, zt = ddpm_noised(pipe)
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=neg)
        with torch.no_grad():
            eps_c = pipe.unet(zt, t, encoder_hidden_states=cond).sample
            eps_u = pipe.unet(zt, t, encoder_hidden_states=uncond).sample
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(model)
        z0, t, alpha, sigma, zt = ddpm_noised(pipe)
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=neg)
        h, w = images.shape[-2:]
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(len(PROMPTS), 1)
        with torch.no_grad():
            eps_c = pipe.unet(zt, t, encoder_hidden_states=embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            eps_u = pipe.unet(zt, t, encoder_hidden_states=neg_embeds, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids}).sample
    elif family == "flux":
        import math

        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipe = FluxPipeline.from_pretrained(model)
        cfg = pipe.vae.config
        z0 = (pipe.vae.encode(2 * x - 1).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
        noise = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in rngs])
        B, C, h, w = z0.shape
        sc = pipe.scheduler.config
        mu = calculate_shift((h // 2) * (w // 2), sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
        s = (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).view(-1, 1, 1, 1)  # FLUX.1 [dev]'s dynamic shift at this size
        alpha, sigma = 1 - s, s
        zt = alpha * z0.detach() + sigma * noise
        packed = pipe._pack_latents(zt, B, C, h, w)
        image_ids = pipe._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32)
        guidance = torch.full((B,), 3.5)

        def velocity(prompts):
            embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=16)
            out = pipe.transformer(hidden_states=packed, timestep=s.flatten(), guidance=guidance, pooled_projections=pooled,
                                   encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids).sample
            return pipe._unpack_latents(out, images.shape[-2], images.shape[-1], pipe.vae_scale_factor)

        with torch.no_grad():
            v_c, v_u = velocity(PROMPTS), velocity(neg)
        eps_c, eps_u = zt + (1 - s) * v_c, zt + (1 - s) * v_u
    elif family == "zimage":
        pipe = ZImagePipeline.from_pretrained(model)
        z0, s, alpha, sigma, zt = flow_noised(pipe)
        embeds, neg_embeds = pipe.encode_prompt(list(PROMPTS), device="cpu", negative_prompt=list(neg), max_sequence_length=48)
        frames = list(zt.unsqueeze(2).unbind(0))  # the transformer takes (C, 1, H, W) latents and the progress 1 - t

        def velocity(captions):  # minus what the transformer predicts
            return -torch.stack(pipe.transformer(frames, 1 - s.flatten(), captions).sample).squeeze(2)

        with torch.no_grad():
            v_c, v_u = velocity(embeds), velocity(neg_embeds)
        eps_c, eps_u = zt + (1 - s) * v_c, zt + (1 - s) * v_u
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(model)
        z0, s, alpha, sigma, zt = flow_noised(pipe)
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu", negative_prompt=neg, max_sequence_length=256)
        timestep = s.flatten() * pipe.scheduler.config.num_train_timesteps
        with torch.no_grad():
            v_c = pipe.transformer(hidden_states=zt, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled).sample
            v_u = pipe.transformer(hidden_states=zt, timestep=timestep, encoder_hidden_states=neg_embeds, pooled_projections=neg_pooled).sample
        eps_c, eps_u = zt + (1 - s) * v_c, zt + (1 - s) * v_u
    direction = -(eps_c - eps_u) / sigma
    (g,) = torch.autograd.grad(z0, x, grad_outputs=alpha * direction)
    return g


CLASSES = {"sd": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3, "flux": Flux, "zimage": ZImage}
# the tiny FLUX's and Z-Image's (their pipelines': 1024 px, 512 tokens)
SIZES = {"flux": {"height": 16, "width": 16, "max_sequence_length": 16}, "zimage": {"height": 16, "width": 16, "max_sequence_length": 48}}


@pytest.mark.parametrize("family,training", [("sd", "lora"), ("sd", "full"), ("sdxl", "lora"), ("sd3", "lora"), ("sd3", "full"),
                                             ("flux", "lora"), ("zimage", "lora")])
def test_the_direction_is_the_base_models_guidance_and_no_copy_is_made(tiny, family, training):
    gen = CLASSES[family](model=tiny[family], training=training, lora_rank=4, negative_prompt="blurry", **SIZES.get(family, {}))
    gen.setup(PROMPTS, 0)
    WeightL2(weight=1.0).setup(gen)  # theta_0, kept as a run keeps it (nothing for LoRA: the base is the frozen weights)
    perturb(gen, training)
    reward = ClassifierFreeGuidance(levels=LEVELS)
    n_params, n_storage = sum(1 for _ in gen.parameters()), sum(p.untyped_storage().nbytes() for p in gen.parameters())
    trainable = [n for n, p in gen.named_parameters() if p.requires_grad]
    reward.setup(gen)
    images = torch.rand(2, 3, *(gen.height, gen.width), generator=torch.Generator().manual_seed(1))
    noise = torch.randn((2, *gen.noise_shape()), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = gen(PROMPTS, noise, gen.sample_options())

    references = gen._reference
    torch.manual_seed(11)
    score, g = reward.score_and_gradient(images, PROMPTS)
    torch.manual_seed(12)  # torch's RNG does not enter: another state, the same direction
    _, again = reward.score_and_gradient(images, PROMPTS)
    _, alone = reward.score_and_gradient(images[1:], PROMPTS[1:])  # nor does the batch
    want = independent_gradient(family, tiny[family], images)

    assert score is None
    scale = float(want.abs().max())
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(again, g, rtol=0, atol=0)
    torch.testing.assert_close(alone, g[1:], rtol=1e-5, atol=1e-5 * scale)
    assert gen._reference is references  # full fine-tuning: weight L2's theta_0, not another copy
    # the trained weights give another direction: the test would see them used instead of theta_0
    lv = gen.noise_levels(torch.tensor([0.5]))
    with torch.no_grad():
        z = gen.encode(images[:1])
        cond = gen._encode(PROMPTS[:1], "cpu", negative=["blurry"])
        t = lv["timesteps"].repeat(2)
        assert not torch.allclose(gen._network(torch.cat([z, z]), t, cond, base=True), gen._network(torch.cat([z, z]), t, cond))
    # no second copy of the denoiser; the reward holds no model; training is as it was
    assert list(reward.parameters()) == [] and list(reward.buffers()) == []
    assert sum(1 for _ in gen.parameters()) == n_params and sum(p.untyped_storage().nbytes() for p in gen.parameters()) == n_storage
    assert [n for n, p in gen.named_parameters() if p.requires_grad] == trainable
    with torch.no_grad():
        torch.testing.assert_close(gen(PROMPTS, noise, gen.sample_options()), before, rtol=0, atol=0)


def test_a_run_trains_on_it_and_logs_its_gradient_but_no_score(tmp_path):
    from rewardkit.optimizer import Optimizer

    recipe = {
        "run": {"dir": str(tmp_path / "r"), "steps": 2, "batch_size": 2, "trackers": [], "progress": False},
        "prompts": {"train": ["a handwritten digit 3", "a handwritten digit 7"]},
        "generator": {"type": "testbed", "num_steps": 2, "training": "lora", "lora_rank": 4, "report": False},
        "optimizer": {"lr": 1e-3},
        "rewards": {"digit_classifier": {}, "classifier_free_guidance": {"weight": 0.5}},
        "regularizers": {"normalize_gradients": {}},
    }
    result = Optimizer.from_recipe(recipe).fit()
    m = result.metrics
    assert m["grad_norm/classifier_free_guidance"] > 0 and not m["skipped"]
    assert "reward/classifier_free_guidance" not in m
    assert m["reward/total"] == pytest.approx(m["reward/digit_classifier"])


def test_it_needs_a_diffusion_generator_and_cannot_evaluate(tmp_path):
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    from conftest import pixels_recipe

    registry = load_registry()
    with pytest.raises(RecipeError, match=r"rewards.classifier_free_guidance: .*needs a diffusion generator.*'pixels' has none"):
        load_recipe(pixels_recipe(tmp_path, rewards={"classifier_free_guidance": {}}), registry=registry)
    recipe = pixels_recipe(tmp_path)
    recipe["generator"] = {"type": "testbed"}
    recipe["prompts"] = {"train": ["a handwritten digit 1"]}
    recipe["rewards"] = {"digit_classifier": {}}
    recipe["eval"] = {"prompts": ["a handwritten digit 1"], "rewards": {"guidance": {"type": "classifier_free_guidance"}}}
    with pytest.raises(RecipeError, match=r"eval.rewards.guidance: classifier_free_guidance gives an image gradient, not a score"):
        load_recipe(recipe, registry=registry)
    freed = pixels_recipe(tmp_path, generator={"type": "testbed", "text_encoders": "free"}, rewards={"classifier_free_guidance": {"negative_prompt": "blurry"}})
    with pytest.raises(RecipeError, match=r"negative_prompt: the generator frees its text encoders"):
        load_recipe(freed, registry=registry)
    with pytest.raises(RecipeError, match="levels"):
        load_recipe(pixels_recipe(tmp_path, generator={"type": "testbed"}, rewards={"classifier_free_guidance": {"levels": [0.5, 0.2]}}), registry=registry)
