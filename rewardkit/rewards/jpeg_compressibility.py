"""`jpeg_compressibility`: minus the image's size as a JPEG, in kilobytes (DDPO's compressibility task).

The image is quantized to 8 bits and encoded by Pillow at `quality`; the
score is -(bytes / 1000). Not differentiable (an entropy coder): it trains
with estimator = 'score_function' (a policy gradient), the classic task
policy-gradient methods for diffusion were first shown on (Black et al.,
DDPO) and the one Flow-GRPO's configurations start from. A weight of -1
makes it DDPO's incompressibility task. The size grows with the image's
area, so compare scores only at one resolution.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from pydantic import Field

from rewardkit.images import to_uint8
from rewardkit.rewards.base import Reward, RewardOptions


class JpegCompressibilityOptions(RewardOptions):
    quality: int = Field(default=95, ge=1, le=95)
    """Pillow's JPEG quality (DDPO's 95; above 95 Pillow disables parts of the compression)."""


class JpegCompressibility(Reward):
    name = "jpeg_compressibility"
    Options = JpegCompressibilityOptions
    differentiable = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        from PIL import Image

        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=self.options.quality)
            sizes.append(buffer.tell())
        return -torch.tensor(sizes, dtype=torch.float32, device=images.device) / 1000
