"""`rewardkit export`'s model card (README.md), its kohya LoRA layout, its all-or-nothing folder and its progress bar.

The kohya file is checked through diffusers' own kohya conversion (load_lora_weights on it), against the
diffusers-layout export of the same run: same weights once loaded, same images from the same noise.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny  # noqa: E402

from rewardkit.cli import main  # noqa: E402
from rewardkit.errors import UserError  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]
BASE_CARD = "---\nlicense: mit\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n---\n\n# a tiny base\n"


def train(family, model, run_dir, steps=2, **generator):
    from rewardkit.optimizer import Optimizer

    recipe = {
        "run": {"steps": steps, "batch_size": 2, "dir": str(run_dir), "trackers": [], "progress": False},
        "prompts": {"train": PROMPTS},
        "generator": {"type": family, "model": model, "num_steps": 2, "training": "lora", "lora_rank": 4, "lora_alpha": 8, **generator},
        "optimizer": {"lr": 0.05},
        "rewards": {"color": {"weight": 2.0}, "smoothness": {"weight": 0.5}},
        "regularizers": {"weight_l2": {"weight": 0.1}},
    }
    Optimizer.from_recipe(recipe).fit()
    return run_dir


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A LoRA run (alpha 8 != rank 4, two rewards) on a tiny SD base whose own card says `license: mit`."""
    root = tmp_path_factory.mktemp("card")
    base = save_tiny("sd", root / "base")
    (base / "README.md").write_text(BASE_CARD)
    return base, train("sd", str(base), root / "run")


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_model_card_fields(sd_run, tmp_path):
    base, run = sd_run
    assert main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "full")]) == 0
    recipe = tomllib.loads((run / "recipe.toml").read_text())

    meta, body = front_matter(tmp_path / "lora" / "README.md")
    assert meta["license"] == "mit"  # from the base's own card
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a local base: its own base on the Hub
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "diffusers"
    assert {"text-to-image", "diffusers", "lora", "rewardkit", "r0", "stable-diffusion"} <= set(meta["tags"])
    for label, reward in recipe["rewards"].items():  # both rewards, with their weights and estimators
        assert f"| {label} | {reward['type']} | {reward['weight']} | {reward['estimator']} |" in body
    assert "| weight_l2 | weight_l2 | 0.1 |" in body
    assert f"LoRA on the unet: rank 4, alpha 8, modules {', '.join(recipe['generator']['lora_target_modules'])}" in body
    assert "| steps (K) | 2 |" in body and "| resolution | 32 x 32 (width x height) |" in body

    embedded = tomllib.loads(body.split("```toml\n", 1)[1].split("```", 1)[0])
    assert embedded == {**recipe, "run": {k: v for k, v in recipe["run"].items() if k != "dir"}}
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "README.md", "exec")
    assert 'weight_name="pytorch_lora_weights.safetensors"' in code and f'from_pretrained("{base}", dtype=dtype)' in code

    newest = max((run / "samples").glob("step_*.png"))  # grids before the first step and after the last
    assert newest.name == "step_000002.png" and (run / "samples" / "step_000000.png").is_file()
    assert (tmp_path / "lora" / "sample_grid.png").read_bytes() == newest.read_bytes()
    assert "](sample_grid.png)" in body and '"a red cat"; "a photo of a dog"' in body

    meta, body = front_matter(tmp_path / "full" / "README.md")
    assert "lora" not in meta["tags"] and meta["base_model_relation"] == "finetune" and meta["license"] == "mit"
    assert "merged into the weights" in body and "load_lora_weights" not in body
    assert (tmp_path / "full" / "sample_grid.png").is_file()


def test_base_licences(tmp_path):
    from rewardkit.export import TESTBED_MODEL, base_licence
    from rewardkit.testbed.data import PACKAGED

    assert TESTBED_MODEL == PACKAGED  # the core names the testbed's teacher without importing the testbed

    assert base_licence("stable-diffusion-v1-5/stable-diffusion-v1-5").license == "creativeml-openrail-m"
    assert base_licence("stabilityai/stable-diffusion-xl-base-1.0").license == "openrail++"
    sd35 = base_licence("stabilityai/stable-diffusion-3.5-medium")
    assert (sd35.license, sd35.name) == ("other", "stabilityai-ai-community") and sd35.link.endswith("/LICENSE.md")
    dev = base_licence("black-forest-labs/FLUX.1-dev")
    assert (dev.license, dev.name) == ("other", "flux-1-dev-non-commercial-license")
    assert base_licence("black-forest-labs/FLUX.1-schnell").license == "apache-2.0"
    assert base_licence("Tongyi-MAI/Z-Image-Turbo").license == "apache-2.0"
    assert base_licence("rewardkit-testbed").license == "apache-2.0"
    unknown = base_licence(str(tmp_path))  # a local folder without a card, and a Hub id not in the table or the cache
    assert (unknown.license, unknown.source) == ("other", None)
    assert base_licence("someone/not-in-the-table").source is None


def assert_kohya_matches_diffusers_layout(cls, base, diffusers_dir, kohya_file, alpha, rank, size=(16, 16)):
    """Load both exports onto the base with diffusers (the kohya one through diffusers' kohya conversion): the same
    LoRA weights and scaling, and the same images from the same latents."""
    from safetensors import safe_open

    with safe_open(str(kohya_file), "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alphas == {float(alpha)}  # peft's lora_alpha, not the rank

    def pipe_with(folder, weight_name):
        pipe = cls.from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(folder, weight_name=weight_name)
        return pipe

    ours = pipe_with(diffusers_dir, "pytorch_lora_weights.safetensors")
    theirs = pipe_with(kohya_file.parent, kohya_file.name)
    a = {k: v for k, v in ours.unet.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in theirs.unet.state_dict().items() if "lora_" in k}
    assert a and a.keys() == b.keys() and len(a) == 2 * sum(k.endswith(".alpha") for k in keys)  # every module: A and B
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    layer = theirs.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == pytest.approx(alpha / rank)

    latents = torch.randn((2, 4, *size), generator=torch.Generator().manual_seed(5))
    call = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt", height=8 * size[0], width=8 * size[1])
    with_diffusers = ours(PROMPTS, latents=latents, **call).images
    with_kohya = theirs(PROMPTS, latents=latents, **call).images
    torch.testing.assert_close(with_kohya, with_diffusers, atol=1e-5, rtol=0)
    theirs.unload_lora_weights()
    assert (theirs(PROMPTS, latents=latents, **call).images - with_kohya).abs().max() > 1e-3  # the LoRA does something


def test_kohya_lora_loads_through_diffusers_conversion(sd_run, tmp_path):
    import diffusers

    base, run = sd_run
    assert main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "diffusers")]) == 0
    assert main(["export", str(run), "--format", "lora", "--lora-layout", "kohya", "--out", str(tmp_path / "kohya")]) == 0
    kohya = tmp_path / "kohya" / "kohya.safetensors"  # named after the folder
    assert_kohya_matches_diffusers_layout(diffusers.StableDiffusionPipeline, base, tmp_path / "diffusers", kohya, alpha=8, rank=4)
    meta, body = front_matter(tmp_path / "kohya" / "README.md")
    assert "lora" in meta["tags"] and f'weight_name="{kohya.name}"' in body and "ComfyUI" in body


def sdxl_generator(base, targets, alpha=6.0):
    """An SDXL generator with a rank-4 LoRA whose B weights are random (not zero as at the start of training), so
    every module's conversion shows in the weights and the images; no training run needed."""
    from rewardkit.generators.sdxl import StableDiffusionXL

    gen = StableDiffusionXL(model=str(base), num_steps=2, lora_rank=4, lora_alpha=alpha, lora_target_modules=targets)
    gen.setup(PROMPTS, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in gen.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return gen.eval()


def test_kohya_sdxl_unet_lora_with_resnet_and_feed_forward_modules(tmp_path):
    import diffusers

    from rewardkit.export import export_generator

    base = save_tiny("sdxl", tmp_path / "base")
    gen = sdxl_generator(base, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"])
    export_generator(gen, tmp_path / "diffusers", "lora")
    export_generator(gen, tmp_path / "sdxl-kohya", "lora", lora_layout="kohya")
    assert_kohya_matches_diffusers_layout(diffusers.StableDiffusionXLPipeline, base, tmp_path / "diffusers",
                                          tmp_path / "sdxl-kohya" / "sdxl-kohya.safetensors", alpha=6.0, rank=4)

    # a module diffusers' kohya conversion maps elsewhere (its name heuristics drop add_embedding's index): refused
    gen = sdxl_generator(base, ["to_q", "add_embedding.linear_1"])
    with pytest.raises(UserError, match="add_embedding.linear_1"):
        export_generator(gen, tmp_path / "refused", "lora", lora_layout="kohya")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob(".refused*"))


def test_testbed_kohya_export_card_code_runs(tmp_path):
    """The packaged teacher: Apache-2.0 like rewardkit, no Hub base_model; the card's own loading code, run as
    written (the kohya file through diffusers' conversion), draws an image."""
    from rewardkit.optimizer import Optimizer

    recipe = {
        "run": {"steps": 1, "batch_size": 2, "dir": str(tmp_path / "run"), "trackers": [], "progress": False},
        "prompts": {"train": ["a handwritten digit 7", "the number three"]},
        "generator": {"type": "testbed", "num_steps": 2, "training": "lora", "lora_rank": 2, "report": False},
        "rewards": {"color": {}},
    }
    Optimizer.from_recipe(recipe).fit()
    out = tmp_path / "digits"
    assert main(["export", str(tmp_path / "run"), "--format", "lora", "--lora-layout", "kohya", "--out", str(out)]) == 0
    meta, body = front_matter(out / "README.md")
    assert meta["license"] == "apache-2.0" and "base_model" not in meta and "rewardkit-testbed" in meta["tags"]
    code = body.split("```python\n", 1)[1].split("```", 1)[0].replace('"path/to/this/folder"', repr(str(out)))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["image"].size == (16, 16)


def test_kohya_layout_refusals(tmp_path, capsys):
    """Families whose kohya layout is not written, and --lora-layout without --format lora: exit 2, nothing written."""
    base = save_tiny("sd3", tmp_path / "base")
    run = train("sd3", str(base), tmp_path / "run", steps=1)
    assert main(["export", str(run), "--format", "lora", "--lora-layout", "kohya", "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "sd (SD 1.x / 2.x) and sdxl" in err and "'sd3'" in err and "--lora-layout diffusers" in err
    assert main(["export", str(run), "--format", "diffusers", "--lora-layout", "kohya", "--out", str(tmp_path / "d")]) == 2
    assert "with --format lora" in capsys.readouterr().err
    assert not any((tmp_path / "k").iterdir()) and not (tmp_path / "d").exists()


def test_failed_export_leaves_nothing_that_looks_complete(sd_run, tmp_path, monkeypatch):
    import rewardkit.export as export

    def broken(*args, **kwargs):
        raise RuntimeError("a bug while writing the card")

    monkeypatch.setattr(export, "model_card", broken)
    _, run = sd_run
    with pytest.raises(RuntimeError, match="a bug"):
        main(["export", str(run), "--format", "lora", "--out", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == [tmp_path / "out"] and not any((tmp_path / "out").iterdir())  # no weights, no .partial


def test_progress_bar_counts_written_bytes(tmp_path, monkeypatch):
    import time

    from rewardkit.export import written_bytes_bar

    monkeypatch.setenv("REWARDKIT_PROGRESS", "1")  # shown although the stream is no terminal
    stream = io.StringIO()
    with written_bytes_bar(tmp_path, 4096, "exporting", file=stream, interval=0.01) as bar:
        (tmp_path / "a.bin").write_bytes(b"x" * 1000)
        end = time.monotonic() + 10
        while bar.n < 1000 and time.monotonic() < end:  # polled from its thread while the block still writes
            time.sleep(0.01)
        assert bar.n == 1000
    assert "exporting" in stream.getvalue() and "100%" in stream.getvalue()
    monkeypatch.setenv("REWARDKIT_PROGRESS", "0")
    with written_bytes_bar(tmp_path, 4096, "hidden", file=stream) as bar:
        assert bar.disable
    assert "hidden" not in stream.getvalue()


def test_export_into_the_current_folder_is_refused_with_a_message(sd_run, tmp_path, monkeypatch, capsys):
    """The export is renamed onto --out as a whole, so '.' (or a folder holding it) cannot be it: exit 2, not a
    half-made folder reported as a failed write."""
    _, run = sd_run
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["export", str(run), "--format", "lora", "--out", "."]) == 2
    assert "is the current folder" in capsys.readouterr().err
    assert list(here.iterdir()) == [] and list(tmp_path.glob(".*partial*")) == []
