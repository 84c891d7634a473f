"""The optimizer: search for high-reward images under regularization.

One step, read top to bottom in `fit`:
  1. draw prompts and noise; let regularizers adjust the sampling options;
  2. generate with gradient: images x;
  3. for each reward i: r_i(x) and g_i = d r_i / d x;
  4. let regularizers transform the g_i (e.g. per-sample normalization),
     combine g = sum_i w_i g_i, surrogate loss = -<stopgrad(g), x> / B;
  5. add regularizer penalties, backward, optimizer step (through accelerate);
  6. log; at intervals write sample grids and atomic checkpoints.

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

from rewardkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic
from rewardkit.errors import RecipeError, TrainingDiverged, UserError
from rewardkit.metrics import MetricsLog, read_metrics
from rewardkit.options import describe_errors
from rewardkit.recipe import OptimizerSection, Recipe, RunSection, load_recipe
from rewardkit.sampling import fixed_noise, generate, save_grid

log = logging.getLogger("rewardkit")

SAMPLE_SEED_OFFSET = 1_000_003  # grid noise is drawn from seed + this, apart from training noise


@dataclass
class Evaluation:
    """Held-out evaluation during training, logged as eval/LABEL next to the training rewards.

    Its prompts and rewards are separate from training (rewards may be
    non-differentiable), so reward hacking - training reward up, held-out
    metrics down - shows in the curves.
    """

    prompts: Sequence[str]
    rewards: Mapping | Sequence
    every: int = 0
    """Every N steps (0: before the first and after the last step only)."""
    n_per_prompt: int = 1
    seed: int = 0


@dataclass
class FitResult:
    run_dir: Path
    step: int
    metrics: dict
    """The last step's metrics (as in metrics.jsonl)."""
    checkpoint: Path | None
    report: str = ""
    """What the generator reported after training (Generator.after_fit), if anything."""


class Optimizer:
    """Maximize weighted rewards of a generator's images under regularization.

    Optimizer(generator=Pixels(height=32, width=32),
              rewards={"red": Color(target=(1, 0, 0))},
              regularizers=[NormalizeGradients()],
              prompts=["a red square"],
              run={"steps": 100, "dir": "runs/demo"},
              optimizer={"lr": 0.05}).fit()
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
    ):
        self.generator = generator
        self.rewards = _labelled(rewards, "rewards")
        self.regularizers = _labelled(regularizers, "regularizers")
        self.prompts = list(prompts)
        if not self.prompts:
            raise UserError("prompts: at least one training prompt is needed")
        self.sample_prompts = list(sample_prompts or self.prompts[:4])
        self.run = _section(RunSection, run, "run")
        self.optim = _section(OptimizerSection, optimizer, "optimizer")
        self.run_dir = Path(self.run.dir or "runs/rewardkit")
        self.evaluation = evaluation
        self.eval_rewards = _labelled(evaluation.rewards, "eval.rewards") if evaluation else {}
        if not self.rewards:
            raise UserError("rewards: at least one reward is needed")
        for label, reward in self.rewards.items():
            if not reward.differentiable:
                raise UserError(
                    f"rewards.{label}: '{reward.name}' is not differentiable, so it cannot be trained on; "
                    "use it for evaluation only, or pick a differentiable reward"
                )

    @classmethod
    def from_recipe(cls, recipe: Recipe | str | Path | Mapping | None = None, overrides: Sequence[str] = (), registry=None) -> "Optimizer":
        """Build from a recipe: a path, an embedded recipe name, a dict, or a loaded Recipe."""
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, overrides, registry)
        return cls(
            generator=recipe.generator.build(),
            rewards={s.label: s.build() for s in recipe.rewards},
            regularizers={s.label: s.build() for s in recipe.regularizers},
            prompts=recipe.prompts,
            sample_prompts=recipe.sample_prompts,
            run=recipe.run,
            optimizer=recipe.optimizer,
            evaluation=_evaluation(recipe.evaluation),
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
        }

    def _eval_table(self) -> dict:
        ev = self.evaluation
        return {
            "every": ev.every, "prompts": list(ev.prompts), "n_per_prompt": ev.n_per_prompt, "seed": ev.seed,
            "rewards": {label: r.recipe_table() for label, r in self.eval_rewards.items()},
        }

    # ------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> FitResult:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        run, run_dir = self.run, self.run_dir
        check_run_dir(run_dir, resume)
        accelerator = Accelerator(mixed_precision=run.mixed_precision, log_with=_trackers(run.trackers, run_dir, self.recipe()) or None)
        accelerator.wait_for_everyone()  # every process has checked the run directory before rank 0 writes to it
        main = accelerator.is_main_process
        world = accelerator.num_processes
        if run.batch_size % world:
            raise UserError(f"run.batch_size = {run.batch_size} does not divide evenly over {world} processes")
        torch.manual_seed(run.seed)

        # Model, rewards and regularizers, in the order the reference weights need:
        # theta_0 is taken from the freshly set-up generator, before any checkpoint loads.
        gen = self.generator
        gen.setup(self.prompts, run.seed)
        gen.to(accelerator.device)
        for reg in self.regularizers.values():
            reg.setup(gen)
        for reward in [*self.rewards.values(), *self.eval_rewards.values()]:
            reward.requires_grad_(False).eval().to(accelerator.device)
        params = gen.trainable_parameters()
        if not params:
            raise UserError(f"generator '{gen.name}' has no trainable parameters")
        optim = _torch_optimizer(self.optim, params)
        schedule = _lr_schedule(self.optim, optim, run.steps)
        data_rng = torch.Generator().manual_seed(run.seed)

        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(run_dir / "metrics.jsonl")
        start_step, nonfinite_total = 0, 0
        checkpoint = latest_checkpoint(run_dir / "checkpoints") if resume else None
        if checkpoint is not None:  # weights now (FSDP shards what it is given); optimizer state once prepared
            gen_state, optim_state, rng_state, state = load_checkpoint(checkpoint)
            gen.load_trainable_state_dict(gen_state)
            data_rng.set_state(rng_state["data"])
            torch.set_rng_state(rng_state["torch"])
            start_step, nonfinite_total = state["step"], state["nonfinite_total"]
            log.info("resuming from %s", checkpoint)
        elif resume:
            log.info("nothing to resume in %s: starting from step 0", run_dir)
        if main:  # without a checkpoint nothing is kept, not even a step-0 evaluation line
            metrics.truncate_after(start_step if checkpoint is not None else -1)
            _write_recipe(run_dir, self.recipe(), resumed=checkpoint is not None)
        model, optim = accelerator.prepare(gen, optim)
        # FSDP replaces each parameter by its shard and only then can take optimizer state; its forward is a
        # collective, so every process takes part in drawing grids and evaluations (rank 0 still writes alone).
        sharded = accelerator.distributed_type == DistributedType.FSDP
        draws = main or sharded
        params = [p for p in model.parameters() if p.requires_grad]
        if checkpoint is not None:
            _load_optimizer_state(gen, optim.optimizer, optim_state["optimizer"])
            if state.get("total_steps", run.steps) == run.steps:
                schedule.load_state_dict(optim_state["schedule"])
            else:  # run.steps changed (extending a run): the new schedule, advanced to this step
                for group in optim.param_groups:
                    group["lr"] = group["initial_lr"] = self.optim.lr
                schedule = _lr_schedule(self.optim, optim.optimizer, run.steps)
                _fast_forward(schedule, state["step"])
        if run.trackers:
            accelerator.init_trackers("rewardkit")

        sample_noise = fixed_noise(gen, len(self.sample_prompts), run.seed + SAMPLE_SEED_OFFSET)
        if start_step == 0 and draws:
            self._grid(gen, sample_noise, run_dir / "samples" / "step_000000.png", main)
            if self.evaluation:
                evaluated = self._evaluate(gen)
                if main:
                    metrics.write({"step": 0, **evaluated})

        from tqdm.auto import tqdm

        progress = tqdm(total=run.steps, initial=start_step, disable=not (run.progress and main), desc="rewardkit", dynamic_ncols=True)
        record: dict = {}
        consecutive_bad = 0
        for step in range(start_step + 1, run.steps + 1):
            t0 = time.perf_counter()

            # 1. prompts and noise: every process draws the global batch, then takes its shard
            prompts, index, noise = self._draw_batch(data_rng, gen, run.batch_size)
            options = gen.sample_options().replace(prompt_index=index)
            for reg in self.regularizers.values():
                options = reg.adjust_sampling(options, len(prompts), data_rng)
            shard = slice(accelerator.process_index * run.batch_size // world, (accelerator.process_index + 1) * run.batch_size // world)
            prompts, noise = prompts[shard], noise[shard].to(accelerator.device)
            options = _shard_options(options, shard)

            # 2. generate with gradient
            t_gen = time.perf_counter()
            with accelerator.autocast():
                images = model(prompts, noise, options).float()
            t1 = time.perf_counter()

            # 3. each reward's score and image gradient, on a detached copy of x
            x = images.detach().requires_grad_(True)
            scores, grads = {}, {}
            for label, reward in self.rewards.items():
                with accelerator.autocast():
                    s = reward(x, prompts).float()
                (grads[label],) = torch.autograd.grad(s.sum(), x)
                scores[label] = s.detach()
            raw_norms = {label: accelerator.reduce(g.flatten(1).norm(dim=1).mean(), "mean").item() for label, g in grads.items()}
            t2 = time.perf_counter()

            # 4. transform, combine, surrogate loss
            for reg in self.regularizers.values():
                grads = reg.transform_gradients(grads)
            g = sum(self.rewards[label].weight * grads[label] for label in self.rewards)
            loss = -(g.detach() * images).sum() / len(prompts)

            # 5. penalties, backward, step (a non-finite step is skipped, not applied)
            penalties = {}
            for label, reg in self.regularizers.items():
                p = reg.penalty(gen)
                if p is not None:
                    penalties[label] = p
                    loss = loss + p
            # Every process must take the same branch, or DDP's collectives mismatch.
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(s).all()) for s in scores.values())
            finite = bool(accelerator.gather(torch.tensor([finite], device=accelerator.device)).all())
            param_grad_norm, backward_time, applied = math.nan, 0.0, False
            if finite:
                t3 = time.perf_counter()
                accelerator.backward(loss)
                backward_time = time.perf_counter() - t3
                param_grad_norm = float(accelerator.clip_grad_norm_(params, self.optim.max_grad_norm or math.inf))
                if accelerator.scaler is not None:
                    # fp16: the grad scaler skips an overflowing step and lowers its scale itself;
                    # that is routine, not divergence, so it does not count towards the NaN guard.
                    optim.step()
                    applied = not optim.step_was_skipped
                else:
                    finite = math.isfinite(param_grad_norm)  # the same on every process (all-reduced)
                    if finite:
                        optim.step()
                        applied = True
            if applied:
                schedule.step()
            if finite:
                consecutive_bad = 0
            else:
                consecutive_bad += 1
                nonfinite_total += 1
            optim.zero_grad(set_to_none=True)
            t4 = time.perf_counter()

            # 6. log, sample, checkpoint
            mean_scores = {label: accelerator.reduce(s.mean(), "mean").item() for label, s in scores.items()}
            record = {
                "step": step,
                "reward/total": sum(self.rewards[label].weight * v for label, v in mean_scores.items()),
                **{f"reward/{label}": v for label, v in mean_scores.items()},
                **{f"grad_norm/{label}": v for label, v in raw_norms.items()},
                **{f"penalty/{label}": p.item() for label, p in penalties.items()},
                "loss": accelerator.reduce(loss.detach(), "mean").item(),
                "param_grad_norm": param_grad_norm,
                "lr": schedule.get_last_lr()[0],
                "skipped": not applied,
                "nonfinite_total": nonfinite_total,
                "time/step": t4 - t0,
                "time/generate": t1 - t_gen,
                "time/rewards": t2 - t1,
                "time/backward": backward_time,
                "memory/peak_mb": _peak_memory_mb(accelerator.device),
            }
            last = step == run.steps
            if draws and self.evaluation and (last or (self.evaluation.every and step % self.evaluation.every == 0)):
                record.update(self._evaluate(gen))
            if main:
                metrics.write(record)
                if run.trackers:
                    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
                progress.update(1)
                progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in record.items() if k.startswith("reward/")}, refresh=False)
            if consecutive_bad >= run.max_nonfinite_steps:
                metrics.close()
                raise TrainingDiverged(
                    f"{consecutive_bad} consecutive steps produced NaN or Inf (last at step {step}); stopped. "
                    f"Each was skipped; the last good checkpoint is {latest_checkpoint(run_dir / 'checkpoints')}. "
                    "Lower optimizer.lr, set optimizer.max_grad_norm, or check the rewards for NaN."
                )
            if draws and (last or (run.sample_every and step % run.sample_every == 0)):
                self._grid(gen, sample_noise, run_dir / "samples" / f"step_{step:06d}.png", main)
            if last or (run.checkpoint_every and step % run.checkpoint_every == 0):
                accelerator.wait_for_everyone()
                # whole tensors and FQN-keyed optimizer state, gathered from the shards under FSDP (then every
                # process takes part): a checkpoint resumes under any process count and configuration
                if main or sharded:
                    weights, optimizer_state = gen.trainable_state_dict(), _optimizer_state(gen, optim.optimizer)
                if main:
                    save_checkpoint(
                        run_dir / "checkpoints",
                        step,
                        weights,
                        {"optimizer": optimizer_state, "schedule": schedule.state_dict()},
                        {"data": data_rng.get_state(), "torch": torch.get_rng_state()},
                        {"nonfinite_total": nonfinite_total, "total_steps": run.steps},
                        keep=run.keep_checkpoints,
                    )
        progress.close()
        metrics.close()
        accelerator.wait_for_everyone()
        if run.trackers:
            accelerator.end_training()

        if not record:  # resumed a finished run: report what it ended with
            history = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
            record = history[-1] if history else {}
        final = latest_checkpoint(run_dir / "checkpoints")
        report = ""
        if main:
            summary = {"step": record.get("step", start_step), "final_metrics": record, "checkpoint": str(final) if final else None}
            _write_json(run_dir / "summary.json", summary)
            if sharded:  # after_fit runs on rank 0 alone, which a sharded generator cannot do
                log.info("no end-of-run report under sharded training; the checkpoint holds the whole generator")
            else:
                report = gen.after_fit(run_dir)
        return FitResult(run_dir, record.get("step", start_step), record, final, report)

    def _grid(self, gen, noise, path: Path, write: bool) -> None:
        images = generate(gen, self.sample_prompts, noise)
        if write:
            save_grid(images, path)

    def _evaluate(self, gen) -> dict:
        """Held-out rewards of the current generator, on fixed prompts and noise."""
        from rewardkit.evaluation import score_rewards

        ev = self.evaluation
        prompts = [p for p in ev.prompts for _ in range(ev.n_per_prompt)]
        images = generate(gen, prompts, fixed_noise(gen, len(prompts), ev.seed))
        scores = score_rewards(self.eval_rewards, images, prompts, batch_size=self.run.batch_size)
        return {f"eval/{label}": s.mean().item() for label, s in scores.items()}

    def _draw_batch(self, rng: torch.Generator, gen, batch_size: int):
        n = len(self.prompts)
        if batch_size <= n:
            idx = torch.randperm(n, generator=rng)[:batch_size]
        else:
            idx = torch.randint(n, (batch_size,), generator=rng)
        noise = torch.randn((batch_size, *gen.noise_shape()), generator=rng)
        return [self.prompts[i] for i in idx.tolist()], idx, noise


# ----------------------------------------------------------------------------------
def _labelled(items, what: str) -> dict:
    """Plugins by label: a dict as given, or a list labelled by plugin name (name_2, ... on repeats)."""
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        label, k = item.name, 2
        while label in out:
            label, k = f"{item.name}_{k}", k + 1
        out[label] = item
    return out


def _evaluation(spec) -> Evaluation | None:
    if spec is None:
        return None
    return Evaluation(spec.prompts, {s.label: s.build() for s in spec.rewards}, spec.every, spec.n_per_prompt, spec.seed)


def _section(model, value, where: str):
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(dict(value or {}))
    except ValidationError as exc:
        raise RecipeError(f"Optimizer({where}=...)", describe_errors(exc, model, where)) from None


def _shard_options(options, shard: slice):
    """Slice per-sample tensors of the sampling options to this process's shard."""
    changes = {k: v[shard] for k, v in vars(options).items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return options.replace(**changes) if changes else options


def _optimizer_state(gen, optim) -> dict:
    """The optimizer's whole state keyed by parameter name (gathered from shards under FSDP; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(gen, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(gen, optim, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(i, int) for group in saved["param_groups"] for i in group["params"]):
        optim.load_state_dict(saved)  # a checkpoint from before name-keyed optimizer state (single process or DDP)
        return
    set_optimizer_state_dict(gen, optim, saved, options=StateDictOptions(full_state_dict=True))


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


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run never reuses a directory that holds one (UserError); --resume continues it."""
    if resume:
        return
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose a new directory with run.dir=..."
        )


def _write_recipe(run_dir: Path, recipe: dict, resumed: bool) -> None:
    import tomli_w

    path = run_dir / "recipe.toml"
    text = tomli_w.dumps(_drop_empty(recipe))
    if resumed and path.exists() and path.read_text() != text:
        import tomllib

        before = _flatten(tomllib.loads(path.read_text()))
        after = _flatten(tomllib.loads(text))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        log.warning("resuming with a recipe that differs from the saved one in: %s", ", ".join(changed))
    write_text_atomic(path, text)


def _drop_empty(d: dict) -> dict:
    return {k: v for k, v in d.items() if not (isinstance(v, dict) and not v)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
