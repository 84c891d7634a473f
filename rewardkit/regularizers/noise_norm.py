"""`noise_norm`: keep optimized noise a likely draw from N(0, I) (ReNO's norm regularizer).

For z in R^d drawn from N(0, I), r = ||z||^2 follows a chi-square law with
d degrees of freedom, concentrated near d. Reward gradients alone push the
noise off that shell, where the generator has never seen its inputs. The
penalty is each noise's chi-square negative log-likelihood, shifted to be 0
at its minimum (r = d - 2):

    weight * mean over the prompts' noises of [r/2 - (d/2 - 1) log r] - min

Averaging over all N noises every step gives each noise a 1/N share, which
is what its reward gradient gets on average too (it is in a batch of B with
probability B/N, where it weighs 1/B), so `weight` trades reward against
likelihood per prompt. Only for generators that optimize their noise
(`training = "noise"`).
"""

from __future__ import annotations

import torch
from pydantic import NonNegativeFloat

from rewardkit.errors import UserError
from rewardkit.generators.base import Generator
from rewardkit.options import PluginOptions
from rewardkit.regularizers.base import Regularizer


class NoiseNormOptions(PluginOptions):
    weight: NonNegativeFloat = 1.0


def chi_square_nll(z: torch.Tensor) -> torch.Tensor:
    """Per row of z (N, ...): the chi-square negative log-likelihood of ||z||^2, 0 at its minimum.

    With k = d/2 - 1 and u = r / (d - 2) it is k (u - 1 - log u), computed in float64: at
    SD3's d = 262144 the two large terms of the plain form cancel below float32's resolution.
    """
    d = z[0].numel()
    u = z.double().flatten(1).pow(2).sum(1) / (d - 2)
    return ((d / 2 - 1) * (u - 1 - torch.log(u))).to(z.dtype)


class NoiseNorm(Regularizer):
    name = "noise_norm"
    Options = NoiseNormOptions

    @classmethod
    def check(cls, options, generator, where: str) -> list[str]:
        if generator.cls.planned_noise_optimization(generator.options) is not False:
            return []  # it optimizes noise, or does not say: setup() checks when it is built
        return [
            f"{where}: 'noise_norm' constrains optimized noise, and generator '{generator.cls.name}' optimizes weights "
            f"as configured; set generator.training = 'noise' or remove [{where}]"
        ]

    def setup(self, generator: Generator) -> None:
        z = generator.optimized_noise()
        if z is None:
            raise UserError(
                f"regularizer 'noise_norm' constrains optimized noise, and generator '{generator.name}' optimizes "
                "weights; set generator.training = 'noise' or remove [regularizers.noise_norm]"
            )
        if z[0].numel() < 3:
            raise UserError("regularizer 'noise_norm' needs noise with at least 3 elements per sample")

    def penalty(self, generator: Generator) -> torch.Tensor:
        return self.options.weight * chi_square_nll(generator.optimized_noise()).mean()
