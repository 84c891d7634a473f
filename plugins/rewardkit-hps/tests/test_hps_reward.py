"""rewardkit-hps on a tiny random-weight open_clip config (offline)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rewardkit.rewards.preprocess import preprocess

open_clip = pytest.importorskip("open_clip")

from rewardkit.errors import UserError  # noqa: E402
from rewardkit_clip import openclip  # noqa: E402
from rewardkit_hps import HPS  # noqa: E402

TINY = "rk-test-tiny-hps"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a portrait of an old fisherman", "a bowl of ramen, studio light", "a castle in the clouds"]
LAYOUT = Path(__file__).with_name("hps_v2_checkpoint_layout.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint in the published files' format: {'state_dict': ...} saved with torch.save."""
    folder = tmp_path_factory.mktemp("hps")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    path = folder / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def hps(checkpoint):
    return HPS(model=TINY, weights=str(checkpoint))


def test_shape_gradient_batch_invariance(hps):
    x = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = hps(x, PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert (scores.abs() <= 100.0 + 1e-4).all()  # 100 * cosine
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        for i in range(3):
            alone = hps(x[i : i + 1].detach(), PROMPTS[i : i + 1])
            assert torch.allclose(alone, scores[i : i + 1].detach(), atol=1e-5, rtol=1e-5)


def test_scale_and_version_options(checkpoint, hps):
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    raw = HPS(model=TINY, weights=str(checkpoint), scale=1.0)
    with torch.no_grad():
        assert torch.allclose(hps(x, PROMPTS[:2]), 100 * raw(x, PROMPTS[:2]), atol=1e-4)
    assert raw.model is hps.model  # built once per process
    assert not raw.model.training and not any(p.requires_grad for p in raw.model.parameters())
    with pytest.raises(Exception, match="version"):
        HPS(model=TINY, weights=str(checkpoint), version="v3")


def test_gradient_checkpointing_and_half(checkpoint, hps):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    (g_ref,) = torch.autograd.grad(hps(x, PROMPTS[:2]).sum(), x)
    ckpt = HPS(model=TINY, weights=str(checkpoint), gradient_checkpointing=True)
    (g,) = torch.autograd.grad(ckpt(x, PROMPTS[:2]).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-4)
    half = HPS(model=TINY, weights=str(checkpoint), dtype="bfloat16")
    assert half.model is not hps.model and next(half.model.parameters()).dtype == torch.bfloat16
    assert torch.allclose(half(x, PROMPTS[:2]), hps(x, PROMPTS[:2]), atol=2.0)


def test_preprocessing_matches_hpsv2_eval_transform_on_a_photo():
    """HPSv2's preprocess_val (hpsv2/src/open_clip/transform.py, is_train=False):
    convert to RGB, ToTensor, Resize(224, BICUBIC) on the tensor, CenterCrop(224),
    normalize with CLIP's mean/std. It resizes tensors, not PIL images, so with
    torchvision's default antialias=True ours is the same computation: tight tolerance.
    """
    from PIL import Image
    from torchvision import transforms as T

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (the source of the bundled test photograph) is not installed")
    photo = Image.open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg").convert("RGB")
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    official = T.Compose([T.ToTensor(), T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.Normalize(mean, std)])(photo)
    ours = preprocess(T.functional.to_tensor(photo)[None], 224, mean, std)[0]
    assert torch.allclose(ours, official, atol=1e-5)


def test_published_checkpoint_layout_loads_into_open_clip_vit_h14():
    """Every tensor of the HPS v2/v2.1 checkpoints (686 names and shapes, dumped from
    the hpsv2 1.2.0 package's own ViT-H-14 definition) has a same-named, same-shaped
    tensor in open_clip's ViT-H-14, and nothing is left over; built on the meta device."""
    layout = json.loads(LAYOUT.read_text())
    assert len(layout) == 686
    with torch.device("meta"):
        model = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        state = {k: torch.empty(shape) for k, shape in layout.items()}
    openclip.load_weights(model, state, what="HPS v2 layout")  # raises on any missing/extra/mis-shaped tensor
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == layout
    assert sum(p.numel() for p in model.parameters()) > 980_000_000
    # and a layout that does not fit is rejected
    state.pop("visual.proj")
    with pytest.raises(UserError, match="missing"):
        openclip.load_weights(model, state, what="HPS v2 layout")


def test_missing_weights_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        HPS(version="v2.0")
    msg = str(err.value)
    assert "HPS v2.0 weights" in msg and "HPS_v2_compressed.pt" in msg and "xswu/HPSv2" in msg and "`weights`" in msg


def test_registered_through_the_entry_point():
    from rewardkit.plugins import load_registry

    info = load_registry().plugins["reward"]["hps"]
    assert info.cls is HPS and info.package == "rewardkit-hps"
