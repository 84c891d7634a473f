"""open_clip models as frozen reward backbones, with tensor preprocessing.

`preprocess` (rewardkit.rewards.preprocess) reproduces open_clip's evaluation transform (resize the shortest
side with bicubic interpolation, centre crop, normalize) on float tensors, so
gradients flow back to the pixels. `load_model` builds an open_clip
architecture, loads weights (an open_clip pretrained tag, a hub reference or
a local file) and caches the frozen model per process.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path

import torch

from rewardkit import hub
from rewardkit.errors import UserError

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# Held weakly: a model lives while a reward uses it, so a reward rebuilt in another dtype frees the old copy.
_CACHE: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()
_TOKENIZERS: dict[str, object] = {}
_LOCK = threading.Lock()


def input_size(pre: dict) -> tuple[int, int]:
    """The (H, W) a preprocessing configuration feeds the model."""
    return (pre["size"],) * 2 if isinstance(pre["size"], int) else tuple(pre["size"])


def model_preprocess_cfg(model) -> dict:
    """The model's own preprocessing settings (size, mean, std, interpolation, resize_mode)."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size") or getattr(model, "visual", model).image_size
    cfg["size"] = size if isinstance(size, int) else tuple(size)
    return cfg


def pretrained_preprocess_cfg(model, model_name: str, pretrained: str, *, what: str) -> dict:
    """The preprocessing open_clip gives `model_name` loaded from `pretrained`: the model config's, overlaid by the
    pretrained tag's own settings (e.g. mean = std = 0.5 for ViT-L-14 laion2b_s32b_b82k, resize_mode 'squash' for
    ViT-H-14 dfn5b), as open_clip.create_model_and_transforms merges them; read from open_clip's tables, offline.
    A hub reference 'owner/repo[/file]' overlays the repo's open_clip_config.json `preprocess_cfg` when the repo has
    one (as open_clip's hf-hub: loading does); a local path names no tag: the model config's settings."""
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    cfg = model_preprocess_cfg(model)
    if _looks_like_tag(pretrained):
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model_name, pretrained) or {})
    elif not hub.looks_local(pretrained) and not Path(pretrained).exists():
        repo, _ = hub.split_hub_ref(pretrained)
        try:
            config = json.loads(hub.resolve(f"{repo}/open_clip_config.json", what=what, option="pretrained").read_text())
        except UserError:  # no such file in the repo (or not cached offline): the model config's settings
            config = {}
        cfg = merge_preprocess_dict(cfg, config.get("preprocess_cfg", {}))
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise UserError(f"{what}: open_clip preprocesses it with resize_mode {cfg['resize_mode']!r}, which rewardkit's differentiable "
                        "preprocessing does not implement ('shortest' and 'squash' are)")
    return cfg


def _looks_like_tag(pretrained: str) -> bool:
    return "/" not in pretrained and not pretrained.startswith(("~", "."))


def resolve_pretrained(model_name: str, pretrained: str, *, what: str, option: str) -> tuple[str, bool]:
    """(local checkpoint path, quick_gelu) for an open_clip tag, a hub reference or a local path."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if _looks_like_tag(pretrained) else {}
    if cfg:
        repo = cfg.get("hf_hub", "").strip("/")
        if not repo:
            raise UserError(
                f"{what}: open_clip's pretrained tag '{pretrained}' of {model_name} has no Hugging Face hub copy; "
                f"download its checkpoint yourself and set `{option}` to the file's path"
            )
        path = hub.resolve(repo, what=what, option=option, default_filenames=OPEN_CLIP_FILES)
        return str(path), bool(cfg.get("quick_gelu", False))
    return str(hub.resolve(pretrained, what=what, option=option, default_filenames=OPEN_CLIP_FILES)), False


def load_model(
    model_name: str,
    checkpoint: str | None,
    *,
    what: str,
    quick_gelu: bool = False,
    dtype: torch.dtype = torch.float32,
    vision_only: bool = False,
):
    """(model, tokenizer): open_clip `model_name` with weights from the local file `checkpoint`, in `dtype`.

    With `vision_only`, the model is the image tower alone (``model.visual``)
    and the tokenizer is None.

    `checkpoint=None` keeps the random initialization (tests, benchmarks).
    The model is built once per process for each (name, checkpoint, dtype,
    quick_gelu, vision_only) while some reward holds it, in eval mode with
    gradients off; callers never cast it in place.
    """
    import open_clip

    key = (model_name, checkpoint, dtype, quick_gelu, vision_only)
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            if model_name not in open_clip.list_models():
                raise UserError(f"{what}: open_clip has no model config '{model_name}'")
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
            if checkpoint is not None:
                load_weights(model, hub.load_state_dict(checkpoint, what=what), what=f"{what} ({checkpoint})")
            if vision_only:
                model = model.visual  # the image tower alone: the text tower is not needed
            model = model.to(dtype).eval().requires_grad_(False)
            _CACHE[key] = model
        if vision_only:
            return model, None
        if model_name not in _TOKENIZERS:
            _TOKENIZERS[model_name] = open_clip.get_tokenizer(model_name)
        return model, _TOKENIZERS[model_name]


def load_weights(model: torch.nn.Module, state: dict, *, what: str) -> None:
    """Load `state` into `model`, requiring every tensor of each to match by name and shape."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{what} do not fit the model: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"{what} do not fit the model: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def set_grad_checkpointing(model, enable: bool) -> None:
    """Recompute transformer blocks in the backward pass (open_clip does this in eval mode too)."""
    visual = getattr(model, "visual", model)
    visual.set_grad_checkpointing(enable)
    if getattr(model, "transformer", None) is not None and visual is not model:
        model.transformer.grad_checkpointing = enable
