"""Differentiable image preprocessing for reward models, on tensors.

Reward models were trained on images resized and normalized by PIL /
torchvision transforms; these functions do the same on float tensors so the
gradient reaches the pixels. Downsampling is antialiased, as PIL does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from rewardkit.errors import UserError


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The output size of torchvision's Resize(size) on an (height, width) image: shortest side -> size."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's CenterCrop (same rounding), for images at least `size` large."""
    h, w = x.shape[-2:]
    th, tw = size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def preprocess(
    images: torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> normalized model input, differentiably.

    resize_mode 'shortest' (open_clip's default): resize the shortest side to
    `size`, then centre crop; 'squash': resize to (size, size). Resizing uses
    antialiasing, as PIL and torchvision do when downsampling.
    """
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    x = images
    mode = "bilinear" if interpolation == "bilinear" else "bicubic"
    if resize_mode == "shortest":
        if th != tw:
            raise UserError(f"resize_mode 'shortest' needs a square model input, got {size}")
        h, w = x.shape[-2:]
        new = resized_size(h, w, th)
        if new != (h, w):
            x = F.interpolate(x, size=new, mode=mode, antialias=True, align_corners=False)
        x = center_crop(x, (th, tw))
    elif resize_mode == "squash":
        if tuple(x.shape[-2:]) != (th, tw):
            x = F.interpolate(x, size=(th, tw), mode=mode, antialias=True, align_corners=False)
    else:
        raise UserError(f"resize_mode {resize_mode!r} is not supported by the tensor preprocessing (use 'shortest' or 'squash')")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
