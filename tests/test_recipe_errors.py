"""Malformed recipes exit 2 with a message naming the key, and no traceback."""

from __future__ import annotations

import pytest

from conftest import PLUGIN_FILES, pixels_recipe, run_cli
from rewardkit.cli import main


def validate(capsys, path, *extra) -> tuple[int, str]:
    code = main(["validate", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


def assert_bad_input(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def test_broken_toml(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[run]\nsteps = = 3\n")
    code, err = validate(capsys, path)
    assert_bad_input(code, err, str(path), "not valid TOML", "line 2")


def test_unknown_section(tmp_path, capsys, write_recipe):
    path = write_recipe({**pixels_recipe(tmp_path / "r"), "rewardz": {}})
    code, err = validate(capsys, path)
    assert_bad_input(code, err, str(path), "[rewardz]: unknown section", "did you mean 'rewards'?")


def test_unknown_key(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r")
    recipe["run"]["stepz"] = 3
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "run.stepz: unknown key", "did you mean 'steps'?")


def test_unknown_plugin_option(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r", regularizers={"weight_l2": {"wieght": 0.1}})
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "regularizers.weight_l2.wieght: unknown key", "did you mean 'weight'?")


def test_wrong_type(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r")
    recipe["optimizer"]["lr"] = "fast"
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "optimizer.lr:", "valid number", "'fast'")


def test_unknown_plugin_name(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r", regularizers={"weight_l3": {}})
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "regularizers.weight_l3.type", "no regularizer plugin named 'weight_l3'", "did you mean 'weight_l2'?")


def test_missing_required_plugin_option(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r")
    del recipe["generator"]["height"]
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "generator.height: required key is missing")


def test_missing_required_option_of_local_plugin(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r", rewards={"brightness": {"weight": 1.0}})
    code, err = validate(capsys, write_recipe(recipe), "--plugin", str(PLUGIN_FILES / "required_option.py"))
    assert_bad_input(code, err, "rewards.brightness.level: required key is missing")


def test_negative_step_count(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r", steps=-5)
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "run.steps:", "greater than 0", "-5")


def test_all_problems_reported_at_once(tmp_path, capsys, write_recipe):
    recipe = pixels_recipe(tmp_path / "r", rewards={"colour": {}})
    recipe["generator"]["hieght"] = 3
    code, err = validate(capsys, write_recipe(recipe))
    assert_bad_input(code, err, "rewards.colour.type", "did you mean 'color'?", "generator.hieght: unknown key")


def test_bad_override_names_the_key(tmp_path, capsys, write_recipe):
    path = write_recipe(pixels_recipe(tmp_path / "r"))
    code, err = validate(capsys, path, "run.batch_size=0")
    assert_bad_input(code, err, "run.batch_size:", "greater than 0")


def test_run_exits_2_in_a_real_process(tmp_path, write_recipe):
    """The exit code and the absence of a traceback, as a shell sees them."""
    recipe = pixels_recipe(tmp_path / "r")
    recipe["run"]["stepz"] = 3
    proc = run_cli("run", str(write_recipe(recipe)))
    assert proc.returncode == 2, proc.stderr
    assert "run.stepz: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists(), "a rejected recipe must not create a run directory"


def test_missing_recipe_file(capsys, tmp_path):
    code, err = validate(capsys, tmp_path / "nope.toml")
    assert_bad_input(code, err, "nope.toml: no such file")


@pytest.mark.parametrize("override", ["run.steps", "=3"])
def test_malformed_override(tmp_path, capsys, write_recipe, override):
    code, err = validate(capsys, write_recipe(pixels_recipe(tmp_path / "r")), override)
    assert_bad_input(code, err, "expected KEY=VALUE")


@pytest.mark.parametrize(
    "key, value",
    [("run.steps", '"10"'), ("run.progress", '"yes"'), ("run.seed", "true"), ("optimizer.lr", '"0.5"'), ("rewards.color.target", '["1", "0", "0"]')],
)
def test_values_are_not_coerced(tmp_path, capsys, write_recipe, key, value):
    """A string is not a number and "yes" is not a boolean: wrong types are errors, not guesses."""
    code, err = validate(capsys, write_recipe(pixels_recipe(tmp_path / "r")), f"{key}={value}")
    assert_bad_input(code, err, key)


def test_toml_arrays_and_integers_fill_tuples_and_floats(tmp_path, capsys, write_recipe):
    code, err = validate(capsys, write_recipe(pixels_recipe(tmp_path / "r")), "optimizer.lr=1", "optimizer.betas=[0.8, 0.9]")
    assert code == 0, err


# --- checks across plugins, before any model loads -------------------------------------------
def make_testbed_recipe(tmp_path, training="full", regularizers=None) -> dict:
    return {
        "run": {"dir": str(tmp_path / "r"), "steps": 2},
        "prompts": {"train": ["a handwritten digit 1"]},
        "generator": {"type": "testbed", "num_steps": 4, "training": training},
        "rewards": {"digit_classifier": {}},
        "regularizers": regularizers or {},
    }


def test_noise_norm_with_a_weight_generator_fails_validation(tmp_path, capsys, write_recipe):
    path = write_recipe(make_testbed_recipe(tmp_path, "lora", {"noise_norm": {}}))
    code, err = validate(capsys, path)
    assert_bad_input(code, err, str(path), "regularizers.noise_norm:", "training = 'noise'")
    assert validate(capsys, write_recipe(make_testbed_recipe(tmp_path, "noise", {"noise_norm": {}})))[0] == 0


def test_intermediate_step_past_num_steps_fails_validation(tmp_path, capsys, write_recipe):
    path = write_recipe(make_testbed_recipe(tmp_path, regularizers={"intermediate_step": {"steps": [1, 4]}}))
    code, err = validate(capsys, path)
    assert_bad_input(code, err, "regularizers.intermediate_step.steps:", "generator.num_steps = 4")
    assert validate(capsys, path, "generator.num_steps=5")[0] == 0
    recipe = pixels_recipe(tmp_path / "p")
    recipe["regularizers"] = {"intermediate_step": {}}
    assert_bad_input(*validate(capsys, write_recipe(recipe)), "regularizers.intermediate_step:", "no sampler steps")


def test_the_python_api_refuses_what_a_recipe_refuses(tmp_path):
    from rewardkit.errors import RecipeError
    from rewardkit.generators.pixels import Pixels
    from rewardkit.optimizer import Optimizer
    from rewardkit.recipe import Evaluation
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.regularizers.weight_l2 import WeightL2
    from rewardkit.rewards.color import Color

    with pytest.raises(RecipeError, match=r"weight: input should be a valid number"):
        WeightL2(weight="1.0")  # TOML's weight = "1.0" is refused, so is Python's
    with pytest.raises(RecipeError, match=r"regularizers.intermediate_step: .*no sampler steps"):
        Optimizer(Pixels(height=8, width=8), [Color()], [IntermediateStep()], prompts=["a"], run={"steps": 2})
    with pytest.raises(RecipeError, match=r"run.steps: input should be a valid integer"):
        Optimizer(Pixels(height=8, width=8), [Color()], prompts=["a"], run={"steps": "2"})
    with pytest.raises(RecipeError, match=r"prompts.train.0: input should be a valid string"):
        Optimizer(Pixels(height=8, width=8), [Color()], prompts=[3], run={"steps": 2})
    with pytest.raises(RecipeError, match=r"eval.every: input should be greater than or equal to 0"):
        Evaluation(prompts=["a"], rewards=[Color()], every=-1)
    with pytest.raises(RecipeError, match=r"eval.prompts"):
        Evaluation(prompts=[], rewards=[Color()])


def test_a_recipe_error_survives_a_process_boundary():
    """Raised in a worker process (a benchmark's pool), it is pickled back to the parent: it must rebuild from its own
    arguments (the default exception pickling passes the message alone, and the rebuild fails)."""
    import pickle

    from rewardkit.errors import RecipeError

    err = pickle.loads(pickle.dumps(RecipeError("r.toml", ["run.steps: must be at least 1"])))
    assert isinstance(err, RecipeError) and err.source == "r.toml" and err.problems == ["run.steps: must be at least 1"]
    assert str(err) == "invalid recipe r.toml:\n  - run.steps: must be at least 1"
