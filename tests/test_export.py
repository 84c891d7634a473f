"""`rewardkit export` and `rewardkit sample` on trained tiny SD / SDXL / SD3 / FLUX generators.

An exported LoRA (load_lora_weights) and an exported full pipeline
(from_pretrained) must reproduce, with plain diffusers and the same
timesteps, eta and noise, the images the generator itself makes.
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
from tiny_models import save_tiny  # noqa: E402

from rewardkit.cli import main  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    return {family: str(save_tiny(family, root / family)) for family in ("sd", "sdxl", "sd3", "flux", "zimage")}


def train(family, model, run_dir, **generator):
    """Two optimizer steps with a colour reward: enough to move the weights visibly."""
    from rewardkit.optimizer import Optimizer

    recipe = {
        "run": {"steps": 2, "batch_size": 2, "dir": str(run_dir), "trackers": [], "progress": False},
        "prompts": {"train": PROMPTS},
        "generator": {"type": family, "model": model, "num_steps": 2, **generator},
        "optimizer": {"lr": 0.05},
        "rewards": {"color": {}},
    }
    Optimizer.from_recipe(recipe).fit()
    return run_dir


def generator_images(run_dir, noise):
    from rewardkit.images import generate
    from rewardkit.plugins import load_registry
    from rewardkit.rundir import load_generator

    gen, _, _ = load_generator(run_dir, load_registry())
    return generate(gen, PROMPTS, noise), gen


def diffusers_images(pipe, settings, noise):
    """The pipeline called as rewardkit_export.json says, as docs/generators.md tells users to: FLUX takes its noise
    packed (as its pipeline makes it), SDXL its sizes as tuples (JSON has lists), and a list of prompts a list of
    negative prompts."""
    pipe.set_progress_bar_config(disable=True)
    latents = pipe._pack_latents(noise, *noise.shape) if type(pipe).__name__ == "FluxPipeline" else noise
    call = dict(settings["pipeline_call"])
    for key in ("original_size", "crops_coords_top_left"):
        if key in call:
            call[key] = tuple(call[key])
    if "negative_prompt" in call:
        call["negative_prompt"] = [call["negative_prompt"]] * len(PROMPTS)
    return pipe(list(PROMPTS), latents=latents, output_type="pt", **call).images  # a copy: ZImagePipeline rewrites the list


# the tiny FLUX at 16 px and 16 T5 tokens, the tiny Z-Image at 16 px and 48 tokens (their pipelines' defaults: 1024 px, 512)
SIZES = {"sd": {}, "sdxl": {}, "sd3": {}, "flux": {"height": 16, "width": 16, "max_sequence_length": 16},
         "zimage": {"height": 16, "width": 16, "max_sequence_length": 48}}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "zimage"])
def test_lora_export_reproduces_generator(base_models, family, tmp_path):
    import diffusers

    run = train(family, base_models[family], tmp_path / "run", training="lora", lora_rank=4, lora_alpha=8, guidance_scale=2.0,
                **SIZES[family])
    assert main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 0

    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    ours, gen = generator_images(run, noise)
    settings = json.loads((tmp_path / "lora" / "rewardkit_export.json").read_text())
    cls = getattr(diffusers, gen.pipeline_class)

    pipe = cls.from_pretrained(base_models[family])
    if family in ("sd", "sdxl"):
        pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "lora", subfolder="scheduler")
    base = diffusers_images(pipe, settings, noise)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    with_lora = diffusers_images(pipe, settings, noise)
    merged = diffusers_images(cls.from_pretrained(tmp_path / "full"), settings, noise)

    assert (base - ours).abs().max() > 1e-3  # training changed the images ...
    torch.testing.assert_close(with_lora, ours, atol=2e-5, rtol=0)  # ... and the exports carry the change
    torch.testing.assert_close(merged, ours, atol=2e-5, rtol=0)


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_exports_record_the_text_conditioning(base_models, tmp_path, t5):
    """text_encoder_3 and max_sequence_length are in rewardkit_export.json, and plain diffusers given them reproduces
    the generator (without T5: both the full export and the base under the LoRA load with text_encoder_3=None)."""
    import diffusers

    run = train("sd3", base_models["sd3"], tmp_path / "run", training="lora", lora_rank=4, text_encoder_3=t5, max_sequence_length=8)
    for fmt in ("lora", "diffusers"):
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(7))
    ours, _ = generator_images(run, noise)
    settings = json.loads((tmp_path / "lora" / "rewardkit_export.json").read_text())
    assert (settings["text_encoder_3"], settings["max_sequence_length"]) == (t5, 8)

    without = {} if settings["text_encoder_3"] else {"text_encoder_3": None, "tokenizer_3": None}  # diffusers wants them named
    full = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "diffusers", **without)
    assert (full.text_encoder_3 is not None) == t5
    torch.testing.assert_close(diffusers_images(full, settings, noise), ours, atol=2e-5, rtol=0)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(base_models["sd3"], **without)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(diffusers_images(pipe, settings, noise), ours, atol=2e-5, rtol=0)
    if t5:  # the recorded length matters: diffusers' default (256 T5 tokens) gives other images
        call = {k: v for k, v in settings["pipeline_call"].items() if k != "max_sequence_length"}
        default = diffusers_images(pipe, settings | {"pipeline_call": call}, noise)
        assert (default - ours).abs().max() > 1e-3


def test_full_export_reproduces_generator_and_lora_format_is_refused(base_models, tmp_path, capsys):
    import diffusers

    run = train("sd", base_models["sd"], tmp_path / "run", training="full")
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 0
    assert main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 2
    assert "training = 'lora'" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 2  # never overwrites

    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    ours, _ = generator_images(run, noise)
    settings = json.loads((tmp_path / "full" / "rewardkit_export.json").read_text())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "full")
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    torch.testing.assert_close(diffusers_images(pipe, settings, noise), ours, atol=2e-5, rtol=0)
    base = diffusers_images(diffusers.StableDiffusionPipeline.from_pretrained(base_models["sd"], scheduler=pipe.scheduler), settings, noise)
    assert (base - ours).abs().max() > 1e-3


def test_sample_command_is_reproducible_with_eta(base_models, tmp_path):
    from PIL import Image
    import numpy as np

    run = train("sd", base_models["sd"], tmp_path / "run", eta=0.8)
    for out in ("a", "b"):
        assert main(["sample", str(run), "--prompt", "a red cat", "-n", "2", "--out", str(tmp_path / out), "--seed", "5"]) == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "0001.png")) for d in ("a", "b"))
    assert (tmp_path / "a" / "grid.png").is_file()
    assert np.array_equal(a, b)
    assert main(["sample", str(run), "--prompt", "a red cat", "-n", "2", "--out", str(tmp_path / "c"), "--seed", "6"]) == 0
    assert not np.array_equal(a, np.asarray(Image.open(tmp_path / "c" / "0001.png")))


def test_export_of_pixels_generator_is_refused(tmp_path, capsys):
    from rewardkit.optimizer import Optimizer

    recipe = {
        "run": {"steps": 1, "batch_size": 1, "dir": str(tmp_path / "run"), "trackers": [], "progress": False},
        "prompts": {"train": ["x"]},
        "generator": {"type": "pixels", "height": 8, "width": 8},
        "rewards": {"color": {}},
    }
    Optimizer.from_recipe(recipe).fit()
    assert main(["export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 2
    assert "cannot be exported" in capsys.readouterr().err
