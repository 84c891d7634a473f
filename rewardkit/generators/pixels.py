"""`pixels`: the images themselves are the parameters, one image per prompt.

Literal search in data space: no network, no prior beyond what the
regularizers add. Pixel values are stored as logits and squashed with a
sigmoid, so every update stays inside [0, 1] without clamping away gradient.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import PositiveInt

from rewardkit.errors import UserError
from rewardkit.generators.base import Generator, SampleOptions
from rewardkit.options import PluginOptions


class PixelsOptions(PluginOptions):
    height: PositiveInt
    width: PositiveInt
    init: Literal["noise", "gray"] = "noise"
    """'noise': random logits (std `init_std`) from the run seed; 'gray': all 0.5."""
    init_std: float = 0.5


class Pixels(Generator):
    name = "pixels"
    Options = PixelsOptions

    @classmethod
    def planned_steps(cls, options) -> int:
        return 0  # no sampler: the images are the parameters

    @classmethod
    def planned_noise_optimization(cls, options) -> bool:
        return False

    def setup(self, prompts: Sequence[str], seed: int) -> None:
        self.prompts = list(dict.fromkeys(prompts))
        self.index = {p: i for i, p in enumerate(self.prompts)}
        shape = (len(self.prompts), 3, self.options.height, self.options.width)
        if self.options.init == "gray":
            logits = torch.zeros(shape)
        else:
            logits = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * self.options.init_std
        self.logits = torch.nn.Parameter(logits)

    def noise_shape(self) -> tuple[int, ...]:
        return (1,)  # the image is the parameter: noise plays no part

    def forward(self, prompts: Sequence[str], noise: torch.Tensor, options: SampleOptions) -> torch.Tensor:
        unknown = [p for p in prompts if p not in self.index]
        if unknown:
            raise UserError(
                f"the pixels generator holds one image per training prompt and has none for {unknown[0]!r}; "
                f"its prompts are: {', '.join(repr(p) for p in self.prompts[:8])}"
            )
        idx = torch.tensor([self.index[p] for p in prompts], device=self.logits.device)
        return torch.sigmoid(self.logits[idx])
