"""`intermediate_step`: R0+'s intermediate supervision, in either of its two readings (docs/methods.md).

The paper says only that R0+ adds "intermediate supervision" and that it
converges faster with a smoother sampling path; its method section is not
public. Two readings, chosen by `supervision`:

- "every_step" (deep supervision; the shipped R0+ recipes): the rewards
  score the clean-image prediction x0_hat of every supervised step, with
  the gradient of each kept through the steps before it, and the loss
  weighs the i-th supervised step by `step_weights[i]`. Every step of the path is pulled
  toward high reward, not only its end.
- "random_step": each training step picks one step k at random, per sample
  (or one for the whole batch); the steps before it run without gradient
  and the rewards score x0_hat of step k alone. A shorter backward graph.

Draws come from the optimizer's data RNG.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeFloat, NonNegativeInt, field_validator, model_validator

from rewardkit.errors import UserError
from rewardkit.generators.base import SampleOptions
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class IntermediateStepOptions(PluginOptions):
    supervision: Literal["every_step", "random_step"] = "every_step"
    """'every_step': rewards on every supervised step's clean-image prediction, gradient through the chain
    (deep supervision); 'random_step': one random step's prediction, earlier steps without gradient."""
    steps: list[NonNegativeInt] | None = None
    """'every_step': the 0-based steps to supervise, increasing; 'random_step': the steps to draw from
    (a repeated step is drawn more often). Default: every step 0..K-1."""
    step_weights: list[NonNegativeFloat] | None = None
    """'every_step' only: the loss weight of each supervised step, the i-th weight for the i-th step
    (default: 1 each: every step's prediction is pulled as hard as R0 pulls its one output; measured
    against 1 / K each in docs/results.md)."""
    per_sample: bool | None = None
    """'random_step' only: a step per sample (true, the default) or one step for the whole batch (false is refused
    under 'every_step', which supervises every step of every sample)."""

    @field_validator("steps")
    @classmethod
    def _not_empty(cls, v):
        if v is not None and not v:
            raise ValueError("steps must not be empty")
        return v

    @model_validator(mode="after")
    def _fits_the_reading(self):
        if self.supervision == "random_step":
            if self.step_weights is not None:
                raise ValueError("step_weights weigh the steps of supervision = 'every_step'; 'random_step' supervises one step at a time")
            return self
        if self.per_sample is False:  # (true is what run directories of the first every-step version recorded)
            raise ValueError("per_sample = false picks one step for the batch under supervision = 'random_step'; 'every_step' supervises "
                             "every step of every sample (set supervision = 'random_step' for the one-random-step reading)")
        if self.steps is not None and any(a >= b for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps of supervision = 'every_step' must be strictly increasing")
        if self.step_weights is not None:
            if not any(w > 0 for w in self.step_weights):
                raise ValueError("step_weights must have at least one positive weight")
            if self.steps is not None and len(self.step_weights) != len(self.steps):
                raise ValueError(f"step_weights has {len(self.step_weights)} entries for the {len(self.steps)} steps {self.steps}")
        return self


class IntermediateStep(Regularizer):
    name = "intermediate_step"
    Options = IntermediateStepOptions

    @classmethod
    def check(cls, options, generator, where: str) -> list[str]:
        K = generator.cls.planned_steps(generator.options)
        if K == 0:
            return [f"{where}: generator '{generator.cls.name}' has no sampler steps, so there is no intermediate step to supervise"]
        problems = []
        if options.supervision == "every_step":
            if not generator.cls.supports_deep_supervision:
                problems.append(f"{where}: generator '{generator.cls.name}' does not support deep supervision (supervision = 'every_step'); "
                                "use supervision = 'random_step'")
            if getattr(generator.options, "grad_steps", None) is not None:
                problems.append(
                    f"{where}: supervision = 'every_step' keeps the gradient through the whole chain, but generator.grad_steps = "
                    f"{generator.options.grad_steps} cuts it; remove one of them (or use supervision = 'random_step')"
                )
        if K is None:
            return problems  # the generator does not say its steps: adjust_sampling checks them against its sample options
        if options.steps is not None and max(options.steps) >= K:
            problems.append(f"{where}.steps: {list(options.steps)} goes past the generator's {K} steps (0..{K - 1}, generator.num_steps = {K})")
        if options.supervision == "every_step" and options.steps is None and options.step_weights is not None and len(options.step_weights) != K:
            problems.append(f"{where}.step_weights: {len(options.step_weights)} weights for the generator's {K} steps")
        return problems

    def adjust_sampling(self, options: SampleOptions, batch_size: int, rng: torch.Generator) -> SampleOptions:
        K = options.num_steps
        if K is None:
            raise UserError("regularizers.intermediate_step: the generator does not say its number of steps, so no step can be picked")
        candidates = list(self.options.steps) if self.options.steps is not None else list(range(K))
        if max(candidates) >= K:
            raise UserError(f"regularizers.intermediate_step.steps {candidates}: the generator has {K} steps (0..{K - 1})")
        if self.options.supervision == "every_step":
            weights = self.options.step_weights or [1.0] * len(candidates)
            if len(weights) != len(candidates):
                raise UserError(f"regularizers.intermediate_step.step_weights: {len(weights)} weights for the {len(candidates)} steps {candidates}")
            return options.replace(deep_supervision=tuple(candidates), deep_supervision_weights=tuple(float(w) for w in weights))
        per_sample = self.options.per_sample is not False
        pick = torch.randint(len(candidates), (batch_size,) if per_sample else (), generator=rng)
        step = torch.tensor(candidates)[pick]
        return options.replace(supervise_step=step if per_sample else int(step))
