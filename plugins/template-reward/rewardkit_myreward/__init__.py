"""rewardkit-myreward: a template reward plugin. Copy this folder, then rename (see README.md).

The example reward is colourfulness (Hasler & Suesstrunk, 2003), computed on
tensors so it is differentiable. Replace `MyReward.forward` (and `__init__`,
to load a model) with your own scorer; keep the contract:

    images (B, 3, H, W) float in [0, 1], prompts (B strings) -> scores (B,), higher is better
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

import rewardkit
from rewardkit.rewards import Reward, RewardOptions

__version__ = "0.1.0"


class MyRewardOptions(RewardOptions):
    """The reward's options: every key a recipe may set under [rewards.LABEL] (`weight` is inherited)."""

    resolution: int = 224
    """Images are resized (differentiably, with antialiasing) so the shorter side has this many pixels."""
    scale: float = 1.0
    """Multiplies the score."""


class MyReward(Reward):
    """Colourfulness: std and mean of the opponent colour channels, on [0, 1] RGB."""

    name = "myreward"  # the name recipes use: [rewards.myreward] or type = "myreward"
    Options = MyRewardOptions
    input_size = None  # (H, W) your model wants, if fixed; informational
    differentiable = True  # False: for evaluation, and for training with estimator = 'score_function' only

    def __init__(self, **options):
        super().__init__(**options)  # validates options into self.options
        # Load your model here (once per process: cache it at module level), then
        # freeze it: model.eval().requires_grad_(False). See docs/writing-a-reward-plugin.md.

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        x = preprocess(images, self.options.resolution)
        r, g, b = x.unbind(dim=1)
        rg = r - g
        yb = 0.5 * (r + g) - b
        std = torch.sqrt(rg.flatten(1).var(dim=1) + yb.flatten(1).var(dim=1) + 1e-12)
        mean = torch.sqrt(rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2 + 1e-12)
        return self.options.scale * (std + 0.3 * mean)


def preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Tensor-only preprocessing: no PIL on the gradient path."""
    h, w = images.shape[-2:]
    if min(h, w) == resolution:
        return images
    scale = resolution / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


@rewardkit.hookimpl
def register_rewards(register):
    register(MyReward)
