"""`rewardkit train-hires`: train the high-resolution classifier of R0+ on the user's images.

    rewardkit train-hires ~/photos --out models/hires_1024.safetensors --resolution 1024

Positives are random crops of the user's real images, each first resized
(down only) so its short side is `--resolution`, the size the generator
will produce; negatives are the same crops down-sampled by a random factor
in [--min-factor, --max-factor] and up-sampled back. A seeded tenth of the
files (at least one) is held out, and the held-out accuracy is printed and
stored in the file's metadata next to the training settings. The reward
that uses the result is `high_resolution` (rewardkit/rewards/high_resolution.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardkit.errors import UserError
from rewardkit.rewards.high_resolution import HighResolutionClassifier, degrade, save_classifier

log = logging.getLogger("rewardkit")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class RealCrops(torch.utils.data.Dataset):
    """Random `crop` x `crop` crops of images resized (down only) to a short side of `resolution`."""

    def __init__(self, paths: list[Path], resolution: int, crop: int):
        self.paths, self.resolution, self.crop = paths, resolution, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        with Image.open(self.paths[i]) as im:
            if min(im.size) > 2 * self.resolution:
                im.draft("RGB", (im.width * self.resolution // min(im.size), im.height * self.resolution // min(im.size)))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            scale = self.resolution / min(im.size)
            if scale < 1:
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
            x = TF.to_dtype(TF.to_image(im), torch.float32, scale=True)
        top = random.randint(0, x.shape[1] - self.crop)
        left = random.randint(0, x.shape[2] - self.crop)
        return x[:, top : top + self.crop, left : left + self.crop]


def find_images(folder: Path, resolution: int, crop: int) -> list[Path]:
    """The usable images of `folder` (recursively); a UserError says why when there are none."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise UserError(f"train-hires: {str(folder)!r} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"train-hires: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    usable, small, broken, below = [], [], [], 0
    for p in files:
        try:
            with Image.open(p) as im:
                short = min(im.size)
        except (UnidentifiedImageError, OSError):
            broken.append(p)
            continue
        (usable if short >= crop else small).append(p)
        below += crop <= short < resolution
    if broken:
        log.warning("train-hires: skipped %d unreadable file(s), e.g. %s", len(broken), broken[0])
    if small:
        log.warning("train-hires: skipped %d image(s) smaller than --crop %d px, e.g. %s", len(small), crop, small[0])
    if below:
        # Never up-sampled: an up-sampled image is exactly what the negatives are.
        log.warning("train-hires: %d image(s) have a short side under --resolution %d px and are used at their own size", below, resolution)
    if len(usable) < 2:
        raise UserError(
            f"train-hires: {len(usable)} usable image(s) in {str(folder)!r}; need at least 2 (one is held out) with a short "
            f"side of at least --crop {crop} px. Real high-resolution photos at or above --resolution {resolution} px are what it learns from."
        )
    return usable


def _seed_worker(seed: int, worker: int) -> None:
    random.seed(seed * 1000 + worker)  # the crops' positions


def _batches(dataset, batch_size: int, steps: int, workers: int, seed: int):
    """`steps` full batches of images drawn with replacement (small folders still fill a batch)."""
    import functools

    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=g)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        worker_init_fn=functools.partial(_seed_worker, seed), pin_memory=torch.cuda.is_available(),
    ))


def _labelled(real: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real crops (label 1) and their degraded copies (label 0), concatenated."""
    images = torch.cat([real, degrade(real, factors)])
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(real))]).to(real.device)
    return images, labels


@torch.no_grad()
def heldout_accuracy(model, dataset, factor_range, device, seed: int = 0) -> float:
    """How often a held-out real crop scores above its own degraded copy (random crops, 64 in all,
    at least 4 per file). This pairwise accuracy is what a reward needs - the direction
    towards real detail - and does not depend on where the logits cross zero."""
    rounds = max(4, math.ceil(64 / len(dataset)))
    random.seed(seed)
    g = torch.Generator().manual_seed(seed)
    wins = total = 0
    model.eval()
    for _ in range(rounds):
        for start in range(0, len(dataset), 16):
            real = torch.stack([dataset[i] for i in range(start, min(start + 16, len(dataset)))]).to(device)
            images, _ = _labelled(real, torch.empty(len(real)).uniform_(*factor_range, generator=g))
            real_logit, degraded_logit = model(images).flatten(1).mean(1).chunk(2)
            wins += int((real_logit > degraded_logit).sum())
            total += len(real)
    model.train()
    return wins / total


def train(
    folder: Path, out: Path, resolution: int = 1024, crop: int = 256, steps: int = 2000, batch_size: int = 16, lr: float = 1e-3,
    min_factor: float = 2.0, max_factor: float = 4.0, width: int = 32, seed: int = 0, workers: int = 0, device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train and save the classifier; returns what was stored in its metadata."""
    from rewardkit.images import default_device, progress_bar

    if not 1 < min_factor <= max_factor:
        raise UserError(f"train-hires: need 1 < --min-factor <= --max-factor; got {min_factor} and {max_factor}")
    if crop < 32:
        raise UserError(f"train-hires: --crop must be at least 32 px (the classifier's patch); got {crop}")
    if resolution < crop:
        raise UserError(f"train-hires: --resolution ({resolution}) must be at least --crop ({crop})")
    if steps < 1 or batch_size < 1 or width < 8 or width % 8:
        raise UserError(f"train-hires: --steps and --batch-size must be positive and --width a multiple of 8; got {steps}, {batch_size}, {width}")
    if Path(out).is_dir():
        raise UserError(f"train-hires: --out {str(out)!r} is a folder; give the .safetensors file to write")
    if workers < 0:
        raise UserError(f"train-hires: --workers must be 0 or more; got {workers}")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train-hires: --device {device} asks for a GPU, and none is available")
    files = find_images(Path(folder), resolution, crop)
    rng = random.Random(seed)
    held = set(rng.sample(range(len(files)), max(1, len(files) // 10)))
    train_set = RealCrops([f for i, f in enumerate(files) if i not in held], resolution, crop)
    val_set = RealCrops([f for i, f in enumerate(files) if i in held], resolution, crop)
    device = torch.device(device or default_device())

    torch.manual_seed(seed)
    random.seed(seed)
    model = HighResolutionClassifier(width).to(device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    stream = _batches(train_set, batch_size, steps, workers, seed)
    bar = progress_bar(steps, "train-hires", "step", enabled=progress)
    t0, ema = time.perf_counter(), math.nan
    for _ in range(steps):
        real = next(stream).to(device)
        images, labels = _labelled(real, torch.empty(len(real)).uniform_(min_factor, max_factor, generator=g))
        logits = model(images)
        # every patch of a crop carries the crop's label
        loss = F.binary_cross_entropy_with_logits(logits, labels.view(-1, 1, 1).expand_as(logits))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        schedule.step()
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
        bar.update(1)
    bar.close()
    accuracy = heldout_accuracy(model, val_set, (min_factor, max_factor), device, seed=seed)
    if accuracy < 0.7:
        log.warning(
            "train-hires: held-out accuracy %.3f is close to chance (0.5): more or more detailed images, more --steps, "
            "or check that the images are really high resolution", accuracy,
        )
    info = {
        "resolution": resolution, "crop": crop, "steps": steps, "batch_size": batch_size, "lr": lr,
        "factors": [min_factor, max_factor], "seed": seed, "train_images": len(train_set), "heldout_images": len(val_set),
        "heldout_accuracy": accuracy, "final_loss": ema, "seconds": round(time.perf_counter() - t0, 1),
        "source": str(Path(folder).resolve()),
    }
    save_classifier(model, Path(out), info)
    return info
