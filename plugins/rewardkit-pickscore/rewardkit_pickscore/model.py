"""PickScore v1 on transformers' CLIPModel: loading, tokenizer and tensor preprocessing.

The published checkpoint (hub repo yuvalkirstain/PickScore_v1) is a CLIP-H
(ViT-H/14 image tower, 24-layer text tower) saved by transformers'
CLIPModel: a config.json plus model.safetensors / pytorch_model.bin whose
tensor names are CLIPModel's own. Its processor (CLIP tokenizer and
CLIPImageProcessor settings) is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's.

Score (as PickScore's README computes it): logit_scale.exp() * cos(image
features, prompt features), the features being CLIPModel's projected image
and text embeddings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardkit import hub
from rewardkit.errors import UserError

log = logging.getLogger("rewardkit")

HUB_REPO = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WHAT = "PickScore v1 weights"
PROCESSOR_WHAT = "PickScore's processor files (CLIP tokenizer, preprocessing)"
PROCESSOR_FILES = ("vocab.json", "merges.txt", "preprocessor_config.json")

# Checkpoints saved by transformers < 4.31 hold these buffers (torch.arange position indices, persistent then);
# CLIPModel now rebuilds them itself, so they are the only extra tensors a checkpoint may carry.
IGNORED = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")

PUBLISHED_PREPROCESSOR = {
    "do_resize": True,
    "size": 224,  # legacy form of {"shortest_edge": 224}
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": 224,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
"""preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (OpenAI CLIP mean/std), with CLIPImageProcessor's
defaults for the keys it leaves out (rescale): used when the processor folder or repo has none."""

PUBLISHED_CONFIG = {
    "projection_dim": 1024,
    "text_config": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # laion's (pre-4.31) ids: eos 2 pools at the highest token id
    ),
    "vision_config": dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
    ),
}  # fmt: skip
"""The architecture in PickScore_v1's config.json (laion's CLIP-ViT-H-14 sizes); for the meta-device layout check and
parameter counts. Loading reads the checkpoint's own config.json."""


def full_size_config():
    from transformers import CLIPConfig

    return CLIPConfig(**PUBLISHED_CONFIG)


# ----------------------------------------------------------------------------- the network
class PickScoreNet(torch.nn.Module):
    """A CLIPModel scoring (pixel_values, input_ids, attention_mask) -> logit_scale.exp() * cosine, float32.

    Its tensors are left uninitialized: build_net loads every one of them from the checkpoint."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPModel

        try:
            from transformers.initialization import no_init_weights  # transformers 5
        except ImportError:
            no_init_weights = contextlib.nullcontext
        with no_init_weights():  # every tensor comes from the checkpoint: skip the random initialization of ~1 B values
            self.clip = CLIPModel(config)
        self.image_size = config.vision_config.image_size
        self.max_length = config.text_config.max_position_embeddings
        self.checkpointing = False
        for layer in [*self.clip.vision_model.encoder.layers, *self.clip.text_model.encoder.layers]:
            _checkpoint_when_asked(layer, self)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        dtype = self.clip.visual_projection.weight.dtype
        image = _pooled(self.clip.get_image_features(pixel_values=pixel_values.to(dtype)))
        text = _pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
        with torch.autocast(image.device.type, enabled=False):  # the cosine and the scale in float32, autocast or not
            image = F.normalize(image.float(), dim=-1)
            text = F.normalize(text.float(), dim=-1)
            return self.clip.logit_scale.float().exp() * (image * text).sum(dim=-1)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns the projected embedding as pooler_output of a model output; 4.x returned the tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _checkpoint_when_asked(layer: torch.nn.Module, owner: PickScoreNet) -> None:
    """Recompute `layer` in backward when owner.checkpointing is set; transformers' own gradient checkpointing
    works only in training mode, and the reward model stays in eval mode."""
    from torch.utils.checkpoint import checkpoint

    # weak references: no reference cycle, so a network no reward holds any more is freed at once (the cache is weak)
    plain, layer_ref, owner_ref = type(layer).forward, weakref.ref(layer), weakref.ref(owner)

    def forward(*args, **kwargs):
        if owner_ref().checkpointing and torch.is_grad_enabled():
            return checkpoint(plain, layer_ref(), *args, use_reentrant=False, **kwargs)
        return plain(layer_ref(), *args, **kwargs)

    layer.forward = forward


def load_weights(clip: torch.nn.Module, state: dict, *, what: str) -> None:
    """Load a CLIPModel state dict into `clip`: every tensor must match by name and shape, except the legacy
    position_ids buffers (IGNORED), which are dropped."""
    state = {k: v for k, v in state.items() if not IGNORED.match(k)}
    try:
        missing, unexpected = clip.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(f"{what} do not fit the CLIP model of their config.json: {exc}") from None
    if missing or unexpected:
        raise UserError(
            f"{what} do not fit the CLIP model of their config.json: {len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def build_net(config_path: Path, weights_path: Path, dtype: torch.dtype) -> PickScoreNet:
    """The frozen network from a config.json and a checkpoint, in `dtype` (the logit scale stays float32)."""
    from transformers import CLIPConfig

    try:
        config = CLIPConfig.from_json_file(str(config_path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{WHAT}: {config_path} is not a readable CLIP config.json: {exc}") from None
    net = PickScoreNet(config)
    load_weights(net.clip, hub.load_state_dict(weights_path, what=WHAT), what=f"{WHAT} ({weights_path})")
    logit_scale = net.clip.logit_scale.detach().clone()
    net = net.to(dtype)
    net.clip.logit_scale.data = logit_scale  # a fresh model, not yet shared: exp() of a bfloat16 scale would be ~1% off
    return net.eval().requires_grad_(False)


def resolve_model_files(ref: str) -> tuple[Path, Path]:
    """(config.json, weights file) for the `weights` option: a hub repo 'owner/repo', a file in one
    ('owner/repo/model.safetensors'), a local folder holding both, or a local weights file with config.json beside it."""
    path = Path(ref).expanduser()
    if path.is_file():
        return _local(path.parent / "config.json"), path
    if path.is_dir():
        return _local(path / "config.json"), hub.resolve(str(path), what=WHAT, option="weights", default_filenames=WEIGHT_FILES)
    if hub.looks_local(ref):
        hub.resolve(ref, what=WHAT, option="weights")  # raises: no such file
    repo, filename = hub.split_hub_ref(ref)
    try:
        weights = hub.resolve(ref, what=WHAT, option="weights", default_filenames=() if filename else WEIGHT_FILES)
        folder = str(Path(filename).parent) if filename else "."
        config = hub.resolve(f"{repo}/{'' if folder == '.' else folder + '/'}config.json", what=WHAT, option="weights")
    except UserError as exc:  # the hub message names one file; PickScore needs its config.json too
        raise UserError(
            f"{exc} PickScore needs the repo's config.json with the weights (`hf download {repo} config.json "
            f"{filename or WEIGHT_FILES[0]}`); a local `weights` path needs config.json beside it."
        ) from None
    return config, weights


def _local(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{WHAT}: {path} is missing; PickScore needs the model's config.json next to its weights (set `weights`)")
    return path


# ----------------------------------------------------------------------------- the processor
def processor_file(ref: str, name: str) -> Path:
    """File `name` of the `processor` option's folder or hub repo."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return hub.resolve(str(path / name), what=PROCESSOR_WHAT, option="processor")
    if hub.looks_local(ref):
        raise UserError(f"{PROCESSOR_WHAT}: no such folder {path}; set the reward's `processor` option to a folder or hub repo")
    repo, folder = hub.split_hub_ref(ref)
    prefix = f"{folder}/" if folder else ""
    try:
        return hub.resolve(f"{repo}/{prefix}{name}", what=PROCESSOR_WHAT, option="processor")
    except UserError as exc:
        files = " ".join(prefix + f for f in PROCESSOR_FILES)
        raise UserError(f"{exc} The processor's files, all small: `hf download {repo} {files}`; a local `processor` folder holds the same.") from None


def load_tokenizer(vocab_path: Path, merges_path: Path):
    """CLIP's byte-level BPE tokenizer from a vocab.json and merges.txt (as CLIPTokenizer.from_pretrained reads them).
    The pad token does not change a score: the text tower is causal and pools at the first end-of-text token."""
    from transformers import CLIPTokenizer

    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as exc:
        raise UserError(f"{PROCESSOR_WHAT}: cannot read {vocab_path} / {merges_path}: {exc}") from None
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    if not isinstance(vocab, dict) or "<|endoftext|>" not in vocab or any(len(m) != 2 for m in merges):
        raise UserError(f"{PROCESSOR_WHAT}: {vocab_path} / {merges_path} are not a CLIP vocab.json / merges.txt")
    return CLIPTokenizer(vocab=vocab, merges=merges)


def read_preprocessor_config(ref: str, default_ref: str = PROCESSOR_REPO) -> dict:
    """The processor's preprocessor_config.json; the published settings (PUBLISHED_PREPROCESSOR) when it has none."""
    try:
        path = processor_file(ref, "preprocessor_config.json")
    except UserError:
        if ref != default_ref:
            log.warning("%s: %s has no preprocessor_config.json; using CLIP-H's published settings", PROCESSOR_WHAT, ref)
        return dict(PUBLISHED_PREPROCESSOR)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{PROCESSOR_WHAT}: {path} is not readable JSON: {exc}") from None


_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes; CLIP processors use bicubic


@dataclass(frozen=True)
class ImageTransform:
    """CLIPImageProcessor's steps on float tensors in [0, 1]: resize (shortest edge, or to a fixed size), centre
    crop, rescale and normalize; differentiable."""

    resize: tuple[str, object] | None  # ("shortest", n) or ("squash", (h, w)) or None
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, cfg: dict, *, what: str = PROCESSOR_WHAT) -> "ImageTransform":
        """From preprocessor_config.json's keys, with CLIPImageProcessor's defaults for absent ones."""
        d = {**PUBLISHED_PREPROCESSOR, **cfg}  # the published values are also CLIPImageProcessor's defaults
        resize = None
        if d.get("do_resize", True):
            size = d["size"]
            if isinstance(size, int):  # the legacy form: the shortest edge
                size = {"shortest_edge": size}
            if set(size) == {"shortest_edge"}:
                resize = ("shortest", int(size["shortest_edge"]))
            elif set(size) == {"height", "width"}:
                resize = ("squash", (int(size["height"]), int(size["width"])))
            else:
                raise UserError(f"{what}: preprocessing size {size} is not supported (shortest_edge, or height and width)")
        crop = None
        if d.get("do_center_crop", True):
            c = d["crop_size"]
            crop = (int(c), int(c)) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        if int(d.get("resample", 3)) not in _RESAMPLE:
            raise UserError(f"{what}: resample {d['resample']} (PIL code) is not supported; bicubic (3) and bilinear (2) are")
        # images come in [0, 1], i.e. uint8 / 255; the processor feeds the model uint8 * rescale_factor
        k = 255 * float(d["rescale_factor"]) if d.get("do_rescale", True) else 255.0
        mean, std = (d["image_mean"], d["image_std"]) if d.get("do_normalize", True) else (0.0, 1.0)
        mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
        std = [std] * 3 if isinstance(std, (int, float)) else std
        return cls(resize, crop, _RESAMPLE[int(d.get("resample", 3))], tuple(m / k for m in mean), tuple(s / k for s in std))

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (H, W) fed to the model, or None when it depends on the image (no crop, shortest-edge resize)."""
        if self.crop:
            return self.crop
        return self.resize[1] if self.resize and self.resize[0] == "squash" else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rewardkit.rewards.preprocess import preprocess, resized_size

        h, w = images.shape[-2:]
        if self.resize is None:
            size = (h, w)
        elif self.resize[0] == "shortest":
            size = resized_size(h, w, self.resize[1])  # transformers' get_resize_output_image_size rounds the same way
        else:
            size = self.resize[1]
        # resize (bicubic, antialiased as PIL) and normalize; 'squash' to the computed size = resize with that output
        x = preprocess(images, size, self.mean, self.std, resize_mode="squash", interpolation=self.interpolation)
        if self.crop:
            # CLIPImageProcessor crops at floor((H - h) / 2), not torchvision's round(): one pixel apart on odd margins
            th, tw = self.crop
            top, left = (x.shape[-2] - th) // 2, (x.shape[-1] - tw) // 2
            if top < 0 or left < 0:
                raise UserError(f"{PROCESSOR_WHAT}: images resized to {tuple(x.shape[-2:])} are smaller than the crop {self.crop}")
            x = x[..., top : top + th, left : left + tw]
        return x
