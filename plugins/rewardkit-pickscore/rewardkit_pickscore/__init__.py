"""rewardkit-pickscore: PickScore v1 (Pick-a-Pic) as a rewardkit reward, on transformers' CLIPModel.

PickScore is CLIP-H fine-tuned on Pick-a-Pic's human preference pairs; its
published checkpoint (hub repo yuvalkirstain/PickScore_v1) is a transformers
CLIPModel, scored as logit_scale.exp() * cos(image, prompt) with laion's
CLIP-ViT-H-14 processor. This module stays cheap to import (torch and
rewardkit only); transformers is imported when a reward is built.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path
from typing import Sequence

import torch

import rewardkit
from rewardkit.errors import UserError
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype

__version__ = "0.1.0"

_NETS: weakref.WeakValueDictionary[tuple, torch.nn.Module] = weakref.WeakValueDictionary()  # alive while a reward holds it
_TOKENIZERS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


class PickScoreOptions(RewardOptions):
    weights: str = "yuvalkirstain/PickScore_v1"
    """PickScore's CLIPModel: a hub repo (config.json + model.safetensors or pytorch_model.bin), a file in one
    ('owner/repo/model.safetensors'), or a local folder or weights file with its config.json beside it."""
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """Hub repo or local folder of the CLIP tokenizer (vocab.json, merges.txt) and the image preprocessing
    (preprocessor_config.json; without one, CLIP-H's published settings: shortest edge 224 bicubic, crop 224)."""
    dtype: ModelDType = "auto"
    """Precision of the CLIP towers: 'auto' is the run's (run.mixed_precision); the logit scale and the cosine stay
    float32; scores are float32."""
    gradient_checkpointing: bool = False
    """Recompute encoder layers during backward: less memory, more time."""


class PickScore(Reward):
    """PickScore v1: logit_scale.exp() * cos(image, prompt) under the Pick-a-Pic-tuned CLIP-H."""

    name = "pickscore"
    Options = PickScoreOptions
    input_size = (224, 224)

    def __init__(self, **options):
        super().__init__(**options)
        from rewardkit_pickscore import model as m

        o = self.options
        self._config, self._weights = m.resolve_model_files(o.weights)
        self.build(load_dtype(o.dtype))
        self.tokenizer = load_tokenizer(o.processor)
        self.transform = m.ImageTransform.from_config(m.read_preprocessor_config(o.processor))
        size = self.transform.output_size
        if size != (self.net.image_size, self.net.image_size):
            raise UserError(
                f"{m.PROCESSOR_WHAT}: {o.processor} preprocesses images to {size or 'a size that depends on the image'}, "
                f"but the model takes {self.net.image_size}x{self.net.image_size}"
            )
        self.input_size = size

    def build(self, dtype: torch.dtype) -> None:
        self.net = load_net(self._config, self._weights, dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        x = self.transform(images.float())
        # as PickScore's README: padding to the longest prompt, truncation at 77 tokens
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.net.max_length, return_tensors="pt")
        self.net.checkpointing = self.options.gradient_checkpointing  # per call: the network may be shared
        return self.net(x, tokens.input_ids.to(images.device), tokens.attention_mask.to(images.device))


def load_net(config: Path, weights: Path, dtype: torch.dtype = torch.float32):
    """The frozen PickScore network for (config.json, weights, dtype): built once per process while some reward holds
    it, never cast in place (a reward in another dtype gets its own copy)."""
    from rewardkit_pickscore.model import build_net

    key = (str(config), str(weights), dtype)
    with _LOCK:
        net = _NETS.get(key)
        if net is None:
            net = _NETS[key] = build_net(config, weights, dtype)
        return net


def load_tokenizer(processor: str):
    """CLIP's tokenizer from the processor's vocab.json and merges.txt, once per process."""
    from rewardkit_pickscore.model import load_tokenizer as build, processor_file

    vocab, merges = processor_file(processor, "vocab.json"), processor_file(processor, "merges.txt")
    key = (str(vocab), str(merges))
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = build(vocab, merges)
        return _TOKENIZERS[key]


@rewardkit.hookimpl
def register_rewards(register):
    register(PickScore)
