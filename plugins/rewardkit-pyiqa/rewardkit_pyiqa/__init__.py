"""rewardkit-pyiqa: any no-reference pyiqa metric as a rewardkit reward or evaluation score.

pyiqa (IQA-PyTorch) is licensed PolyForm-Noncommercial-1.0.0: installing this
plugin installs it, under that licence. rewardkit itself does not depend on it.

- sign: a lower-is-better metric (pyiqa's `lower_better`) is negated, so the
  reward is always higher-is-better;
- `rescale = true` maps the metric's documented score range onto [0, 1]
  (1 = best), to put different metrics on a common scale;
- differentiability is declared per metric (NON_DIFFERENTIABLE below): such a
  metric scores images for evaluation, and the optimizer refuses to train on it.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Sequence

import torch
from pydantic import Field

import rewardkit
from rewardkit.errors import UserError, did_you_mean
from rewardkit.rewards import ModelDType, Reward, RewardOptions, load_dtype

__version__ = "0.1.0"

NON_DIFFERENTIABLE = frozenset(
    {
        # measured with pyiqa 0.1.16: no gradient or an identically zero one
        "entropy", "piqe",
        # classical pipelines with non-smooth steps (patch selection, histogram/SVR fits)
        "niqe", "niqe_matlab", "ilniqe", "brisque", "brisque_matlab", "nrqm", "pi",
        # vision-language models that score through generated-token probabilities
        "qalign", "qalign_8bit", "qalign_4bit", "qrealign", "qrealign-mini", "qrealign-lite", "qrealign-pro", "compare2score",
    }
)  # fmt: skip
"""Metrics declared non-differentiable: usable for evaluation only. Override with `differentiable`."""

DATASET_METRICS = frozenset({"fid", "sfid", "fid_dinov2", "inception_score"})
"""Metrics of image sets, not of single images: no per-image reward."""

_METRICS: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()  # alive while a reward holds it
_LOCK = threading.Lock()


class PyIQAOptions(RewardOptions):
    metric: str
    """pyiqa metric name (a no-reference one: musiq, topiq_nr, clipiqa, maniqa, nima, ...)."""
    metric_options: dict[str, Any] = Field(default_factory=dict)
    """Passed to pyiqa.create_metric, e.g. {pretrained_model_path = "/models/musiq_koniq.pth"}."""
    rescale: bool = False
    """Map the metric's score range (pyiqa's `score_range`) to [0, 1], 1 = best."""
    differentiable: bool | None = None
    """Override the declared differentiability of the metric (None: use NON_DIFFERENTIABLE)."""
    dtype: ModelDType = "auto"
    """Precision of the metric's network: 'auto' is the run's (run.mixed_precision); scores are returned as float32."""
    gradient_checkpointing: bool = False
    """Recompute the metric's forward pass during backward instead of storing its activations."""


class PyIQA(Reward):
    """A pyiqa no-reference metric: images (B, 3, H, W) in [0, 1] -> (B,), higher is better."""

    name = "pyiqa"
    Options = PyIQAOptions
    input_size = None  # pyiqa metrics take images at their own size

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        config = metric_config(o.metric)
        self.score_range = parse_score_range(config.get("score_range"))
        if o.rescale and self.score_range is None:
            raise UserError(
                f"pyiqa metric '{o.metric}' has no bounded score range ({config.get('score_range')!r}), so `rescale` cannot be used with it"
            )
        self.build(load_dtype(o.dtype))
        self.lower_better = bool(self._metric[0].lower_better)
        self.differentiable = o.differentiable if o.differentiable is not None else o.metric not in NON_DIFFERENTIABLE

    def build(self, dtype: torch.dtype) -> None:
        metric = _create(self.options.metric, self.options.metric_options, dtype)
        self._metric = (metric,)  # holds the cached metric (a plain attribute: its network is registered as `net`)
        self.net = metric.net

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        param = next(self.net.parameters(), None)  # some metrics (piqe, entropy) have no parameters
        x = images.to(param.dtype) if param is not None and param.is_floating_point() else images
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            if self.options.gradient_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                raw = checkpoint(self.net, x, use_reentrant=False)
            else:
                raw = self.net(x)
        if isinstance(raw, (tuple, list)):
            raw = raw[0]
        raw = raw.float().reshape(images.shape[0], -1).mean(dim=1)
        return self.transform(raw)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw metric values -> reward: negated if lower is better, optionally rescaled to [0, 1]."""
        if self.options.rescale:
            lo, hi = self.score_range
            unit = (raw - lo) / (hi - lo)
            return 1.0 - unit if self.lower_better else unit
        return -raw if self.lower_better else raw


def parse_score_range(text: str | None) -> tuple[float, float] | None:
    """pyiqa's score_range text ('0, 1', '~0, ~100') -> (low, high); '~' marks approximate bounds."""
    if not text:
        return None
    try:
        lo, hi = (float(part.strip().lstrip("~")) for part in text.split(","))
    except ValueError:
        return None
    return (lo, hi) if hi > lo else None


def metric_config(metric: str) -> dict:
    """pyiqa's default config of `metric`, if it can be a reward (a no-reference, per-image metric)."""
    try:
        import pyiqa
        from pyiqa.default_model_configs import DEFAULT_CONFIGS
    except ImportError as exc:
        raise UserError(f"the pyiqa reward needs the pyiqa package ({exc}); pip install rewardkit-pyiqa (PolyForm-Noncommercial licence)") from None
    if metric not in DEFAULT_CONFIGS:
        raise UserError(f"pyiqa has no metric '{metric}'{did_you_mean(metric, DEFAULT_CONFIGS)}; see pyiqa.list_models('NR')")
    if metric in DATASET_METRICS:
        raise UserError(f"pyiqa metric '{metric}' scores sets of images, not single images: it cannot be a reward")
    if DEFAULT_CONFIGS[metric].get("metric_mode") != "NR":
        raise UserError(
            f"pyiqa metric '{metric}' is full-reference (it compares against a reference image), and rewards have "
            "no reference; use a no-reference metric: " + ", ".join(pyiqa.list_models("NR")[:8]) + ", ..."
        )
    return DEFAULT_CONFIGS[metric]


def _create(metric: str, metric_options: dict, dtype: torch.dtype):
    import pyiqa

    key = (metric, json.dumps(metric_options, sort_keys=True, default=str), dtype)
    with _LOCK:
        m = _METRICS.get(key)
        if m is None:
            try:
                m = pyiqa.create_metric(metric, as_loss=False, device="cpu", **metric_options)
            except (OSError, ConnectionError) as exc:  # URLError, LocalEntryNotFoundError, HTTP errors: missing weights
                raise UserError(
                    f"pyiqa metric '{metric}': its weights are not available offline and could not be downloaded "
                    f"({type(exc).__name__}: {str(exc)[:160]}). Pre-download them on a machine with network (building the "
                    f"metric once caches them under ~/.cache/torch/hub/pyiqa or the Hugging Face cache), or set "
                    f"metric_options = {{pretrained_model_path = '/path/to/weights.pth'}}."
                ) from None
            except TypeError as exc:
                raise UserError(f"pyiqa metric '{metric}': bad metric_options {metric_options}: {exc}") from None
            m.net.to(dtype).eval().requires_grad_(False)
            _METRICS[key] = m
        return m


@rewardkit.hookimpl
def register_rewards(register):
    register(PyIQA)
