"""`high_resolution`: R0+'s high-resolution guidance (docs/r0.md).

Reward models look at about 224 px, so at 512-1024 px they cannot tell
crisp detail from a blurry upscale. High-resolution guidance adds a
classifier p_phi(HR | x), trained to tell the user's real high-resolution
images from degraded copies of them (down- then up-sampled), and maximizes
log p_phi(HR | x) as one more reward: by Bayes' rule, sampling
p(x | c, HR) ~ p(x | c) * p(HR | x).

The classifier is a small fully convolutional network that runs on the
image at full resolution and scores every 33 x 33 px patch (stride 16); the reward is the mean over patches of log p(HR | patch). Train it
with `rewardkit train-hires FOLDER --out FILE` (rewardkit/hires_training.py);
it is saved as one .safetensors file whose metadata records how it was
trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import field_validator

from rewardkit.errors import UserError
from rewardkit.rewards.base import Reward, RewardOptions

log = logging.getLogger("rewardkit")

FORMAT = "rewardkit-hires-classifier"


class HighResolutionClassifier(torch.nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> per-patch logits (B, H/16, W/16) of 'real high resolution'."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        layers, channels = [], [3, w, w, 2 * w, 2 * w, 4 * w]
        for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
            # Full resolution first: the fine detail that separates real from upsampled lives there.
            # No normalization layer: statistics over the whole image would make a patch's score depend
            # on the rest of the image, and training crops and full generated images differ in size.
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Conv2d(4 * w, 1, 1)
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images * 2 - 1))[:, 0]


def degrade(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Down-sample each image by its factor (antialiased) and up-sample it back to its size (bilinear)."""
    out = []
    h, w = images.shape[-2:]
    for img, f in zip(images, factors.tolist()):
        small = F.interpolate(img[None], size=(max(1, round(h / f)), max(1, round(w / f))), mode="bilinear", antialias=True, align_corners=False)
        out.append(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out).clamp(0, 1)


def save_classifier(model: HighResolutionClassifier, path: Path, info: dict) -> None:
    """Write the classifier and how it was trained to one .safetensors file, atomically."""
    from safetensors.torch import save_file

    from rewardkit.durable import atomic_write

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "width": str(model.width), "info": json.dumps(info)})


def load_classifier(path: str | Path, who: str = "high_resolution") -> tuple[HighResolutionClassifier, dict]:
    """(classifier, training info) from a file written by `rewardkit train-hires`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"reward '{who}': weights {str(path)!r} not found. Train the classifier on a folder of your own "
            f"high-resolution images first: `rewardkit train-hires IMAGES_DIR --out {path}`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"reward '{who}': weights {str(path)!r} is not a readable .safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"reward '{who}': weights {str(path)!r} is not a high-resolution classifier written by `rewardkit train-hires`")
    model = HighResolutionClassifier(width=int(meta["width"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), json.loads(meta.get("info", "{}"))


class HighResolutionOptions(RewardOptions):
    weights: str
    """The classifier written by `rewardkit train-hires FOLDER --out FILE`. A relative path is taken from the
    working directory and saved absolute in the run's recipe.toml, so `--resume` works from anywhere."""

    @field_validator("weights")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return str(Path(v).expanduser().resolve())


class HighResolution(Reward):
    """R0+'s high-resolution guidance: the mean over patches of log p_phi(HR | patch), in (-inf, 0]."""

    name = "high_resolution"
    Options = HighResolutionOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.model, self.info = load_classifier(self.options.weights, self.name)
        self._warned = False

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        trained_at = self.info.get("resolution")
        if trained_at and not self._warned and abs(min(images.shape[-2:]) - trained_at) > 0.25 * trained_at:
            log.warning(
                "reward 'high_resolution': images are %d x %d, the classifier was trained on images with a short side "
                "of %d px (`rewardkit train-hires --resolution`); its notion of detail may not carry over",
                *images.shape[-2:], trained_at,
            )
            self._warned = True
        return F.logsigmoid(self.model(images).float()).flatten(1).mean(1)
