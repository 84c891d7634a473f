"""The built-in plugins, registered through the same hooks as third-party ones."""

from rewardkit.hookspecs import hookimpl


@hookimpl
def register_generators(register):
    from rewardkit.generators.pixels import Pixels
    from rewardkit.generators.sd import StableDiffusion
    from rewardkit.generators.sd3 import StableDiffusion3
    from rewardkit.testbed.plugins import TestbedGenerator

    register(Pixels)
    register(StableDiffusion)
    register(StableDiffusion3)
    register(TestbedGenerator)


@hookimpl
def register_rewards(register):
    from rewardkit.rewards.color import Color
    from rewardkit.rewards.high_resolution import HighResolution
    from rewardkit.rewards.smoothness import Smoothness
    from rewardkit.testbed.plugins import DigitClassifier, DigitPrototype, DigitRealism

    register(Color)
    register(Smoothness)
    register(HighResolution)
    register(DigitClassifier)
    register(DigitRealism)
    register(DigitPrototype)


@hookimpl
def register_regularizers(register):
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.regularizers.noise_norm import NoiseNorm
    from rewardkit.regularizers.normalize_gradients import NormalizeGradients
    from rewardkit.regularizers.random_eta import RandomEta
    from rewardkit.regularizers.weight_l2 import WeightL2

    register(WeightL2)
    register(NormalizeGradients)
    register(RandomEta)
    register(IntermediateStep)
    register(NoiseNorm)
