"""rewardkit-imagereward: ImageReward v1.0 as a rewardkit reward, on transformers' BLIP classes.

The `image-reward` package itself pins timm 0.6 and needs patches to run on
transformers 5; this plugin loads its published checkpoint into
transformers' BlipVisionModel + BlipTextModel through a weight-name mapping
(rewardkit_imagereward.model) and scores with the same formula.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch

import rewardkit
from rewardkit.errors import UserError
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype

__version__ = "0.1.0"

_MODELS: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()  # alive while a reward holds it
_TOKENIZERS: dict[str, object] = {}
_LOCK = threading.Lock()


class ImageRewardOptions(RewardOptions):
    weights: str = "THUDM/ImageReward/ImageReward.pt"
    """ImageReward v1.0 checkpoint: a hub reference 'owner/repo/file' or a local path."""
    tokenizer: str = "google-bert/bert-base-uncased"
    """BERT's vocabulary: a hub repo id ('owner/repo', its vocab.txt) or a local vocab.txt or folder holding one."""
    dtype: ModelDType = "auto"
    """Precision of the BLIP encoders: 'auto' is the run's (run.mixed_precision); the small MLP head stays
    float32; scores are float32."""
    gradient_checkpointing: bool = False
    """Recompute encoder layers during backward: less memory, more time."""


class ImageReward(Reward):
    """ImageReward v1.0: a BLIP-based human preference reward, normalized to mean 0 / std 1 on its data."""

    name = "imagereward"
    Options = ImageRewardOptions
    input_size = (224, 224)

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        self.build(load_dtype(o.dtype))
        self.tokenizer = load_tokenizer(o.tokenizer)
        self.input_size = (self.net.image_size, self.net.image_size)

    def build(self, dtype: torch.dtype) -> None:
        self.net = load_model(self.options.weights, dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from rewardkit.rewards.preprocess import preprocess
        from rewardkit_imagereward.model import IMAGE_MEAN, IMAGE_STD, MAX_PROMPT_TOKENS

        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        # BLIP's transform: Resize(shortest side, bicubic) + CenterCrop + Normalize
        x = preprocess(images.float(), self.net.image_size, IMAGE_MEAN, IMAGE_STD)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
        self.net.checkpointing = self.options.gradient_checkpointing  # per call: the model may be shared
        dtype = self.net.vision.embeddings.patch_embedding.weight.dtype
        return self.net(x.to(dtype), tokens.input_ids.to(images.device), tokens.attention_mask.to(images.device))


def load_model(weights: str, dtype: torch.dtype = torch.float32):
    """The ImageReward model with weights from `weights` (hub reference or local path), its BLIP encoders in `dtype`
    and its MLP head in float32; built once per process and dtype while some reward holds it (never cast in place)."""
    from rewardkit import hub
    from rewardkit_imagereward.model import ImageRewardModel, convert_state_dict, shapes_from_checkpoint

    path = hub.resolve(weights, what="ImageReward v1.0 weights", option="weights")
    key = (str(path), dtype)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            state = hub.load_state_dict(path, what="ImageReward v1.0 weights")
            try:
                model = ImageRewardModel(shapes_from_checkpoint(state))
                converted = convert_state_dict(state)
            except KeyError as exc:
                raise UserError(f"ImageReward v1.0 weights: {path} is not in ImageReward's layout (unknown or missing tensor {exc})") from None
            missing, unexpected = model.load_state_dict(converted, strict=False)
            if missing or unexpected:
                raise UserError(f"ImageReward v1.0 weights: {path} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
            model = model.to(dtype)
            model.mlp.float()
            model = _MODELS[key] = model.eval().requires_grad_(False)
        return model


def load_tokenizer(ref: str):
    """BLIP's tokenizer: BERT's WordPiece vocabulary (vocab.txt), lower-cased, plus the
    [DEC] and [ENC] tokens BLIP appends (ids 30522 and 30523 for bert-base-uncased)."""
    import inspect

    from transformers import BertTokenizer

    from rewardkit import hub

    with _LOCK:
        if ref not in _TOKENIZERS:
            path = hub.resolve(ref, what="ImageReward's tokenizer vocabulary", option="tokenizer", default_filenames=("vocab.txt",))
            tokens = path.read_text(encoding="utf-8").splitlines()
            if "[CLS]" not in tokens or "[SEP]" not in tokens:
                raise UserError(f"ImageReward's tokenizer: {path} is not a BERT vocab.txt (no [CLS]/[SEP])")
            if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 4
                tok = BertTokenizer(vocab_file=str(path), do_lower_case=True)
            else:  # transformers 5: the vocabulary itself
                tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
            tok.add_special_tokens({"bos_token": "[DEC]"})
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            _TOKENIZERS[ref] = tok
        return _TOKENIZERS[ref]


@rewardkit.hookimpl
def register_rewards(register):
    register(ImageReward)
