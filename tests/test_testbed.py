"""The embedded digits testbed: data, shipped weights, plugins, quickstart, evaluation.

Nothing here retrains the teacher: the tests use the weights that ship in
rewardkit/testbed/weights (trained by `python -m rewardkit.testbed.train`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from rewardkit.testbed import data
from rewardkit.testbed.data import PACKAGED, WEIGHTS_DIR, weights_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_splits_are_disjoint_and_cover_the_data():
    x, y = data.load_raw()
    sp = data.splits()
    assert len(x) == 1797
    assert {k: len(v[0]) for k, v in sp.items()} == {"heldout": 400, "a": 698, "b": 699, "teacher": 1397}
    flat = {k: {tuple(img[0].flatten().tolist()) for img in v[0]} for k, v in sp.items()}
    # (identical images may occur twice in the raw data; the index split is what is disjoint)
    assert len(flat["a"] & flat["b"]) <= 2 and len(flat["heldout"] & flat["a"]) <= 2
    assert sp["a"][0].shape[1:] == (3, 16, 16) and 0 <= float(sp["a"][0].min()) and float(sp["a"][0].max()) <= 1


@pytest.mark.parametrize(
    "text, digit",
    [("a handwritten digit 7", 7), ("the number seven", 7), ("digit 0", 0), ("a handwritten nine", 9), ("a cat", -1), ("the digit 3, not 4", 4)],
)
def test_parse_digit(text, digit):
    assert data.parse_digit(text) == digit


def test_shipped_weights_are_small_and_complete():
    folder = weights_dir(PACKAGED)
    assert folder == WEIGHTS_DIR
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 5 * 2**20, f"shipped testbed weights are {total / 2**20:.1f} MiB"
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["classifier_heldout_accuracy"] > 0.9
    assert manifest["evaluator_heldout_accuracy"] > 0.9


def test_missing_weights_say_how_to_train(tmp_path):
    from rewardkit.errors import UserError

    with pytest.raises(UserError, match="python -m rewardkit.testbed.train"):
        weights_dir(str(tmp_path))


def test_rewards_score_real_digits_and_are_differentiable():
    from rewardkit.testbed.plugins import DigitClassifier, DigitPrototype, DigitRealism

    x, y = data.splits()["heldout"]
    x, y = x[:50], y[:50]
    right = [data.prompt(int(d)) for d in y]
    wrong = [data.prompt(int((d + 1) % 10)) for d in y]
    clf, real, proto = DigitClassifier(), DigitRealism(), DigitPrototype()
    assert float((clf(x, right) > clf(x, wrong)).float().mean()) > 0.9
    assert float((proto(x, right) > proto(x, wrong)).float().mean()) > 0.8
    noise = torch.rand_like(x)
    assert float(real(x, right).mean()) > float(real(noise, right).mean())
    margin = DigitClassifier(score="margin")
    assert float((margin(x, right) > 0).float().mean()) > 0.9
    for reward in (clf, real, proto):
        xi = x[:4].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(reward(xi, right[:4]).sum(), xi)
        assert g.shape == xi.shape and float(g.abs().sum()) > 0


def test_digit_correct_is_the_classifiers_accuracy_and_refuses_training():
    """1 exactly where the classifier's logit of the prompt's digit beats every other (its margin is positive), else 0;
    held-out real digits are mostly read right; not differentiable, so a recipe cannot train on it pathwise."""
    from rewardkit.errors import RecipeError, UserError
    from rewardkit.optimizer import Optimizer
    from rewardkit.testbed.plugins import DigitClassifier, DigitCorrect

    x, y = data.splits()["heldout"]
    x = x[:60]
    prompts = [data.prompt(int((d + (i % 3 == 0)) % 10)) for i, d in enumerate(y[:60])]  # a third of them name another digit
    correct = DigitCorrect()(x, prompts)
    margin = DigitClassifier(score="margin")(x, prompts)
    assert correct.dtype == torch.float32 and set(correct.tolist()) == {0.0, 1.0}
    assert torch.equal(correct, (margin > 0).float())
    assert 0.5 < float(correct.mean()) < 0.75  # right on most of the two thirds that name their own digit
    assert not DigitCorrect.differentiable
    recipe = {"generator": {"type": "testbed"}, "rewards": {"digit_correct": {}}, "prompts": {"train": prompts[:2]},
              "run": {"steps": 1, "trackers": [], "progress": False}}
    with pytest.raises((RecipeError, UserError), match="'digit_correct' is not differentiable"):
        Optimizer.from_recipe(recipe)


def test_capped_rewards_stop_pushing_past_the_cap():
    """Past the cap a reward's gradient is exactly zero, so per-sample normalization leaves it zero."""
    from rewardkit.regularizers.normalize_gradients import NormalizeGradients
    from rewardkit.testbed.plugins import DigitClassifier, DigitPrototype

    x, y = data.splits()["heldout"]
    prompts = [data.prompt(int(d)) for d in y[:40]]
    x = x[:40].clone().requires_grad_(True)
    for capped, plain, cap in (
        (DigitClassifier(confidence=0.9), DigitClassifier(), math.log(0.9)),
        (DigitPrototype(max_similarity=0.7), DigitPrototype(), 0.7),
    ):
        scores = plain(x, prompts)
        above = scores.detach() > cap
        assert 0 < int(above.sum()) < len(prompts)  # both kinds of sample present
        torch.testing.assert_close(capped(x, prompts), scores.clamp(max=cap))
        (g,) = torch.autograd.grad(capped(x, prompts).sum(), x)
        g = NormalizeGradients().transform_gradients({"r": g})["r"]
        norms = g.flatten(1).norm(dim=1)
        assert (norms[above] == 0).all() and torch.allclose(norms[~above], torch.ones(int((~above).sum())), atol=1e-4)


def test_rewards_reject_prompts_without_a_digit():
    from rewardkit.errors import UserError
    from rewardkit.testbed.plugins import DigitClassifier

    with pytest.raises(UserError, match="names no digit"):
        DigitClassifier()(torch.rand(1, 3, 16, 16), ["a cat"])


def test_plugins_are_registered():
    from rewardkit.plugins import load_registry

    reg = load_registry()
    assert "testbed" in reg.names("generator")
    assert {"digit_classifier", "digit_realism", "digit_prototype", "digit_correct"} <= set(reg.names("reward"))


def test_testbed_generator_is_the_sd_generator_on_the_teacher():
    from rewardkit.generators.sd import StableDiffusion
    from rewardkit.testbed.evaluate import teacher

    gen = teacher(steps=4, guidance=1.0)
    assert isinstance(gen, StableDiffusion)
    assert gen.noise_shape() == (4, 8, 8)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = gen(["a handwritten digit 1", "the number seven", "digit 0"], noise, gen.sample_options())
    assert images.shape == (3, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_teacher_draws_the_digit_it_is_asked_for():
    from rewardkit.testbed.evaluate import Reference, evaluate_generator, teacher

    row = evaluate_generator(teacher(steps=25, guidance=3.0), Reference(), per_digit=3)
    assert row["accuracy"] >= 0.7, row


def test_frechet_distance():
    from rewardkit.testbed.evaluate import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 4, generator=g)
    b = torch.randn(2000, 4, generator=g)
    assert frechet_distance(a, b) < 0.05
    assert frechet_distance(a, b + 2.0) == pytest.approx(16.0, rel=0.05)


def test_quickstart_recipe_validates():
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import DEFAULT_RECIPE, load_recipe

    recipe = load_recipe(REPO / "recipes" / "quickstart.toml", registry=load_registry())
    assert recipe.generator.cls.name == "testbed"
    assert {s.cls.name for s in recipe.rewards} >= {"digit_classifier"} and len(recipe.rewards) >= 2
    assert {s.cls.name for s in recipe.regularizers} >= {"weight_l2", "random_eta", "normalize_gradients"}
    assert recipe.generator.options.num_steps == 4
    assert DEFAULT_RECIPE == "quickstart"


def test_quickstart_trains_samples_and_reports(tmp_path, capsys):
    """A few real optimizer steps of the quickstart, then `rewardkit sample` and the report table."""
    from rewardkit.cli import main

    run_dir = tmp_path / "run"
    args = ["run", str(REPO / "recipes" / "quickstart.toml"), f"run.dir='{run_dir}'", "run.steps=3", "run.batch_size=4",
            "run.checkpoint_every=0", "run.sample_every=0", "run.progress=false", "generator.report=false"]
    assert main(args) == 0
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all("reward/digit_classifier" in h for h in history)
    assert (run_dir / "samples" / "step_000000.png").is_file() and (run_dir / "samples" / "step_000003.png").is_file()

    out = tmp_path / "samples"
    assert main(["sample", str(run_dir), "--prompt", "a handwritten digit 3", "-n", "16", "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 16 and (out / "grid.png").is_file()

    capsys.readouterr()
    assert main(["testbed-report", str(run_dir), "--per-digit", "2"]) == 0  # the testbed plugin's command
    table = capsys.readouterr().out
    assert "teacher, 25 steps, CFG" in table and "teacher, 4 steps, untrained" in table and "trained" in table
    report = json.loads((run_dir / "testbed_report.json").read_text())
    assert len(report) == 4 and all(0 <= r["accuracy"] <= 1 for r in report.values())


def test_end_of_run_report_can_be_switched_off(tmp_path):
    from rewardkit import testbed
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    registry = load_registry()
    recipe = load_recipe(REPO / "recipes" / "quickstart.toml", ["generator.report=false"], registry=registry)
    assert testbed.run_finished(run_dir=tmp_path, recipe=recipe, registry=registry) is None
