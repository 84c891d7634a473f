"""The score-function estimator (GRPO, rewardkit/policy_gradient.py) and its place in the optimizer's loop.

The maths against hand computations (group advantages, the clipped surrogate's
gradient); on the testbed: the first update's importance ratio is exactly 1, a
second update on the same samples is off-policy, one update raises the
log-probability of the trajectories that scored above their group; a recipe
whose rewards are all pathwise never runs any of it; bad settings exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardkit import policy_gradient
from rewardkit.errors import RecipeError, UserError
from rewardkit.optimizer import Optimizer
from rewardkit.plugins import load_registry
from rewardkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


def test_group_advantages_standardize_within_each_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.5, 1.5, 0.5, 1.5])
    adv = policy_gradient.group_advantages(scores, 4)
    g0 = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (torch.tensor([1.0, 0, 0, 0]).std(unbiased=False) + 1e-4)
    torch.testing.assert_close(adv[:4], g0)
    assert torch.equal(adv[4:8], torch.zeros(4))  # a group whose samples all score alike teaches nothing
    torch.testing.assert_close(adv[8:], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (0.5 + 1e-4))
    wide = policy_gradient.group_advantages(scores, 4, standardize="global")  # the group's mean, the batch's spread
    torch.testing.assert_close(wide[8:], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (scores.std(unbiased=False) + 1e-4))
    assert policy_gradient.group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, clip=1.0)[0] == 1.0
    with pytest.raises(ValueError, match="multiple of the group size 4"):
        policy_gradient.group_advantages(scores[:6], 4)


def test_the_clipped_surrogates_gradient_is_the_policy_gradient_inside_the_clip_and_zero_outside():
    """d loss / d log p_i = -A_i rho_i / (B S d) where rho_i is inside [1 - eps, 1 + eps] or clipping would raise the
    objective (min picks the unclipped term), 0 where the clipped term is the smaller one."""
    d, eps = 10, 0.01
    old = torch.zeros(4, 1, dtype=torch.float64)
    log_p = torch.tensor([[0.0], [0.05], [0.5], [-0.5]], dtype=torch.float64, requires_grad=True)  # rho: 1, 1.005, 1.051, 0.951
    adv = torch.tensor([1.0, -2.0, 1.0, 1.0])
    loss, stats = policy_gradient.clipped_surrogate(log_p, old, adv, eps, d)
    (g,) = torch.autograd.grad(loss, log_p)
    rho = torch.exp(log_p.detach() / d)[:, 0]
    expected = -adv.double() * rho / (4 * d)
    expected[2] = 0.0  # rho above 1 + eps with A > 0: the clipped term is the minimum, its gradient zero
    torch.testing.assert_close(g[:, 0], expected)  # (row 3: rho below 1 - eps with A > 0 keeps the unclipped term)
    assert float(stats["clipped"]) == 0.5


def grpo_recipe(tmp_path, **policy):
    return {
        "run": {"steps": 1, "batch_size": 8, "dir": str(tmp_path / "run"), "trackers": [], "progress": False, "seed": 0},
        "prompts": {"train": PROMPTS},
        "generator": {"type": "testbed", "num_steps": 3, "eta": 0.7, "training": "lora", "lora_rank": 4},
        "optimizer": {"lr": 1e-2},
        "rewards": {"digit_classifier": {"estimator": "score_function"}},
        "policy_gradient": {"group_size": 4, **policy},
    }


def hand_advantages(generator, prompts, noise, options):
    """The batch's images and classifier rewards, apart from the optimizer, and their advantages in groups of 4."""
    from rewardkit.testbed.plugins import DigitClassifier

    with torch.no_grad():
        scores = DigitClassifier()(generator(prompts, noise, options), prompts).view(-1, 4)
    return ((scores - scores.mean(1, keepdim=True)) / (scores.std(1, unbiased=False, keepdim=True) + 1e-4)).flatten()


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_the_first_update_is_on_policy_and_a_second_one_is_not(tmp_path):
    Optimizer.from_recipe(grpo_recipe(tmp_path)).fit()
    first = metrics(tmp_path)[-1]
    assert first["policy/ratio"] == 1.0 and first["policy/clipped"] == 0.0  # recomputed bit for bit
    assert first["reward/digit_classifier"] < 0 and not first["skipped"]

    Optimizer.from_recipe(grpo_recipe(tmp_path / "again", updates_per_batch=2)).fit()
    second = metrics(tmp_path / "again")[-1]
    assert second["policy/ratio"] != 1.0 and second["policy/clipped"] > 0  # the same samples, moved weights


def test_one_update_raises_the_log_probability_of_the_better_trajectories(tmp_path):
    """After one GRPO step (plain SGD), sum_i A_i (log p_new(tau_i) - log p_old(tau_i)) > 0 over the batch it learned
    from: the step moves the policy towards the samples that scored above their group."""
    opt = Optimizer.from_recipe(grpo_recipe(tmp_path) | {"optimizer": {"name": "sgd", "lr": 0.5}})
    seen, original = {}, opt._rollouts

    def keep(prompts, noise, options, steps):
        advantages = hand_advantages(opt.generator, prompts, noise, options)
        seen.update(prompts=prompts, noise=noise, options=options, advantages=advantages, part=original(prompts, noise, options, steps)[0])
        return [seen["part"]]

    opt._rollouts = keep
    opt.fit()
    part, gen = seen["part"], opt.generator
    assert seen["prompts"][:4] == [seen["prompts"][0]] * 4  # a group: one prompt, four samples
    with torch.no_grad():
        new = gen(seen["prompts"], seen["noise"], seen["options"].replace(rollout=part["rollout"], score_steps=(0, 1)))
    moved = new - part["old"]
    gain = (seen["advantages"].double() * moved.sum(1)).sum()
    assert moved.abs().max() > 0 and gain > 0


def test_the_testbed_grpo_recipe_trains(tmp_path):
    overrides = [f"run.dir='{tmp_path / 'run'}'", "run.steps=1", "run.batch_size=8", "policy_gradient.group_size=4",
                 "run.trackers=[]", "run.progress=false", "run.sample_every=0", "run.checkpoint_every=0"]
    result = Optimizer.from_recipe(REPO / "recipes" / "grpo_testbed.toml", overrides).fit()
    record = metrics(tmp_path)[-1]
    assert result.step == 1 and record["policy/ratio"] == 1.0 and 0 <= record["reward/digit_correct"] <= 1
    # what comes after training works for a policy-gradient run as for any: sample, export, eval
    from rewardkit.cli import main

    run_dir = str(tmp_path / "run")
    assert main(["sample", run_dir, "--prompt", "a handwritten digit 3", "-n", "2", "--out", str(tmp_path / "samples")]) == 0
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["0000.png", "0001.png", "grid.png"]
    assert main(["export", run_dir, "--format", "lora", "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    assert main(["eval", run_dir, "--prompts", str(prompts), "--metrics", "digit_correct", "--out", str(tmp_path / "eval")]) == 0
    assert "digit_correct" in (tmp_path / "eval" / "results.md").read_text()


def test_a_pathwise_recipe_never_runs_the_policy_gradient(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the policy-gradient code ran for a pathwise-only recipe")

    monkeypatch.setattr(Optimizer, "_rollouts", forbidden)
    monkeypatch.setattr(policy_gradient, "clipped_surrogate", forbidden)
    recipe = grpo_recipe(tmp_path)
    recipe["rewards"] = {"digit_classifier": {}}
    del recipe["policy_gradient"]
    Optimizer.from_recipe(recipe).fit()
    record = metrics(tmp_path)[-1]
    assert not [k for k in record if k.startswith("policy/")] and "policy_gradient" not in (tmp_path / "run" / "recipe.toml").read_text()


def test_settings_it_cannot_train_with_are_refused_naming_the_key(tmp_path):
    recipe = grpo_recipe(tmp_path)
    for change, message in [
        ({"policy_gradient": {"group_size": 3}}, "policy_gradient.group_size = 3 does not divide the update's 8 samples"),
        ({"policy_gradient": {"steps": [2]}}, r"policy_gradient.steps \[2\]: the updates of a 3-step sampler are 0 .. 1"),
        ({"generator": recipe["generator"] | {"num_steps": 1}}, "needs at least 2 sampler steps"),
        ({"generator": recipe["generator"] | {"training": "noise"}}, "with generator.training = 'noise' nothing it reaches is trained"),
        ({"generator": {"type": "pixels", "height": 8, "width": 8}}, "generator 'pixels' has no stochastic sampler"),
    ]:
        with pytest.raises(RecipeError, match=message):
            Optimizer.from_recipe(recipe | change)
    for change, message in [
        ({"generator": recipe["generator"] | {"eta": 0.0}}, "the sampler's eta must be above 0 at every update"),
        ({"policy_gradient": {"group_size": 1}}, "policy_gradient.group_size: .*greater than or equal to 2"),
        ({"rewards": {"digit_classifier": {}}}, "policy_gradient: set, but no reward trains with it"),
        ({"rewards": {"classifier_free_guidance": {"estimator": "score_function"}}}, "gradient, not a score, so it trains pathwise only"),
    ]:
        with pytest.raises(RecipeError, match=message):
            load_recipe(recipe | change, registry=load_registry())
    random_eta = recipe | {"generator": recipe["generator"] | {"eta": 0.0}, "regularizers": {"random_eta": {"low": 0.5}}}
    load_recipe(random_eta, registry=load_registry())  # the regularizer's eta is the policy's


def test_a_built_reward_that_says_it_is_not_differentiable_is_refused_pathwise():
    from rewardkit.generators.pixels import Pixels
    from rewardkit.rewards.color import Color

    judge = Color()
    judge.differentiable = False  # per instance, as rewardkit-pyiqa's metrics say it
    with pytest.raises(UserError, match="rewards.judge: 'color' is not differentiable, so it cannot be trained on pathwise"):
        Optimizer(generator=Pixels(height=8, width=8), rewards={"judge": judge}, prompts=["x"], run={"steps": 1})


def test_groups_split_over_micro_batches_get_the_advantages_of_the_whole_group(tmp_path):
    """run.batch_size 2 x 2 micro-batches, groups of 4: each group spans both micro-batches; the advantages the
    optimizer trains with are those computed by hand from the whole update's rewards, in order."""
    recipe = grpo_recipe(tmp_path)
    recipe["run"] |= {"batch_size": 2, "gradient_accumulation_steps": 2}
    opt = Optimizer.from_recipe(recipe)
    seen, original = {}, opt._rollouts

    def keep(prompts, noise, options, steps):
        seen["expected"] = hand_advantages(opt.generator, prompts, noise, options)
        seen["parts"] = original(prompts, noise, options, steps)
        return seen["parts"]

    opt._rollouts = keep
    opt.fit()
    got = torch.cat([part["advantages"] for part in seen["parts"]])
    assert len(seen["parts"]) == 2 and len(got) == 4
    torch.testing.assert_close(got, seen["expected"], rtol=1e-5, atol=1e-5)


def test_pathwise_and_score_function_rewards_train_in_one_step(tmp_path):
    recipe = grpo_recipe(tmp_path)
    recipe["rewards"] = {"digit_prototype": {}, "digit_correct": {"estimator": "score_function", "weight": 2.0}}
    Optimizer.from_recipe(recipe).fit()
    record = metrics(tmp_path)[-1]
    assert not record["skipped"] and record["policy/ratio"] == 1.0
    assert record["grad_norm/digit_prototype"] > 0 and 0 <= record["reward/digit_correct"] <= 1
    assert record["reward/total"] == pytest.approx(record["reward/digit_prototype"] + 2.0 * record["reward/digit_correct"])


def test_a_kl_penalty_to_the_reference_starts_at_zero_and_holds_the_policy_near_it(tmp_path):
    """regularizers.kl_reference: at the first step the LoRA generator is theta_0 (KL 0 exactly); after it, the logged
    penalty is beta times the batch's mean KL; with a large beta the policy ends closer to theta_0 than without."""
    def run(name, weight):
        recipe = grpo_recipe(tmp_path / name)
        recipe["run"]["steps"] = 3
        recipe["regularizers"] = {"kl_reference": {"weight": weight}}
        Optimizer.from_recipe(recipe).fit()
        return metrics(tmp_path / name)

    free, held = run("free", 0.0), run("held", 100.0)
    assert held[0]["policy/kl"] == 0.0 and held[1]["policy/kl"] > 0
    for record in held:
        assert record["penalty/kl_reference"] == pytest.approx(100.0 * record["policy/kl"], rel=1e-6)
    assert free[1]["policy/kl"] == pytest.approx(held[1]["policy/kl"], rel=1e-6)  # the same first step (its KL gradient is 0)
    assert held[2]["policy/kl"] < 0.5 * free[2]["policy/kl"]


def test_a_kl_penalty_without_a_policy_gradient_is_refused(tmp_path):
    recipe = grpo_recipe(tmp_path)
    recipe["rewards"] = {"digit_classifier": {}}
    del recipe["policy_gradient"]
    recipe["regularizers"] = {"kl_reference": {}}
    with pytest.raises(RecipeError, match="regularizers.kl_reference: 'kl_reference' constrains the policy gradient's updates"):
        load_recipe(recipe, registry=load_registry())


def test_a_window_trains_consecutive_updates_where_only_they_are_stochastic(tmp_path):
    """policy_gradient.window (Flow-GRPO-Fast): each step trains `window` consecutive updates inside `steps`, at a start
    drawn per batch; the rollout samples deterministically outside them (no density there: NaN), and the update
    trained is on-policy (ratio 1)."""
    recipe = grpo_recipe(tmp_path, window=2, steps=[1, 2, 3])
    recipe["run"]["steps"] = 6
    recipe["generator"]["num_steps"] = 5
    opt = Optimizer.from_recipe(recipe)
    windows, original = [], opt._rollouts

    def keep(prompts, noise, sampling, steps):
        parts = original(prompts, noise, sampling, steps)
        old = parts[0]["old"]
        windows.append((steps, sorted(set(old.isfinite().all(0).nonzero()[:, 0].tolist()))))
        return parts

    opt._rollouts = keep
    opt.fit()
    assert len(windows) == 6 and {w for w, _ in windows} <= {(1, 2), (2, 3)} and len({w for w, _ in windows}) == 2
    assert all(list(w) == stochastic for w, stochastic in windows)  # stochastic exactly where trained
    assert all(r["policy/ratio"] == 1.0 for r in metrics(tmp_path))
    with pytest.raises(RecipeError, match="a window moves inside consecutive, increasing updates"):
        load_recipe(grpo_recipe(tmp_path, window=2, steps=[0, 2, 3]), registry=load_registry())
    with pytest.raises(RecipeError, match="policy_gradient.window = 3 is wider than the 2 updates of a 3-step sampler"):
        load_recipe(grpo_recipe(tmp_path, window=3), registry=load_registry())


def test_a_policy_gradient_run_resumes_exactly(tmp_path):
    """Stopped after step 2 and resumed, a GRPO run (a drawn window, two clipped updates per batch, a KL penalty)
    ends bit for bit where the uninterrupted one does: between steps nothing of a rollout is in flight, and the
    prompt groups, noises and windows of the later steps are drawn from the checkpointed generator state."""
    from safetensors.torch import load_file

    def recipe(run_dir, steps):
        r = grpo_recipe(run_dir, window=1, updates_per_batch=2)
        r["run"] |= {"steps": steps, "checkpoint_every": 2, "dir": str(run_dir)}
        r["regularizers"] = {"kl_reference": {"weight": 1.0}, "weight_l2": {"weight": 1.0}}
        return r

    Optimizer.from_recipe(recipe(tmp_path / "straight", 4)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 2)).fit()
    Optimizer.from_recipe(recipe(tmp_path / "resumed", 4)).fit(resume=True)
    straight, resumed = (load_file(tmp_path / d / "checkpoints" / "step_000004" / "generator.safetensors") for d in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("straight", "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward/digit_classifier", "policy/ratio", "policy/kl", "loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_a_non_finite_score_skips_the_policy_gradient_step_and_training_goes_on(tmp_path):
    """A score-function reward (a throwaway plugin) that returns NaN for one batch: that step is skipped (no weight
    moves, counted by the NaN guard), the next one trains."""
    from safetensors.torch import load_file

    plugin = tmp_path / "flaky_judge.py"
    plugin.write_text(
        "import math\nimport rewardkit\nfrom rewardkit.testbed.plugins import DigitCorrect\n\n"
        "class FlakyJudge(DigitCorrect):\n    name = 'flaky_judge'\n    calls = 0\n\n"
        "    def forward(self, images, prompts):\n        FlakyJudge.calls += 1\n"
        "        score = super().forward(images, prompts)\n"
        "        return score * math.nan if FlakyJudge.calls == 2 else score\n\n"
        "@rewardkit.hookimpl\ndef register_rewards(register):\n    register(FlakyJudge)\n")
    recipe = grpo_recipe(tmp_path)
    recipe["run"] |= {"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 3}
    recipe["rewards"] = {"flaky_judge": {"estimator": "score_function"}}
    Optimizer.from_recipe(recipe, registry=load_registry([str(plugin)])).fit()
    records = metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, True, False] and records[-1]["nonfinite_total"] == 1
    step = [load_file(tmp_path / "run" / "checkpoints" / f"step_{k:06d}" / "generator.safetensors") for k in (1, 2, 3)]
    assert all(torch.equal(step[0][n], step[1][n]) for n in step[0])  # the skipped step moved nothing
    assert any(not torch.equal(step[1][n], step[2][n]) for n in step[0])


def test_jpeg_compressibility_is_minus_pillows_jpeg_size_of_the_saved_image(tmp_path):
    """The score against an independent path: the image written as a PNG by torchvision (its own 8-bit rounding), read
    back and encoded by Pillow at quality 95; a flat image compresses better than noise; pathwise is refused."""
    import io

    from PIL import Image
    from torchvision.utils import save_image

    from rewardkit.rewards.jpeg_compressibility import JpegCompressibility

    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 48), 0.3), torch.rand(1, 3, 32, 48, generator=g)])
    scores = JpegCompressibility()(images, ["a", "b"])
    for image, score in zip(images, scores):
        save_image(image, tmp_path / "x.png")
        buffer = io.BytesIO()
        Image.open(tmp_path / "x.png").convert("RGB").save(buffer, format="JPEG", quality=95)
        assert float(score) == pytest.approx(-buffer.tell() / 1000, abs=1e-6)
    assert scores[0] > scores[1]
    recipe = grpo_recipe(tmp_path)
    recipe["rewards"] = {"jpeg_compressibility": {}}
    del recipe["policy_gradient"]
    with pytest.raises(RecipeError, match="'jpeg_compressibility' is not differentiable, so it cannot be trained on pathwise"):
        load_recipe(recipe, registry=load_registry())


def test_a_pathwise_recipe_trains_as_before_the_score_function_estimator(tmp_path):
    """The numbers and weights of a pathwise-only run (LoRA, accumulation, R0+ per sample, the EMA, every R0
    regularizer) as the code before the estimator computed them (tests/pathwise_golden.py, commit 32c811b): on the
    machine that wrote them, bit for bit; elsewhere as two Adam runs whose sums ran in another order agree."""
    from safetensors.torch import load_file

    from conftest import assert_adam_runs_agree
    from pathwise_golden import golden_recipe, run_golden

    data = Path(__file__).parent / "data"
    numbers, tensors = run_golden(tmp_path / "run")
    golden = load_file(data / "pathwise_golden.safetensors")
    assert tensors.keys() == golden.keys()
    lr, steps = golden_recipe(tmp_path)["optimizer"]["lr"], golden_recipe(tmp_path)["run"]["steps"]
    for name in golden:
        assert_adam_runs_agree(tensors[name], golden[name], lr, steps)
    expected = json.loads((data / "pathwise_golden.json").read_text())
    # step 1 is computed from the initial weights (float32 sums: 1e-5); later steps from weights Adam may have moved
    # apart by up to 2 lr each where a gradient is near zero (a few of thousands): the numbers agree to about 1e-3
    for step, (got, want) in enumerate(zip(numbers, expected, strict=True), 1):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5 if step == 1 else 1e-3, abs=1e-9), (step, key)
