"""rewardkit-pickscore on a tiny random-weight CLIPModel, saved and loaded as a user would (offline)."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewardkit.errors import UserError
from rewardkit.testbed.models import byte_characters
from rewardkit_pickscore import PickScore
from rewardkit_pickscore.model import ImageTransform, PickScoreNet, full_size_config, load_weights, read_preprocessor_config

LAYOUT = Path(__file__).with_name("pickscore_v1_checkpoint_layout.json")
EPS = torch.finfo(torch.float32).eps
PROMPTS = [
    "a portrait of an old fisherman",
    "a bowl of ramen, studio light",
    "a castle in the clouds, " * 5,  # > 77 tokens with the character-level vocabulary: truncated
]
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json, as published (PickScore's processor)
PUBLISHED_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}  # fmt: skip
TINY_SIZE = 32
# Real CLIP's vocabulary order (bytes, bytes + "</w>", merges, then the two specials) without merges: every character a token.
VOCAB = [*byte_characters(), *(c + "</w>" for c in byte_characters()), "<|startoftext|>", "<|endoftext|>"]
TINY = dict(
    projection_dim=16,
    logit_scale_init_value=4.0,  # exp = 54.6: neither CLIP's default (14.3) nor its cap (100), so a hard-coded scale shows
    text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        vocab_size=len(VOCAB), bos_token_id=len(VOCAB) - 2, eos_token_id=len(VOCAB) - 1, pad_token_id=len(VOCAB) - 1,
    ),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TINY_SIZE, patch_size=16),
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test downloads: the hub is off for transformers (its constant) and for rewardkit.hub (the variable)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny PickScore in the published formats: model/ (save_pretrained: config.json + model.safetensors), legacy/
    (pytorch_model.bin with the position_ids buffers old transformers saved), processor/ (vocab.json, merges.txt,
    preprocessor_config.json at the tiny input size)."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(**TINY)).eval()
    with torch.no_grad():  # LayerNorms start at 1 / 0: perturb every tensor, so that a tensor loaded into the wrong place shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder / "model")
    (folder / "legacy").mkdir()
    (folder / "legacy" / "config.json").write_text((folder / "model" / "config.json").read_text())
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange((TINY_SIZE // 16) ** 2 + 1)[None]
    torch.save(state, folder / "legacy" / "pytorch_model.bin")
    proc = folder / "processor"
    proc.mkdir()
    (proc / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (proc / "merges.txt").write_text("#version: 0.2\n")
    (proc / "preprocessor_config.json").write_text(json.dumps({**PUBLISHED_PREPROCESSOR, "size": TINY_SIZE, "crop_size": TINY_SIZE}))
    return folder


@pytest.fixture(scope="module")
def reward(files):
    return PickScore(weights=str(files / "model"), processor=str(files / "processor"))


def batch_tolerance(scale: float) -> float:
    """Scoring images alone or in a batch (prompts padded to other lengths), or through another code path, may round
    float32 operations differently: ~1 eps each, over ~30 matmuls / norms of two 2-layer towers, each a sum of <= 64
    terms. Rounding errors add like a random walk: sqrt(30 * 64) eps of relative error in the cosine (|cos| <= 1),
    times the logit scale."""
    return scale * math.sqrt(30 * 64) * EPS


def test_shape_gradient_batch_invariance(reward):
    x = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    tol = batch_tolerance(reward.net.clip.logit_scale.exp().item())
    with torch.no_grad():
        for i in range(3):
            alone = reward(x[i : i + 1].detach(), PROMPTS[i : i + 1])
            assert (alone - scores[i]).abs().item() <= tol
        assert (reward(x[:1].detach(), PROMPTS[1:2]) - scores[0]).abs().item() > 100 * tol  # the prompt matters


def test_score_is_logit_scale_times_cosine_of_transformers_clip(reward, files):
    """Against transformers' own loading (from_pretrained), tokenizer files, PIL image processor and CLIPModel.forward."""
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref = CLIPModel.from_pretrained(files / "model", dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(files / "processor")
    processor = CLIPImageProcessorPil.from_pretrained(files / "processor")
    # uint8 images already at the model's input size: both pipelines skip resize and crop and see the same pixels
    pixels = np.random.default_rng(0).integers(0, 256, (3, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    pixel_values = processor(images=[Image.fromarray(p) for p in pixels], return_tensors="pt").pixel_values
    text = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert text.input_ids.shape[1] == 77  # the long prompt was truncated
    with torch.no_grad():
        out = ref(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixel_values)
        cos = (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1)
        expected = ref.logit_scale.exp() * cos
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        ours = reward(images, PROMPTS)
        # the two pixel pipelines: uint8 / 255 in float64 (numpy) vs float32 here, a few ulps of |x| <= 2.2 apart
        assert (reward.transform(images) - pixel_values).abs().max() <= 4 * 2.2 * EPS
    scale = ref.logit_scale.exp().item()
    # the checkpoint's (perturbed) logit scale, not the config's initial exp(4)
    assert abs(scale - math.exp(reward.net.clip.logit_scale.item())) <= 2 * scale * EPS and abs(scale - math.e**4) > 0.01
    assert torch.allclose(ours, expected, rtol=0, atol=batch_tolerance(scale))
    assert torch.allclose(expected, out.logits_per_image.diagonal(), rtol=0, atol=batch_tolerance(scale))
    assert expected.std() > 100 * batch_tolerance(scale)  # the scores differ: an image/prompt mix-up would show


def _photo():
    from PIL import Image

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (the source of the bundled test photograph) is not installed")
    return Image.open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg").convert("RGB")


VARIANT = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 200}}  # resize and crop differ


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
@pytest.mark.parametrize("settings", [{}, VARIANT], ids=["published", "resize256-crop224x200"])
def test_preprocessing_matches_clip_image_processor_on_a_photo(backend, settings):
    """transformers' CLIPImageProcessor with the published settings (and a variant whose resize and crop differ) on
    a real 640x427 photograph, against our tensor preprocessing.

    The processor resizes the uint8 image and stores the result in 8 bits: PIL's resampler rounds (and clips bicubic
    overshoot) after each of its two passes, which puts it up to several 8-bit levels from the exact resize at sharp
    edges. Our float resize is the exact one (PIL's own float-mode resize, to float32 precision). So the tolerance is
    measured, per pixel, on this photo: how far the processor's uint8 path lies from the same processor fed the
    float resize (do_resize off) - plus float32 slack. torchvision's uint8 kernel rounds its fixed-point sums on its
    own, so its 8-bit result may sit one level (1/255/std) away from PIL's.
    """
    from PIL import Image
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from rewardkit.rewards.preprocess import resized_size

    photo = _photo()
    cfg = {**PUBLISHED_PREPROCESSOR, **settings}
    official = (CLIPImageProcessorPil if backend == "pil" else CLIPImageProcessor)(**cfg)
    out = official(images=photo, return_tensors="pt").pixel_values[0]

    w, h = photo.size
    nh, nw = resized_size(h, w, 256 if settings else 224)
    arr = np.asarray(photo)
    channels = [Image.fromarray(arr[..., c] / np.float32(255), mode="F") for c in range(3)]  # PIL's float mode: no rounding
    exact = np.stack([np.asarray(im.resize((nw, nh), Image.BICUBIC)) for im in channels], -1)
    pil = CLIPImageProcessorPil(**cfg)
    from_exact = pil(images=exact, do_resize=False, do_rescale=False, input_data_format="channels_last", return_tensors="pt").pixel_values[0]
    pil_uint8 = pil(images=photo, return_tensors="pt").pixel_values[0]
    level = 1 / 255 / torch.tensor(cfg["image_std"]).view(3, 1, 1)
    slack = 1e-4  # float32 kernels (ours, PIL's float mode) agree to ~1.5e-5 of the [0, 1] range, /std ~0.26
    tol = (pil_uint8 - from_exact).abs() + slack + (level if backend == "torchvision" else 0)

    transform = ImageTransform.from_config(cfg)
    ours = transform(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255)[0]
    assert ours.shape == out.shape == (3, 224, 200 if settings else 224)
    assert (ours - from_exact).abs().max() <= slack  # the resize, crop and normalization themselves
    assert ((ours - out).abs() <= tol).all()  # and the official pipeline, 8-bit rounding included
    assert (ours - out).abs().mean() < 0.5 * level.min()  # rounding to 8 bits: about 1/4 level on average (uniform)


def test_preprocessing_defaults_are_the_published_settings(files, tmp_path):
    assert ImageTransform.from_config(read_preprocessor_config(str(tmp_path))) == ImageTransform.from_config(PUBLISHED_PREPROCESSOR)
    tiny = ImageTransform.from_config(read_preprocessor_config(str(files / "processor")))
    assert tiny.output_size == (TINY_SIZE, TINY_SIZE) and tiny != ImageTransform.from_config(PUBLISHED_PREPROCESSOR)
    with pytest.raises(UserError, match="takes 32x32"):  # the published 224 crop does not fit the tiny model
        proc = tmp_path / "proc"
        proc.mkdir()
        for name in ("vocab.json", "merges.txt"):
            (proc / name).write_text((files / "processor" / name).read_text())
        PickScore(weights=str(files / "model"), processor=str(proc))


def test_published_checkpoint_layout_loads_on_the_meta_device():
    """Every tensor of PickScore_v1's layout (912 names and shapes, see make_pickscore_layout.py) lands on a
    same-named, same-shaped tensor of the full-size model, nothing is left over, and only the two legacy
    position_ids buffers are dropped; a layout missing or adding a tensor is refused."""
    layout = json.loads(LAYOUT.read_text())
    tensors = layout["tensors"]
    assert len(tensors) == 912
    cfg = full_size_config()
    for tower in ("text_config", "vision_config"):
        for key, value in layout["config"][tower].items():
            assert getattr(getattr(cfg, tower), key) == value, (tower, key)
    assert cfg.projection_dim == layout["config"]["projection_dim"]
    with torch.device("meta"):
        net = PickScoreNet(cfg)
        state = {k: torch.empty(shape) for k, shape in tensors.items()}
    load_weights(net.clip, state, what="PickScore v1 layout")  # raises on any missing / extra / mis-shaped tensor
    ours = {k: list(v.shape) for k, v in net.clip.state_dict().items()}
    assert ours == {k: v for k, v in tensors.items() if not k.endswith(".embeddings.position_ids")}
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == sum(math.prod(v) for v in tensors.values()) - 77 - 257 == 986_109_441
    for broken, match in [
        ({k: v for k, v in state.items() if k != "visual_projection.weight"}, "1 missing"),
        ({**state, "text_model.embeddings.token_type_ids": torch.empty(1, 77, device="meta")}, "1 unexpected"),
        ({**state, "text_projection.weight": torch.empty(1024, 1280, device="meta")}, "size mismatch"),
    ]:
        with pytest.raises(UserError, match=match):
            load_weights(net.clip, broken, what="PickScore v1 layout")


def test_open_clip_counts_the_same_clip_h():
    """An independent definition of CLIP-H (open_clip's ViT-H-14, as HPS uses) has as many parameters."""
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        vit_h = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    assert sum(p.numel() for p in vit_h.parameters()) == 986_109_441


def test_legacy_checkpoint_file_and_cache(reward, files, tmp_path):
    """pytorch_model.bin (torch.load weights_only) with the old position_ids buffers, given as a file: same scores;
    one further tensor: refused. The network is built once per process."""
    legacy = PickScore(weights=str(files / "legacy" / "pytorch_model.bin"), processor=str(files / "processor"))
    x = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(legacy(x, PROMPTS[:2]), reward(x, PROMPTS[:2]))
    assert legacy.net is not reward.net and PickScore(weights=str(files / "model"), processor=str(files / "processor")).net is reward.net
    assert not reward.net.training and not any(p.requires_grad for p in reward.net.parameters())
    state = torch.load(files / "legacy" / "pytorch_model.bin", weights_only=True)
    state["text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(64, 32)
    (tmp_path / "config.json").write_text((files / "model" / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="1 unexpected"):
        PickScore(weights=str(tmp_path), processor=str(files / "processor"))


def test_bfloat16_and_gradient_checkpointing(reward, files):
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = reward(x, PROMPTS[:2])
    (g_ref,) = torch.autograd.grad(ref.sum(), x)

    ckpt = PickScore(weights=str(files / "model"), processor=str(files / "processor"), gradient_checkpointing=True)
    assert ckpt.net is reward.net  # shared: the setting applies per call
    calls = []
    # a pre-hook on the layer's first module: torch stops recomputing once it has the saved tensors it needs
    hook = reward.net.clip.vision_model.encoder.layers[0].layer_norm1.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        out = ckpt(x, PROMPTS[:2])
        (g,) = torch.autograd.grad(out.sum(), x)
        assert len(calls) == 2  # the layer ran again during backward
        calls.clear()
        torch.autograd.grad(reward(x, PROMPTS[:2]).sum(), x)
        assert len(calls) == 1
    finally:
        hook.remove()
    # recomputation repeats the same float32 operations: the batch tolerance, for the gradient relative to its size
    scale = reward.net.clip.logit_scale.exp().item()
    assert torch.allclose(out, ref, rtol=0, atol=batch_tolerance(scale))
    assert torch.allclose(g, g_ref, rtol=0, atol=batch_tolerance(1.0) * g_ref.abs().max().item())

    half = PickScore(weights=str(files / "model"), processor=str(files / "processor"), dtype="bfloat16")
    assert half.net is not reward.net and half.net.clip.visual_projection.weight.dtype == torch.bfloat16
    assert half.net.clip.logit_scale.dtype == torch.float32 and reward.net.clip.visual_projection.weight.dtype == torch.float32
    scores = half(x, PROMPTS[:2])
    assert scores.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: each rounding is off by <= 2^-9 relative. Weights and activations are
    # rounded at ~30 places per tower, errors adding up like a random walk: ~sqrt(30) * 2^-9 = 1.1 % of each feature
    # vector, so the cosine moves by up to ~2 * 1.1 % (two towers), times the logit scale: 2.2 % of 54.6 = 1.2.
    assert (scores - ref).abs().max() <= scale * 2 * math.sqrt(30) * 2**-9
    (g_half,) = torch.autograd.grad(half(x, PROMPTS[:2]).sum(), x)
    assert torch.isfinite(g_half).all() and F.cosine_similarity(g_half.flatten(), g_ref.flatten(), dim=0) > 0.9


def test_tokenizer_on_clips_real_vocabulary_matches_open_clip(tmp_path):
    """vocab.json / merges.txt rebuilt from CLIP's BPE file (shipped in the open_clip wheel) in the layout of the
    laion repo's files; the plugin's tokenizer must give open_clip's token ids (the tokenizer HPS / laion CLIP use)."""
    import gzip

    open_clip = pytest.importorskip("open_clip")
    from open_clip import tokenizer as oct

    from rewardkit_pickscore import load_tokenizer

    lines = gzip.open(Path(oct.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # as CLIP's own SimpleTokenizer reads the file
    chars = byte_characters()
    vocab = [*chars, *(c + "</w>" for c in chars), *("".join(m.split()) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = load_tokenizer(str(tmp_path))
    prompts = ["A photo of a CAT", "a bowl of ramen, studio-light!!", "an astronaut riding a horse on mars, 4k hdr"]
    ref = open_clip.get_tokenizer("ViT-H-14")(prompts)  # (3, 77), zero-padded
    ours = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    mask = ours.attention_mask.bool()
    assert torch.equal(ours.input_ids[mask], ref[ref != 0]) and torch.equal(mask, ref != 0)


def test_missing_weights_offline(monkeypatch, tmp_path, files):
    """Offline with an empty hub cache: UserError (the CLI's exit code 2) naming the file, the repo, the download
    command and the option, for the weights and for the processor."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        PickScore(processor=str(files / "processor"))
    msg = str(err.value)
    assert "PickScore v1 weights" in msg and "yuvalkirstain/PickScore_v1" in msg and "model.safetensors" in msg
    assert "`hf download yuvalkirstain/PickScore_v1 config.json model.safetensors`" in msg and "`weights`" in msg
    with pytest.raises(UserError) as err:
        PickScore(weights=str(files / "model"))
    msg = str(err.value)
    assert "vocab.json" in msg and "`processor`" in msg
    assert "`hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K vocab.json merges.txt preprocessor_config.json`" in msg
    with pytest.raises(UserError, match="config.json"):
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "model.safetensors").write_bytes((files / "model" / "model.safetensors").read_bytes())
        PickScore(weights=str(tmp_path / "w"), processor=str(files / "processor"))


def test_registered_through_the_entry_point():
    from rewardkit.plugins import load_registry

    info = load_registry().plugins["reward"]["pickscore"]
    assert info.cls is PickScore and info.package == "rewardkit-pickscore"
