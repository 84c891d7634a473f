"""`color`: how close an image is to a target colour.

Score = -scale * mean over pixels of the squared RGB distance to `target`.
Cheap, differentiable, and with a known optimum: useful to test and
demonstrate the optimizer without any download.
"""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field

from rewardkit.rewards.base import Reward, RewardOptions


class ColorOptions(RewardOptions):
    target: tuple[float, float, float] = Field(default=(1.0, 0.0, 0.0))
    """RGB in [0, 1]."""
    scale: float = 1.0
    """Multiplies the score: reward units are arbitrary, and this sets them."""


class Color(Reward):
    name = "color"
    Options = ColorOptions

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        target = torch.tensor(self.options.target, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return -self.options.scale * ((images - target) ** 2).mean(dim=(1, 2, 3))
