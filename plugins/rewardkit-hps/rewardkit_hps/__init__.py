"""rewardkit-hps: Human Preference Score v2.0 / v2.1 as a rewardkit reward.

HPS v2 is OpenCLIP ViT-H-14 fine-tuned on human preference pairs; its score
is the cosine similarity of the image and prompt embeddings. The published
checkpoints (hub repo xswu/HPSv2: HPS_v2_compressed.pt, HPS_v2.1_compressed.pt)
hold a state dict with exactly open_clip's ViT-H-14 names and shapes, so they
load into ``open_clip.create_model('ViT-H-14')`` unchanged.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

import rewardkit
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype

__version__ = "0.1.0"

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSOptions(RewardOptions):
    version: Literal["v2.0", "v2.1"] = "v2.1"
    """Which published HPS checkpoint: v2.1 is the one R0 trains with."""
    weights: str | None = None
    """A local checkpoint path or hub reference 'owner/repo/file'; default: the `version`'s file in xswu/HPSv2."""
    model: str = "ViT-H-14"
    """open_clip architecture the checkpoint loads into (change only for custom HPS-style checkpoints)."""
    scale: float = 100.0
    """Score = scale * cosine. 100 gives the numbers papers report (e.g. 30.19); 1 gives hpsv2.score's."""
    dtype: ModelDType = "auto"
    """Precision of the model: 'auto' is the run's (run.mixed_precision); scores are returned as float32."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks during backward: less memory, more time."""


class HPS(Reward):
    """HPS v2 / v2.1: scale * cos(image, prompt) under the HPS-tuned ViT-H-14."""

    name = "hps"
    Options = HPSOptions
    input_size = (224, 224)

    def __init__(self, **options):
        super().__init__(**options)
        from rewardkit import hub
        from rewardkit_clip import openclip

        o = self.options
        self._what = f"HPS {o.version} weights"
        self._checkpoint = str(hub.resolve(o.weights or f"{HUB_REPO}/{CHECKPOINTS[o.version]}", what=self._what, option="weights"))
        self.build(load_dtype(o.dtype))
        self.pre = openclip.model_preprocess_cfg(self.model)  # HPS v2's preprocess_val: open_clip's ViT-H-14 defaults
        self.input_size = openclip.input_size(self.pre)

    def build(self, dtype: torch.dtype) -> None:
        from rewardkit_clip import openclip

        self.model, self.tokenizer = openclip.load_model(self.options.model, self._checkpoint, what=self._what, dtype=dtype)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from rewardkit_clip import openclip
        from rewardkit_clip.rewards import clip_cosine

        openclip.set_grad_checkpointing(self.model, self.options.gradient_checkpointing)
        return self.options.scale * clip_cosine(self.model, self.tokenizer, self.pre, images, prompts)


@rewardkit.hookimpl
def register_rewards(register):
    register(HPS)
