"""Reward plugins: the protocol (base.py), the plugin API for rewards (preprocess.py, heads.py) and the
built-in cheap rewards, a default plugin module.

This module registers the built-ins through the same hook as third-party
plugins, importing each only when the hook runs, so loading it stays cheap.
"""

from rewardkit.hookspecs import hookimpl
from rewardkit.lazy import lazy_attributes

__all__ = ["ModelDType", "Reward", "RewardOptions", "load_dtype"]
__getattr__ = lazy_attributes(__name__, {name: "rewardkit.rewards.base" for name in __all__})


@hookimpl
def register_rewards(register):
    from rewardkit.rewards.classifier_free_guidance import ClassifierFreeGuidance
    from rewardkit.rewards.color import Color
    from rewardkit.rewards.high_resolution import HighResolution
    from rewardkit.rewards.jpeg_compressibility import JpegCompressibility
    from rewardkit.rewards.remote import Remote
    from rewardkit.rewards.vlm_judge import VLMJudge
    from rewardkit.rewards.smoothness import Smoothness

    register(Color)
    register(Smoothness)
    register(HighResolution)
    register(ClassifierFreeGuidance)
    register(JpegCompressibility)
    register(Remote)
    register(VLMJudge)
