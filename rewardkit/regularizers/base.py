"""The regularizer protocol: anything that constrains the search.

One class with optional methods covers the paper's techniques; a
regularizer overrides only the ones it needs:

- `setup(generator)`: once, before training (e.g. remember theta_0).
- `adjust_sampling(options, batch_size, rng)`: change the sampler's options
  for this step (random eta, a random supervised step for R0+).
- `transform_gradients(grads)`: rewrite the per-reward image gradients
  before they are combined (per-sample normalization).
- `penalty(generator)`: a differentiable scalar added to the loss
  (weight L2 to the initial weights).
- `policy_penalty(kl)`: with score-function rewards, a differentiable scalar
  from the KL divergence of the trained sampler's updates to the initial
  model's (a KL penalty to the reference); asked for by `uses_reference_kl`.

Regularizers run in recipe order.
"""

from __future__ import annotations

import torch

from rewardkit.generators.base import Generator, SampleOptions
from rewardkit.options import Configurable


class Regularizer(Configurable):
    """Base class of regularizer plugins; every method is optional."""

    uses_reference_kl: bool = False
    """True: `policy_penalty` is called on each policy-gradient update (the recipe needs score-function rewards)."""

    def __init__(self, **options):
        self._set_options(options)

    def setup(self, generator: Generator) -> None:
        pass

    def adjust_sampling(self, options: SampleOptions, batch_size: int, rng: torch.Generator) -> SampleOptions:
        return options

    def transform_gradients(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return grads

    def penalty(self, generator: Generator) -> torch.Tensor | None:
        return None

    def policy_penalty(self, kl: torch.Tensor) -> torch.Tensor | None:
        """kl (B, n), float64: per sample and trained update, KL(trained || theta_0) of the sampler's transition per
        element (rewardkit.sampler.trajectory_log_probs), with gradient; a scalar added to the loss."""
        return None
