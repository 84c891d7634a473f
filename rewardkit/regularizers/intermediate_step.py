"""`intermediate_step`: R0+'s intermediate supervision (docs/r0.md).

Each training step picks a random step k of the K sampler steps, per sample
(or one for the whole batch); the generator runs the steps before k without
gradient and returns the clean-image prediction x0_hat of step k, which the
rewards then score. Shorter backward graph, faster convergence, and a
smoother sampling path. Draws come from the optimizer's data RNG.
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeInt, field_validator

from rewardkit.errors import UserError
from rewardkit.generators.base import SampleOptions
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class IntermediateStepOptions(PluginOptions):
    steps: list[NonNegativeInt] | None = None
    """Candidate 0-based steps to supervise (default: every step 0..K-1)."""
    per_sample: bool = True
    """A step per sample (True) or one step for the whole batch."""

    @field_validator("steps")
    @classmethod
    def _not_empty(cls, v):
        if v is not None and not v:
            raise ValueError("steps must not be empty")
        return v


class IntermediateStep(Regularizer):
    name = "intermediate_step"
    Options = IntermediateStepOptions

    @classmethod
    def check(cls, options, generator, where: str) -> list[str]:
        K = generator.cls.planned_steps(generator.options)
        if K is None:
            return []  # the generator does not say: adjust_sampling checks against its sample options
        if K == 0:
            return [f"{where}: generator '{generator.cls.name}' has no sampler steps, so there is no intermediate step to supervise"]
        if options.steps is not None and max(options.steps) >= K:
            return [f"{where}.steps: {list(options.steps)} goes past the generator's {K} steps (0..{K - 1}, generator.num_steps = {K})"]
        return []

    def adjust_sampling(self, options: SampleOptions, batch_size: int, rng: torch.Generator) -> SampleOptions:
        K = options.num_steps
        if K is None:
            raise UserError("regularizers.intermediate_step: the generator does not say its number of steps, so no step can be picked")
        candidates = list(self.options.steps) if self.options.steps is not None else list(range(K))
        if max(candidates) >= K:
            raise UserError(f"regularizers.intermediate_step.steps {candidates}: the generator has {K} steps (0..{K - 1})")
        pick = torch.randint(len(candidates), (batch_size,) if self.options.per_sample else (), generator=rng)
        step = torch.tensor(candidates)[pick]
        return options.replace(supervise_step=step if self.options.per_sample else int(step))
