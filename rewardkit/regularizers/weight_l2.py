"""`weight_l2`: lambda * ||theta - theta_0||^2 on the trainable weights.

The paper's main defence against reward hacking: without it the generator
drifts off the image manifold (repeated objects, over-saturation). theta_0 is
the generator's initial state; generators with adapters compute the distance
from the adapter delta without keeping a copy of the model.
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat

from rewardkit.generators.base import Generator
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class WeightL2Options(PluginOptions):
    weight: NonNegativeFloat = 1.0
    """lambda."""


class WeightL2(Regularizer):
    name = "weight_l2"
    Options = WeightL2Options

    def setup(self, generator: Generator) -> None:
        generator.snapshot_reference()

    def penalty(self, generator: Generator) -> torch.Tensor:
        return self.options.weight * generator.squared_distance_to_reference()
