"""`normalize_gradients`: combine rewards by direction, not by raw scale.

Each reward's image gradient g_i = d r_i / d x is divided by its per-sample
L2 norm before the weighted sum, so a reward whose gradients are 1000x
smaller still steers the search (docs/r0.md).

With `combine = "sum"` (the paper's formula, sum_i w_i g_i / ||g_i||) the
push against the regularizers grows with the number of rewards: three
rewards push three times as hard against weight L2 as one. `combine =
"mean"` divides by the number of rewards, so adding a reward changes the
direction but not the strength (measured on the testbed: docs/results.md).
"""

from __future__ import annotations

import torch
from typing import Literal

from pydantic import PositiveFloat

from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class NormalizeGradientsOptions(PluginOptions):
    eps: PositiveFloat = 1e-12
    """Added to the norm, so a zero gradient stays zero."""
    combine: Literal["sum", "mean"] = "sum"
    """'sum': each normalized gradient counts fully (the paper's sum); 'mean': divided by the number of rewards."""


class NormalizeGradients(Regularizer):
    name = "normalize_gradients"
    Options = NormalizeGradientsOptions

    def transform_gradients(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        share = 1.0 if self.options.combine == "sum" else 1.0 / len(grads)
        out = {}
        for label, g in grads.items():
            norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
            out[label] = share * g / (norm + self.options.eps)
        return out
