"""A throwaway reward that returns NaN on rank 1 only, at its second call."""

import math
import os

import rewardkit
from rewardkit.rewards.color import Color


class NaNOnRankOne(Color):
    name = "nan_on_rank_one"
    calls = 0

    def forward(self, images, prompts):
        NaNOnRankOne.calls += 1
        score = super().forward(images, prompts)
        if os.environ.get("RANK") == "1" and NaNOnRankOne.calls == 2:
            return score * math.nan
        return score


@rewardkit.hookimpl
def register_rewards(register):
    register(NaNOnRankOne)
