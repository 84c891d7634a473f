"""`intermediate_step` read as deep supervision: every step's prediction scored, each weighted in the loss.

With SGD, one step from theta_0 moves the weights by -lr times the loss gradient, which is linear in the
step weights: the update with weights w is sum_k w_k times the update with step k alone, and with all the
weight on the last step it is R0's update. The runs are the real Optimizer on the testbed generator.
"""

from __future__ import annotations

import pytest
import torch

from rewardkit.errors import RecipeError, UserError
from rewardkit.optimizer import Optimizer


def recipe(run_dir, regularizers) -> dict:
    return {
        "run": {"dir": str(run_dir), "steps": 1, "batch_size": 2, "trackers": [], "progress": False, "sample_every": 0},
        "prompts": {"train": ["a handwritten digit 3", "a handwritten digit 7"]},
        "generator": {"type": "testbed", "num_steps": 3, "training": "full", "report": False},
        "optimizer": {"name": "sgd", "lr": 1e-2},
        "rewards": {"digit_classifier": {}, "digit_prototype": {}},
        "regularizers": {**regularizers, "normalize_gradients": {}},
    }


def update(tmp_path, name, regularizers) -> dict[str, torch.Tensor]:
    opt = Optimizer.from_recipe(recipe(tmp_path / name, regularizers))
    opt.generator.setup(opt.prompts, 0)
    start = {k: v.clone() for k, v in opt.generator.trainable_state_dict().items()}
    opt.fit()
    return {k: v - start[k] for k, v in opt.generator.trainable_state_dict().items()}


def assert_same_update(a, b):
    flat_a, flat_b = torch.cat([v.flatten() for v in a.values()]), torch.cat([v.flatten() for v in b.values()])
    assert flat_b.abs().max() > 0
    torch.testing.assert_close(flat_a, flat_b, rtol=1e-3, atol=1e-4 * float(flat_b.abs().max()))


def test_deep_supervision_weighs_each_steps_prediction_as_asked(tmp_path):
    deep = lambda w: {"intermediate_step": {"supervision": "every_step", "step_weights": w}}  # noqa: E731
    r0 = update(tmp_path, "r0", {})
    assert_same_update(update(tmp_path, "last", deep([0.0, 0.0, 1.0])), r0)
    single = [update(tmp_path, f"only_{k}", deep([float(k == j) for j in range(3)])) for k in range(3)]
    weighted = update(tmp_path, "weighted", deep([0.5, 1.0, 2.0]))
    assert_same_update(weighted, {n: 0.5 * single[0][n] + single[1][n] + 2.0 * single[2][n] for n in r0})
    # the default weighs every step 1: the sum of the steps' updates (not their mean)
    assert_same_update(update(tmp_path, "default", {"intermediate_step": {}}), {n: sum(s[n] for s in single) for n in r0})


def test_a_generator_without_deep_supervision_is_refused(tmp_path):
    from rewardkit.generators.base import SampleOptions
    from rewardkit.generators.pixels import Pixels
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.rewards.color import Color

    class FourSteps(Pixels):  # says it has 4 steps at run time, returns one image per prompt whatever it is asked
        name = "four_steps"

        @classmethod
        def planned_steps(cls, options):
            return None

        def sample_options(self):
            return SampleOptions(num_steps=4)

    run = {"steps": 1, "dir": str(tmp_path / "r"), "trackers": []}
    with pytest.raises(RecipeError, match=r"generator 'four_steps' does not support deep supervision .*use supervision = 'random_step'"):
        Optimizer(FourSteps(height=8, width=8), [Color()], [IntermediateStep()], prompts=["a"], run=run)
    Optimizer(FourSteps(height=8, width=8), [Color()], [IntermediateStep(supervision="random_step")], prompts=["a"], run=run).fit()

    class Claims(FourSteps):  # says it supports it, and does not: the image count gives it away
        name = "claims"
        supports_deep_supervision = True

    opt = Optimizer(Claims(height=8, width=8), [Color()], [IntermediateStep()], prompts=["a"], run={**run, "dir": str(tmp_path / "c")})
    with pytest.raises(UserError, match=r"returned 4 images for 4 prompts and the 4 steps of deep supervision"):
        opt.fit()


@pytest.mark.parametrize("options,generator,message", [
    ({"step_weights": [1.0, 1.0]}, {}, r"step_weights: 2 weights for the generator's 3 steps"),
    ({"steps": [0, 2], "step_weights": [1.0]}, {}, r"step_weights has 1 entries for the 2 steps \[0, 2\]"),
    ({"supervision": "random_step", "step_weights": [1.0, 1.0, 1.0]}, {}, r"'random_step' supervises one step at a time"),
    ({}, {"grad_steps": 1}, r"keeps the gradient through the whole chain, but generator.grad_steps = 1 cuts it"),
    ({"steps": [2, 1]}, {}, r"strictly increasing"),
    ({"step_weights": [0.0, 0.0, 0.0]}, {}, r"at least one positive weight"),
    ({"per_sample": False}, {}, r"per_sample = false picks one step for the batch"),
])
def test_bad_deep_supervision_options_are_refused_before_anything_loads(tmp_path, options, generator, message):
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    r = recipe(tmp_path, {"intermediate_step": options})
    r["generator"].update(generator)
    with pytest.raises(RecipeError, match=message):
        load_recipe(r, registry=load_registry())


def test_the_random_step_reading_takes_a_repeated_step_as_a_weight():
    from rewardkit.generators.base import SampleOptions
    from rewardkit.regularizers.intermediate_step import IntermediateStep

    reg = IntermediateStep(supervision="random_step", steps=[3, 3, 3, 0])
    picked = reg.adjust_sampling(SampleOptions(num_steps=4), 4000, torch.Generator().manual_seed(0)).supervise_step
    assert set(picked.tolist()) == {0, 3} and 0.7 < float((picked == 3).float().mean()) < 0.8
