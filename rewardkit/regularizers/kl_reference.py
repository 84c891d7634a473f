"""`kl_reference`: beta * KL(p_theta || p_theta_0) of the sampler's transitions, for policy-gradient training.

GRPO's KL penalty to the reference model (Flow-GRPO's `beta`), on the
trajectories the score-function estimator trains on: each trained update is a
Gaussian under the trained weights and under the initial ones, with the same
standard deviation, so its KL divergence is ||mean - mean_0||^2 / (2 std^2);
it is averaged over the image's elements (Flow-GRPO's form, the per-element
scale of the importance ratio), the trained updates and the batch. theta_0 is
the generator's initial state, as for `weight_l2`: LoRA disables its adapters,
full fine-tuning keeps a copy of the weights. It costs one forward pass of the
frozen model, without gradient, per trained update.

This is the exact KL of the two steps. Flow-GRPO's code divides by the SDE's
2 sigma_t^2 rather than the step's variance 2 sigma_t^2 (t - s), so its KL is
this one times t - s, update by update, and its beta corresponds to about
beta x mean(t - s) here: 0.04 is about 0.003 on rewardkit's trailing 10-step
SD3.5 schedule (mean t - s = 1/12). Only about: t - s runs from 0.036 to
0.18 over those updates, so one beta weighs them differently than Flow-GRPO's.

`weight_l2` constrains the weights wherever the samples are; this constrains
what the sampler does on the samples the policy is trained on.
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat

from rewardkit.generators.base import Generator
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class KLReferenceOptions(PluginOptions):
    weight: NonNegativeFloat = 0.01
    """beta, on the exact per-element KL (rewardkit's default; see the module docstring for Flow-GRPO's scale)."""


class KLReference(Regularizer):
    name = "kl_reference"
    Options = KLReferenceOptions
    uses_reference_kl = True

    def setup(self, generator: Generator) -> None:
        generator.snapshot_reference()

    def policy_penalty(self, kl: torch.Tensor) -> torch.Tensor:
        return self.options.weight * kl.mean()
