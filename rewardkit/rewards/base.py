"""The reward protocol: images and prompts to scores, higher is better.

``reward(images, prompts) -> scores`` with images (B, 3, H, W) float in
[0, 1] and scores (B,). A reward does its own preprocessing (resize,
normalize) on tensors so gradients flow back to the pixels; it never
round-trips through PIL on the training path.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from rewardkit.options import Configurable, PluginOptions


ModelDType = Literal["auto", "float32", "float16", "bfloat16"]
"""A reward model's precision option: 'auto' follows the run (bfloat16 / float16 under run.mixed_precision =
'bf16' / 'fp16', float32 otherwise and outside training); the others fix it."""


def load_dtype(option: str) -> torch.dtype:
    """The dtype to build a model in for a `ModelDType` option: 'auto' builds in float32 until the run says otherwise."""
    return torch.float32 if option == "auto" else getattr(torch, option)


class RewardOptions(PluginOptions):
    """Options every reward has; subclass to add the reward's own."""

    weight: float = 1.0
    """Weight w_i of this reward in the combined objective."""
    estimator: Literal["pathwise", "score_function"] = "pathwise"
    """How the reward's signal reaches the generator: 'pathwise' through its image gradient (R0; the reward must be
    differentiable), 'score_function' through the sampler's transition log-probabilities (GRPO, [policy_gradient];
    any reward, differentiable or not)."""


class Reward(Configurable, torch.nn.Module):
    """Base class of reward plugins.

    Subclasses set `name`, optionally `input_size` (the (H, W) the model
    sees; informational) and `differentiable`, declare `Options` (subclass
    of RewardOptions), load their model in `__init__`, and implement
    `forward`. The optimizer freezes the module and puts it in eval mode.
    """

    Options = RewardOptions
    input_size: tuple[int, int] | None = None
    differentiable: bool = True

    def __init__(self, **options):
        torch.nn.Module.__init__(self)
        self._set_options(options)

    @property
    def weight(self) -> float:
        return self.options.weight

    def setup(self, generator) -> None:
        """Called once before training with the run's generator (before any checkpoint loads); most rewards ignore it."""

    def use_precision(self, dtype: torch.dtype) -> None:
        """Called by the optimizer before training with the run's compute dtype. A reward with a model declares
        `dtype: ModelDType = "auto"` and implements `build`; under 'auto' its networks are rebuilt in `dtype`
        (explicit dtypes are kept)."""
        if getattr(self.options, "dtype", None) == "auto":
            self.build(dtype)

    def build(self, dtype: torch.dtype) -> None:
        """(Re)build the reward's networks in `dtype`: called from `__init__` with load_dtype(options.dtype) and
        by `use_precision`. Take models from a process-wide cache keyed by everything that determines them, the
        dtype included, and never cast a cached model in place: another reward may hold it. (Small heads stay
        float32 whatever `dtype` is.)"""
        raise NotImplementedError(f"reward '{self.name}' has dtype = 'auto' but does not implement build(dtype)")

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def score_and_gradient(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(scores (B,), d scores / d images): what training asks of a reward; `images` carry no graph.

        A reward that gives an image-space direction but no score (classifier-free
        guidance as an implicit reward) overrides this and returns (None, direction).
        """
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            s = self(x, prompts).float()
            (g,) = torch.autograd.grad(s.sum(), x)
        return s.detach(), g


def standalone_reward(cls, values: dict, label: str, source: str, device: str | None = None):
    """A reward plugin built outside a run (evaluation, `serve-reward`): its options validated as a recipe's are,
    frozen, in eval mode, on `device` (default: the GPU when there is one)."""
    from rewardkit.errors import UserError
    from rewardkit.images import default_device
    from rewardkit.options import validate_plugin_options

    validate_plugin_options(cls, values, label, source=source)
    if cls.setup is not Reward.setup:
        raise UserError(f"reward '{label}' needs the run's generator (it implements setup), so it cannot be built apart from a run")
    return cls(**values).requires_grad_(False).eval().to(torch.device(device) if device else default_device())
