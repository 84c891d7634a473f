"""Reward plugins: the base protocol and the built-in cheap rewards."""

from rewardkit.rewards.base import Reward, RewardOptions

__all__ = ["Reward", "RewardOptions"]
