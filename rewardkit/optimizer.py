"""The optimizer: search for high-reward images under regularization.

`fit` is setup, a loop of `record = self._step(step)`, and finish. One step,
read top to bottom in `_step` and `_micro_step`:
  1. draw the update's prompts and noise; let regularizers adjust the
     sampling options;
  then for each micro-batch (one, unless run.gradient_accumulation_steps > 1):
  2. generate with gradient: images x (under R0+'s deep supervision, one
     per supervised step and sample);
  3. for each reward i: r_i(x) and g_i = d r_i / d x (a gradient-only reward,
     such as classifier-free guidance, gives g_i alone);
  4. let regularizers transform the g_i (e.g. per-sample normalization),
     form the rewards' loss (`_reward_loss`: pathwise, -<stopgrad(sum w_i g_i), x> / B),
     add the regularizers' penalties, backward;
  5. one optimizer step on the summed gradients (`_apply_update`), then the
     weights' moving average (optimizer.ema_decay);
  6. log; at intervals evaluate, write sample grids and atomic checkpoints.

The rewards never see the generator's graph: their gradients are taken with
respect to a detached copy of x, then pushed into the generator through the
surrogate loss. That keeps reward graphs short and lets gradients be
rewritten per reward.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from pydantic import ValidationError

from rewardkit import distributed, policy_gradient, sampler
from rewardkit.checkpoint import latest_checkpoint, load_checkpoint, load_ema, save_checkpoint, usable_checkpoint
from rewardkit.durable import write_text_atomic
from rewardkit.ema import EMA
from rewardkit.errors import RecipeError, TrainingDiverged, UserError, WriteFailed
from rewardkit.images import fixed_noise, generate, optimized_batches, progress_bar, save_grid, save_pngs
from rewardkit.metrics import MetricsLog, read_metrics
from rewardkit.options import describe_errors, validate_strict
from rewardkit.generators.base import Rollout
from rewardkit.recipe import (Evaluation, OptimizerSection, PluginSpec, PolicyGradientSection, PromptsSection, Recipe, RunSection, check_estimators,
                              check_plugins, load_recipe)
from rewardkit.rundir import check_run_dir, claim_run_dir, write_json, write_recipe

log = logging.getLogger("rewardkit")

SAMPLE_SEED_OFFSET = 1_000_003  # grid noise is drawn from seed + this, apart from training noise


@dataclass
class FitResult:
    run_dir: Path
    step: int
    metrics: dict
    """The last step's metrics (as in metrics.jsonl)."""
    checkpoint: Path | None
    report: str = ""
    """What the run reported when it ended (e.g. where a noise-optimizing run wrote its images), if anything."""


class Optimizer:
    """Maximize weighted rewards of a generator's images under regularization.

    Optimizer(generator=Pixels(height=32, width=32),
              rewards={"red": Color(target=(1, 0, 0))},
              regularizers=[NormalizeGradients()],
              prompts=["a red square"],
              run={"steps": 100, "dir": "runs/demo"},
              optimizer={"lr": 0.05}).fit()

    Arguments are validated as strictly as a recipe is, cross-plugin checks included.
    """

    def __init__(
        self,
        generator,
        rewards,
        regularizers=(),
        *,
        prompts: Sequence[str],
        sample_prompts: Sequence[str] | None = None,
        run: RunSection | Mapping | None = None,
        optimizer: OptimizerSection | Mapping | None = None,
        evaluation: Evaluation | None = None,
        policy_gradient: PolicyGradientSection | Mapping | None = None,
    ):
        self.generator = generator
        self.rewards = _labelled(rewards, "rewards")
        self.regularizers = _labelled(regularizers, "regularizers")
        section = _section(PromptsSection, {"train": list(prompts), "sample": None if sample_prompts is None else list(sample_prompts)}, "prompts")
        self.prompts = section.train
        if not self.prompts:
            raise UserError("prompts: at least one training prompt is needed")
        self.sample_prompts = section.sample or self.prompts[:4]
        self.run = _section(RunSection, run, "run")
        self.optim = _section(OptimizerSection, optimizer, "optimizer")
        self.policy = _section(PolicyGradientSection, policy_gradient, "policy_gradient")
        self.run_dir = Path(self.run.dir or "runs/rewardkit")
        self.evaluation = evaluation
        self.eval_rewards = _built(_labelled(evaluation.rewards, "eval.rewards"), self.rewards.values()) if evaluation else {}
        if not self.rewards:
            raise UserError("rewards: at least one reward is needed")
        # the rewards trained by the score-function estimator (GRPO, rewardkit.policy_gradient); the others: pathwise
        self.score_labels = [label for label, r in self.rewards.items() if r.options.estimator == "score_function"]
        checked = []
        for where, plugins in (("rewards", self.rewards), ("regularizers", self.regularizers), ("eval.rewards", self.eval_rewards)):
            checked += [(f"{where}.{label}", _spec(label, plugin)) for label, plugin in plugins.items()]
        generator_spec = _spec("generator", generator)
        problems = check_plugins(generator_spec, checked) + check_estimators(
            generator_spec, [_spec(label, r) for label, r in self.rewards.items()], self.policy, self.run,
            [_spec(label, r) for label, r in self.regularizers.items()],
            differentiable={label: r.differentiable for label, r in self.rewards.items()})  # (an instance may say)
        if problems:
            raise RecipeError("Optimizer(...)", problems)

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | Path | Mapping | None = None, overrides: Sequence[str] = (), registry=None) -> "Optimizer":
        """Build from a recipe: a path, an embedded recipe name, a dict, or a loaded Recipe.

        `registry` (default: rewardkit.plugins.load_registry()) names the plugins a recipe may use.
        """
        if not isinstance(recipe, Recipe):
            if registry is None:
                from rewardkit.plugins import load_registry

                registry = load_registry()
            recipe = load_recipe(recipe, overrides, registry=registry)
        return cls(
            generator=recipe.generator.build(),
            rewards={s.label: s.build() for s in recipe.rewards},
            regularizers={s.label: s.build() for s in recipe.regularizers},
            prompts=recipe.prompts,
            sample_prompts=recipe.sample_prompts,
            run=recipe.run,
            optimizer=recipe.optimizer,
            evaluation=recipe.evaluation,
            policy_gradient=recipe.policy_gradient,
        )

    def recipe(self) -> dict:
        """The run as a self-contained recipe (saved as recipe.toml)."""
        return {
            "run": self.run.model_dump(mode="json", exclude_none=True),
            "prompts": {"train": self.prompts, "sample": self.sample_prompts},
            "generator": self.generator.recipe_table(),
            "optimizer": self.optim.model_dump(mode="json", exclude_none=True),
            "rewards": {label: r.recipe_table() for label, r in self.rewards.items()},
            "regularizers": {label: r.recipe_table() for label, r in self.regularizers.items()},
            **({"eval": self._eval_table()} if self.evaluation else {}),
            **({"policy_gradient": self.policy.model_dump(mode="json", exclude_none=True)} if self.score_labels else {}),
        }

    def _eval_table(self) -> dict:
        ev = self.evaluation
        return {
            "every": ev.every, "prompts": list(ev.prompts), "n_per_prompt": ev.n_per_prompt, "seed": ev.seed,
            "rewards": {label: r.recipe_table() for label, r in self.eval_rewards.items()},
        }

    # ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> FitResult:
        self._lock = None
        try:
            start_step = self._setup(resume)
            record: dict = {}
            for step in range(start_step + 1, self.run.steps + 1):
                record = self._step(step)
            return self._finish(record, start_step)
        except WriteFailed as exc:  # a full disk: say what is safe, and how to go on
            raise WriteFailed(f"{exc}. The last good checkpoint is {latest_checkpoint(self.run_dir / 'checkpoints') or 'none yet'}; "
                              "free space, then continue with --resume") from exc
        finally:
            if self._lock is not None:
                self._lock.release()

    def _step(self, step: int) -> dict:
        acc, run = self.accelerator, self.run
        t0 = self._clock()
        lr = self.schedule.get_last_lr()[0]  # the rate this step's update uses (the schedule steps after it)

        # 1. prompts and noise of the whole update, drawn at once on every process (so accumulation changes
        #    no draw: batch 4 x 4 micro-batches is batch 16); regularizers adjust the sampling options
        n_micro = run.gradient_accumulation_steps
        group = self.policy.group_size if self.score_labels else 1
        prompts, index, noise = self._draw_batch(run.batch_size * n_micro, group)
        options = self.generator.sample_options().replace(prompt_index=index)
        for reg in self.regularizers.values():
            options = reg.adjust_sampling(options, len(prompts), self.data_rng)

        # 1b. score-function rewards: sample the whole update once, without gradient, keeping each trajectory and its
        #     log-probabilities; score it; each sample's advantage within its prompt's group
        rollouts = self._rollouts(prompts, noise, *self._policy_sampling(options, len(prompts))) if self.score_labels else [None] * n_micro

        # 2-4. each micro-batch of run.batch_size (this process's shard of it): generate, score, loss, backward
        # 5. one optimizer step for the update (skipped, not applied, when any micro-batch was non-finite); score-
        #    function rewards may take several on one batch of samples (policy_gradient.updates_per_batch)
        updates, applied, finite = [], [], []
        for u in range(self.policy.updates_per_batch if self.score_labels else 1):
            micro = []
            for m in range(n_micro):
                with acc.accumulate(self.model):  # gradients add up; DDP / FSDP synchronize at the last micro-batch only
                    micro.append(self._micro_step(*self._shard(prompts, noise, options, m), rollouts[m], first=u == 0))
            was_applied, was_finite, param_grad_norm = self._apply_update(all(m["finite"] for m in micro))
            updates.append(micro)
            applied.append(was_applied)
            finite.append(was_finite)
        # the step's bookkeeping, once per step whatever the number of updates: the weights' average, the learning
        # rate, the NaN guard (it counts steps with a non-finite update; the total counts updates)
        if any(applied) and self.ema is not None:
            self.ema.update(self._trainable(), step)
        if any(applied):
            self.schedule.step()
        self.nonfinite_total += finite.count(False)
        self.consecutive_bad = 0 if all(finite) else self.consecutive_bad + 1
        if all(finite):
            self.lost_at_good_step = self._lost_batches()
        micro = updates[0]  # the rewards' scores and gradients: the first update's; the policy's statistics: the last's
        t4 = self._clock()

        # 6. log; at intervals evaluate, draw a grid, checkpoint
        def mean(key: str, label: str, micro=micro) -> float:
            return acc.reduce(torch.stack([m[key][label] for m in micro]).mean(), "mean").item()

        mean_scores = {label: mean("scores", label) for label in micro[0]["scores"]}
        record = {
            "step": step,
            "reward/total": sum(self.rewards[label].weight * v for label, v in mean_scores.items()),
            **{f"reward/{label}": v for label, v in mean_scores.items()},
            **{f"grad_norm/{label}": mean("grad_norms", label) for label in micro[0]["grad_norms"]},
            **{f"penalty/{label}": mean("penalties", label) for label in micro[0]["penalties"]},
            "loss": acc.reduce(torch.stack([m["loss"] for m in micro]).mean(), "mean").item(),
            "param_grad_norm": param_grad_norm,
            **{f"policy/{key}": mean("policy", key, updates[-1]) for key in updates[-1][0]["policy"]},
            "lr": lr,
            "skipped": not any(applied),
            **({"policy/skipped_updates": applied.count(False)} if self.score_labels else {}),
            **({"grad_scale": float(acc.scaler.get_scale())} if acc.scaler is not None else {}),
            "nonfinite_total": self.nonfinite_total,
            "time/step": t4 - t0,
            **{f"time/{phase}": sum(m["time"][phase] for m in micro) for phase in ("generate", "rewards", "backward")},
            **({"time/rollout": sum(r["time"] for r in rollouts)} if self.score_labels else {}),
            "memory/peak_mb": _peak_memory_mb(acc.device),
        }
        last = step == run.steps
        if self.evaluation and (last or (self.evaluation.every and step % self.evaluation.every == 0)):
            record.update(self._evaluate())
        self._log(record)
        self._stop_if_diverged(step)
        if last or (run.sample_every and step % run.sample_every == 0):
            self._grid(step)
        if last or (run.checkpoint_every and step % run.checkpoint_every == 0):
            self._save_checkpoint(step)
        return record

    def _micro_step(self, prompts: list[str], noise: torch.Tensor, options, rollout: dict | None = None, first: bool = True) -> dict:
        """Steps 2-4 on one micro-batch (this process's shard): its loss's gradient added to the weights' .grad.

        With score-function rewards, `rollout` is the micro-batch's share of `_rollouts`; the pathwise rewards train
        on the first update of a batch only (`first`), the policy gradient on every one."""
        acc, clock = self.accelerator, self._clock
        pathwise = first and len(self.score_labels) < len(self.rewards)
        scores, grads, grad_norms, loss = {}, {}, {}, None
        # 2. generate with gradient (deep supervision: every supervised step's images, step-major)
        t_gen = clock()
        if pathwise:
            with acc.autocast():
                images = self.model(prompts, noise, options).float()
        t1 = clock()

        # 3. each pathwise reward's score and image gradient, on a detached copy of x
        if pathwise:
            image_prompts, image_weights = self._image_rows(images, prompts, options)
            for label, reward in self.rewards.items():
                if label in self.score_labels:
                    continue
                with acc.autocast():
                    s, grads[label] = reward.score_and_gradient(images.detach(), image_prompts)
                if s is not None:  # gradient-only rewards have no score
                    scores[label] = s.float()
            grad_norms = {label: g.flatten(1).norm(dim=1).mean() for label, g in grads.items()}
        t2 = clock()

        # 4. transform the gradients; the rewards' loss (pathwise, then the policy gradient's) plus the penalties;
        #    backward (a non-finite loss is not)
        if pathwise:
            for reg in self.regularizers.values():
                grads = reg.transform_gradients(grads)
            loss = self._reward_loss(images, grads, image_weights)
        policy_loss, policy, kl = None, {}, None
        if rollout is not None:
            steps, with_kl = rollout["steps"], any(reg.uses_reference_kl for reg in self.regularizers.values())
            scoring = rollout["options"].replace(rollout=rollout["rollout"], score_steps=steps, score_reference=with_kl)
            with acc.autocast():  # (float64, as recorded while sampling: the first update's ratio is exactly 1)
                log_p = self.model(prompts, noise, scoring)
            if with_kl and not isinstance(log_p, tuple):
                raise UserError(f"regularizers: a KL penalty to the reference needs generator '{self.generator.name}' to give the "
                                "KL of its updates (SampleOptions.score_reference), which it does not")
            log_p, kl = log_p if with_kl else (log_p, None)
            policy_loss, policy = policy_gradient.clipped_surrogate(
                log_p, rollout["old"][:, list(steps)], rollout["advantages"], self.policy.clip_range, rollout["elements"])
            policy["loss"] = policy_loss.detach()
            if kl is not None:
                policy["kl"] = kl.detach().mean()
        last_loss = policy_loss if policy_loss is not None else loss
        penalties = {}
        for label, reg in self.regularizers.items():
            p = reg.policy_penalty(kl) if reg.uses_reference_kl else reg.penalty(self.generator)
            if p is not None:
                penalties[label] = p.detach()
                last_loss = last_loss + p
        total = last_loss if loss is None or policy_loss is None else loss + last_loss
        # every process takes the same branch (the decision is all-gathered), or DDP's collectives mismatch
        finite = bool(torch.isfinite(total)) and all(bool(torch.isfinite(s).all()) for s in scores.values())
        finite = bool(acc.gather(torch.tensor([finite], device=acc.device)).all())
        t3 = clock()
        # FSDP keeps the gradients of accumulated micro-batches unsharded until the last one's backward reduces them;
        # that backward must run even when the update will be skipped, or they would leak into the next update
        if finite or (self.sharded and self.run.gradient_accumulation_steps > 1):
            # one backward through both graphs (pathwise and policy): DDP decides in forward whether to synchronize,
            # so a second backward would not be reduced
            acc.backward(last_loss if loss is None or policy_loss is None else loss + last_loss)  # / micro-batches
        # the scores of the returned images (deep supervision: of the last supervised step's); the score-function
        # rewards' are the rollout's
        scores = {label: s[-len(prompts):].mean() for label, s in scores.items()} | (rollout["scores"] if rollout is not None else {})
        return {
            "finite": finite,
            "loss": total.detach(),
            "scores": scores,
            "grad_norms": grad_norms,
            "penalties": penalties,
            "policy": policy,
            "time": {"generate": t1 - t_gen, "rewards": t2 - t1, "backward": clock() - t3},
        }

    def _policy_sampling(self, options, n: int):
        """The rollouts' sampling options and the updates the policy gradient trains this step: policy_gradient.steps
        (default: every update); with a window, `window` consecutive ones at a start drawn in that range, the sampler
        deterministic (eta 0) outside it, as Flow-GRPO-Fast samples (its other updates then cost no noise)."""
        K = options.num_steps or self.generator.planned_steps(self.generator.options)
        if not K:
            raise UserError(f"generator '{self.generator.name}' does not say its number of sampler steps (SampleOptions.num_steps "
                            "or planned_steps), which the score-function estimator needs")
        steps = list(self.policy.steps) if self.policy.steps is not None else list(range(K - 1))
        sampling = options.replace(supervise_step=None, grad_steps=None, deep_supervision=None, deep_supervision_weights=None)
        if self.policy.window is None:
            return sampling, tuple(steps)
        if self.policy.window > len(steps):
            raise UserError(f"policy_gradient.window = {self.policy.window} is wider than the {len(steps)} updates it moves in "
                            f"(policy_gradient.steps, or the {K - 1} updates of a {K}-step sampler)")
        start = steps[0] + int(torch.randint(len(steps) - self.policy.window + 1, (), generator=self.data_rng))
        window = tuple(range(start, start + self.policy.window))
        inside = torch.zeros(K)
        inside[list(window)] = 1.0
        return sampling.replace(eta=sampler.eta_matrix(options.eta, n, K, "cpu") * inside), window

    def _rollouts(self, prompts: list[str], noise: torch.Tensor, sampling, steps: tuple[int, ...]) -> list[dict]:
        """Step 1b: each micro-batch sampled without gradient with the options `sampling` (this process's shard), its
        trajectories and their log-probabilities kept (whole chains: R0+'s supervision is for the pathwise pass),
        scored by the score-function rewards; then the advantages of the whole update, from every process's scores
        (so they do not depend on how the batch is split), handed back per micro-batch: {rollout, options, steps, old,
        elements, advantages, scores, time}."""
        acc, B, t0 = self.accelerator, self.run.batch_size, self._clock()
        parts, weighted = [], []
        for m in range(self.run.gradient_accumulation_steps):
            p, z, o = self._shard(prompts, noise, sampling, m)
            rollout = Rollout()
            with torch.no_grad(), acc.autocast():
                images = self.model(p, z, o.replace(rollout=rollout)).float()
                local = {label: self.rewards[label](images, p).float() for label in self.score_labels}
            whole = {label: acc.gather(s) for label, s in local.items()}  # the micro-batch's B rows, in order
            weighted.append(sum(self.rewards[label].weight * whole[label] for label in self.score_labels))
            parts.append({"rollout": rollout, "options": o, "steps": steps, "old": torch.stack(rollout.log_probs, 1),
                          "elements": z[0].numel(), "scores": {label: s.mean() for label, s in whole.items()}})
        advantages = policy_gradient.group_advantages(torch.cat(weighted), self.policy.group_size, self.policy.standardize,
                                                      self.policy.advantage_clip)
        shard = distributed.batch_shard(acc.process_index, acc.num_processes, B)
        t = self._clock() - t0
        return [part | {"advantages": advantages[m * B : (m + 1) * B][shard], "time": t / len(parts)} for m, part in enumerate(parts)]

    def _reward_loss(self, images: torch.Tensor, grads: dict[str, torch.Tensor], image_weights: torch.Tensor) -> torch.Tensor:
        """How the rewards' signal reaches the generator: the pathwise estimator (R0).

        g = sum_i w_i T(g_i) is a direction in image space; the surrogate
        -<stopgrad(g), x> / B has gradient -g / B with respect to x, so backward
        carries it through the generator by the chain rule. `image_weights`
        holds the 1 / B (deep supervision: the step's weight / B) of each image.
        """
        g = sum(self.rewards[label].weight * grads[label] for label in self.rewards if label in grads)
        return -(image_weights * (g.detach() * images).flatten(1).sum(1)).sum()

    def _image_rows(self, images: torch.Tensor, prompts: list[str], options) -> tuple[list[str], torch.Tensor]:
        """The prompt and the loss weight of each generated image: 1 / B each, or under deep supervision
        one image per supervised step and sample (step-major), weighted by its step's weight / B."""
        steps = options.deep_supervision or (None,)
        weights = options.deep_supervision_weights or (1.0,) * len(steps)
        if len(images) != len(steps) * len(prompts):
            raise UserError(
                f"generator '{self.generator.name}' returned {len(images)} images for {len(prompts)} prompts"
                + (f" and the {len(steps)} steps of deep supervision (regularizers.intermediate_step, supervision = 'every_step'): "
                   "it does not support deep supervision; use supervision = 'random_step'" if options.deep_supervision else "")
            )
        weights = torch.tensor(weights, dtype=torch.float32, device=images.device).repeat_interleave(len(prompts)) / len(prompts)
        return list(prompts) * len(steps), weights

    def _apply_update(self, finite: bool) -> tuple[bool, bool, float]:
        """The optimizer step on the accumulated gradients unless the update is non-finite: (applied, finite, gradient norm).

        `finite` is the same on every process (each micro-batch's decision was all-gathered).
        """
        acc, optim = self.accelerator, self.torch_optimizer
        param_grad_norm, applied = math.nan, False
        if finite:
            param_grad_norm = float(acc.clip_grad_norm_(self.params, self.optim.max_grad_norm or math.inf))
            if acc.scaler is not None:
                # fp16: the grad scaler skips an overflowing step and lowers its scale itself;
                # that is routine, not divergence, so it does not count towards the NaN guard.
                optim.step()
                applied = not optim.step_was_skipped
            else:
                finite = math.isfinite(param_grad_norm)  # the same on every process (all-reduced)
                if finite:
                    optim.step()
                    applied = True
        optim.zero_grad(set_to_none=True)
        return applied, finite, param_grad_norm

    def _clock(self) -> float:
        """time.perf_counter(), after the device has finished its queued work (CUDA runs asynchronously:
        without the synchronization a phase's time would land in whichever phase next waits for the GPU)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    # --- setup and finish ------------------------------------------------------------
    def _setup(self, resume: bool) -> int:
        """Build everything a step needs, restore a checkpoint when resuming; returns the step to continue after."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        run, run_dir = self.run, self.run_dir
        check_run_dir(run_dir, resume)
        _forget_other_precision(run.mixed_precision)
        acc = self.accelerator = Accelerator(
            mixed_precision=run.mixed_precision, gradient_accumulation_steps=run.gradient_accumulation_steps,
            log_with=_trackers(run.trackers, run_dir, self.recipe()) or None,
        )
        if run.mixed_precision == "fp16" and acc.device.type == "cpu" and acc.scaler is None:
            # accelerate declines fp16 on CPU, where torch has both autocast and a GradScaler: enable accelerate's own
            # fp16 path there (its autocast, scaled backward, unscale-before-clip, skipped overflow steps)
            acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
        if acc.gradient_accumulation_steps != run.gradient_accumulation_steps:
            raise UserError(
                f"the accelerate configuration sets gradient_accumulation_steps = {acc.gradient_accumulation_steps} "
                f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS), the recipe run.gradient_accumulation_steps = {run.gradient_accumulation_steps}; "
                "rewardkit draws each update's batch itself, so set it in the recipe only and remove it from the accelerate YAML"
            )
        acc.wait_for_everyone()  # every process has checked the run directory before rank 0 writes to it
        self.main = acc.is_main_process
        # before the generator and rewards are set up (the CLI checks before they are even built): a busy or
        # unwritable directory, or no intact checkpoint, costs nothing
        self._main_decides(lambda: setattr(self, "_lock", claim_run_dir(run_dir)))
        checkpoint = self._main_decides(self._checkpoint_to_resume) if resume else None
        if run.batch_size % acc.num_processes:
            raise UserError(f"run.batch_size = {run.batch_size} does not divide evenly over {acc.num_processes} processes")
        torch.manual_seed(run.seed)

        # Model, rewards and regularizers, in the order the reference weights need:
        # theta_0 is taken from the freshly set-up generator, before any checkpoint loads.
        gen = self.generator
        gen.setup(self.prompts, run.seed)
        gen.to(acc.device)
        gen.prepare_prompts([*self.prompts, *self.sample_prompts, *(self.evaluation.prompts if self.evaluation else [])])
        for reg in self.regularizers.values():
            reg.setup(gen)
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.mixed_precision, torch.float32)
        for reward in {id(r): r for r in [*self.rewards.values(), *self.eval_rewards.values()]}.values():  # a shared model once
            reward.use_precision(compute_dtype)  # dtype = 'auto' (the default): rebuilt in the run's precision, then moved
            reward.requires_grad_(False).eval().to(acc.device)
            reward.setup(gen)
        params = gen.trainable_parameters()
        if not params:
            raise UserError(f"generator '{gen.name}' has no trainable parameters")
        optim = _torch_optimizer(self.optim, params)
        self.schedule = _lr_schedule(self.optim, optim, run.steps)
        self.data_rng = torch.Generator().manual_seed(run.seed)
        self.nonfinite_total, self.consecutive_bad = 0, 0
        self.lost_at_good_step = self._lost_batches()

        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        # weights before prepare (FSDP shards what it is given), optimizer state after it
        optim_state, state = self._restore_weights(checkpoint) if checkpoint is not None else (None, {"step": 0})
        start_step = state["step"]
        if self.main:  # without a checkpoint nothing is kept, not even a step-0 evaluation line
            self.metrics.truncate_after(start_step if checkpoint is not None else -1)
            write_recipe(run_dir, self.recipe(), resumed=checkpoint is not None)
        self.model, self.torch_optimizer = acc.prepare(gen, optim)
        # FSDP replaces each parameter by its shard and only then can take optimizer state; its forward is a
        # collective, so every process takes part in drawing grids and evaluations (rank 0 still writes alone).
        self.sharded = acc.distributed_type == DistributedType.FSDP
        self.draws = self.main or self.sharded
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None
        if self.optim.ema_decay is not None:
            if self.optim.ema_device == "cpu" and self.sharded:
                raise UserError("optimizer.ema_device = 'cpu' is not supported under FSDP (each process averages its shards in place); use 'accelerator'")
            self.ema = EMA(self._trainable(), self.optim.ema_decay, self.optim.ema_device)
        if optim_state is not None:
            self._restore_optimizer(optim_state, state)
            self._restore_ema(checkpoint)
        if run.trackers:
            acc.init_trackers("rewardkit")

        self.sample_noise = fixed_noise(gen, len(self.sample_prompts), run.seed + SAMPLE_SEED_OFFSET)
        if start_step == 0:
            self._grid(0)
            if self.evaluation:
                evaluated = self._evaluate()
                if self.main:
                    self.metrics.write({"step": 0, **evaluated})
        # tqdm's default bar shows steps done / run.steps, elapsed < remaining (the ETA) and the rate; rank 0 alone
        self.progress = progress_bar(run.steps, "rewardkit", "step", enabled=run.progress and self.main, initial=start_step)
        return start_step

    def _main_decides(self, decide):
        """`decide()` on rank 0 alone, its result handed to every process; a UserError it raises is raised on
        every process, so that none is left waiting in a collective for a rank that has stopped."""
        outcome = [None, None]
        if self.main:
            try:
                outcome = [decide(), None]
            except UserError as exc:
                outcome = [None, str(exc)]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(outcome)
        if outcome[1] is not None:
            raise UserError(outcome[1])
        return outcome[0]

    def _checkpoint_to_resume(self) -> Path | None:
        """The newest intact checkpoint (damaged newer ones set aside); rank 0 alone reads and renames."""
        checkpoint = usable_checkpoint(self.run_dir / "checkpoints")
        if checkpoint is None:
            log.info("nothing to resume in %s: starting from step 0", self.run_dir)
        return checkpoint

    def _restore_weights(self, checkpoint: Path) -> tuple[dict, dict]:
        """Load a checkpoint's weights and RNG states; returns (optimizer state, state.json) for after prepare."""
        gen_state, optim_state, rng_state, state = load_checkpoint(checkpoint)
        self.generator.load_trainable_state_dict(gen_state)
        self.data_rng.set_state(rng_state["data"])
        torch.set_rng_state(rng_state["torch"])
        self.nonfinite_total = state["nonfinite_total"]
        log.info("resuming from %s", checkpoint)
        return optim_state, state

    def _restore_optimizer(self, optim_state: dict, state: dict) -> None:
        """Optimizer and LR-schedule state into the prepared (possibly sharded) optimizer."""
        optim, scaler = self.torch_optimizer, self.accelerator.scaler
        distributed.load_optimizer_state(self.generator, optim.optimizer, optim_state["optimizer"])
        if scaler is not None and "grad_scaler" in optim_state:
            scaler.load_state_dict(optim_state["grad_scaler"])
        elif scaler is not None:
            log.info("the checkpoint has no fp16 loss scale (it was not an fp16 run): starting from the default scale")
        if state.get("total_steps", self.run.steps) == self.run.steps:
            self.schedule.load_state_dict(optim_state["schedule"])
        else:  # run.steps changed (extending a run): the new schedule, advanced to this step
            for group in optim.param_groups:
                group["lr"] = group["initial_lr"] = self.optim.lr
            self.schedule = _lr_schedule(self.optim, optim.optimizer, self.run.steps)
            _fast_forward(self.schedule, state["step"])

    def _trainable(self):
        return [(n, p) for n, p in self.generator.named_parameters() if p.requires_grad]

    def _restore_ema(self, checkpoint: Path) -> None:
        if self.ema is None:
            return
        saved = load_ema(checkpoint)
        if saved is None:  # EMA switched on for a resumed run: the average built above starts from the resumed weights
            log.info("%s has no EMA weights: the average starts from the resumed weights", checkpoint)
        else:
            self.ema.load_state_dict(saved)

    def _save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        # whole tensors and FQN-keyed optimizer state, gathered from the shards under FSDP (then every
        # process takes part): a checkpoint resumes under any process count and configuration
        if self.main or self.sharded:
            weights = self.generator.trainable_state_dict()
            optimizer_state = distributed.optimizer_state(self.generator, self.torch_optimizer.optimizer)
            ema_state = self.ema.state_dict() if self.ema is not None else None
        if self.main:
            save_checkpoint(
                self.run_dir / "checkpoints",
                step,
                weights,
                # fp16: the loss scale is state too (a resumed run must skip the overflow steps the uninterrupted one skips)
                {"optimizer": optimizer_state, "schedule": self.schedule.state_dict(),
                 **({"grad_scaler": self.accelerator.scaler.state_dict()} if self.accelerator.scaler is not None else {})},
                {"data": self.data_rng.get_state(), "torch": torch.get_rng_state()},
                {"nonfinite_total": self.nonfinite_total, "total_steps": self.run.steps},
                keep=self.run.keep_checkpoints,
                ema_state=ema_state,
            )

    def _finish(self, record: dict, start_step: int) -> FitResult:
        acc, run_dir = self.accelerator, self.run_dir
        self.progress.close()
        self.metrics.close()
        acc.wait_for_everyone()
        if not record:  # resumed a finished run: report what it ended with
            history = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            record = history[-1] if history else {}
        final = latest_checkpoint(run_dir / "checkpoints")
        report = self._write_optimized_images() if self.generator.optimized_noise() is not None else ""  # collectives under FSDP
        if self.main:
            write_json(run_dir / "summary.json", {"step": record.get("step", start_step), "final_metrics": record, "checkpoint": str(final) if final else None})
        for tracker in acc.trackers:  # (not end_training: it also destroys the process group, which is not ours to end)
            tracker.finish()
        return FitResult(run_dir, record.get("step", start_step), record, final, report)

    # --- logging and drawing -----------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.main:
            return
        self.metrics.write(record)
        if self.run.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
        self.progress.update(1)
        self.progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k.startswith("reward/")}, refresh=False)

    def _draw(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Images without gradient, on every drawing process (FSDP's forward is a collective); resharded after."""
        images = generate(self.generator, prompts, noise)
        distributed.reshard(self.generator)
        return images

    def _grid(self, step: int) -> None:
        if self.draws:
            images = self._draw(self.sample_prompts, self.sample_noise)
            if self.main:
                save_grid(images, self.run_dir / "samples" / f"step_{step:06d}.png", prompts=self.sample_prompts)  # one prompt per tile

    def _evaluate(self) -> dict:
        """Held-out rewards of the current generator, on fixed prompts and noise ({} on processes that do not draw)."""
        if not self.draws:
            return {}
        from rewardkit.evaluation import score_rewards

        ev = self.evaluation
        prompts = [p for p in ev.prompts for _ in range(ev.n_per_prompt)]
        images = self._draw(prompts, fixed_noise(self.generator, len(prompts), ev.seed))
        with self.accelerator.autocast():  # the rewards' precision is the run's, as in training
            scores = score_rewards(self.eval_rewards, images, prompts, batch_size=self.run.batch_size)
        return {f"eval/{label}": s.float().mean().item() for label, s in scores.items()}

    def _write_optimized_images(self) -> str:
        """A noise-optimizing run's result is its images: one PNG per training prompt in RUN_DIR/images/."""
        if not self.draws:
            return ""
        folder, paths = self.run_dir / "images", []
        table = distributed.full_tensor(self.generator.optimized_noise()).detach()  # under FSDP a collective: every drawing process
        for start, images in optimized_batches(self.generator, self.prompts, table=table):  # batch by batch: N images need not fit in memory
            distributed.reshard(self.generator)
            if self.main:
                paths += save_pngs(images, folder, start=start)
        if not self.main:
            return ""
        index = [{"index": i, "prompt": p, "file": path.name} for i, (p, path) in enumerate(zip(self.prompts, paths))]
        write_text_atomic(folder / "index.jsonl", "".join(json.dumps(row) + "\n" for row in index))
        return f"{len(paths)} images from the optimized noise, one per training prompt: {folder} (index.jsonl lists the prompts)"

    def _shard(self, prompts: list[str], noise: torch.Tensor, options, micro: int = 0):
        """This process's part of micro-batch `micro` of the update: prompts, noise (on its device), per-sample options."""
        acc, B = self.accelerator, self.run.batch_size
        micro_batch = slice(micro * B, (micro + 1) * B)
        prompts, noise, options = prompts[micro_batch], noise[micro_batch], distributed.shard_options(options, micro_batch)
        shard = distributed.batch_shard(acc.process_index, acc.num_processes, B)
        return prompts[shard], noise[shard].to(acc.device), distributed.shard_options(options, shard)

    def _lost_batches(self) -> dict[str, int]:
        """{label: batches no server answered so far} of the rewards computed elsewhere (remote, vlm_judge)."""
        return {label: r.endpoints.failed_batches for label, r in self.rewards.items() if hasattr(r, "endpoints")}

    def _stop_if_diverged(self, step: int) -> None:
        if self.consecutive_bad >= self.run.max_nonfinite_steps:
            self.metrics.close()
            # rewards served elsewhere (remote, vlm_judge) score NaN for a batch no server answered: those that lost
            # batches since the last good step come first (counted on this process; each process has its requests)
            lost = [f"{label} ({n - self.lost_at_good_step.get(label, 0)} batch(es) no server answered; see the warnings above)"
                    for label, n in self._lost_batches().items() if n > self.lost_at_good_step.get(label, 0)]
            cause = (f"Rewards computed elsewhere failed: {', '.join(lost)}; check their servers. " if lost else
                     "Lower optimizer.lr, set optimizer.max_grad_norm, or check the rewards for NaN.")
            raise TrainingDiverged(
                f"{self.consecutive_bad} consecutive steps produced NaN or Inf (last at step {step}); stopped. "
                f"Each was skipped; the last good checkpoint is {latest_checkpoint(self.run_dir / 'checkpoints')}. " + cause
            )

    def _draw_batch(self, batch_size: int, group: int = 1):
        """batch_size samples: batch_size / group prompts, each `group` times in a row, and a noise per sample."""
        n, n_prompts = len(self.prompts), batch_size // group
        if n_prompts <= n:
            idx = torch.randperm(n, generator=self.data_rng)[:n_prompts]
        else:
            idx = torch.randint(n, (n_prompts,), generator=self.data_rng)
        idx = idx.repeat_interleave(group) if group > 1 else idx
        noise = torch.randn((batch_size, *self.generator.noise_shape()), generator=self.data_rng)
        return [self.prompts[i] for i in idx.tolist()], idx, noise


# ----------------------------------------------------------------------------------
def _spec(label: str, plugin) -> PluginSpec:
    """A built plugin as the spec that recipe checks take."""
    return PluginSpec(label, type(plugin), plugin.options)


def _labelled(items, what: str) -> dict:
    """Plugins by label: a dict as given, or a list labelled by plugin name (name_2, ... on repeats);
    a loaded Recipe's specs keep their table's label."""
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        if isinstance(item, PluginSpec):
            out[item.label] = item
            continue
        label, k = item.name, 2
        while label in out:
            label, k = f"{item.name}_{k}", k + 1
        out[label] = item
    return out


def _built(plugins: dict, training_rewards) -> dict:
    """Plugins by label, a loaded Recipe's specs built (Evaluation.rewards holds either). A spec equal to a
    training reward (same class, same options but the weight, which evaluation does not use) reuses that
    reward: one copy of each model in memory."""
    def scoring(options) -> dict:
        return options.model_dump(exclude={"weight"})

    out = {}
    for label, p in plugins.items():
        if isinstance(p, PluginSpec):
            same = [r for r in training_rewards if type(r) is p.cls and scoring(r.options) == scoring(p.options)]
            p = same[0] if same else p.build()
        out[label] = p
    return out


def _section(model, value, where: str):
    """A recipe section from Python, validated exactly as TOML's is (strict types, unknown keys refused)."""
    if isinstance(value, model):
        return value
    try:
        return validate_strict(model, dict(value or {}))
    except ValidationError as exc:
        raise RecipeError(f"Optimizer({where}=...)", describe_errors(exc, model, where)) from None


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    mixed precision; a notebook or script that fits a bf16 run after an fp32 one is entitled to it. Only the
    precision state is dropped: the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _torch_optimizer(cfg: OptimizerSection, params):
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _lr_schedule(cfg: OptimizerSection, optim, total_steps: int):
    from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

    warmup = min(cfg.warmup_steps, total_steps)
    main = (
        CosineAnnealingLR(optim, T_max=max(1, total_steps - warmup))
        if cfg.schedule == "cosine"
        else ConstantLR(optim, factor=1.0, total_iters=0)
    )
    if not warmup:
        return main
    return SequentialLR(optim, [LinearLR(optim, start_factor=1.0 / (warmup + 1), total_iters=warmup), main], milestones=[warmup])


def _fast_forward(schedule, steps: int) -> None:
    import warnings

    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            schedule.step()


def _trackers(names: list[str], run_dir: Path, recipe: dict) -> list:
    """accelerate trackers: TensorBoard under RUN_DIR/tensorboard, wandb named after the run."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", run_dir))
        elif name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise UserError("run.trackers includes 'wandb', but wandb is not installed: pip install 'rewardkit[wandb]'") from None
            trackers.append(WandBTracker("rewardkit", name=run_dir.name, dir=str(run_dir), config=recipe))
    return trackers


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
