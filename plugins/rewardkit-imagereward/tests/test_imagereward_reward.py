"""rewardkit-imagereward on a tiny random-weight BLIP (offline)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from rewardkit.errors import UserError
from rewardkit_imagereward import ImageReward
from rewardkit.rewards.preprocess import preprocess
from rewardkit_imagereward.model import (
    IMAGE_MEAN,
    IMAGE_STD,
    ImageRewardModel,
    checkpoint_key_to_ours,
    full_size_shapes,
    shapes_from_checkpoint,
)

LAYOUT = Path(__file__).with_name("imagereward_v1_checkpoint_layout.json")
IGNORED = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}
TINY = dict(
    vision_hidden=64, vision_layers=2, vision_intermediate=128, image_size=32, patch_size=16,
    text_hidden=64, text_layers=2, text_intermediate=128, vocab_size=40, max_positions=40,
)  # fmt: skip
WORDS = "a an the red blue green cat dog bird car house tree sky on in of with under photo painting big small sunset beach".split()
PROMPTS = ["a red cat on the beach", "a painting of a blue house", "a small bird in the tree"]


def published_layout() -> dict[str, list[int]]:
    """Names and shapes of ImageReward.pt: the state dict of ImageReward 1.5's own model
    (BLIP_Pretrain(vit='large') + MLP(768)), dumped from that package's code."""
    return json.loads(LAYOUT.read_text())


def tiny_original_checkpoint() -> dict[str, torch.Tensor]:
    """A random tiny model's weights, written back into the published checkpoint's names."""
    torch.manual_seed(0)
    ours = ImageRewardModel(TINY).state_dict()
    for v in ours.values():  # LayerNorms start at 1/0: randomize so a wrong mapping shows
        v.add_(0.02 * torch.randn_like(v))
    layer = re.compile(r"\.(blocks|layer)\.(\d+)\.")
    names = [k for k in published_layout() if not (m := layer.search(k)) or int(m.group(2)) < 2]
    original = {}
    for k in names:
        mapped = checkpoint_key_to_ours(k)
        original[k] = ours[mapped].clone() if mapped else torch.randn(3)
    original["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY["max_positions"])[None]
    assert len(original) == len(names) and {checkpoint_key_to_ours(k) for k in names} - {None} == set(ours)
    return original


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    torch.save(tiny_original_checkpoint(), folder / "ImageReward.pt")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return folder


@pytest.fixture(scope="module")
def reward(files):
    return ImageReward(weights=str(files / "ImageReward.pt"), tokenizer=str(files / "tokenizer"))


def test_shape_gradient_batch_invariance(reward):
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        for i in range(3):
            alone = reward(x[i : i + 1].detach(), PROMPTS[i : i + 1])
            assert torch.allclose(alone, scores[i : i + 1].detach(), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(reward(x[:1].detach(), PROMPTS[1:2]), scores[:1].detach())  # the prompt matters


def test_loaded_weights_are_the_checkpoints_and_score_formula(reward, files):
    original = torch.load(files / "ImageReward.pt", weights_only=True)
    net = reward.net
    assert torch.equal(net.vision.embeddings.class_embedding, original["blip.visual_encoder.cls_token"])
    assert torch.equal(net.vision.encoder.layers[1].self_attn.qkv.weight, original["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(net.text.encoder.layer[1].crossattention.self.key.weight, original["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"])
    assert torch.equal(net.mlp.layers[7].bias, original["mlp.layers.7.bias"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    again = ImageReward(weights=str(files / "ImageReward.pt"), tokenizer=str(files / "tokenizer"), weight=0.5)
    assert again.net is reward.net  # built once per process


def test_tokenization_matches_blip(files):
    """BLIP's tokenizer is BERT's plus [DEC] (bos) and [ENC]; ImageReward pads/truncates to 35."""
    from rewardkit_imagereward import load_tokenizer

    tok = load_tokenizer(str(files / "tokenizer"))
    n = 5 + len(WORDS)
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n, n + 1] and tok.bos_token == "[DEC]"
    out = tok(["a red cat " * 20, "sky"], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert out.input_ids.shape == (2, 35) and (out.input_ids[:, 0] == tok.cls_token_id).all()
    assert out.attention_mask[1].sum() == 3  # [CLS] sky [SEP]


def test_half_precision_and_gradient_checkpointing(reward, files):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = reward(x, PROMPTS[:2])
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    ckpt = ImageReward(weights=str(files / "ImageReward.pt"), tokenizer=str(files / "tokenizer"), gradient_checkpointing=True)
    out = ckpt(x, PROMPTS[:2])
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5, rtol=1e-4)
    half = ImageReward(weights=str(files / "ImageReward.pt"), tokenizer=str(files / "tokenizer"), dtype="bfloat16")
    assert half.net.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert half.net.mlp.layers[0].weight.dtype == torch.float32
    assert torch.allclose(half(x, PROMPTS[:2]), ref, atol=0.1)


def test_preprocessing_matches_imagereward_transform_on_a_photo():
    """ImageReward's own transform (ImageReward/ImageReward.py, _transform(224)): PIL
    Resize(224, BICUBIC) of the shortest side, CenterCrop(224), RGB, ToTensor, Normalize
    with CLIP's mean/std. PIL rounds the resized image to 8 bits (up to 0.5/255, ~0.007
    after dividing by std ~0.27) and clamps bicubic overshoot at hard edges; so: mean abs
    difference < 0.01 and 99.9th percentile < 0.05 in normalized units (data span ~3.8)."""
    from PIL import Image
    from torchvision import transforms as T

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (the source of the bundled test photograph) is not installed")
    photo = Image.open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg")
    official = T.Compose(
        [T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(IMAGE_MEAN, IMAGE_STD)]
    )(photo)
    ours = preprocess(T.functional.to_tensor(photo.convert("RGB"))[None], 224, IMAGE_MEAN, IMAGE_STD)[0]
    diff = (ours - official).abs()
    assert ours.shape == official.shape == (3, 224, 224)
    assert diff.mean() < 0.01 and torch.quantile(diff.flatten(), 0.999) < 0.05


def test_mapping_covers_every_tensor_of_the_published_checkpoint():
    """Full-size model on the meta device: each of the 625 checkpoint tensors maps onto a
    tensor of the same shape (or is one of the 5 the reward does not use), and every tensor
    of the model receives exactly one checkpoint tensor."""
    layout = published_layout()
    assert len(layout) == 625
    with torch.device("meta"):
        model = ImageRewardModel(full_size_shapes())
        meta_state = {k: torch.empty(v) for k, v in layout.items()}
    assert shapes_from_checkpoint(meta_state) == full_size_shapes()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for key, shape in layout.items():
        name = checkpoint_key_to_ours(key)
        if name is None:
            assert key in IGNORED
            continue
        assert name in ours, f"{key} -> {name}: no such tensor"
        assert ours[name] == shape, f"{key} -> {name}: shape {ours[name]} != {shape}"
        assert name not in mapped, f"{key} and {mapped.get(name)} both map to {name}"
        mapped[name] = key
    assert set(mapped) == set(ours)
    assert 440_000_000 < sum(p.numel() for p in model.parameters()) < 460_000_000
    with pytest.raises(KeyError):
        checkpoint_key_to_ours("blip.some_new_module.weight")


def test_missing_weights_offline(monkeypatch, tmp_path, files):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        ImageReward(tokenizer=str(files / "tokenizer"))
    msg = str(err.value)
    assert "ImageReward v1.0 weights" in msg and "THUDM/ImageReward" in msg and "ImageReward.pt" in msg and "`weights`" in msg
    with pytest.raises(UserError, match="`tokenizer`") as err:
        ImageReward(weights=str(files / "ImageReward.pt"))  # google-bert/bert-base-uncased, not cached here
    assert "vocab.txt" in str(err.value)
