"""`normalize_gradients`: combine rewards by direction, not by raw scale.

Each reward's image gradient g_i = d r_i / d x is divided by its per-sample
L2 norm before the weighted sum, so a reward whose gradients are 1000x
smaller still steers the search (docs/r0.md).
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat

from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class NormalizeGradientsOptions(PluginOptions):
    eps: PositiveFloat = 1e-12
    """Added to the norm, so a zero gradient stays zero."""


class NormalizeGradients(Regularizer):
    name = "normalize_gradients"
    Options = NormalizeGradientsOptions

    def transform_gradients(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for label, g in grads.items():
            norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
            out[label] = g / (norm + self.options.eps)
        return out
