"""The testbed's data: scikit-learn's digits, split once, with a fixed seed; and where its weights are.

1,797 real handwritten 8x8 digits (values 0..16) ship inside scikit-learn,
so nothing is downloaded. The splits are disjoint:

    held-out  400 images: the real reference of the Frechet distance (never trained on)
    split A   the reward classifier's training set
    split B   the independent evaluator's training set
    teacher   A and B together (everything but the held-out images)

Images are white ink on black, upsampled to 16x16 (bilinear) and repeated to
three channels: (N, 3, 16, 16) float in [0, 1], the generator's image format.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PACKAGED = "rewardkit-testbed"
"""The reserved name of the weights that ship in the package (the default of every testbed plugin)."""
WEIGHTS_DIR = Path(__file__).parent / "weights"
ENV = "REWARDKIT_TESTBED_WEIGHTS"

SPLIT_SEED = 20250317
N_HELDOUT = 400
IMAGE_SIZE = 16
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = (
    "a handwritten digit {d}",
    "a handwritten {w}",
    "the number {d}",
    "the digit {w}",
    "a handwritten number {w}",
    "digit {d}",
)
"""Prompt templates the teacher is trained on; {d} is the numeral, {w} the word."""


def prompt(digit: int, template: str = PHRASINGS[0]) -> str:
    return template.format(d=digit, w=NUMBER_WORDS[digit])


def parse_digit(text: str) -> int:
    """The digit a prompt asks for: its last numeral or number word; -1 if none."""
    import re

    found = -1
    for m in re.finditer(r"\d|[a-z]+", text.lower()):
        tok = m.group(0)
        if tok.isdigit():
            found = int(tok)
        elif tok in NUMBER_WORDS:
            found = NUMBER_WORDS.index(tok)
    return found


def load_raw():
    """(images (1797, 8, 8) float in [0, 1], labels (1797,) long)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'heldout', 'a', 'b', 'teacher'}: (images (N, 3, 16, 16) in [0, 1], labels (N,))."""
    x, y = load_raw()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, rest = perm[:N_HELDOUT], perm[N_HELDOUT:]
    half = len(rest) // 2
    a, b = rest[:half], rest[half:]
    imgs = to_images(x)
    return {
        "heldout": (imgs[held], y[held]),
        "a": (imgs[a], y[a]),
        "b": (imgs[b], y[b]),
        "teacher": (imgs[rest], y[rest]),
    }


def to_images(x8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, 8, 8) in [0, 1] -> (N, 3, size, size) in [0, 1]."""
    x = x8[:, None]
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def to_gray(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, size, size): the input of the testbed's classifiers, differentiable."""
    g = images.mean(dim=1, keepdim=True)
    if g.shape[-2:] != (size, size):
        g = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return g


def weights_dir(name: str = PACKAGED) -> Path:
    """The folder of testbed weights that `name` means: the packaged one (or $REWARDKIT_TESTBED_WEIGHTS), or a path."""
    from rewardkit.errors import UserError

    if name == PACKAGED:
        folder = Path(os.environ.get(ENV) or WEIGHTS_DIR)
    else:
        folder = Path(name).expanduser()
        if folder.name == "teacher" and (folder / "model_index.json").is_file():
            folder = folder.parent
    if not (folder / "teacher" / "model_index.json").is_file():
        raise UserError(
            f"testbed weights {name!r}: {folder} holds no trained testbed (teacher/model_index.json is missing). "
            "Train it with `python -m rewardkit.testbed.train` (a few minutes on a CPU; add --out DIR to write elsewhere)."
        )
    return folder
