"""`random_eta`: draw the sampler's stochasticity eta at random in training (docs/r0.md).

Each training step draws eta per sample and per step (or per sample only),
so the generator has to work along many sampling paths rather than one; a
fixed eta (the generator's `eta` option) is used at inference. Draws come
from the optimizer's data RNG, so runs are reproducible and resume exactly.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from rewardkit.generators.base import SampleOptions
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class RandomEtaOptions(PluginOptions):
    distribution: Literal["uniform", "choice"] = "uniform"
    """'uniform': eta ~ U[low, high]; 'choice': eta picked uniformly from `values`."""
    low: float = Field(default=0.0, ge=0, le=1)
    high: float = Field(default=1.0, ge=0, le=1)
    """eta is in [0, 1]: 0 deterministic, 1 the Gaussian posterior's noise (rewardkit.sampler)."""
    values: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 1.0]
    """The candidates of distribution = 'choice'."""
    per_step: bool = True
    """One eta per sample and step (True), or one per sample for all its steps."""

    @model_validator(mode="after")
    def _range(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be at least low ({self.low})")
        if not self.values:
            raise ValueError("values must not be empty")
        return self


class RandomEta(Regularizer):
    name = "random_eta"
    Options = RandomEtaOptions

    def adjust_sampling(self, options: SampleOptions, batch_size: int, rng: torch.Generator) -> SampleOptions:
        # Without a known number of steps there is nothing per step to draw: one eta per sample.
        shape = (batch_size, options.num_steps) if self.options.per_step and options.num_steps else (batch_size,)
        o = self.options
        if o.distribution == "uniform":
            eta = o.low + (o.high - o.low) * torch.rand(shape, generator=rng)
        else:
            eta = torch.tensor(o.values, dtype=torch.float32)[torch.randint(len(o.values), shape, generator=rng)]
        return options.replace(eta=eta)
