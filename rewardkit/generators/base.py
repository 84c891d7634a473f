"""The generator protocol: a model wrapped into a differentiable sampler.

A generator maps ``prompts, noise, SampleOptions -> images`` with images of
shape (B, 3, H, W), float in [0, 1], differentiable with respect to its
trainable parameters. The optimizer never looks inside: it only calls the
methods below, so literal pixel search, a LoRA on a diffusion model and a
full fine-tune are driven by the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from rewardkit.distributed import full_tensor, squared_distance
from rewardkit.errors import UserError
from rewardkit.options import Configurable


@dataclass
class Rollout:
    """What a stochastic sampling pass leaves for a score-function (policy-gradient) estimator: the state x_t entering
    each step (detached) and the log-probability (B,) of each stochastic update under the weights that sampled it.
    Filled by `forward` when passed as SampleOptions.rollout; read back through SampleOptions.score_steps."""

    trajectory: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[torch.Tensor] = field(default_factory=list)


@dataclass
class SampleOptions:
    """Knobs the optimizer and regularizers may set per call.

    A generator reads the ones it supports and ignores the rest.

    num_steps: sampler steps (None: the generator's own default).
    eta: stochasticity per sample and step: a float, a (B,) or a (B, K) tensor.
    supervise_step: None to return the final image; else the 0-based step
        whose clean-image prediction is returned (R0+), earlier steps run
        without gradient. A (B,) tensor picks one step per sample.
    grad_steps: backpropagate through the last `grad_steps` steps only
        (None: through all of them).
    deep_supervision: None, or increasing 0-based steps whose clean-image
        predictions are all returned, stacked step-major (len x B images),
        each with the gradient kept through every step before it (R0+ read
        as deep supervision); generators that do say `supports_deep_supervision`.
    deep_supervision_weights: the weight of each of those steps in the
        rewards' loss (the optimizer reads it; None: 1 each).
    prompt_index: (B,) positions of the batch's prompts in the training
        prompt list, set by the optimizer during training (None otherwise);
        generators with per-prompt parameters (optimized noise) use it.
    rollout: a Rollout that `forward` fills while sampling (generators that
        say `supports_score_function`; eta > 0 at every update).
    score_steps: with a filled `rollout`: `forward` returns, instead of
        images, the log-probabilities (B, len(score_steps)) of those updates of
        the recorded trajectory under the current weights, with gradient: what
        the score-function estimator differentiates. (Through `forward`, so
        that DDP / FSDP wrappers see the call.)
    score_reference: with score_steps: `forward` returns (log_p, kl), kl
        (B, len(score_steps)) the KL divergence per element of each update
        from the frozen theta_0's (a KL penalty to the reference model).
    """

    num_steps: int | None = None
    eta: float | torch.Tensor = 0.0
    supervise_step: int | torch.Tensor | None = None
    grad_steps: int | None = None
    prompt_index: torch.Tensor | None = None
    deep_supervision: tuple[int, ...] | None = None
    deep_supervision_weights: tuple[float, ...] | None = None
    rollout: Rollout | None = None
    score_steps: tuple[int, ...] | None = None
    score_reference: bool = False

    def replace(self, **changes) -> "SampleOptions":
        return replace(self, **changes)


class Generator(Configurable, torch.nn.Module):
    """Base class of generator plugins.

    Subclasses set `name`, declare `Options`, and implement `setup`,
    `noise_shape` and `forward`. Trainable parameters are those with
    ``requires_grad``; everything else is frozen.
    """

    supports_deep_supervision: bool = False
    """Whether `forward` honours SampleOptions.deep_supervision (R0+'s every-step reading)."""
    supports_score_function: bool = False
    """Whether `forward` honours SampleOptions.rollout and score_steps (transition log-probabilities)."""

    def __init__(self, **options):
        torch.nn.Module.__init__(self)
        self._set_options(options)
        self._reference: dict[str, torch.Tensor] | None = None
        self._reference_shards: dict[str, torch.Tensor] = {}  # theta_0 split like its FSDP-sharded parameter

    def setup(self, prompts: Sequence[str], seed: int) -> None:
        """Build or initialize the model; called once before training and
        before any checkpoint is loaded. `prompts` is the training set."""

    def prepare_prompts(self, prompts: Sequence[str]) -> None:
        """Every prompt the run will use (training, sample and evaluation), after `setup` and the move to the
        device; a generator may encode them once here (diffusion: text_encoders = 'free')."""

    def noise_shape(self) -> tuple[int, ...]:
        """Shape of one sample's input noise."""
        raise NotImplementedError

    def sample_options(self) -> SampleOptions:
        """This generator's default options, used as-is for inference."""
        return SampleOptions()

    def forward(self, prompts: Sequence[str], noise: torch.Tensor, options: SampleOptions) -> torch.Tensor:
        raise NotImplementedError

    def optimized_noise(self) -> torch.Tensor | None:
        """The trainable input noise (one row per training prompt), for generators that optimize
        their noise (ReNO-style); None for those that optimize weights."""
        return None

    # --- what a recipe's other plugins may ask before anything is built -------------
    @classmethod
    def planned_steps(cls, options) -> int | None:
        """The number of sampler steps a generator with these options runs; 0 when it has no sampler;
        None when it does not say (the checks that need it are then left to training time)."""
        return None

    @classmethod
    def planned_noise_optimization(cls, options) -> bool | None:
        """Whether a generator with these options optimizes its input noise (see `optimized_noise`);
        None when it does not say."""
        return None

    # --- what gets trained, saved and regularized -------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, whole, as saved in checkpoints.

        Under FSDP each process holds a shard: this gathers them, so every process must call it.
        """
        return {n: full_tensor(p).detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise UserError(
                f"the checkpoint does not fit generator '{self.name}' as its recipe builds it: missing {missing[:5]}, "
                f"unexpected {extra[:5]}; was it written by a run with other generator options?"
            )
        wrong = [f"{n} {tuple(t.shape)} (expected {tuple(params[n].shape)})" for n, t in state.items() if t.shape != params[n].shape]
        if wrong:
            raise UserError(
                f"the checkpoint does not fit generator '{self.name}' as its recipe builds it: {', '.join(wrong[:3])}; "
                "did the recipe change (e.g. the training prompts of a noise-optimizing run, or the LoRA rank)?"
            )
        with torch.no_grad():
            for n, tensor in state.items():
                params[n].copy_(tensor)

    def snapshot_reference(self) -> None:
        """Remember the current trainable weights as the reference theta_0.

        Generators that can express the distance without a copy (LoRA: the
        adapter delta itself) override `squared_distance_to_reference` and
        make this a no-op.
        """
        self._reference = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def squared_distance_to_reference(self) -> torch.Tensor:
        """sum ||theta - theta_0||^2 over trainable weights, differentiable."""
        if self._reference is None:
            raise RuntimeError("snapshot_reference() was not called before squared_distance_to_reference()")
        params = dict(self.named_parameters())
        return sum(squared_distance(params[n], ref, self._reference_shards, n) for n, ref in self._reference.items())
