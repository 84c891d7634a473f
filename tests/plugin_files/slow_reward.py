"""A throwaway local plugin: the color reward, slowed down so a test can kill a run mid-way."""

import time

import rewardkit
from rewardkit.rewards.color import Color


class SlowColor(Color):
    name = "slow_color"

    def forward(self, images, prompts):
        time.sleep(0.03)
        return super().forward(images, prompts)


@rewardkit.hookimpl
def register_rewards(register):
    register(SlowColor)
