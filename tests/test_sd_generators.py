"""The diffusion generators (`sd`, `sdxl`, `sd3`, `flux`, `zimage`) on tiny random-weight pipelines (offline, CPU).

What is checked: with eta = 0 the K-step sampler is diffusers' own DDIM /
flow-match Euler sampler; with eta > 0 every intermediate keeps the
schedule's noise level; gradients reach the trainable weights in every
training mode, through exactly the steps asked for; weight_l2 is the
distance to the initial weights; a short run raises a reward; load errors
are clear.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny, save_tiny_sd, save_tiny_sd3  # noqa: E402

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.generators.base import SampleOptions  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402
from rewardkit.generators.flux import Flux  # noqa: E402
from rewardkit.generators.sd3 import StableDiffusion3  # noqa: E402
from rewardkit.generators.sdxl import StableDiffusionXL  # noqa: E402
from rewardkit.generators.zimage import ZImage  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    return str(save_tiny_sd(tmp_path_factory.mktemp("models") / "sd_v", prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return str(save_tiny_sd3(tmp_path_factory.mktemp("models") / "sd3"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(save_tiny("sdxl", tmp_path_factory.mktemp("models") / "sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    return str(save_tiny("flux", tmp_path_factory.mktemp("models") / "flux"))


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> str:
    return str(save_tiny("zimage", tmp_path_factory.mktemp("models") / "zimage"))


FAMILIES = ["sd", "sdxl", "sd3", "flux", "zimage"]
SCHEDULES = ["sd", "sd3", "flux"]  # one family per schedule code path: sdxl is sd's schedule; flux adds the dynamic shift


@pytest.fixture(scope="session")
def models(tiny_sd, tiny_sdxl, tiny_sd3, tiny_flux, tiny_zimage):
    # FLUX's and Z-Image's pipelines have a fixed default size (1024 px) and text length (512 tokens): the tiny ones
    # sample at 16 px, with 16 T5 tokens, and 48 Qwen tokens (the chat template and the prompts fit: their own lengths)
    return {"sd": (StableDiffusion, tiny_sd), "sdxl": (StableDiffusionXL, tiny_sdxl), "sd3": (StableDiffusion3, tiny_sd3),
            "flux": (functools.partial(Flux, height=16, width=16, max_sequence_length=16), tiny_flux),
            "zimage": (functools.partial(ZImage, height=16, width=16, max_sequence_length=48), tiny_zimage)}


def build(cls, model, **options):
    gen = cls(model=model, **options)
    gen.setup(PROMPTS, 0)
    return gen


def noise_for(gen, n=2, seed=0):
    return torch.randn((n, *gen.noise_shape()), generator=torch.Generator().manual_seed(seed))


# --- eta = 0: the real samplers ---------------------------------------------------------
@pytest.mark.parametrize("variant,guidance", [("eps", 1.0), ("eps", 3.0), ("v", 1.0)])
def test_sd_matches_diffusers_ddim(tiny_sd, tiny_sd_v, variant, guidance):
    from diffusers import StableDiffusionPipeline

    model = tiny_sd if variant == "eps" else tiny_sd_v
    gen = build(StableDiffusion, model, guidance_scale=guidance, negative_prompt="blurry")
    noise = noise_for(gen)
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.scheduler = gen.export_scheduler()  # DDIM, trailing spacing, final alpha 1
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance, negative_prompt=["blurry"] * 2,
               latents=noise, output_type="pt", height=32, width=32).images
    assert list(pipe.scheduler.timesteps) == gen.timesteps(4) == [999, 749, 499, 249]
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.std() > 0.01  # not a constant image that would match anything


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_matches_diffusers_flow_match_euler(tiny_sd3, t5):
    from diffusers import StableDiffusion3Pipeline

    gen = build(StableDiffusion3, tiny_sd3, guidance_scale=2.0, num_steps=3, text_encoder_3=t5)
    noise = noise_for(gen)
    with torch.no_grad():
        ours = gen(PROMPTS, noise, gen.sample_options())

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=3, sigmas=gen.unshifted_sigmas(3), guidance_scale=2.0,
               latents=noise, output_type="pt", height=16, width=16).images
    assert ("text_encoder_3" in dict(gen.named_children())) == t5 == (gen.pipe.text_encoder_3 is not None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.std() > 0.01


def test_custom_timesteps_are_used(tiny_sd):
    gen = build(StableDiffusion, tiny_sd, num_steps=2, timesteps=[900, 300])
    seen = []
    gen.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    with torch.no_grad():
        gen(PROMPTS[:1], noise_for(gen, 1), gen.sample_options())
    assert seen == [900, 300]


# --- eta > 0: noise levels follow the schedule ------------------------------------------------
@pytest.mark.parametrize("family", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 1.0, "random"])
def test_intermediate_noise_level_matches_schedule(models, family, eta, monkeypatch):
    """With an oracle network that knows x0, x_t - alpha_t x0 must have std sigma_t at every step."""
    cls, model = models[family]
    gen = build(cls, model, num_steps=4)
    B = 16
    x0_true = torch.rand((1, *gen.noise_shape())) * 2 - 1

    def oracle(x, schedule, k, cond):
        a, s = schedule["alpha"][k], schedule["sigma"][k]
        return x0_true.expand_as(x), (x - a * x0_true) / s

    monkeypatch.setattr(gen, "_predict", oracle)
    if eta == "random":
        eta = torch.rand((B, 4), generator=torch.Generator().manual_seed(1))
    noise = noise_for(gen, B)
    trajectory = []
    with torch.no_grad():
        gen.sample_latents(["a"] * B, noise, SampleOptions(num_steps=4, eta=eta), trajectory=trajectory)
    schedule = gen.schedule(4, "cpu")
    assert len(trajectory) == 4
    for k, x in enumerate(trajectory):
        residual = x - schedule["alpha"][k] * x0_true
        assert residual.std().item() == pytest.approx(schedule["sigma"][k].item(), rel=0.03), f"step {k}"
        assert residual.mean().abs().item() < 0.05
    if not isinstance(eta, float) or eta > 0:
        det = []
        with torch.no_grad():
            gen.sample_latents(["a"] * B, noise, SampleOptions(num_steps=4, eta=0.0), trajectory=det)
        assert (trajectory[-1] - det[-1]).abs().mean() > 0.05  # eta really injects fresh noise


def test_step_noise_is_deterministic_and_per_sample(tiny_sd):
    gen = build(StableDiffusion, tiny_sd)
    noise = noise_for(gen, 3)
    opts = SampleOptions(num_steps=4, eta=0.7)
    with torch.no_grad():
        a = gen(["x", "y", "z"], noise, opts)
        b = gen(["x", "y", "z"], noise, opts)
        single = gen(["y"], noise[1:2], opts)
        det = gen(["x", "y", "z"], noise, SampleOptions(num_steps=4, eta=0.0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a[1:2], single, atol=1e-5, rtol=0)
    assert (a - det).abs().max() > 1e-3


# --- gradients in every training mode ---------------------------------------------------------
MODES = {
    "all": SampleOptions(num_steps=3),
    "last": SampleOptions(num_steps=3, grad_steps=1),
    # R0+: sample 0 supervises step 2, sample 1 step 1; each sample's earlier steps run without gradient
    "intermediate": SampleOptions(num_steps=3, supervise_step=torch.tensor([2, 1])),
}
# One denoiser call per step, except where only some rows carry gradient: those rows run in a call of their
# own (intermediate, step 1: sample 1 with gradient, then sample 0 without); rows past their step are not run.
GRAD_CALLS = {"all": [True] * 3, "last": [False, False, True], "intermediate": [False, True, False, True]}


@pytest.mark.parametrize("family,training,mode", [(f, t, m) for f in FAMILIES for t in ("lora", "full") for m in MODES
                                                   if f in ("sd", "sd3") or m != "intermediate"])  # (R0+ per family: below)
def test_gradients_reach_trainable_weights(models, family, training, mode):
    cls, model = models[family]
    gen = build(cls, model, training=training, lora_rank=4, gradient_checkpointing=(mode == "all"), eta=0.5)
    with torch.no_grad():  # LoRA B starts at 0, which hides A's gradient: move off it
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    calls = []
    gen.denoiser.register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
    images = gen(PROMPTS, noise_for(gen), MODES[mode])
    assert calls == GRAD_CALLS[mode]  # gradient through exactly the steps asked for
    (images * torch.linspace(0, 1, images.numel()).view_as(images)).sum().backward()
    params = dict((n, p) for n, p in gen.named_parameters() if p.requires_grad)
    assert params and all(("lora_" in n) == (training == "lora") for n in params)
    assert all(n.startswith(gen.denoiser_name + ".") for n in params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in params.values())
    assert nonzero >= 0.9 * len(params), f"{nonzero}/{len(params)} trainable tensors got a gradient"
    assert not any(p.grad is not None for n, p in gen.named_parameters() if not p.requires_grad)


def test_supervised_step_returns_that_steps_prediction(tiny_sd):
    gen = build(StableDiffusion, tiny_sd, num_steps=3)
    noise = noise_for(gen)
    calls = []
    gen.unet.register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
    gen(PROMPTS, noise, SampleOptions(num_steps=3, supervise_step=1)).sum().backward()
    assert calls == [False, True]  # R0+: earlier steps without gradient, later steps not run
    with torch.no_grad():
        full = gen(PROMPTS, noise, SampleOptions(num_steps=3))
        last = gen(PROMPTS, noise, SampleOptions(num_steps=3, supervise_step=2))
        step0 = gen(PROMPTS, noise, SampleOptions(num_steps=3, supervise_step=0))
        mixed = gen(PROMPTS, noise, SampleOptions(num_steps=3, supervise_step=torch.tensor([0, 2])))
    torch.testing.assert_close(last, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[0], step0[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], full[1], atol=1e-6, rtol=0)
    assert (step0 - full).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_sample", [True, False])
def test_r0plus_runs_with_gradient_only_the_rows_it_supervises(models, family, per_sample):
    """R0+ shortens the backward graph: each step runs with gradient only the rows that supervise it, so the
    saved activations are those of the supervised (row, step) pairs - not those of the whole chain."""
    cls, model = models[family]
    gen = build(cls, model, num_steps=4, eta=0.5)
    with torch.no_grad():
        for n, p in gen.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    B, params = 4, {p.data_ptr() for p in gen.parameters()}
    noise = noise_for(gen, B)
    prompts = ["a red cat", "a blue dog"] * 2  # (for Z-Image: captions of one padded length, as a batch pads to its longest)
    steps = torch.tensor([0, 1, 2, 3]) if per_sample else 2
    calls = []
    gen.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), args[0] if args else kwargs["hidden_states"])), with_kwargs=True)

    def saved_bytes(options):
        total = [0]

        def pack(t):
            if t.data_ptr() not in params:  # activations, not the weights autograd also keeps
                total[0] += t.numel() * t.element_size()
            return t

        calls.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gen.sample_latents(prompts, noise, options)
        return total[0]

    supervised = saved_bytes(SampleOptions(num_steps=4, supervise_step=steps))
    grad_rows = [len(x) for g, x in calls if g]
    if per_sample:  # step k: sample k alone with gradient; samples past their step are not run
        assert grad_rows == [1, 1, 1, 1]
        assert [len(x) for g, x in calls if not g] == [3, 2, 1]
    else:  # one step for the batch: the 4 rows at step 2 with gradient, steps 0-1 without, step 3 not run
        assert grad_rows == [B] and len(calls) == 3
    one_step = saved_bytes(SampleOptions(num_steps=4, supervise_step=2))
    everything = saved_bytes(SampleOptions(num_steps=4))
    # The same 4 (row, step) pairs carry gradient either way (4 calls of 1 row add a little per call: the
    # timestep embedding and such, 7% here); the whole chain carries 16, as the old sampler did for R0+.
    assert one_step <= supervised <= 1.1 * one_step
    assert everything >= 3.5 * supervised


@pytest.mark.parametrize("family", FAMILIES)
def test_deep_supervision_decodes_every_steps_prediction_with_gradient_for_every_row(models, family):
    """R0+ read as deep supervision: one image per step and sample, step-major; the last step's images are
    the plain sampler's; every step runs the whole batch with gradient (the chain is kept)."""
    cls, model = models[family]
    gen = build(cls, model, num_steps=3, eta=0.0)
    noise = noise_for(gen, 2)
    calls = []
    gen.denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((torch.is_grad_enabled(), len(args[0] if args else kwargs["hidden_states"]))), with_kwargs=True)
    deep = gen(PROMPTS, noise, SampleOptions(num_steps=3, deep_supervision=(0, 1, 2)))
    assert calls == [(True, 2)] * 3
    with torch.no_grad():
        plain = gen(PROMPTS, noise, SampleOptions(num_steps=3))
        first = gen(PROMPTS, noise, SampleOptions(num_steps=3, supervise_step=0))
    assert deep.shape == (6, *plain.shape[1:])
    torch.testing.assert_close(deep[4:].detach(), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deep[:2].detach(), first, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_frozen_module_has_the_declared_dtype_whatever_the_checkpoint_holds(dtype):
    """The packaged teacher is saved in float16; transformers keeps a text encoder's saved dtype unless told."""
    from safetensors import safe_open

    from rewardkit.testbed.data import weights_dir

    folder = weights_dir("rewardkit-testbed") / "teacher"
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    gen = build(StableDiffusion, str(folder), weights_dtype=dtype, training="lora", lora_rank=4)
    assert {p.dtype for p in gen.parameters() if not p.requires_grad} == {getattr(torch, dtype)}
    assert {p.dtype for p in gen.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("dynamic", [False, True])
def test_sd3_noise_levels_are_the_schedulers_own(tiny_sd3, dynamic):
    """The levels the guidance reward noises to: diffusers' shifted sigma for each unshifted u (static or dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    gen = build(StableDiffusion3, tiny_sd3)
    if dynamic:
        gen.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(gen.pipe.scheduler.config, use_dynamic_shifting=True)
    u = torch.tensor([0.05, 0.3, 0.9])
    levels = gen.noise_levels(u)
    _, h, w = gen.noise_shape()
    p = gen.transformer.config.patch_size
    for i, ui in enumerate(u.tolist()):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
        scheduler.set_timesteps(1, sigmas=[ui], **({"mu": calculate_shift((h // p) * (w // p))} if dynamic else {}))
        torch.testing.assert_close(levels["sigma"][i], scheduler.sigmas[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(levels["timesteps"][i], scheduler.timesteps[0], rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(levels["alpha"][i], 1 - scheduler.sigmas[0], rtol=1e-6, atol=1e-7)
    assert bool((levels["sigma"] > u).all()) or dynamic  # SD3's shift 3 moves every level up


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_embeddings_are_computed_once_and_the_encoders_can_be_freed(models, family):
    """Frozen text encoders: a cached embedding is what encoding gives (the same images, guidance on), a cached
    prompt is not encoded again, and after text_encoders = 'free' the encoders are gone.

    "The same" within float32 rounding: the cache encodes each distinct row once ([negative, p1, p2]) where plain
    encoding encodes the batch's rows ([negative, negative, p1, p2]), and a GEMM over another number of rows may
    round differently (by CPU: bit-equal on some, ~5e-7 apart on others). Another prompt's embedding moves these
    images by orders of magnitude more (checked below), so the tolerance still tells a right embedding from a wrong one."""
    cls, model = models[family]
    options = {"num_steps": 2, "guidance_scale": 3.0, "negative_prompt": "blurry"}
    plain = build(cls, model, prompt_cache=0, **options)
    cached = build(cls, model, **options)
    noise = noise_for(plain)
    calls = []
    for name, module in cached.pipe.components.items():
        if name.startswith("text_encoder") and module is not None:
            module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        want = plain(PROMPTS, noise, plain.sample_options())
        first = cached(PROMPTS, noise, cached.sample_options())
        n_first = len(calls)
        second = cached(PROMPTS[::-1], noise.flip(0), cached.sample_options())
        swapped = plain(PROMPTS[::-1], noise, plain.sample_options())
    assert n_first > 0 and len(calls) == n_first, "the second call encodes nothing"
    rounding = dict(rtol=0, atol=1e-5)  # images in [0, 1]: 80x float32's eps, far below a wrong prompt's effect
    assert (swapped - want).abs().max() > 100 * rounding["atol"], "the prompt's embedding matters to these images"
    torch.testing.assert_close(first, want, **rounding)
    torch.testing.assert_close(second[1], want[0], **rounding)

    freed = build(cls, model, text_encoders="free", **options)
    before = sum(p.numel() for p in freed.parameters())
    freed.prepare_prompts(PROMPTS)
    assert not any(n.startswith("text_encoder") for n, _ in freed.named_parameters())
    assert sum(p.numel() for p in freed.parameters()) < before
    with torch.no_grad():
        torch.testing.assert_close(freed(PROMPTS, noise, freed.sample_options()), want, **rounding)
    with pytest.raises(UserError, match=r"prompt 'a green frog' was not encoded at setup, and the text encoders were freed"):
        freed(["a green frog"], noise[:1], freed.sample_options())


def test_the_prompt_cache_keeps_its_size(tiny_sd):
    gen = build(StableDiffusion, tiny_sd, num_steps=1, prompt_cache=2)
    noise = noise_for(gen, 1)
    with torch.no_grad():
        for prompt in ("a", "b", "c", "b", "d"):
            gen([prompt], noise, gen.sample_options())
    assert list(gen._embedding_cache) == ["b", "d"]  # least recently used dropped first


# --- weight_l2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("training", ["lora", "full"])
def test_weight_l2_zero_at_init_positive_after_a_step(models, family, training):
    from rewardkit.regularizers.weight_l2 import WeightL2

    cls, model = models[family]
    gen = build(cls, model, training=training, lora_rank=4, num_steps=2)
    reg = WeightL2(weight=1.0)
    reg.setup(gen)
    assert reg.penalty(gen).item() == 0.0
    if training == "lora":
        assert gen._reference == {}  # no copy of the model is held
    opt = torch.optim.SGD(gen.trainable_parameters(), lr=0.1)
    gen(PROMPTS, noise_for(gen), gen.sample_options()).mean().backward()
    opt.step()
    penalty = reg.penalty(gen)
    assert penalty.item() > 0 and penalty.requires_grad


def test_lora_distance_equals_peft_delta_weights(tiny_sd):
    gen = build(StableDiffusion, tiny_sd, lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in gen.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    expected = sum((layer.get_delta_weight("default") ** 2).sum() for layer in gen._lora_layers())
    assert len(gen._lora_layers()) > 0
    torch.testing.assert_close(gen.squared_distance_to_reference(), expected, rtol=1e-4, atol=0)


# --- a short run raises the reward ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_short_run_raises_reward(models, family, tmp_path):
    from rewardkit.optimizer import Optimizer
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.regularizers.normalize_gradients import NormalizeGradients
    from rewardkit.regularizers.random_eta import RandomEta
    from rewardkit.regularizers.weight_l2 import WeightL2
    from rewardkit.rewards.color import Color
    from rewardkit.images import fixed_noise, generate

    cls, model = models[family]
    gen = cls(model=model, num_steps=2, lora_rank=4)
    regs = [WeightL2(weight=1e-3), RandomEta(), NormalizeGradients()]
    if family == "sd":
        regs.append(IntermediateStep())  # R0+ on one family, R0 on the other
    reward = Color(target=(1.0, 0.0, 0.0))
    opt = Optimizer(gen, [reward], regs, prompts=PROMPTS, sample_prompts=PROMPTS[:1],
                    run={"steps": 12, "batch_size": 2, "dir": str(tmp_path / "run"), "trackers": [], "progress": False},
                    optimizer={"lr": 0.05})
    gen.setup(PROMPTS, 0)  # fit() sets up again; this copy only measures the start
    noise = fixed_noise(gen, 4, 123)
    before = reward(generate(gen, PROMPTS * 2, noise), PROMPTS * 2).mean().item()
    result = opt.fit()
    after = reward(generate(gen, PROMPTS * 2, noise), PROMPTS * 2).mean().item()
    assert result.step == 12 and not result.metrics["skipped"]
    # The tiny random VAE can only reach colours near gray, so the gain is small but systematic.
    assert after > before + 0.008, (before, after)
    assert result.metrics["penalty/weight_l2"] > 0


# --- load errors ------------------------------------------------------------------------------
def test_missing_model_is_a_user_error_naming_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        build(StableDiffusion, "no-such-org/no-such-model")
    msg = str(err.value)
    assert "no-such-org/no-such-model" in msg and "huggingface-cli download" in msg and "local" in msg


def test_cli_run_with_missing_model_exits_2(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from rewardkit.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[run]\nsteps = 1\ntrackers = []\nprogress = false\n[prompts]\ntrain = ["a"]\n'
        '[generator]\ntype = "sd3"\nmodel = "no-such-org/sd3-missing"\n[rewards.color]\n'
    )
    assert main(["run", str(recipe), f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "no-such-org/sd3-missing" in err and "Traceback" not in err


def test_local_path_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        build(StableDiffusion, str(tmp_path / "absent"))
    with pytest.raises(UserError, match="no model_index.json"):
        build(StableDiffusion, str(tmp_path))
    (tmp_path / "m.ckpt").write_bytes(b"")
    with pytest.raises(UserError, match="pickled"):
        build(StableDiffusion, str(tmp_path / "m.ckpt"))
    with pytest.raises(UserError, match="no such file"):
        build(StableDiffusion, str(tmp_path / "m.safetensors"))


def test_unsupported_pipeline_and_prediction_type(tiny_sd3, tmp_path):
    with pytest.raises(UserError, match="supports StableDiffusionPipeline"):
        build(StableDiffusion, tiny_sd3)
    sample_model = save_tiny_sd(tmp_path / "x0", prediction_type="sample")
    with pytest.raises(UserError, match="supports prediction types epsilon, v_prediction"):
        build(StableDiffusion, str(sample_model))


def test_options_are_validated():
    from rewardkit.errors import RecipeError

    with pytest.raises(RecipeError, match="sd.timesteps: .*strictly decreasing"):
        StableDiffusion(model="m", timesteps=[300, 900])
    with pytest.raises(RecipeError, match="sd3.sigmas"):
        StableDiffusion3(model="m", sigmas=[1.0, 1.5])
    with pytest.raises(RecipeError, match="lora_rnak: unknown key .*lora_rank"):
        StableDiffusion(model="m", lora_rnak=4)


# --- precision and decoding options -------------------------------------------------------------
def test_bf16_frozen_weights_keep_fp32_adapter(tiny_sd):
    gen = build(StableDiffusion, tiny_sd, weights_dtype="bfloat16", lora_rank=4, num_steps=2)
    trainable = gen.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert gen.vae.dtype == gen.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in gen.unet.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.01)
    images = gen(PROMPTS, noise_for(gen), gen.sample_options())
    assert images.dtype == torch.float32
    images.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in trainable) and any(p.grad.abs().sum() > 0 for p in trainable)


def test_sliced_vae_decode_matches_full(tiny_sd):
    full, sliced = (build(StableDiffusion, tiny_sd, vae_decode=mode, num_steps=2) for mode in ("full", "sliced"))
    assert sliced.vae.use_slicing and not full.vae.use_slicing
    noise = noise_for(full)
    with torch.no_grad():
        torch.testing.assert_close(sliced(PROMPTS, noise, sliced.sample_options()), full(PROMPTS, noise, full.sample_options()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_deterministic_in_every_mode(models, family):
    """No submodule (LoRA layers included) runs in training mode: the same noise gives the same images."""
    cls, model = models[family]
    gen = build(cls, model, training="lora")
    gen.train()
    assert not any(m.training for m in gen.denoiser.modules())
    noise = noise_for(gen)
    with torch.no_grad():
        a = gen(["a cat", "a dog"], noise, gen.sample_options())
        b = gen(["a cat", "a dog"], noise, gen.sample_options())
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_run_apart_see_their_own_prompts_under_guidance(models, family):
    """Steps that run some rows of the batch apart give each row what a batch of its own gives (guidance on)."""
    cls, model = models[family]
    gen = build(cls, model, num_steps=3, guidance_scale=2.0, eta=0.5)
    prompts = ["a red cat", "a photo of a dog", "a blue car"]
    noise = noise_for(gen, 3)
    steps = torch.tensor([0, 2, 1])
    with torch.no_grad():
        together = gen(prompts, noise, SampleOptions(num_steps=3, supervise_step=steps))
        alone = [gen([p], noise[i : i + 1], SampleOptions(num_steps=3, supervise_step=int(steps[i]))) for i, p in enumerate(prompts)]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
