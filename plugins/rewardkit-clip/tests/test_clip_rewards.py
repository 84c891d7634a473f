"""rewardkit-clip: clip_score and laion_aesthetic on tiny random-weight open_clip configs (offline)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rewardkit.rewards.preprocess import preprocess

open_clip = pytest.importorskip("open_clip")

from rewardkit.errors import UserError  # noqa: E402
from rewardkit_clip import openclip  # noqa: E402
from rewardkit_clip.rewards import AestheticMLP, CLIPScore, LAIONAesthetic  # noqa: E402

TINY = "rk-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a red bicycle", "two cats on a sofa", "a lighthouse at dusk"]


def real_photo():
    """A real photograph that ships inside scikit-learn (found without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (the source of the bundled test photograph) is not installed")
    from PIL import Image

    path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg"
    return Image.open(path).convert("RGB")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Register the tiny config with open_clip and save random weights as safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("openclip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def clip_reward(tiny_weights):
    return CLIPScore(model=TINY, pretrained=str(tiny_weights))


@pytest.fixture(scope="module")
def aesthetic_reward(tiny_weights, tmp_path_factory):
    torch.manual_seed(1)
    head = AestheticMLP(TINY_CFG["embed_dim"])
    path = tmp_path_factory.mktemp("aes") / "aesthetic.pth"
    torch.save(head.state_dict(), path)
    return LAIONAesthetic(clip_model=TINY, clip_pretrained=str(tiny_weights), weights=str(path))


def images(n, h=40, w=56, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["clip", "aesthetic"])
def test_shape_gradient_and_batch_invariance(which, clip_reward, aesthetic_reward):
    reward = clip_reward if which == "clip" else aesthetic_reward
    x = images(3).requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        alone = reward(x[1:2].detach(), PROMPTS[1:2])
        assert torch.allclose(alone, scores[1:2].detach(), atol=1e-5, rtol=1e-5)
        # the prompt matters for clip_score, and the image for both
        assert not torch.allclose(reward(x[1:2].detach().flip(-1).roll(7, -2), PROMPTS[1:2]), alone)


def test_clip_score_is_scaled_cosine(clip_reward, tiny_weights):
    model = clip_reward.model
    x = images(2, 32, 32)
    with torch.no_grad():
        pre = (x - torch.tensor(openclip.model_preprocess_cfg(model)["mean"]).view(1, 3, 1, 1)) / torch.tensor(
            openclip.model_preprocess_cfg(model)["std"]
        ).view(1, 3, 1, 1)
        img = torch.nn.functional.normalize(model.encode_image(pre), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(TINY)(PROMPTS[:2])), dim=-1)
        expected = 100 * (img * txt).sum(-1)
        assert torch.allclose(clip_reward(x, PROMPTS[:2]), expected, atol=1e-4)


def test_a_pretrained_tag_sets_the_preprocessing(tiny_weights, monkeypatch):
    """A tag's own mean / std / resize mode (open_clip's pretrained table) decide the preprocessing, as in
    open_clip.create_model_and_transforms; here a tag of the tiny model whose checkpoint is the local file."""
    from rewardkit import hub

    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"squashed": {"hf_hub": "someone/tiny/", "mean": (0.5,) * 3, "std": (0.5,) * 3, "resize_mode": "squash"}})
    monkeypatch.setattr(hub, "resolve", lambda ref, **kw: tiny_weights if ref == "someone/tiny" else pytest.fail(ref))
    reward = CLIPScore(model=TINY, pretrained="squashed")
    assert (reward.pre["mean"], reward.pre["std"], reward.pre["resize_mode"]) == ((0.5,) * 3, (0.5,) * 3, "squash")
    x = images(2, 40, 56)  # not square: squashed to 32 x 32, not cropped
    with torch.no_grad():
        squashed = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        img = torch.nn.functional.normalize(reward.model.encode_image((squashed - 0.5) / 0.5), dim=-1)
        txt = torch.nn.functional.normalize(reward.model.encode_text(open_clip.get_tokenizer(TINY)(PROMPTS[:2])), dim=-1)
        torch.testing.assert_close(reward(x, PROMPTS[:2]), 100 * (img * txt).sum(-1), atol=1e-4, rtol=0)


def test_a_hub_repo_preprocess_config_sets_the_preprocessing(tiny_weights, tmp_path, monkeypatch):
    """Weights given as a hub reference: the repo's open_clip_config.json preprocess_cfg applies (open_clip's hf-hub:)."""
    from rewardkit import hub

    config = tmp_path / "open_clip_config.json"
    config.write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3, "resize_mode": "squash"}}))
    files = {"someone/tiny": tiny_weights, "someone/tiny/open_clip_config.json": config}
    monkeypatch.setattr(hub, "resolve", lambda ref, **kw: files[ref])
    reward = CLIPScore(model=TINY, pretrained="someone/tiny")
    assert (tuple(reward.pre["mean"]), tuple(reward.pre["std"]), reward.pre["resize_mode"]) == ((0.5,) * 3, (0.25,) * 3, "squash")


@pytest.mark.parametrize("model, tag, mean, resize_mode", [
    ("ViT-H-14", "laion2b_s32b_b79k", open_clip.OPENAI_DATASET_MEAN, "shortest"),  # the paper's CLIP score
    ("ViT-L-14", "laion2b_s32b_b82k", (0.5, 0.5, 0.5), "shortest"),
    ("ViT-H-14", "dfn5b", open_clip.OPENAI_DATASET_MEAN, "squash"),
])  # fmt: skip
def test_published_tags_preprocess_as_open_clip_says(model, tag, mean, resize_mode):
    with torch.device("meta"):  # parameters made on the meta device (device="meta" alone builds them first: ~1 min)
        built = open_clip.create_model(model, pretrained=None, device="meta")
    cfg = openclip.pretrained_preprocess_cfg(built, model, tag, what="test")
    assert (tuple(cfg["mean"]), cfg["resize_mode"]) == (tuple(mean), resize_mode) and cfg["size"] in (224, (224, 224))


def test_model_is_built_once_and_frozen(clip_reward, tiny_weights):
    again = CLIPScore(model=TINY, pretrained=str(tiny_weights), weight=2.0)
    assert again.model is clip_reward.model
    assert not any(p.requires_grad for p in again.model.parameters()) and not again.model.training


def test_half_precision_and_gradient_checkpointing(clip_reward, tiny_weights):
    x = images(2).requires_grad_(True)
    ref = clip_reward(x, PROMPTS[:2])
    (g_ref,) = torch.autograd.grad(ref.sum(), x)

    ckpt = CLIPScore(model=TINY, pretrained=str(tiny_weights), gradient_checkpointing=True)
    out = ckpt(x, PROMPTS[:2])
    (g_ckpt,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(g_ckpt, g_ref, atol=1e-5, rtol=1e-4)

    half = CLIPScore(model=TINY, pretrained=str(tiny_weights), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    out = half(x, PROMPTS[:2])
    assert out.dtype == torch.float32
    # bf16 keeps ~3 significant digits: cosines (x100) agree to about one unit
    assert torch.allclose(out, ref, atol=2.0)


def test_tensor_preprocessing_matches_open_clip_transform_on_a_photo():
    """Our differentiable preprocessing vs open_clip's own PIL evaluation transform.

    Both resize with bicubic antialiasing (PIL vs torch's PIL-compatible
    kernel); PIL additionally rounds the resized image to 8 bits and clamps
    it. That rounding (up to 0.5/255 before normalization, ~0.007 after
    dividing by CLIP's std of ~0.27) is the main difference; bicubic
    overshoot clamping at hard edges adds a few larger pixels. Hence:
    mean abs difference < 0.01, 99.9th percentile < 0.05, in normalized units
    where the data spans about 3.8.
    """
    from torchvision.transforms.functional import to_tensor

    photo = real_photo()
    official = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)(photo)
    ours = preprocess(to_tensor(photo)[None], 224, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)[0]
    assert ours.shape == official.shape == (3, 224, 224)
    diff = (ours - official).abs()
    assert diff.mean() < 0.01, diff.mean()
    assert torch.quantile(diff.flatten(), 0.999) < 0.05


def test_aesthetic_head_layout_matches_the_published_checkpoint():
    # sac+logos+ava1-l14-linearMSE.pth: layers.{0,2,4,6,7}.{weight,bias} on 768-d ViT-L/14 embeddings
    published = {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip
    with torch.device("meta"):
        head = AestheticMLP(768)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == published
    with torch.device("meta"):
        vit_l = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    assert vit_l.visual.output_dim == 768


def test_missing_weights_offline_is_a_user_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        CLIPScore()  # the default: ViT-H-14 laion2b_s32b_b79k, not cached here
    message = str(err.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message and "`pretrained`" in message and "hf download" in message
    with pytest.raises(UserError, match="no such file"):
        LAIONAesthetic(weights=str(tmp_path / "nope.pth"), clip_pretrained=str(tmp_path / "nope.safetensors"))


def test_missing_weights_exit_code_2(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    from rewardkit.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[run]\nsteps = 1\ndir = "{tmp_path / "run"}"\n[prompts]\ntrain = ["a cat"]\n'
        '[generator]\ntype = "pixels"\nheight = 16\nwidth = 16\n[rewards.clip_score]\n'
    )
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "CLIP-ViT-H-14" in err and "Traceback" not in err
