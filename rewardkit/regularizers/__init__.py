"""Regularizer plugins: the protocol (base.py) and the built-in techniques, a default plugin module.

This module registers the built-ins through the same hook as third-party
plugins, importing each only when the hook runs, so loading it stays cheap.
"""

from rewardkit.hookspecs import hookimpl
from rewardkit.lazy import lazy_attributes

__all__ = ["Regularizer"]
__getattr__ = lazy_attributes(__name__, {name: "rewardkit.regularizers.base" for name in __all__})


@hookimpl
def register_regularizers(register):
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.regularizers.kl_reference import KLReference
    from rewardkit.regularizers.noise_norm import NoiseNorm
    from rewardkit.regularizers.normalize_gradients import NormalizeGradients
    from rewardkit.regularizers.random_eta import RandomEta
    from rewardkit.regularizers.weight_l2 import WeightL2

    register(WeightL2)
    register(NormalizeGradients)
    register(RandomEta)
    register(IntermediateStep)
    register(NoiseNorm)
    register(KLReference)
