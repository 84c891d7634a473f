"""The hooks a rewardkit plugin implements.

A plugin is a module (or an installed package's module, found through the
``rewardkit`` entry-point group) with functions marked ``@rewardkit.hookimpl``.
Each hook receives a ``register`` callable; call it once per class you provide::

    import rewardkit

    @rewardkit.hookimpl
    def register_rewards(register):
        register(MyReward)

The class says its own ``name`` and declares its options as a pydantic model
in ``Options`` (see rewardkit.generators.Generator, rewardkit.rewards.Reward,
rewardkit.regularizers.Regularizer). Built-in plugins are registered through
these same hooks (rewardkit/builtins.py).
"""

import pluggy

hookspec = pluggy.HookspecMarker("rewardkit")
hookimpl = pluggy.HookimplMarker("rewardkit")


@hookspec
def register_generators(register):
    """Register generator classes: ``register(cls)`` for each.

    A generator wraps a model into a differentiable sampler
    ``prompts, noise, SampleOptions -> images (B, 3, H, W) in [0, 1]``
    whose trainable parameters the optimizer updates.
    """


@hookspec
def register_rewards(register):
    """Register reward classes: ``register(cls)`` for each.

    A reward maps ``images (B, 3, H, W) in [0, 1], prompts -> scores (B,)``;
    higher is better, differentiable unless it says otherwise.
    """


@hookspec
def register_regularizers(register):
    """Register regularizer classes: ``register(cls)`` for each.

    A regularizer constrains the search through any of the optional methods
    of rewardkit.regularizers.Regularizer: a penalty term, a change to the
    sampling options, or a transform of the per-reward image gradients.
    """
