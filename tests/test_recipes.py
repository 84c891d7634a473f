"""Every shipped recipe validates, and every method recipe runs a few steps on tiny random models.

The method recipes name the paper's rewards (HPS v2.1, ImageReward, CLIP
score), whose weights are gigabytes: in the runs below command-line
overrides swap them for built-in rewards and the backbone for a tiny
random-weight pipeline, so what is exercised is the recipe's structure -
generator options, regularizers, optimizer, schedule - end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewardkit.errors import RecipeError
from rewardkit.plugins import load_registry
from rewardkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
METHODS = {
    "r0_sd15": "sd",
    "r0plus_sd15": "sd",
    "r0_sd3": "sd3",
    "r0_sdxl": "sdxl",
    "r0_sd35": "sd35",
    "r0_flux": "flux",
    "r0_zimage": "zimage",
    "r0plus_hires_sd3": "sd3",
    "draft_k_sd15": "sd",
    "reno_sd_turbo": "sd",
}
PAPER_REWARDS = {"hps", "imagereward", "clip_score"}
CHEAP = {"hps": "color", "imagereward": "smoothness", "clip_score": "color", "laion_aesthetic": "smoothness"}


def _load(path, overrides=()):
    try:
        return load_recipe(path, list(overrides), registry=load_registry())
    except RecipeError as exc:
        missing = [r for r in PAPER_REWARDS if f"no reward plugin named '{r}'" in str(exc)]
        if missing:
            pytest.skip(f"reward plugins not installed: {missing} (pip install rewardkit-hps rewardkit-imagereward rewardkit-clip)")
        raise


def test_the_method_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "r0_sd15", "r0plus_sd15", "r0_sd3", "r0plus_hires_sd3"} <= names
    assert set(METHODS) <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = _load(path)
    assert recipe.run.steps > 0 and recipe.prompts


@pytest.mark.parametrize("name", ["r0_sd15", "r0plus_sd15", "r0_sd3", "r0plus_hires_sd3", "r0_sdxl", "r0_sd35", "r0_flux", "r0_zimage"])
def test_method_recipes_are_r0(name):
    recipe = _load(REPO / "recipes" / f"{name}.toml")
    hires = {"high_resolution"} if name.endswith("hires_sd3") else set()
    assert {s.cls.name for s in recipe.rewards} == PAPER_REWARDS | hires
    regs = [s.cls.name for s in recipe.regularizers]
    assert {"weight_l2", "random_eta", "normalize_gradients"} <= set(regs)
    assert ("intermediate_step" in regs) == name.startswith("r0plus")
    assert recipe.generator.options.num_steps == 4


def test_reno_recipe_optimizes_noise_of_a_frozen_model():
    recipe = _load(REPO / "recipes" / "reno_sd_turbo.toml")
    assert recipe.generator.options.training == "noise"
    assert {s.cls.name for s in recipe.rewards} == PAPER_REWARDS
    assert [s.cls.name for s in recipe.regularizers] == ["noise_norm", "normalize_gradients"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    folders = {family: save_tiny(family, root / family) for family in ("sd", "sdxl", "sd3", "flux", "zimage")}
    return folders | {"sd35": save_tiny("sd3", root / "sd35", sd35=True)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_recipe_runs_on_a_tiny_model(name, tiny_folders, tmp_path, request):
    from rewardkit.optimizer import Optimizer

    kind = METHODS[name]
    size = 32 if kind in ("sd", "sdxl") else 16
    path = REPO / "recipes" / f"{name}.toml"
    base = _load(path)
    overrides = [
        f"generator.model='{tiny_folders[kind]}'", f"generator.height={size}", f"generator.width={size}",
        "generator.weights_dtype='float32'", "generator.lora_rank=4", "run.mixed_precision='no'",
        f"run.dir='{tmp_path / 'run'}'", "run.steps=2", "run.batch_size=2", "run.trackers=[]", "run.progress=false",
        "run.sample_every=0", "run.checkpoint_every=0", "optimizer.warmup_steps=0",
    ]
    overrides += [f"rewards.{s.label}.type='{CHEAP[s.cls.name]}'" for s in base.rewards if s.cls.name in CHEAP]
    overrides += [f"eval.rewards.{s.label}.type='{CHEAP[s.cls.name]}'" for s in base.evaluation.rewards if s.cls.name in CHEAP]
    if any(s.cls.name == "high_resolution" for s in base.rewards):
        overrides.append(f"rewards.high_resolution.weights='{request.getfixturevalue('hires_classifier')[0]}'")
    if kind == "flux":
        overrides.append("generator.max_sequence_length=16")  # the tiny T5's length (FLUX.1's: 512)
    if kind == "zimage":
        overrides.append("generator.max_sequence_length=48")  # the chat template and a prompt fit (Z-Image's: 512)
    if base.generator.options.num_steps > 4:
        overrides.append("generator.num_steps=5")
    recipe = _load(path, overrides)
    result = Optimizer.from_recipe(recipe).fit()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [h for h in history if "loss" not in h]  # the [eval] line before the first step
    history = [h for h in history if "loss" in h]
    assert [h["step"] for h in evaluated] == [0] and {"eval/hps", "eval/aesthetic"} <= set(evaluated[0])
    assert {"eval/hps", "eval/aesthetic"} <= set(history[-1])  # and after the last
    assert result.step == 2 and len(history) == 2
    assert not any(h["skipped"] for h in history)
    assert result.checkpoint is not None and (result.checkpoint / "state.json").is_file()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_recipes_evaluate_the_papers_metrics_on_held_out_prompts(name):
    recipe = _load(REPO / "recipes" / f"{name}.toml")
    ev = recipe.evaluation
    assert ev is not None and {s.cls.name for s in ev.rewards} == PAPER_REWARDS | {"laion_aesthetic"}
    assert ev.prompts and not set(ev.prompts) & set(recipe.prompts), "held out: no training prompt among them"
    if METHODS[name] in ("sd3", "sd35"):
        assert recipe.generator.options.text_encoder_3, "SD3 recipes keep T5, as the paper's SD3 does"


def test_the_flow_grpo_recipe_runs_on_a_tiny_sd3(tiny_folders, tmp_path):
    """Flow-GRPO's structure end to end on a tiny SD3.5: the SDE sampler, guidance, a non-differentiable reward by
    the policy gradient, the KL penalty, global standardization, the EMA, the [eval] rewards."""
    from rewardkit.optimizer import Optimizer

    path = REPO / "recipes" / "flow_grpo_sd3.toml"
    recipe = _load(path, [
        f"generator.model='{tiny_folders['sd35']}'", "generator.height=16", "generator.width=16", "generator.num_steps=3",
        "generator.weights_dtype='float32'", "generator.lora_rank=4", "generator.lora_alpha=8", "run.mixed_precision='no'",
        f"run.dir='{tmp_path / 'run'}'", "run.steps=2", "run.batch_size=4", "run.gradient_accumulation_steps=2",
        "policy_gradient.group_size=4", "run.trackers=[]", "run.progress=false", "run.sample_every=0", "run.checkpoint_every=0",
        "eval.rewards.aesthetic.type='smoothness'",
    ])
    assert recipe.generator.options.stochastic_update == "flow_sde" and recipe.generator.options.guidance_scale == 4.5
    result = Optimizer.from_recipe(recipe).fit()
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    assert result.step == 2 and [h["step"] for h in steps] == [1, 2] and not any(h["skipped"] for h in steps)
    assert steps[0]["policy/ratio"] == 1.0 and steps[0]["policy/kl"] == 0.0 and steps[1]["policy/kl"] > 0
    assert steps[0]["reward/jpeg_compressibility"] < 0 and "eval/jpeg_compressibility" in steps[-1]
