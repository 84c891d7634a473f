"""rewardkit-clip: the CLIP score and the LAION aesthetic predictor as rewardkit rewards.

Registered through the `rewardkit` entry-point group; importing this module is
cheap (open_clip loads only when a reward is built).
"""

import rewardkit

__version__ = "0.1.0"


@rewardkit.hookimpl
def register_rewards(register):
    from rewardkit_clip.rewards import CLIPScore, LAIONAesthetic

    register(CLIPScore)
    register(LAIONAesthetic)
