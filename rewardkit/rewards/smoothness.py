"""`smoothness`: negative total variation of the image.

Score = -scale * mean absolute difference between neighbouring pixels
(horizontal and vertical). Rewards flat regions; complements `color`, and
its image gradient has a very different scale, which is what gradient
normalization across rewards is for.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rewardkit.rewards.base import Reward, RewardOptions


class SmoothnessOptions(RewardOptions):
    scale: float = 1.0
    """Multiplies the score: reward units are arbitrary, and this sets them."""


class Smoothness(Reward):
    name = "smoothness"
    Options = SmoothnessOptions

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(1, 2, 3))
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(1, 2, 3))
        return -self.options.scale * (dx + dy)
