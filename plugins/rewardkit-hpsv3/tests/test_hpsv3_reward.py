"""rewardkit-hpsv3 on a tiny random-weight Qwen2-VL (offline).

The tiny model (rewardkit_hpsv3.tiny: 2 vision blocks of width 32, 2 decoder layers of width 64) is saved with
safetensors under the published checkpoint's names (checked against hpsv3_checkpoint_layout.json, made by
make_hpsv3_layout.py from the hpsv3 package's own model class), next to a processor folder (tokenizer, Qwen2-VL's
chat template, preprocessor_config.json, config.json) the plugin loads the way it loads Qwen/Qwen2-VL-7B-Instruct.
"""

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewardkit.errors import UserError  # noqa: E402
from rewardkit_hpsv3 import HPSv3  # noqa: E402
from rewardkit_hpsv3.tiny import IMAGE_MEAN, IMAGE_STD, PREPROCESSOR, QWEN2_VL_CHAT_TEMPLATE, write_tiny_files  # noqa: E402
from rewardkit_hpsv3.model import (  # noqa: E402
    FULL_CONFIG,
    FULL_VOCAB,
    INSTRUCTION,
    PIXELS,
    REWARD_QUERY,
    REWARD_TOKEN,
    HPSv3Model,
    architecture_config,
    checkpoint_key_to_ours,
    hpsv3_text,
    load_checkpoint,
    preprocess,
    resize,
    smart_resize,
)

LAYOUT = Path(__file__).with_name("hpsv3_checkpoint_layout.json")
PROMPTS = ["a red cat on the beach", "a painting of a blue house by the sea at sunset, oil on canvas", "a small bird"]


def published_layout() -> dict[str, list[int]]:
    """Names and shapes of HPSv3.safetensors: the state dict of hpsv3 1.0.0's own Qwen2VLRewardModelBT (transformers
    4.45.2) at Qwen2-VL-7B-Instruct's sizes, built on the meta device by make_hpsv3_layout.py (see its docstring)."""
    return json.loads(LAYOUT.read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's operations are small: on the shared 2-core machine two threads only contend (measured: the
    batch test 1.8 s with one thread, up to 16 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny files; their checkpoint names are exactly the published layout's, restricted to two layers."""
    from safetensors import safe_open

    folder = write_tiny_files(tmp_path_factory.mktemp("hpsv3"))
    with safe_open(str(folder / "HPSv3.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = re.compile(r"\.(blocks|layers)\.(\d+)\.")
    assert names == {k for k in published_layout() if not (m := layer.search(k)) or int(m.group(2)) < 2}
    return folder


@pytest.fixture(scope="module")
def reward(files):
    return HPSv3(weights=str(files / "HPSv3.safetensors"), processor=str(files / "processor"))


def test_prompt_is_hpsv3s():
    """The instruction and the reward query are hpsv3 1.0.0's INSTRUCTION and prompt_with_special_token
    (hpsv3/dataset/data_collator_qwen.py); SHA-256 digests computed from that package."""
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    assert hashlib.sha256(REWARD_QUERY.encode()).hexdigest() == "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    text = hpsv3_text("a {curly} cat")
    assert "Textual prompt - a {curly} cat\n" in text and text.endswith(f"ratings of this image: {REWARD_TOKEN}\n\nEND\n")


def test_preprocessing_matches_qwen2vl_image_processor_on_a_photo():
    """HPSv3's image path (hpsv3/dataset/utils.py fetch_image, then the processor): PIL bicubic resize of the uint8
    photo to smart_resize(h, w, 28, min = max = 256*28*28), then transformers' Qwen2-VL image processor (the PIL
    backend, as transformers 4.45.2's only Qwen2VLImageProcessor was) with the published settings: it keeps that size
    (its own range is 3136..12845056 pixels), rescales, normalizes, patchifies.

    Tolerance, resize path: PIL resamples 8-bit images in two separable passes and rounds each to uint8, the float
    tensor resize does not round. One rounding is at most 0.5/255; the first pass's rounding passes through the second
    pass's bicubic weights, whose absolute sum is below 1.1 (a = -0.5 kernel: 1 + 2 * 0.5 / 12 = 1.083 continuous), so
    b = (1 + 1.1) * 0.5/255 / min(std) = 0.0158 in normalized units bounds every entry where PIL does not clip. PIL
    also clips bicubic overshoot at hard edges to [0, 255] (in each pass): there the difference is larger, so entries
    beyond b may be at most as many as the resized pixels that overshoot [0, 1] in the float resize. The mean
    difference of two independent roundings is about 0.55 * 0.5/255/std; we require it below 0.5/255/min(std).
    (Bilinear, or bicubic without antialiasing, give a mean of ~0.03: this test fails for them.) Exact path: an image
    already at HPSv3's size (448 x 448 is a fixed point of smart_resize) is not resampled by either side, so the
    patches agree to float32 rounding of (x - mean) / std (values <= 2.2: 1e-6)."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        pytest.skip("scikit-learn (the source of the bundled test photograph) is not installed")
    photo = Image.open(Path(spec.submodule_search_locations[0]) / "datasets" / "images" / "china.jpg").convert("RGB")
    official = Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if "_type" not in k and "class" not in k})

    def tensor(im):
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255

    h, w = smart_resize(photo.height, photo.width)
    assert (h, w) == (364, 532) and h * w <= PIXELS and h % 28 == w % 28 == 0
    ref = official(images=[photo.resize((w, h), Image.BICUBIC)], return_tensors="pt")
    ours, grid = preprocess(tensor(photo), IMAGE_MEAN, IMAGE_STD)
    assert torch.equal(grid, ref["image_grid_thw"]) and grid.tolist() == [[1, h // 14, w // 14]]
    assert ours.shape == ref["pixel_values"].shape == (h * w // 196, 3 * 2 * 14 * 14)
    diff = (ours - ref["pixel_values"]).abs()
    bound = (1 + 1.1) * 0.5 / 255 / min(IMAGE_STD)
    overshoot = ((resized := resize(tensor(photo))) < 0).logical_or(resized > 1).float().mean()
    assert diff.mean() < 0.5 / 255 / min(IMAGE_STD)
    assert (diff > bound).float().mean() <= overshoot < 0.02

    square = photo.resize((448, 448), Image.BICUBIC)
    assert smart_resize(448, 448) == (448, 448)
    ref = official(images=[square], return_tensors="pt")
    ours, grid = preprocess(tensor(square), IMAGE_MEAN, IMAGE_STD)
    assert torch.equal(grid, ref["image_grid_thw"]) and torch.allclose(ours, ref["pixel_values"], rtol=0, atol=1e-6)


def test_shape_gradient_batch_invariance_and_checkpointing(reward, files):
    """Scores (B,) float32 with a finite non-zero image gradient; each image scored alone, with gradient
    checkpointing, gives its score and its gradient in the batch (a score depends on its own image only). Rows are
    padded on the right (HPSv3's processor uses padding_side='right'): a row's tokens keep their positions 0..n-1
    and, attention being causal, never see the padding, so alone and batched compute the same numbers up to float32
    kernel blocking (a few ulp: ~1e-7 measured), and recomputation repeats the same float32 operations. 1e-5 is 100x
    that and well below what changing the prompt does to the tiny model's score (~4e-4, checked in the next test:
    the prompt is a few tokens of HPSv3's ~800)."""
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
    scores = reward(x, PROMPTS[:2])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    ckpt = HPSv3(weights=str(files / "HPSv3.safetensors"), processor=str(files / "processor"), gradient_checkpointing=True)
    assert ckpt.net is reward.net  # the option is applied per call, not baked into the shared model
    for i in range(2):
        xi = x[i : i + 1].detach().requires_grad_(True)
        alone = ckpt(xi, PROMPTS[i : i + 1])
        (gi,) = torch.autograd.grad(alone.sum(), xi)
        assert torch.allclose(alone, scores[i : i + 1], atol=1e-5, rtol=1e-5)
        assert torch.allclose(gi, grad[i : i + 1], atol=1e-5 * grad.abs().max(), rtol=1e-4)


def test_score_equals_transformers_qwen2vl_forward_on_processor_inputs(reward, files):
    """Independent computation of HPSv3's score: transformers' Qwen2VLProcessor (the tokenizer loaded from the
    folder, <|Reward|> added as HPSv3's create_model_and_processor does, Qwen2-VL's chat template, the PIL image
    processor) makes the inputs from HPSv3's messages exactly as hpsv3/inference.py prepare_batch does (padding=True,
    right side); transformers' Qwen2VLModel.forward (weights renamed here by hand) runs them with the sequential
    positions HPSv3's forward gives its text model (position_ids=None in transformers 4.45.2) and with the rotary
    frequencies rounded to bfloat16 as HPSv3's model.to(torch.bfloat16) leaves them; HPSv3's head (Linear ReLU
    [Dropout] Linear ReLU Linear, from the checkpoint's rm_head tensors) on the hidden state at <|Reward|>; score =
    output 0 (mu). The image is uint8 at 448 x 448, so both sides get the same pixels (no resampling), and both
    compute in float32 (the plugin's patch embedding is a matmul, transformers' a conv3d: same sums, other order):
    1e-5 is float32 noise, well below the ~4e-4 the second prompt changes the score by."""
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLModel, Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (1, 448, 448, 3), generator=g, dtype=torch.uint8).expand(2, -1, -1, -1)  # one image
    images = [Image.fromarray(p.numpy()) for p in pixels]
    tok = AutoTokenizer.from_pretrained(str(files / "processor"), padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if "_type" not in k and "class" not in k}),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    prompts = PROMPTS[:2]
    messages = [
        [{"role": "user", "content": [
            {"type": "image", "image": im, "min_pixels": PIXELS, "max_pixels": PIXELS},
            {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + REWARD_QUERY},
        ]}]
        for im, p in zip(images, prompts)
    ]  # fmt: skip
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = proc(text=text, images=images, padding=True, return_tensors="pt")
    assert batch.attention_mask[0, -1] == 0 and batch.attention_mask[1, -1] == 1  # right padding

    state = load_file(str(files / "HPSv3.safetensors"))
    ref = Qwen2VLModel(Qwen2VLConfig.from_dict(json.loads((files / "processor" / "config.json").read_text()))).eval()
    ref.load_state_dict(
        {("" if k.startswith("visual.") else "language_model.") + (k[len("model.") :] if k.startswith("model.") else k): v
         for k, v in state.items() if k.startswith(("visual.", "model."))},
        strict=True,
    )  # fmt: skip
    for name, buf in list(ref.named_buffers()):
        if name.endswith("inv_freq"):
            owner, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(owner), attr, buf.bfloat16().float())
    b, length = batch.input_ids.shape
    with torch.no_grad():
        hidden = ref(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, position_ids=torch.arange(length).expand(3, b, length),
        ).last_hidden_state  # fmt: skip
        at = batch.input_ids == tok.convert_tokens_to_ids(REWARD_TOKEN)
        assert at.sum(1).tolist() == [1, 1]
        h = F.relu(F.linear(hidden[at], state["rm_head.0.weight"], state["rm_head.0.bias"]))
        h = F.relu(F.linear(h, state["rm_head.3.weight"], state["rm_head.3.bias"]))
        expected = F.linear(h, state["rm_head.5.weight"], state["rm_head.5.bias"])[:, 0]
        x = pixels.permute(0, 3, 1, 2).float() / 255
        ours = reward(x, prompts)
        ids, mask, _ = reward.processor.encode(prompts, 256)
    assert torch.equal(ids, batch.input_ids) and torch.equal(mask, batch.attention_mask)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (ours, expected)
    assert (expected[0] - expected[1]).abs() > 1e-4  # same image, other prompt: the prompt matters


def test_loaded_weights_cache_and_frozen(reward, files):
    from safetensors.torch import load_file

    original = load_file(str(files / "HPSv3.safetensors"))
    net = reward.net
    assert torch.equal(net.model.visual.blocks[1].attn.qkv.weight, original["visual.blocks.1.attn.qkv.weight"])
    assert torch.equal(net.model.visual.merger.mlp[2].bias, original["visual.merger.mlp.2.bias"])
    assert torch.equal(net.model.language_model.layers[1].self_attn.k_proj.weight, original["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(net.model.language_model.embed_tokens.weight, original["model.embed_tokens.weight"])
    assert torch.equal(net.rm_head[5].weight, original["rm_head.5.weight"])
    inv_freq = net.model.language_model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, inv_freq.bfloat16().float())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    again = HPSv3(weights=str(files / "HPSv3.safetensors"), processor=str(files / "processor"), weight=0.5)
    assert again.net is reward.net and again.processor is reward.processor  # built once per process


def test_bfloat16_path(reward, files):
    """dtype='bfloat16' builds a second model (the cached float32 one is not cast) whose towers are bfloat16 and head
    float32; it scores in float32. The bound is a sanity check, not an accuracy claim: measured differences are ~2e-3
    (hpsv3's own model in bfloat16 vs float32, transformers 4.45.2, differs by the same ~2e-3 on this tiny config),
    and 0.05 is half the score's magnitude, so NaNs or a mis-plumbed dtype fail."""
    x = torch.rand(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    half = HPSv3(weights=str(files / "HPSv3.safetensors"), processor=str(files / "processor"), dtype="bfloat16")
    assert half.net is not reward.net and reward.net.rm_head[0].weight.dtype == torch.float32
    assert half.net.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16 and half.net.rm_head[0].weight.dtype == torch.float32
    with torch.no_grad():
        low, ref = half(x, PROMPTS[:1]), reward(x, PROMPTS[:1])
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and torch.allclose(low, ref, atol=0.05)
    half.use_precision(torch.float32)  # dtype='bfloat16' is fixed: the run's precision does not change it
    assert half.net.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16


def test_mapping_covers_every_tensor_of_the_published_checkpoint():
    """Full-size model (Qwen2-VL-7B-Instruct's config values, as in make_hpsv3_layout.py) on the meta device: each of
    the 736 tensors of HPSv3.safetensors' layout maps onto a tensor of the same shape, except lm_head.weight (unused),
    every tensor of the model receives exactly one; the loader accepts that layout and refuses it with one tensor
    missing or of another shape."""
    spec = importlib.util.spec_from_file_location("make_hpsv3_layout", Path(__file__).with_name("make_hpsv3_layout.py"))
    dump = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dump)
    assert FULL_CONFIG == dump.QWEN2_VL_7B_INSTRUCT_CONFIG  # the sizes the layout was dumped at are the plugin's
    assert FULL_VOCAB == dump.TOKENIZER_LENGTH_WITH_REWARD_TOKEN
    layout = published_layout()
    assert len(layout) == 736 and layout["model.embed_tokens.weight"] == [151658, 3584]
    with torch.device("meta"):
        model = HPSv3Model(architecture_config(FULL_CONFIG, FULL_VOCAB))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = {}
    for key, shape in layout.items():
        name = checkpoint_key_to_ours(key)
        if name is None:
            assert key == "lm_head.weight"
            continue
        assert name in ours, f"{key} -> {name}: no such tensor"
        assert ours[name] == shape, f"{key} -> {name}: shape {ours[name]} != {shape}"
        assert name not in mapped, f"{key} and {mapped.get(name)} both map to {name}"
        mapped[name] = key
    assert set(mapped) == set(ours)
    n = sum(p.numel() for p in model.parameters())
    assert n + 151658 * 3584 == 8_292_152_882  # the published model's count (make_hpsv3_layout.py) less lm_head
    with pytest.raises(KeyError):
        checkpoint_key_to_ours("vision_tower.blocks.0.norm1.weight")
    meta = {new: torch.empty(layout[k], device="meta") for k in layout if (new := checkpoint_key_to_ours(k))}
    load_checkpoint(model, meta, what="HPSv3 weights")  # the loader's own check: the full layout fits
    del meta["model.language_model.norm.weight"]
    with pytest.raises(UserError, match="missing.*language_model.norm.weight"):
        load_checkpoint(model, meta, what="HPSv3 weights")
    meta["model.language_model.norm.weight"] = torch.empty(3584, device="meta")
    meta["rm_head.5.weight"] = torch.empty(1, 16, device="meta")  # a one-output head: not HPSv3's
    with pytest.raises(UserError, match="rm_head.5.weight"):
        load_checkpoint(model, meta, what="HPSv3 weights")


def test_missing_files_offline(monkeypatch, tmp_path, files):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as err:
        HPSv3(processor=str(files / "processor"))
    msg = str(err.value)
    assert "HPSv3 weights" in msg and "MizzenAI/HPSv3" in msg and "HPSv3.safetensors" in msg and "`weights`" in msg
    assert "hf download MizzenAI/HPSv3 HPSv3.safetensors" in msg
    with pytest.raises(UserError) as err:
        HPSv3(weights=str(files / "HPSv3.safetensors"))  # Qwen/Qwen2-VL-7B-Instruct: not cached here
    msg = str(err.value)
    assert "Qwen/Qwen2-VL-7B-Instruct" in msg and "config.json" in msg and "`processor`" in msg and "hf download" in msg
    torch.save({"w": torch.zeros(1)}, tmp_path / "HPSv3.pt")
    with pytest.raises(UserError, match="safetensors"):
        HPSv3(weights=str(tmp_path / "HPSv3.pt"), processor=str(files / "processor"))


def test_registered_through_the_entry_point():
    from rewardkit.plugins import load_registry

    info = load_registry().plugins["reward"]["hpsv3"]
    assert info.cls is HPSv3 and info.package == "rewardkit-hpsv3"
