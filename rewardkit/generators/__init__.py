"""Generator plugins: the base protocol and the built-in parameterizations."""

from rewardkit.generators.base import Generator, SampleOptions

__all__ = ["Generator", "SampleOptions"]
