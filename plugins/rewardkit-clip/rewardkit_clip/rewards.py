"""`clip_score` and `laion_aesthetic`: rewards on open_clip backbones."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from rewardkit.errors import UserError
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype
from rewardkit import hub
from rewardkit.rewards.heads import LinearStackHead
from rewardkit.rewards.preprocess import preprocess
from rewardkit_clip import openclip


class _FrozenBackbone(RewardOptions):
    dtype: ModelDType = "auto"
    """Precision of the reward model: 'auto' is the run's (run.mixed_precision); float16 / bfloat16 halve its
    memory next to float32 (scores are returned as float32)."""
    gradient_checkpointing: bool = False
    """Recompute the transformer blocks during backward: less memory, about one more forward of time."""


class CLIPScoreOptions(_FrozenBackbone):
    model: str = "ViT-H-14"
    """open_clip architecture name."""
    pretrained: str = "laion2b_s32b_b79k"
    """open_clip pretrained tag of `model`, a hub reference 'owner/repo[/file]', or a local checkpoint path."""
    scale: float = 100.0
    """Score = scale * cosine(image, prompt); 100 is the usual CLIP-score convention."""


class CLIPScore(Reward):
    """CLIP score: scale * cosine similarity of the image and prompt embeddings.

    Unlike the evaluation metric's max(cos, 0), no clamp: the reward keeps its
    gradient for images that do not match the prompt at all.
    """

    name = "clip_score"
    Options = CLIPScoreOptions
    input_size = (224, 224)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._what = f"CLIP weights ({o.model}, {o.pretrained})"
        self._checkpoint, self._quick_gelu = openclip.resolve_pretrained(o.model, o.pretrained, what=self._what, option="pretrained")
        self.build(load_dtype(o.dtype))
        self.pre = openclip.pretrained_preprocess_cfg(self.model, o.model, o.pretrained, what=self._what)
        self.input_size = openclip.input_size(self.pre)

    def build(self, dtype: torch.dtype) -> None:
        o = self.options
        self.model, self.tokenizer = openclip.load_model(o.model, self._checkpoint, what=self._what, quick_gelu=self._quick_gelu, dtype=dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        # set per call: the cached model may be shared with a reward that wants the other setting
        openclip.set_grad_checkpointing(self.model, self.options.gradient_checkpointing)
        return self.options.scale * clip_cosine(self.model, self.tokenizer, self.pre, images, prompts)


def clip_cosine(model, tokenizer, pre: dict, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Cosine similarity (B,) of open_clip image and text embeddings, computed in float32 at the end."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
    dtype = next(model.parameters()).dtype
    x = preprocess(images.float(), pre["size"], pre["mean"], pre["std"], pre.get("resize_mode", "shortest"), pre.get("interpolation", "bicubic"))
    image_features = F.normalize(model.encode_image(x.to(dtype)).float(), dim=-1)
    tokens = tokenizer(list(prompts)).to(images.device)
    text_features = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return (image_features * text_features).sum(dim=-1)


# ------------------------------------------------------------------------------------
class AestheticMLP(LinearStackHead):
    """The LAION aesthetic predictor v2 head, on L2-normalized CLIP image embeddings."""


_HEADS: dict[str, AestheticMLP] = {}


def load_aesthetic_head(path: str) -> AestheticMLP:
    if path not in _HEADS:
        state = hub.load_state_dict(path, what="LAION aesthetic predictor weights")
        if "layers.0.weight" not in state:
            raise UserError(f"LAION aesthetic predictor weights: {path} has no 'layers.0.weight': not an aesthetic predictor v2 checkpoint")
        head = AestheticMLP(state["layers.0.weight"].shape[1])
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"LAION aesthetic predictor weights: {path} does not fit the v2 MLP: {exc}") from None
        _HEADS[path] = head.eval().requires_grad_(False)
    return _HEADS[path]


class AestheticOptions(_FrozenBackbone):
    weights: str = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
    """The v2 MLP (sac+logos+ava1-l14-linearMSE): a hub reference 'owner/repo/file' or a local path."""
    clip_model: str = "ViT-L-14"
    """open_clip architecture of the image embeddings the MLP was trained on (OpenAI CLIP ViT-L/14)."""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag, hub reference or local checkpoint of `clip_model`."""


class LAIONAesthetic(Reward):
    """LAION aesthetic predictor v2: MLP(normalize(CLIP ViT-L/14 image embedding)), about 1-10."""

    name = "laion_aesthetic"
    Options = AestheticOptions
    input_size = (224, 224)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self._what = f"CLIP weights ({o.clip_model}, {o.clip_pretrained}) of the aesthetic predictor"
        self._checkpoint, self._quick_gelu = openclip.resolve_pretrained(o.clip_model, o.clip_pretrained, what=self._what, option="clip_pretrained")
        self.build(load_dtype(o.dtype))
        self.pre = openclip.pretrained_preprocess_cfg(self.model, o.clip_model, o.clip_pretrained, what=self._what)
        self.input_size = openclip.input_size(self.pre)
        head_path = hub.resolve(o.weights, what="LAION aesthetic predictor weights", option="weights")
        self.head = load_aesthetic_head(str(head_path))
        width = self.head.layers[0].in_features
        out_dim = getattr(self.model, "output_dim", width)
        if out_dim != width:
            raise UserError(f"laion_aesthetic: the MLP expects {width}-d embeddings but {o.clip_model} gives {out_dim}-d")

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        openclip.set_grad_checkpointing(self.model, self.options.gradient_checkpointing)
        dtype = next(self.model.parameters()).dtype
        p = self.pre
        x = preprocess(images.float(), p["size"], p["mean"], p["std"], p.get("resize_mode", "shortest"), p.get("interpolation", "bicubic"))
        features = F.normalize(self.model(x.to(dtype)).float(), dim=-1)
        with torch.autocast(features.device.type, enabled=False):  # the small head in float32, autocast or not
            return self.head(features).squeeze(-1)

    def build(self, dtype: torch.dtype) -> None:  # the image tower only: the head stays float32
        o = self.options
        self.model, _ = openclip.load_model(o.clip_model, self._checkpoint, what=self._what, quick_gelu=self._quick_gelu, dtype=dtype, vision_only=True)
