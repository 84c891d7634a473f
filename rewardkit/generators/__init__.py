"""Generator plugins: the protocol (base.py) and the built-in parameterizations, a default plugin module.

This module registers the built-ins through the same hook as third-party
plugins, importing each only when the hook runs, so loading it stays cheap.
"""

from rewardkit.hookspecs import hookimpl
from rewardkit.lazy import lazy_attributes

__all__ = ["Generator", "SampleOptions"]
__getattr__ = lazy_attributes(__name__, {name: "rewardkit.generators.base" for name in __all__})


@hookimpl
def register_generators(register):
    from rewardkit.generators.flux import Flux
    from rewardkit.generators.pixels import Pixels
    from rewardkit.generators.sd import StableDiffusion
    from rewardkit.generators.sd3 import StableDiffusion3
    from rewardkit.generators.sdxl import StableDiffusionXL
    from rewardkit.generators.zimage import ZImage

    register(Pixels)
    register(StableDiffusion)
    register(StableDiffusionXL)
    register(StableDiffusion3)
    register(Flux)
    register(ZImage)
