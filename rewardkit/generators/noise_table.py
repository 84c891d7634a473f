"""Test-time noise optimization (ReNO-style, `training = "noise"`): one trainable input noise per training prompt.

Every weight stays frozen; the parameter is a table with one N(0, I) noise
per position in the training prompt list. During training the optimizer
says which rows a batch uses (SampleOptions.prompt_index); outside training
a prompt of the training set uses its (first) row, any other prompt the
noise it is given, so it is sampled by the frozen model as usual.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rewardkit.errors import UserError


def initial_noise(prompts: Sequence[str], shape: tuple[int, ...], seed: int) -> torch.nn.Parameter:
    """The table: one N(0, I) noise per position of the training prompt list, drawn from the run's seed."""
    if not prompts:
        raise UserError("generator.training = 'noise' optimizes one noise per training prompt, and there are no prompts")
    rng = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn((len(prompts), *shape), generator=rng))


class NoiseSlots:
    """Which row of the table each training prompt owns (a repeated prompt owns one row per occurrence;
    a lookup by text takes its first)."""

    def __init__(self, prompts: Sequence[str]):
        self.slot: dict[str, int] = {}
        for i, p in enumerate(prompts):
            self.slot.setdefault(p, i)

    def lookup(self, table: torch.Tensor, prompts: Sequence[str], noise: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The optimized noise of each sample: its training row during training (`index`); outside training
        a training prompt's first row, and for any other prompt the noise it was given."""
        if index is not None:
            return table[index.to(table.device)]
        slots = [self.slot.get(p, -1) for p in prompts]
        known = torch.tensor([s >= 0 for s in slots], device=table.device).view(-1, *([1] * (noise.dim() - 1)))
        rows = table[torch.tensor([max(s, 0) for s in slots], device=table.device)]
        return torch.where(known, rows, noise.to(table.device, table.dtype))
