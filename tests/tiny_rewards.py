"""Tiny random-weight checkpoints for the paper's reward plugins, written offline.

The same constructions as the plugins' own tests (plugins/*/tests), as files a
user would pass through options (`weights`, `model`, `pretrained`,
`tokenizer`, ...), so `rewardkit eval --metric-option` can load them:

- hps: an open_clip config registered under a tiny name + {'state_dict': ...} (.pt)
- clip_score / laion_aesthetic: an open_clip config + safetensors weights, and an
  aesthetic v2 MLP head on its embeddings
- imagereward: a tiny BLIP model saved under ImageReward.pt's own tensor names,
  and a small BERT vocab.txt

open_clip configs are registered in this process (open_clip.add_model_config),
so the rewards must be built in the same process (e.g. by `rewardkit.cli.main`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

HPS_MODEL = "rk-tiny-eval-hps"
HPS_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CLIP_MODEL = "rk-tiny-eval-clip"
CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
IMAGEREWARD_TINY = {
    "vision_hidden": 64, "vision_layers": 2, "vision_intermediate": 128, "image_size": 32, "patch_size": 16,
    "text_hidden": 64, "text_layers": 2, "text_intermediate": 128, "vocab_size": 40, "max_positions": 40,
}  # fmt: skip
IMAGEREWARD_WORDS = ["a", "an", "the", "red", "blue", "green", "cat", "dog", "bird", "car", "house", "tree", "sky", "on", "in", "of", "with", "under", "photo", "painting", "big", "small", "sunset", "beach"]
IMAGEREWARD_LAYOUT = Path(__file__).parents[1] / "plugins" / "rewardkit-imagereward" / "tests" / "imagereward_v1_checkpoint_layout.json"


def _open_clip_model(folder: Path, name: str, cfg: dict, seed: int):
    import open_clip

    (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None)


def save_tiny_hps(folder: str | Path, seed: int = 0) -> dict:
    """{'model': open_clip name, 'weights': path}: the options of a tiny `hps` reward."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _open_clip_model(folder, HPS_MODEL, HPS_CFG, seed)
    path = folder / "HPS_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the published files' format
    return {"model": HPS_MODEL, "weights": str(path)}


def save_tiny_clip(folder: str | Path, seed: int = 0) -> tuple[dict, dict]:
    """Options of a tiny `clip_score` and of a tiny `laion_aesthetic` sharing one open_clip model."""
    from rewardkit_clip.rewards import AestheticMLP
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _open_clip_model(folder, CLIP_MODEL, CLIP_CFG, seed)
    clip_path = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_path))
    torch.manual_seed(seed + 1)
    head_path = folder / "aesthetic.pth"
    torch.save(AestheticMLP(CLIP_CFG["embed_dim"]).state_dict(), head_path)
    clip = {"model": CLIP_MODEL, "pretrained": str(clip_path)}
    aesthetic = {"clip_model": CLIP_MODEL, "clip_pretrained": str(clip_path), "weights": str(head_path)}
    return clip, aesthetic


def save_tiny_imagereward(folder: str | Path, seed: int = 0) -> dict:
    """{'weights': ImageReward.pt, 'tokenizer': folder with vocab.txt}: a tiny `imagereward`.

    A random tiny model's weights written back under the published checkpoint's
    tensor names (layers 0 and 1 of each tower), as the plugin's tests do."""
    from rewardkit_imagereward.model import ImageRewardModel, checkpoint_key_to_ours

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ours = ImageRewardModel(IMAGEREWARD_TINY).state_dict()
    for v in ours.values():  # LayerNorms start at 1/0: randomize them too
        v.add_(0.02 * torch.randn_like(v))
    layer = re.compile(r"\.(blocks|layer)\.(\d+)\.")
    names = [k for k in json.loads(IMAGEREWARD_LAYOUT.read_text()) if not (m := layer.search(k)) or int(m.group(2)) < 2]
    original = {}
    for k in names:
        mapped = checkpoint_key_to_ours(k)
        original[k] = ours[mapped].clone() if mapped else torch.randn(3)
    original["blip.text_encoder.embeddings.position_ids"] = torch.arange(IMAGEREWARD_TINY["max_positions"])[None]
    weights = folder / "ImageReward.pt"
    torch.save(original, weights)
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *IMAGEREWARD_WORDS]) + "\n")
    return {"weights": str(weights), "tokenizer": str(folder / "tokenizer")}
