"""A trained few-step generator in downstream use (the paper's Fig. 16): image editing and ControlNet.

Editing is diffusers' img2img (SDEdit) on the generator's own steps: checked
against StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline
given the same latents and noise, and at the two ends (strength 0: the image
through the VAE; strength 1: plain sampling). ControlNet is checked against
StableDiffusionControlNetPipeline / StableDiffusionXLControlNetPipeline with
the same ControlNet, control image and noise, and the control image must
change the output.
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

from rewardkit.cli import main  # noqa: E402
from rewardkit.controlnet import Control  # noqa: E402
from rewardkit.generators.sd import StableDiffusion  # noqa: E402
from rewardkit.generators.sdxl import StableDiffusionXL  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]
CLASSES = {"sd": StableDiffusion, "sdxl": StableDiffusionXL}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    return {family: str(save_tiny(family, root / family)) for family in ("sd", "sdxl")}


def build(family, folders, **options):
    gen = CLASSES[family](model=folders[family], **options)
    gen.setup(PROMPTS, 0)
    return gen.eval()


def images_and_noise(gen, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((len(PROMPTS), 3, gen.height, gen.width), generator=g)
    return images, torch.randn((len(PROMPTS), *gen.noise_shape()), generator=g)


def close(ours, ref):
    torch.testing.assert_close(ours, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=0)


# --- editing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_strength_0_is_the_image_through_the_vae_and_strength_1_is_plain_sampling(folders, family):
    gen = build(family, folders, guidance_scale=2.0)
    images, noise = images_and_noise(gen)
    vae = gen.pipe.vae
    with torch.no_grad():
        roundtrip = (vae.decode(vae.encode(2 * images - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        close(gen.edit(PROMPTS, images, noise, 0.0), roundtrip)
        plain = gen(PROMPTS, noise, gen.sample_options())
        torch.testing.assert_close(gen.edit(PROMPTS, images, noise, 1.0), plain, rtol=0, atol=0)
        assert (gen.edit(PROMPTS, images, noise, 0.5) - plain).abs().max() > 1e-3  # the image matters in between


@pytest.mark.parametrize("family,strength", [("sd", 0.5), ("sdxl", 0.75)])
def test_editing_matches_diffusers_img2img(folders, family, strength):
    """The img2img pipeline given the generator's latents of the image (a 4-channel `image` is taken as latents) and
    a seeded generator draws the same noise; its timesteps from int(K * strength) on are the generator's last steps."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    gen = build(family, folders, guidance_scale=2.0)
    images, _ = images_and_noise(gen)
    with torch.no_grad():
        latents = gen.encode(images)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))  # what the pipeline draws from seed 5
    with torch.no_grad():
        ours = gen.edit(PROMPTS, images, noise, strength)
    cls = StableDiffusionImg2ImgPipeline if family == "sd" else StableDiffusionXLImg2ImgPipeline
    pipe = cls.from_pretrained(folders[family], **({"safety_checker": None} if family == "sd" else {}))
    pipe.scheduler = gen.export_scheduler()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=latents, strength=strength, num_inference_steps=4, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    close(ours, ref)


@pytest.mark.parametrize("pipeline,family", [("StableDiffusionImg2ImgPipeline", "sd"), ("FluxImg2ImgPipeline", "flux"),
                                             ("ZImageImg2ImgPipeline", "zimage")])
def test_edit_runs_as_many_steps_as_the_familys_img2img(pipeline, family):
    """The number of steps an edit runs is the family's img2img's (SD: int(K s); SD3 / FLUX / Z-Image: K - int(K - K s),
    one more at K = 4, s = 0.6), read from the pipeline's own get_timesteps on its scheduler."""
    import diffusers

    from rewardkit.generators.flux import Flux
    from rewardkit.generators.zimage import ZImage

    cls = getattr(diffusers, pipeline)
    generator = {"sd": StableDiffusion, "flux": Flux, "zimage": ZImage}[family]
    scheduler = diffusers.DDIMScheduler() if family == "sd" else diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = cls.__new__(cls)
    pipe.scheduler = scheduler
    for K in (1, 2, 4, 8):
        for strength in (0.0, 0.3, 0.5, 0.6, 0.75, 0.99, 1.0):
            scheduler.set_timesteps(K)
            _, n = cls.get_timesteps(pipe, K, strength, "cpu")
            assert generator.edit_steps(K, strength) == n, (K, strength)


def test_a_strength_that_runs_no_step_is_refused(folders):
    from rewardkit.errors import UserError

    gen = build("sd", folders, num_steps=4)
    images, noise = images_and_noise(gen)
    with pytest.raises(UserError, match="--strength 0.2 runs no step of this 4-step generator"):
        gen.edit(PROMPTS, images, noise, 0.2)


# --- ControlNet --------------------------------------------------------------------------------------
def tiny_controlnet(folder):
    """A ControlNet initialized from the base model's UNet (as ControlNets are), its zero-initialized
    convolutions moved off zero so that the control image has an effect."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"), conditioning_embedding_out_channels=(4, 8))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "controlnet_cond_embedding.conv_out" in name:  # the control image's path into the network
                p.copy_(torch.randn(p.shape, generator=g))
            elif "controlnet_down_blocks" in name or "controlnet_mid_block" in name:  # the residuals' zero convolutions
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_controlnet_matches_the_controlnet_pipeline_and_the_control_image_matters(folders, family):
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

    gen = build(family, folders, guidance_scale=2.0)
    net = tiny_controlnet(folders[family])
    control, noise = images_and_noise(gen, seed=1)
    with torch.no_grad():
        plain = gen(PROMPTS, noise, gen.sample_options())
        gen.control = Control(net, control, scale=0.8)
        ours = gen(PROMPTS, noise, gen.sample_options())
        gen.control = Control(net, 1 - control, scale=0.8)
        inverted = gen(PROMPTS, noise, gen.sample_options())
    gen.control = None

    base = gen.pipe
    components = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor", "image_encoder")}
    if family == "sd":
        pipe = StableDiffusionControlNetPipeline(**components, controlnet=net, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=net, add_watermarker=False)
    pipe.scheduler = gen.export_scheduler()  # the trained generator's base is the frozen pipeline here: LoRA B = 0
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, image=control, num_inference_steps=4, guidance_scale=2.0, controlnet_conditioning_scale=0.8,
               latents=noise, output_type="pt", height=gen.height, width=gen.width).images
    close(ours, ref)
    assert (ours - plain).abs().max() > 1e-3 and (ours - inverted).abs().max() > 1e-3


# --- the command ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(folders, tmp_path_factory):
    from rewardkit.optimizer import Optimizer

    run_dir = tmp_path_factory.mktemp("run") / "sd"
    recipe = {
        "run": {"steps": 1, "batch_size": 2, "dir": str(run_dir), "trackers": [], "progress": False},
        "prompts": {"train": PROMPTS},
        "generator": {"type": "sd", "model": folders["sd"], "num_steps": 4, "lora_rank": 4},
        "rewards": {"color": {}},
    }
    Optimizer.from_recipe(recipe).fit()
    return run_dir


def test_sample_edits_and_controls_from_the_command_line(trained, folders, tmp_path):
    from PIL import Image

    from rewardkit.rundir import load_generator
    from rewardkit.plugins import load_registry

    gen = load_generator(trained, load_registry())[0]
    picture = tmp_path / "in.png"
    Image.fromarray((torch.rand(gen.height, gen.width, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy()).save(picture)
    net_dir = tmp_path / "controlnet"
    tiny_controlnet(folders["sd"]).save_pretrained(net_dir)
    args = ["sample", str(trained), "--prompt", "a red cat", "-n", "2"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--out", str(tmp_path / "edit"), "--init-image", str(picture), "--strength", "0.5"]) == 0
    assert main([*args, "--out", str(tmp_path / "ctrl"), "--controlnet", str(net_dir), "--control-image", str(picture)]) == 0
    pngs = {name: sorted((tmp_path / name).glob("[0-9]*.png")) for name in ("plain", "edit", "ctrl")}
    assert all(len(v) == 2 for v in pngs.values())
    read = {name: torch.tensor(list(Image.open(v[0]).getdata())).float() for name, v in pngs.items()}
    assert (read["edit"] - read["plain"]).abs().max() > 0 and (read["ctrl"] - read["plain"]).abs().max() > 0


def test_a_controlnet_for_another_base_model_exits_2_naming_the_difference(trained, folders, tmp_path, capsys):
    """An SDXL ControlNet on an SD generator would fail mid-sampling on a shape: refused before sampling."""
    from PIL import Image

    tiny_controlnet(folders["sdxl"]).save_pretrained(tmp_path / "sdxl-controlnet")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    code = main(["sample", str(trained), "--prompt", "a", "--out", str(tmp_path / "out"),
                 "--controlnet", str(tmp_path / "sdxl-controlnet"), "--control-image", str(tmp_path / "img.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--controlnet was made for another base model" in err and "addition_embed_type 'text_time'" in err, err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("extra, expected", [
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--controlnet", "somewhere"], "--controlnet MODEL and --control-image IMG go together"),
    (["--init-image", "absent.png"], "--init-image absent.png: no such file"),
    (["--init-image", "IMG", "--strength", "1.5"], "argument --strength: must be in [0, 1], got 1.5"),
    (["--controlnet", "no-such-org/no-such-controlnet", "--control-image", "IMG"], "--controlnet 'no-such-org/no-such-controlnet' could not be loaded"),
    (["--init-image", "NOT_AN_IMAGE"], "not a readable image"),
])
def test_bad_downstream_arguments_exit_2_naming_them(trained, tmp_path, capsys, monkeypatch, extra, expected):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    (tmp_path / "text.png").write_text("not an image")
    extra = [a.replace("NOT_AN_IMAGE", str(tmp_path / "text.png")).replace("IMG", str(tmp_path / "img.png")) for a in extra]
    try:
        code = main(["sample", str(trained), "--prompt", "a", "--out", str(tmp_path / "out"), *extra])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
