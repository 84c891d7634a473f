"""Recipes: TOML descriptions of a run, validated into typed objects.

A recipe names plugins by their registered name and sets their options;
it never imports or executes code. Layout::

    [run]            steps, batch size, seed, where to write, how often to sample/checkpoint
    [prompts]        training prompts (inline or a file) and the fixed grid prompts
    [generator]      type = "<generator plugin>", then its options
    [optimizer]      torch optimizer and learning-rate schedule
    [rewards.LABEL]  one table per reward; type defaults to LABEL; `weight`, `estimator` and its options
    [regularizers.LABEL]  likewise, applied in the order written
    [policy_gradient]     GRPO's settings, for rewards with estimator = "score_function"

Every problem found is reported at once, each naming the file and the
dotted key, with a close match for misspelled keys and plugin names.
"""

from __future__ import annotations

import copy
import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from rewardkit.errors import RecipeError, UserError, did_you_mean
from rewardkit.options import describe_errors, validate_strict

DEFAULT_RECIPE = "quickstart"
"""The embedded recipe `rewardkit run` uses when given none."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # TOML has inf and nan; no setting means anything there


Seed = Annotated[int, Field(ge=0, lt=2**62)]  # torch's generators take below 2**64; rewardkit adds offsets to seeds


class RunSection(_Section):
    dir: str | None = None
    """Run directory. Default: runs/<recipe file name>."""
    seed: Seed = 0
    steps: PositiveInt
    batch_size: PositiveInt = 4
    """Prompts per micro-batch, over all processes together (each process takes batch_size / processes)."""
    gradient_accumulation_steps: PositiveInt = 1
    """Micro-batches per optimizer step: each update sees batch_size x gradient_accumulation_steps prompts
    (= per-process batch x processes x accumulation), the same draws as one batch of that size."""
    sample_every: NonNegativeInt = 0
    """Write a sample grid every N steps (0: only before the first and after the last step)."""
    checkpoint_every: NonNegativeInt = 0
    """Checkpoint every N steps (0: only after the last step)."""
    keep_checkpoints: PositiveInt = 2
    max_nonfinite_steps: PositiveInt = 5
    """Stop after this many consecutive steps with NaN/Inf (each is skipped)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    accelerate_config: str = "ddp"
    """Multi-process runs (--num-processes N): a shipped accelerate configuration by name, or a path to your own YAML."""

    @field_validator("accelerate_config")
    @classmethod
    def _known_config(cls, value: str) -> str:
        from rewardkit.distributed import shipped_configs

        if not value.endswith((".yaml", ".yml", ".json")) and value not in shipped_configs():
            shipped = sorted(shipped_configs())
            raise ValueError(f"no shipped accelerate config named '{value}'{did_you_mean(value, shipped)}; shipped: {', '.join(shipped)}, or a path to your own .yaml")
        return value
    progress: bool = True


class PromptsSection(_Section):
    train: list[str] = Field(default_factory=list)
    file: str | None = None
    """A prompt file relative to the recipe file: .txt (one per line), .json or .csv (see rewardkit/prompts.py)."""
    sample: list[str] | None = None
    """Prompts of the sample grids (default: the first 4 training prompts)."""


class OptimizerSection(_Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    max_grad_norm: PositiveFloat | None = None
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the trainable weights with this decay (e.g. 0.999; warm-up
    min(decay, (1 + t) / (10 + t))), saved in checkpoints and used by `sample / export / eval --ema`."""
    ema_device: Literal["accelerator", "cpu"] = "accelerator"
    """Where the average lives: next to the weights, or in CPU memory (saves accelerator memory, costs a copy per step)."""


class PolicyGradientSection(_Section):
    """[policy_gradient]: how rewards with estimator = 'score_function' train (GRPO; rewardkit.policy_gradient)."""

    group_size: int = Field(default=4, ge=2)
    """G: samples of each prompt in a batch; advantages are taken within each prompt's group (a group of one has
    nothing to be compared with)."""
    standardize: Literal["group", "global"] = "group"
    """The advantage's scale: the group's reward standard deviation ('group'), or the whole batch's ('global');
    the group's mean is subtracted either way."""
    advantage_clip: PositiveFloat = 5.0
    """Advantages are clipped to +- this."""
    updates_per_batch: PositiveInt = 1
    """Optimizer updates on each batch of samples: the first at an importance ratio of 1, later ones clipped."""
    clip_range: PositiveFloat = 1e-4
    """epsilon of the clipped per-element importance ratio (Flow-GRPO's 1e-4)."""
    steps: list[NonNegativeInt] | None = None
    """The sampler's updates (0 .. K-2) trained by the policy gradient, a subset (fewer training timesteps than
    sampling steps); None: every update. With `window`, the consecutive updates the window moves in."""
    window: PositiveInt | None = None
    """Train `window` consecutive updates per batch, at a start drawn at random inside `steps`, the sampler
    stochastic only there (Flow-GRPO-Fast's SDE window, deterministic steps elsewhere); None: train all of `steps`."""

    @field_validator("steps")
    @classmethod
    def _distinct(cls, v):
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("steps must list distinct updates (0 .. K-2), at least one")
        return v

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window is not None and self.steps is not None:
            if self.steps != list(range(self.steps[0], self.steps[0] + len(self.steps))):
                raise ValueError(f"steps {self.steps}: a window moves inside consecutive, increasing updates (e.g. [0, 1, 2, 3])")
            if self.window > len(self.steps):
                raise ValueError(f"window = {self.window} is wider than steps {self.steps}")
        return self


class _PluginTable(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str | None = None


class EvalSettings(_Section):
    """The scalar settings of held-out evaluation, validated alike from TOML and from Python."""

    every: NonNegativeInt = 0
    """Evaluate every N steps (0: before the first and after the last step only)."""
    n_per_prompt: PositiveInt = 1
    seed: Seed = 0


class EvalSection(EvalSettings):
    """[eval]: held-out evaluation during training, with its own rewards (which may be non-differentiable)."""

    prompts: list[str] = Field(default_factory=list)
    file: str | None = None
    """A prompt file relative to the recipe file (.txt, .json or .csv)."""
    rewards: dict[str, _PluginTable] = Field(min_length=1)


class _RecipeModel(_Section):
    run: RunSection
    prompts: PromptsSection
    generator: _PluginTable
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    rewards: dict[str, _PluginTable] = Field(min_length=1)
    regularizers: dict[str, _PluginTable] = Field(default_factory=dict)
    eval: EvalSection | None = None
    policy_gradient: PolicyGradientSection = Field(default_factory=PolicyGradientSection)

    @model_validator(mode="after")
    def _generator_has_type(self):
        if not self.generator.type:
            raise ValueError("[generator] needs `type`, the name of a generator plugin")
        return self


@dataclass
class PluginSpec:
    """One plugin of a recipe: its class and validated options."""

    label: str
    cls: type
    options: Any

    def build(self):
        return self.cls(**self.options.model_dump())


@dataclass
class Recipe:
    """A validated recipe: typed sections and resolved plugin specs."""

    source: str
    run: RunSection
    prompts: list[str]
    sample_prompts: list[str]
    optimizer: OptimizerSection
    generator: PluginSpec
    rewards: list[PluginSpec]
    regularizers: list[PluginSpec] = field(default_factory=list)
    evaluation: "Evaluation | None" = None
    policy_gradient: PolicyGradientSection = field(default_factory=PolicyGradientSection)


@dataclass
class Evaluation:
    """Held-out evaluation during training, logged as eval/LABEL next to the training rewards.

    The one type of the recipe's [eval] section and of `Optimizer(evaluation=...)`.
    Its prompts and rewards are separate from training (rewards may be
    non-differentiable), so reward hacking - training reward up, held-out
    metrics down - shows in the curves.
    """

    prompts: Sequence[str]
    rewards: Mapping | Sequence
    """Reward plugins: a dict by label, or a list (labelled by name); in a loaded Recipe, their
    PluginSpecs, which the Optimizer builds."""
    every: int = 0
    """Every N steps (0: before the first and after the last step only)."""
    n_per_prompt: int = 1
    seed: int = 0

    def __post_init__(self):
        where = "Optimizer(evaluation=...)"
        try:
            validate_strict(EvalSettings, {"every": self.every, "n_per_prompt": self.n_per_prompt, "seed": self.seed})
        except ValidationError as exc:
            raise RecipeError(where, describe_errors(exc, EvalSettings, "eval")) from None
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise RecipeError(where, ["eval.prompts: expected a non-empty list of prompt strings"])
        if not self.rewards:
            raise RecipeError(where, ["eval.rewards: at least one reward is needed"])
        self.prompts = list(self.prompts)


def embedded_recipes() -> dict[str, Path]:
    """Recipes shipped inside the package, by name (file name without .toml)."""
    root = importlib.resources.files("rewardkit.recipes")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def read_recipe_file(path: str | Path | None) -> tuple[dict, str, Path | None]:
    """Parse a recipe file (or an embedded recipe's name): (data, source label, folder)."""
    if path is None:
        path = DEFAULT_RECIPE
    p = Path(path)
    if not p.exists():
        embedded = embedded_recipes()
        if str(path) in embedded:
            p = embedded[str(path)]
        else:
            raise UserError(
                f"recipe {path}: no such file, and no embedded recipe of that name{did_you_mean(str(path), embedded)}; "
                f"embedded recipes: {', '.join(sorted(embedded))}"
            )
    from rewardkit.prompts import read_text

    data = parse_toml(read_text(p, what="recipe"), str(path))
    return data, str(path), p.parent


def parse_toml(text: str, source: str) -> dict:
    """tomllib.loads, with whatever the parser raises on its input reported as an invalid recipe: not only
    TOMLDecodeError (deep nesting exhausts its recursion, for one)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        raise RecipeError(source, ["not valid TOML: arrays or tables nested too deeply"]) from None
    except Exception as exc:  # noqa: BLE001 - the parser is the standard library's: a failure is its input's
        raise RecipeError(source, [f"not valid TOML: {type(exc).__name__}: {exc}"]) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value), the value read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. run.steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except Exception:  # noqa: BLE001 - not a TOML value (anything the parser raises, deep nesting included): a string
        value = raw
    return [k.strip() for k in key.split(".")], value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError("override", [f"{'.'.join(keys[: i + 1])}: is a value, not a table; cannot set {text!r}"])
        node[keys[-1]] = value
    return data


def load_recipe(source: str | Path | Mapping | None = None, overrides: Sequence[str] = (), *, registry) -> Recipe:
    """Read, override and validate a recipe (a path, an embedded name, or a dict) against the plugins of
    `registry` (rewardkit.plugins.load_registry()).

    Each plugin's options are validated on their own, then against the rest of the
    recipe (`check_plugins`), so `rewardkit validate` catches what would otherwise
    fail only after the models load.
    """
    if isinstance(source, Mapping):
        data, label, folder = dict(source), "<dict>", Path.cwd()
    else:
        data, label, folder = read_recipe_file(source)
    data = apply_overrides(data, overrides)
    try:
        model = validate_strict(_RecipeModel, data)
    except ValidationError as exc:
        raise RecipeError(label, _section_errors(describe_errors(exc, _RecipeModel))) from None

    problems: list[str] = []
    generator = _plugin_spec(registry, "generator", "generator", "generator", model.generator, problems)
    rewards = [_plugin_spec(registry, "reward", f"rewards.{k}", k, t, problems) for k, t in model.rewards.items()]
    regularizers = [_plugin_spec(registry, "regularizer", f"regularizers.{k}", k, t, problems) for k, t in model.regularizers.items()]
    prompts = _read_prompts(model.prompts, folder, problems)
    evaluation = None
    if model.eval is not None:
        ev = model.eval
        eval_rewards = [_plugin_spec(registry, "reward", f"eval.rewards.{k}", k, t, problems) for k, t in ev.rewards.items()]
        eval_prompts = _read_prompts(ev, folder, problems, where="eval")
    if not problems:
        checked = [(f"rewards.{s.label}", s) for s in rewards] + [(f"regularizers.{s.label}", s) for s in regularizers]
        if model.eval is not None:
            checked += [(f"eval.rewards.{s.label}", s) for s in eval_rewards]
            evaluation = Evaluation(eval_prompts, eval_rewards, ev.every, ev.n_per_prompt, ev.seed)
        problems = check_plugins(generator, checked) + check_estimators(generator, rewards, model.policy_gradient, model.run, regularizers)
        if "policy_gradient" in data and not any(s.options.estimator == "score_function" for s in rewards):
            problems.append("policy_gradient: set, but no reward trains with it: give one rewards.LABEL.estimator = "
                            "'score_function', or remove the table")
    if problems:
        raise RecipeError(label, problems)

    run = model.run
    if run.dir is None:
        stem = Path(label).stem if label != "<dict>" else "rewardkit"
        run = run.model_copy(update={"dir": f"runs/{stem}"})
    sample = model.prompts.sample if model.prompts.sample else prompts[:4]
    return Recipe(label, run, prompts, sample, model.optimizer, generator, rewards, regularizers, evaluation, model.policy_gradient)


def check_estimators(generator: PluginSpec, rewards: Sequence[PluginSpec], section: PolicyGradientSection | None, run: RunSection,
                     regularizers: Sequence[PluginSpec] = (), differentiable: Mapping[str, bool] | None = None) -> list[str]:
    """Each training reward's estimator against what it can do and what the generator gives (lines naming the key):
    a non-differentiable reward cannot train pathwise; score-function rewards need a stochastic sampler (at least
    one update between two steps, eta above 0), trained weights, and batches of whole groups. `section` None: the
    recipe has no [policy_gradient] table (the defaults apply); `differentiable`: by label, where built rewards say."""
    differentiable = differentiable or {}
    out = [
        f"rewards.{s.label}: '{s.cls.name}' is not differentiable, so it cannot be trained on pathwise; set "
        f"rewards.{s.label}.estimator = 'score_function' (a policy gradient), or use it for evaluation only"
        for s in rewards if not differentiable.get(s.label, s.cls.differentiable) and s.options.estimator == "pathwise"
    ]
    labels = [s.label for s in rewards if s.options.estimator == "score_function"]
    if not labels:
        return out + [f"regularizers.{r.label}: '{r.cls.name}' constrains the policy gradient's updates, and no reward trains "
                      "with one: give a reward estimator = 'score_function', or remove the regularizer"
                      for r in regularizers if getattr(r.cls, "uses_reference_kl", False)]
    section = section or PolicyGradientSection()
    gen, where = generator.cls, f"rewards.{labels[0]}.estimator = 'score_function'"
    if not getattr(gen, "supports_score_function", False):
        return out + [f"{where}: generator '{gen.name}' has no stochastic sampler whose transition log-probabilities it "
                      "can give; use a diffusion generator (sd, sdxl, sd3, flux, zimage, testbed)"]
    steps = gen.planned_steps(generator.options)
    if steps is not None and steps < 2:
        out.append(f"{where} needs at least 2 sampler steps (a stochastic update between them); generator.num_steps = {steps}")
    if gen.planned_noise_optimization(generator.options):
        out.append(f"{where} trains the weights through the sampler's transitions; with generator.training = 'noise' "
                   "nothing it reaches is trained: use 'lora' or 'full'")
    total = run.batch_size * run.gradient_accumulation_steps
    if total % section.group_size:
        out.append(f"policy_gradient.group_size = {section.group_size} does not divide the update's {total} samples "
                   "(run.batch_size x run.gradient_accumulation_steps); make the batch a multiple of it")
    random_eta = [r for r in regularizers if r.cls.name == "random_eta"]
    if getattr(generator.options, "eta", None) == 0 and not (random_eta and random_eta[0].options.high > 0):
        out.append(f"{where} samples with the policy's noise, so the sampler's eta must be above 0 at every update: set "
                   "generator.eta > 0 (e.g. 0.7), or add [regularizers.random_eta] with high > 0")
    if steps is not None and section.steps is not None and [k for k in section.steps if k > steps - 2]:
        out.append(f"policy_gradient.steps {[k for k in section.steps if k > steps - 2]}: the updates of a {steps}-step "
                   f"sampler are 0 .. {steps - 2}")
    if steps is not None and section.window is not None and section.steps is None and section.window > steps - 1:
        out.append(f"policy_gradient.window = {section.window} is wider than the {steps - 1} updates of a {steps}-step sampler")
    return out


def check_plugins(generator: PluginSpec, plugins: Sequence[tuple[str, PluginSpec]]) -> list[str]:
    """Each plugin's own check against the recipe's generator (Configurable.check), as lines naming the key.

    Run on the specs, before anything is built: by load_recipe and, for plugins
    built in Python, by the Optimizer, so both refuse the same recipes.
    """
    problems = generator.cls.check(generator.options, generator, "generator")
    for where, spec in plugins:
        problems += spec.cls.check(spec.options, generator, where)
    return problems


def _section_errors(problems: list[str]) -> list[str]:
    out = []
    for p in problems:
        key, _, rest = p.partition(": ")
        if "." not in key and rest.startswith("unknown key"):
            p = f"[{key}]: unknown section{rest[len('unknown key'):]}"
        elif "." not in key and rest.startswith("required key is missing"):
            p = f"[{key}]: required section is missing"
        out.append(p)
    return out


def _plugin_spec(registry, kind: str, where: str, label: str, table: _PluginTable, problems: list[str]) -> PluginSpec | None:
    name = table.type or label
    options = dict(table.model_extra or {})
    if name not in registry.plugins[kind]:
        known = ", ".join(registry.names(kind)) or "none"
        failed = [f for f in registry.failures if f.plugin == name]
        why = f" (plugin '{name}' from {failed[0].package} failed to load: {failed[0].error})" if failed else ""
        problems.append(f"{where}.type: no {kind} plugin named '{name}'{why}{did_you_mean(name, registry.names(kind))}; registered: {known}")
        return None
    cls = registry.plugins[kind][name].cls
    try:
        return PluginSpec(label, cls, validate_strict(cls.Options, options))
    except ValidationError as exc:
        problems.extend(describe_errors(exc, cls.Options, where))
        return None


def _read_prompts(section: PromptsSection | EvalSection, folder: Path, problems: list[str], where: str = "prompts") -> list[str]:
    from rewardkit.prompts import read_prompts

    prompts = list(section.train if isinstance(section, PromptsSection) else section.prompts)
    if section.file:
        path = Path(section.file)
        if not path.is_absolute():
            path = folder / path
        try:
            prompts += read_prompts(path)[0]
        except UserError as exc:
            problems.append(f"{where}.file: {exc}")
    if not prompts and not problems:
        listed = "prompts.train" if where == "prompts" else f"{where}.prompts"
        problems.append(f"{where}: no prompts; set {listed} = [...] or {where}.file = 'prompts.txt'")
    return prompts
