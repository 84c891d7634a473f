"""The optimizer loop on the pixels generator: rewards rise, aggregation, guards, API."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import pixels_recipe
from rewardkit import Optimizer
from rewardkit.errors import TrainingDiverged, UserError
from rewardkit.generators.pixels import Pixels
from rewardkit.metrics import read_metrics
from rewardkit.plugins import load_registry
from rewardkit.recipe import load_recipe
from rewardkit.regularizers.normalize_gradients import NormalizeGradients
from rewardkit.regularizers.weight_l2 import WeightL2
from rewardkit.rewards.base import Reward
from rewardkit.rewards.color import Color
from rewardkit.rewards.smoothness import Smoothness


def test_pixels_recipe_raises_the_combined_reward(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=40, rewards={"color": {"target": [0.9, 0.1, 0.1]}, "smoothness": {}})
    result = Optimizer.from_recipe(recipe).fit()
    history = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in history] == list(range(1, 41))
    first, last = history[0]["reward/total"], history[-1]["reward/total"]
    assert last > first + 0.5 * abs(first), (first, last)
    assert result.metrics == history[-1]
    assert (tmp_path / "run" / "samples" / "step_000000.png").is_file()
    assert (tmp_path / "run" / "samples" / "step_000040.png").is_file()
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "step_000040"


def _two_reward_run(tmp_path, name: str, normalized: bool) -> list[dict]:
    """color (tiny image gradients) + smoothness scaled so its gradients are ~1000x larger."""
    recipe = pixels_recipe(
        tmp_path / name,
        steps=60,
        rewards={"color": {"target": [0.9, 0.1, 0.1]}, "smoothness": {"scale": 300.0}},
        regularizers={"normalize_gradients": {}} if normalized else {},
    )
    Optimizer.from_recipe(recipe).fit()
    return read_metrics(tmp_path / name / "metrics.jsonl")


def test_normalized_gradients_let_the_small_reward_count(tmp_path):
    plain = _two_reward_run(tmp_path, "plain", normalized=False)
    normed = _two_reward_run(tmp_path, "normed", normalized=True)

    ratio = plain[0]["grad_norm/smoothness"] / plain[0]["grad_norm/color"]
    assert 300 < ratio < 3000, f"raw gradient norms should differ by ~1000x, got {ratio:.0f}x"

    def gain(history, key):
        return history[-1][key] - history[0][key]

    # Normalized: both rewards improve substantially.
    assert gain(normed, "reward/color") > 0.5 * abs(normed[0]["reward/color"])
    assert gain(normed, "reward/smoothness") > 0.5 * abs(normed[0]["reward/smoothness"])
    # Plain weighted sum: smoothness dominates, colour barely moves.
    assert gain(plain, "reward/smoothness") > 0.5 * abs(plain[0]["reward/smoothness"])
    assert gain(plain, "reward/color") < 0.25 * gain(normed, "reward/color")


def test_weight_l2_is_zero_at_init_and_holds_the_search_back(tmp_path):
    gen = Pixels(height=8, width=8)
    reg = WeightL2(weight=1.0)
    gen.setup(["p"], seed=0)
    reg.setup(gen)
    assert reg.penalty(gen).item() == 0.0
    with torch.no_grad():
        gen.logits.add_(0.1)
    assert reg.penalty(gen).item() == pytest.approx(0.1**2 * gen.logits.numel(), rel=1e-4)

    def final_distance(weight: float, name: str) -> float:
        recipe = pixels_recipe(tmp_path / name, steps=30, regularizers={"weight_l2": {"weight": weight}})
        return Optimizer.from_recipe(recipe).fit().metrics.get("penalty/weight_l2", math.nan) / weight

    assert final_distance(10.0, "strong") < 0.5 * final_distance(1e-4, "weak")


class NaNReward(Reward):
    """NaN on the steps listed in `bad_calls` (1-based call numbers), else a colour score."""

    name = "nan_reward"

    def __init__(self, bad_calls, **options):
        super().__init__(**options)
        self.bad_calls, self.calls = set(bad_calls), 0

    def forward(self, images, prompts):
        self.calls += 1
        score = -((images - 1.0) ** 2).mean(dim=(1, 2, 3))
        return score * math.nan if self.calls in self.bad_calls else score


def _api_run(tmp_path, reward, steps=10, **run):
    return Optimizer(
        generator=Pixels(height=8, width=8),
        rewards={"r": reward},
        prompts=["a", "b"],
        run={"dir": str(tmp_path / "run"), "steps": steps, "batch_size": 2, "trackers": [], "progress": False, **run},
        optimizer={"name": "adam", "lr": 0.05},
    )


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    opt = _api_run(tmp_path, NaNReward(bad_calls={3, 4, 7}))
    result = opt.fit()
    history = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in history if r["skipped"]] == [3, 4, 7]
    assert result.metrics["nonfinite_total"] == 3
    assert math.isfinite(result.metrics["reward/r"])
    assert torch.isfinite(opt.generator.logits).all()


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    opt = _api_run(tmp_path, NaNReward(bad_calls=range(1, 100)), max_nonfinite_steps=3)
    gen = opt.generator
    with pytest.raises(TrainingDiverged, match="3 consecutive steps produced NaN or Inf"):
        opt.fit()
    initial = torch.randn(gen.logits.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    assert torch.equal(gen.logits.detach(), initial), "skipped steps must not change the parameters"


def test_api_labels_rewards_and_saves_a_loadable_recipe(tmp_path):
    opt = Optimizer(
        generator=Pixels(height=8, width=8),
        rewards=[Color(target=(0, 0, 1)), Color(target=(0, 1, 0), weight=0.5), Smoothness()],
        regularizers=[NormalizeGradients()],
        prompts=["x"],
        run={"dir": str(tmp_path / "api"), "steps": 3, "trackers": [], "progress": False},
    )
    assert list(opt.rewards) == ["color", "color_2", "smoothness"]
    result = opt.fit()
    assert set(k for k in result.metrics if k.startswith("reward/")) == {"reward/total", "reward/color", "reward/color_2", "reward/smoothness"}
    saved = load_recipe(tmp_path / "api" / "recipe.toml", registry=load_registry())
    assert [(s.label, s.cls.name, s.options.weight) for s in saved.rewards] == [("color", "color", 1.0), ("color_2", "color", 0.5), ("smoothness", "smoothness", 1.0)]
    assert saved.rewards[1].options.target == (0.0, 1.0, 0.0)
    assert saved.run.steps == 3


def test_non_differentiable_reward_is_refused_for_training():
    class Judge(Color):
        name = "judge"
        differentiable = False

    with pytest.raises(UserError, match="rewards.judge: 'judge' is not differentiable"):
        Optimizer(generator=Pixels(height=8, width=8), rewards={"judge": Judge()}, prompts=["x"], run={"steps": 1})


def test_bad_api_options_name_the_key():
    with pytest.raises(UserError, match="run.stepz: unknown key"):
        Optimizer(generator=Pixels(height=8, width=8), rewards=[Color()], prompts=["x"], run={"stepz": 1})
    with pytest.raises(UserError, match="height: required key is missing"):
        Pixels(width=8)


def test_existing_run_directory_is_not_overwritten(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=2)
    Optimizer.from_recipe(recipe).fit()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        Optimizer.from_recipe(recipe).fit()


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=10, run={"checkpoint_every": 2, "keep_checkpoints": 2})
    Optimizer.from_recipe(recipe).fit()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000008", "step_000010"]


def test_warmup_and_cosine_schedule(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=10, optimizer={"lr": 0.1, "warmup_steps": 4, "schedule": "cosine"})
    Optimizer.from_recipe(recipe).fit()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    # the rate each logged step used: linear warm-up from lr / (w + 1) over w = 4 steps, then cosine over the other 6
    warmup = [0.1 * (1 + k) / 5 for k in range(5)]
    cosine = [0.1 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert lrs == pytest.approx(warmup + cosine[1:], rel=1e-6)


def test_the_logged_lr_is_the_one_the_step_used(tmp_path, monkeypatch):
    used = []
    step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=5, optimizer={"lr": 0.1, "warmup_steps": 3})).fit()
    assert [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == pytest.approx(used, rel=1e-9)
    assert len(set(used)) == 4  # the warm-up moved it


def test_wandb_asked_but_not_installed_is_bad_input(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    recipe = pixels_recipe(tmp_path / "run", steps=1, run={"trackers": ["wandb"]})
    with pytest.raises(UserError, match="wandb is not installed: pip install 'rewardkit\\[wandb\\]'"):
        Optimizer.from_recipe(recipe).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_loaded_recipes_evaluation_goes_to_the_optimizer_as_is(tmp_path):
    """Evaluation is one type: the recipe's [eval] (reward specs) is accepted by Optimizer(evaluation=...)."""
    recipe = pixels_recipe(tmp_path / "r", steps=2)
    recipe["eval"] = {"prompts": ["a red square"], "rewards": {"held_out": {"type": "smoothness"}}}
    loaded = load_recipe(recipe, registry=load_registry())
    opt = Optimizer(Pixels(height=8, width=8), [Color()], prompts=["a red square"], run={"steps": 2, "dir": str(tmp_path / "api"), "trackers": []},
                    evaluation=loaded.evaluation)
    assert type(opt.eval_rewards["held_out"]).name == "smoothness"
    assert "eval/held_out" in opt.fit().metrics


def test_a_generator_that_does_not_say_its_steps_is_checked_at_training_time(tmp_path):
    """Cross-plugin checks refuse what a generator declares, and leave generators that declare nothing alone."""
    from rewardkit.regularizers.intermediate_step import IntermediateStep

    class Undeclared(Pixels):  # a third-party generator written before planned_steps existed
        name = "undeclared"

        @classmethod
        def planned_steps(cls, options):
            return None

    opt = Optimizer(Undeclared(height=8, width=8), [Color()], [IntermediateStep(supervision="random_step")], prompts=["a"],
                    run={"steps": 1, "dir": str(tmp_path / "u"), "trackers": []})
    with pytest.raises(UserError, match="does not say its number of steps"):
        opt.fit()  # the runtime check, as before


def test_an_eval_reward_equal_to_a_training_reward_is_the_same_model(tmp_path):
    """[eval.rewards.hps] next to [rewards.hps] must not load HPS twice."""
    recipe = pixels_recipe(tmp_path / "r", steps=1, rewards={"color": {"target": [1.0, 0.0, 0.0]}})
    recipe["eval"] = {"prompts": ["a red square"], "rewards": {"same": {"type": "color", "target": [1.0, 0.0, 0.0]},
                                                                "other": {"type": "color", "target": [0.0, 1.0, 0.0]}}}
    opt = Optimizer.from_recipe(recipe)
    assert opt.eval_rewards["same"] is opt.rewards["color"]
    assert opt.eval_rewards["other"] is not opt.rewards["color"]


def test_normalized_gradients_sum_or_average_over_rewards():
    g = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    grads = {"a": g, "b": 1000 * g.flip(0), "c": 1e-3 * torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))}
    for combine, share in (("sum", 1.0), ("mean", 1 / 3)):
        out = NormalizeGradients(combine=combine).transform_gradients(grads)
        for label, t in out.items():  # each reward's per-sample gradient norm: 1, or 1 / (number of rewards)
            torch.testing.assert_close(t.flatten(1).norm(dim=1), torch.full((3,), share), rtol=1e-5, atol=0)
            torch.testing.assert_close(t / t.flatten(1).norm(dim=1).view(-1, 1, 1, 1), grads[label] / grads[label].flatten(1).norm(dim=1).view(-1, 1, 1, 1))


def test_eval_rewards_reuse_training_rewards_whatever_their_options_hold(tmp_path):
    """Options that are dicts (pyiqa's metric_options) cannot be hashed; the weight does not count."""
    from pydantic import Field

    from rewardkit.plugins import PluginInfo
    from rewardkit.rewards.smoothness import SmoothnessOptions

    class DictOptions(SmoothnessOptions):
        settings: dict = Field(default_factory=dict)

    class DictReward(Smoothness):
        name = "dict_reward"
        Options = DictOptions

    registry = load_registry()
    registry.plugins["reward"]["dict_reward"] = PluginInfo("reward", "dict_reward", DictReward, "test", "0")
    recipe = pixels_recipe(tmp_path / "r", steps=1, rewards={"dict_reward": {"settings": {"a": 1}, "weight": 2.0}})
    recipe["eval"] = {"prompts": ["a red square"], "rewards": {"held_out": {"type": "dict_reward", "settings": {"a": 1}}}}
    opt = Optimizer.from_recipe(load_recipe(recipe, registry=registry))
    assert opt.eval_rewards["held_out"] is opt.rewards["dict_reward"]


def test_phase_timings_wait_for_cuda_and_only_for_cuda(monkeypatch):
    """CUDA runs asynchronously: a phase's time must include its own kernels, so the clock synchronizes first."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    opt = Optimizer.__new__(Optimizer)
    for kind, expected in (("cpu", 0), ("cuda", 1)):
        calls.clear()
        opt.accelerator = SimpleNamespace(device=SimpleNamespace(type=kind))
        opt._clock()
        assert len(calls) == expected, kind
