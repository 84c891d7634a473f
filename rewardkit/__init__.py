"""rewardkit: reward-driven post-training of text-to-image generators.

Importing this package is cheap (no torch): the heavy names below load on
first use, so `rewardkit --help` and plugin modules stay fast to import.
"""

from rewardkit.hookspecs import hookimpl
from rewardkit.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "Optimizer": "rewardkit.optimizer",
    "FitResult": "rewardkit.optimizer",
    "Generator": "rewardkit.generators.base",
    "SampleOptions": "rewardkit.generators.base",
    "Reward": "rewardkit.rewards.base",
    "RewardOptions": "rewardkit.rewards.base",
    "Regularizer": "rewardkit.regularizers.base",
    "PluginOptions": "rewardkit.options",
    "load_recipe": "rewardkit.recipe",
    "Evaluation": "rewardkit.recipe",
    "load_registry": "rewardkit.plugins",
}

__all__ = ["hookimpl", "__version__", *_LAZY]

__getattr__ = lazy_attributes(__name__, _LAZY)
