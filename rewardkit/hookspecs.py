"""The hooks a rewardkit plugin implements.

A plugin is a module (or an installed package's module, found through the
``rewardkit`` entry-point group) with functions marked ``@rewardkit.hookimpl``.
The registering hooks receive a ``register`` callable; call it once per thing you provide::

    import rewardkit

    @rewardkit.hookimpl
    def register_rewards(register):
        register(MyReward)

The class says its own ``name`` and declares its options as a pydantic model
in ``Options`` (see rewardkit.generators.Generator, rewardkit.rewards.Reward,
rewardkit.regularizers.Regularizer). The built-in plugins are default plugin
modules registered through these same hooks (``DEFAULT_PLUGINS`` in
rewardkit/plugins.py). Keep a plugin module cheap to import: import torch and
models inside the hooks, so ``rewardkit --help`` stays fast.
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


@hookspec
def register_commands(register):
    """Register subcommands of the ``rewardkit`` command line:
    ``register(name, run, arguments=None, help="")`` for each.

    ``arguments(parser)`` adds the command's arguments to its argparse parser;
    ``run(args, registry) -> int`` runs it and returns the exit code (raise
    rewardkit.errors.UserError for bad input: exit 2 with its message).
    Commands of the default plugin modules show in ``rewardkit --help``;
    those of installed packages are found when their name is used, and
    ``rewardkit plugins`` lists them all.
    """


@hookspec
def run_finished(run_dir, recipe, registry):
    """Called on the main process when ``rewardkit run`` has trained a recipe to its end.

    ``run_dir`` is the run directory (its newest checkpoint is the final one),
    ``recipe`` the validated rewardkit.recipe.Recipe, ``registry`` the plugin
    registry. Return a report to print (e.g. an evaluation table), or None.
    """
