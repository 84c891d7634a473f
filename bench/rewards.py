"""Size, time and memory of every reward plugin: forward + backward at batch 4.

    python bench/rewards.py                  # tiny random-weight configs on CPU (as in the tests); markdown table
    python bench/rewards.py --full --device cuda   # full-size architectures, random weights (no download), on a GPU

Reported per reward:
- parameters at full size, counted on the meta device (no memory, no download);
- time: median and minimum wall time of forward + backward (gradient with respect
  to the images) over --repeat runs after one warm-up (on a shared machine the
  minimum is the steadier figure);
- activations: bytes the autograd graph holds for the backward pass (distinct
  tensors saved for backward, model weights excluded), measured with saved-tensor
  hooks; exact on CPU, where no allocator statistic exists;
- on CUDA, also the allocator's peak (torch.cuda.max_memory_allocated).

pyiqa rows appear only when pyiqa is installed (it is optional: non-commercial licence).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

BATCH = 4
PROMPTS = ["a red bicycle leaning on a wall", "two cats on a sofa", "a lighthouse at dusk", "a bowl of ramen"]
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_IR = dict(
    vision_hidden=64, vision_layers=2, vision_intermediate=128, image_size=32, patch_size=16,
    text_hidden=64, text_layers=2, text_intermediate=128, vocab_size=30524, max_positions=40,
)  # fmt: skip

TINY_PICKSCORE = dict(
    projection_dim=32,
    text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                     vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513),
    vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
)  # fmt: skip


# ----------------------------------------------------------------------------- full-size parameter counts
def full_size_params() -> dict[str, int]:
    counts = {}
    try:
        import open_clip

        with torch.device("meta"):  # (device="meta" alone would build the parameters first, then move them)
            vit_h = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
            vit_l = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
        counts["hps"] = counts["clip_score"] = sum(p.numel() for p in vit_h.parameters())
        from rewardkit_clip.rewards import AestheticMLP

        with torch.device("meta"):
            head = AestheticMLP(768)
        counts["laion_aesthetic"] = sum(p.numel() for p in vit_l.visual.parameters()) + sum(p.numel() for p in head.parameters())
    except ImportError:
        pass
    try:
        from rewardkit_imagereward.model import ImageRewardModel, full_size_shapes

        with torch.device("meta"):
            counts["imagereward"] = sum(p.numel() for p in ImageRewardModel(full_size_shapes()).parameters())
    except ImportError:
        pass
    try:
        from rewardkit_pickscore.model import PickScoreNet, full_size_config

        with torch.device("meta"):
            counts["pickscore"] = sum(p.numel() for p in PickScoreNet(full_size_config()).parameters())
    except ImportError:
        pass
    try:
        from rewardkit_hpsv3.model import FULL_CONFIG, FULL_VOCAB, HPSv3Model, architecture_config

        with torch.device("meta"):
            counts["hpsv3"] = sum(p.numel() for p in HPSv3Model(architecture_config(FULL_CONFIG, FULL_VOCAB)).parameters())
    except ImportError:
        pass
    return counts


# ----------------------------------------------------------------------------- building the rewards
def build_tiny(tmp: Path) -> dict:
    """Every installed reward on tiny random-weight configs, as the tests build them; the differentiable built-ins too."""
    from rewardkit.rewards.color import Color
    from rewardkit.rewards.smoothness import Smoothness

    rewards = {"color": Color(), "smoothness": Smoothness()}
    try:
        import open_clip
        from safetensors.torch import save_file

        (tmp / "rk-bench-tiny.json").write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(tmp)
        torch.manual_seed(0)
        model = open_clip.create_model("rk-bench-tiny", pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "clip.safetensors"))
        from rewardkit_clip.rewards import AestheticMLP, CLIPScore, LAIONAesthetic

        rewards["clip_score"] = CLIPScore(model="rk-bench-tiny", pretrained=str(tmp / "clip.safetensors"))
        torch.save(AestheticMLP(32).state_dict(), tmp / "aes.pth")
        rewards["laion_aesthetic"] = LAIONAesthetic(clip_model="rk-bench-tiny", clip_pretrained=str(tmp / "clip.safetensors"), weights=str(tmp / "aes.pth"))
        torch.save({"state_dict": model.state_dict()}, tmp / "hps.pt")
        from rewardkit_hps import HPS

        rewards["hps"] = HPS(model="rk-bench-tiny", weights=str(tmp / "hps.pt"))
    except ImportError:
        pass
    try:
        import rewardkit_imagereward  # noqa: F401  (installed?)

        torch.manual_seed(0)
        rewards["imagereward"] = _imagereward_with(_random_imagereward(TINY_IR), tmp)
    except ImportError:
        pass
    try:
        rewards["pickscore"] = _tiny_pickscore(tmp)
    except ImportError:
        pass
    try:
        from rewardkit_hpsv3 import HPSv3
        from rewardkit_hpsv3.tiny import write_tiny_files

        folder = write_tiny_files(tmp / "hpsv3")
        rewards["hpsv3"] = HPSv3(weights=str(folder / "HPSv3.safetensors"), processor=str(folder / "processor"))
    except ImportError:
        pass
    try:
        from rewardkit_pyiqa import PyIQA

        rewards["pyiqa (cnniqa)"] = PyIQA(metric="cnniqa", metric_options={"pretrained": None})
        rewards["pyiqa (musiq)"] = PyIQA(metric="musiq", metric_options={"pretrained": False})
    except Exception as exc:  # pyiqa missing (ImportError) or unusable (UserError)
        print(f"(no pyiqa rows: {type(exc).__name__}: {exc})", file=sys.stderr)
    return rewards


def _imagereward_with(make_net, tmp: Path, **options):
    """An ImageReward reward on `make_net(dtype)` (random weights), with a stand-in vocabulary. The plugin's loader is
    replaced for the rest of this process, so that the reward can rebuild its network in the run's dtype."""
    import rewardkit_imagereward as ir

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.strip(",").lower() for p in PROMPTS for w in p.split()})
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n")
    ir.load_model = lambda weights, dtype=torch.float32: make_net(dtype)
    return ir.ImageReward(weights="unused", tokenizer=str(tmp / "vocab.txt"), **options)


def _random_imagereward(shapes):
    from rewardkit_imagereward.model import ImageRewardModel

    def make(dtype):
        net = ImageRewardModel(shapes).to(dtype)
        net.mlp.float()  # as the plugin's loader: the head in float32
        return net.eval().requires_grad_(False)

    return make


def _pickscore_processor(tmp: Path, image_size: int) -> Path:
    """A character-level CLIP vocabulary (end-of-text the highest id) and the published preprocessing at image_size."""
    from rewardkit.testbed.models import byte_characters

    chars = byte_characters()
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    folder = tmp / f"pickscore-processor-{image_size}"
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": image_size, "crop_size": image_size}))
    return folder


def _tiny_pickscore(tmp: Path, **options):
    from transformers import CLIPConfig, CLIPModel

    from rewardkit_pickscore import PickScore

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**TINY_PICKSCORE)).save_pretrained(tmp / "pickscore")
    return PickScore(weights=str(tmp / "pickscore"), processor=str(_pickscore_processor(tmp, 32)), **options)


def _full_pickscore(tmp: Path, **options):
    """Full-size CLIP-H, random weights, no download; the plugin's loaders are replaced for the rest of the process."""
    import rewardkit_pickscore as ps
    from rewardkit_pickscore import model as m

    def make(config_path, weights_path, dtype=torch.float32):
        net = m.PickScoreNet(m.full_size_config())
        net.clip.init_weights()  # PickScoreNet skips initialization (a checkpoint overwrites every tensor)
        return net.to(dtype).eval().requires_grad_(False)

    m.resolve_model_files = lambda ref: (Path("unused"), Path("unused"))
    ps.load_net = make
    return ps.PickScore(processor=str(_pickscore_processor(tmp, 224)), **options)


def _full_hpsv3(tmp: Path, **options):
    """Full-size Qwen2-VL-7B + HPSv3's head, random weights, no download (a stand-in tokenizer, the published image
    settings); the plugin's loader is replaced for the rest of the process."""
    import rewardkit_hpsv3 as h3
    from rewardkit_hpsv3.model import FULL_CONFIG, FULL_VOCAB, HPSv3Model, architecture_config
    from rewardkit_hpsv3.tiny import write_tiny_files

    folder = write_tiny_files(tmp / "hpsv3")

    def make(weights, processor, dtype=torch.float32):
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # 7.7 B parameters built directly in dtype
        try:
            net = HPSv3Model(architecture_config(FULL_CONFIG, FULL_VOCAB))
        finally:
            torch.set_default_dtype(default)
        net.rm_head.float()
        net.image_token_id = processor.image_token_id
        return net.eval().requires_grad_(False)

    h3.load_model = make
    return h3.HPSv3(weights="unused", processor=str(folder / "processor"), **options)


def _random_open_clip(name, checkpoint, *, what, quick_gelu=False, dtype=torch.float32, vision_only=False):
    """The plugin's open_clip loader, with random weights and no cache: HPS and CLIP score get a ViT-H-14 each."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    model = (model.visual if vision_only else model).to(dtype).eval().requires_grad_(False)
    return model, None if vision_only else open_clip.get_tokenizer(name)


def build_full(tmp: Path, names=("hps", "clip_score", "laion_aesthetic", "imagereward", "pickscore", "hpsv3"), **options) -> dict:
    """Full-size architectures with random weights (no download), `names` of them, each built with `options`.

    The plugins' loaders are replaced for the rest of this process (a benchmark's process): rewards with
    dtype = 'auto' rebuild their networks when the run sets its precision."""
    from rewardkit import hub
    from rewardkit_clip import openclip

    resolve = hub.resolve
    hub.resolve = lambda ref, **kw: resolve(ref, **kw) if Path(ref).exists() else Path("unused")  # local files (a vocabulary) still load
    openclip.resolve_pretrained = lambda *a, **kw: ("unused", False)
    openclip.load_model = _random_open_clip
    import rewardkit_clip.rewards as cr
    from rewardkit_hps import HPS

    cr.load_aesthetic_head = lambda path: cr.AestheticMLP(768).eval().requires_grad_(False)
    rewards = {name: cls(**options) for name, cls in (("hps", HPS), ("clip_score", cr.CLIPScore), ("laion_aesthetic", cr.LAIONAesthetic)) if name in names}
    if "imagereward" in names:
        from rewardkit_imagereward.model import full_size_shapes

        rewards["imagereward"] = _imagereward_with(_random_imagereward(full_size_shapes()), tmp, **options)
    if "pickscore" in names:
        rewards["pickscore"] = _full_pickscore(tmp, **options)
    if "hpsv3" in names:
        rewards["hpsv3"] = _full_hpsv3(tmp, **options)
    return rewards


# ----------------------------------------------------------------------------- measuring
def saved_activation_bytes(fn, exclude: set[int]) -> tuple[torch.Tensor, int]:
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def measure(reward, device: str, size: int, repeat: int) -> dict:
    reward = reward.to(device)
    weights = {p.untyped_storage().data_ptr() for p in reward.parameters()} | {b.untyped_storage().data_ptr() for b in reward.buffers()}
    x = torch.rand(BATCH, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))

    def step():
        xi = x.clone().requires_grad_(True)
        scores, act = saved_activation_bytes(lambda: reward(xi, PROMPTS[:BATCH]), weights)
        torch.autograd.grad(scores.sum(), xi)
        return act

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, act = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        act = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times), "activations_mb": act / 2**20}
    if device == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size architectures (random weights) instead of tiny configs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="input image side (default: 64 tiny, 512 full)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady timings on a shared machine)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="the rewards' dtype (full-size only); half precisions run under autocast, as in a run")
    args = parser.parse_args(argv)
    size = args.size or (512 if args.full else 64)
    torch.set_num_threads(args.threads)
    params = full_size_params()
    with tempfile.TemporaryDirectory() as tmp:
        rewards = build_full(Path(tmp), dtype=args.dtype) if args.full else build_tiny(Path(tmp))
        print(f"forward + backward, batch {BATCH}, {size}x{size} images in [0, 1], {'full-size' if args.full else 'tiny'} configs, "
              f"{args.dtype if args.full else 'float32'}, {args.device} ({args.threads} thread), torch {torch.__version__}\n")
        cuda = args.device == "cuda"
        print("| reward | model | input size | parameters (full size) | time median / min (ms) | activations (MB) |" + (" CUDA peak (MB) |" if cuda else ""))
        print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
        for name, reward in rewards.items():
            half = args.full and args.dtype != "float32"
            with torch.autocast(args.device, dtype=getattr(torch, args.dtype), enabled=half):
                r = measure(reward, args.device, size, args.repeat)
            key = name.split(" ")[0]
            p = params.get(key) or (sum(t.numel() for t in reward.parameters()) if key in ("pyiqa", "color", "smoothness") else None)
            model = _describe(name, reward)
            isz = "x".join(map(str, reward.input_size)) if reward.input_size else "any"
            count = "0" if p == 0 else f"{p / 1e6:.1f} M" if p else "?"
            line = f"| {name} | {model} | {isz} | {count} | {r['median_ms']:.3g} / {r['min_ms']:.3g} | {r['activations_mb']:.1f} |"
            if cuda:
                line += f" {r['cuda_peak_mb']:.0f} |"
            print(line)
    return 0


def _describe(name: str, reward) -> str:
    return {
        "hps": "open_clip ViT-H-14 (HPS v2.1 weights)",
        "clip_score": "open_clip ViT-H-14 laion2b_s32b_b79k",
        "laion_aesthetic": "CLIP ViT-L/14 image tower + v2 MLP",
        "imagereward": "BLIP ViT-L/16 + BERT-base (cross-attn) + MLP",
        "pickscore": "PickScore v1: CLIP-H (transformers CLIPModel)",
        "hpsv3": "Qwen2-VL-7B-Instruct + HPSv3 reward head (mu)",
        "color": "none (built in)",
        "smoothness": "none (built in)",
    }.get(name, f"pyiqa {getattr(reward.options, 'metric', '')}")


if __name__ == "__main__":
    sys.exit(main())
