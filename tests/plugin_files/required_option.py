"""A local plugin with a required option, for recipe-validation tests."""

import rewardkit
from rewardkit.rewards.base import Reward, RewardOptions


class TargetOptions(RewardOptions):
    level: float


class Brightness(Reward):
    name = "brightness"
    Options = TargetOptions

    def forward(self, images, prompts):
        return -(images.mean(dim=(1, 2, 3)) - self.options.level) ** 2


@rewardkit.hookimpl
def register_rewards(register):
    register(Brightness)
