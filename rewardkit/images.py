"""Images from a generator, outside training: the same generator call as in training, under no_grad.

The optimizer's sample grids and evaluations, `rewardkit sample` and
`rewardkit eval` all go through `generate`, so training and inference cannot
drift apart (the testbed's report times its own batches, through the same
generator call). This module knows nothing else of rewardkit: it calls the
generator protocol (`noise_shape`, `sample_options`, `forward`) duck-typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import make_grid, save_image

from rewardkit.durable import atomic_write
from rewardkit.errors import UserError


def fixed_noise(generator, n: int, seed: int, device=None) -> torch.Tensor:
    """Noise for `n` samples, determined by `seed` alone."""
    rng = torch.Generator().manual_seed(seed)
    return torch.randn((n, *generator.noise_shape()), generator=rng).to(device or "cpu")


def generate(generator, prompts: Sequence[str], noise: torch.Tensor, options=None, batch_size: int = 8) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, generated in batches."""
    options = options or generator.sample_options()
    return _in_batches(generator, prompts, noise, batch_size, lambda p, z: generator(p, z, options))


def edit(generator, prompts: Sequence[str], image: torch.Tensor, noise: torch.Tensor, strength: float, batch_size: int = 8) -> torch.Tensor:
    """`image` (1, 3, H, W) edited toward each prompt from each noise (generator.edit), in batches; on the CPU."""
    return _in_batches(generator, prompts, noise, batch_size, lambda p, z: generator.edit(p, image.expand(len(z), -1, -1, -1), z, strength))


@torch.no_grad()
def _in_batches(generator, prompts: Sequence[str], noise: torch.Tensor, batch_size: int, call) -> torch.Tensor:
    """call(prompts, noise) per batch, in eval mode, on the generator's device; the images in [0, 1] on the CPU."""
    device = next(generator.parameters(), torch.empty(0)).device
    was_training = generator.training
    generator.eval()
    try:
        chunks = [call(list(prompts[i : i + batch_size]), noise[i : i + batch_size].to(device)).float().clamp(0, 1).cpu()
                  for i in range(0, len(prompts), batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(chunks)


def load_image(path: str | Path, height: int, width: int, what: str) -> torch.Tensor:
    """An image file as (1, 3, height, width) in [0, 1], resized (Lanczos, as diffusers' VaeImageProcessor) to the
    generator's size; UserError naming `what` (the argument) when it cannot be read."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"{what} {path}: not a readable image ({exc}); give a PNG or JPEG file") from None
    if im.size != (width, height):
        im = im.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def optimized_batches(generator, prompts: Sequence[str], batch_size: int = 8, table: torch.Tensor | None = None):
    """Yield (first position, images) for every training prompt, from its optimized noise.

    For generators that optimize one input noise per training prompt
    (`optimized_noise()` is not None): row i of the noise belongs to prompts[i].
    Each batch is one generator call, so `prompt_index` matches its prompts.
    `table`: the whole noise table, when `optimized_noise()` holds only a shard (FSDP).
    """
    table = generator.optimized_noise() if table is None else table
    options = generator.sample_options()
    for start in range(0, len(prompts), batch_size):
        index = torch.arange(start, min(start + batch_size, len(prompts)))
        noise = table.detach()[index.to(table.device)]
        yield start, generate(generator, [prompts[i] for i in index.tolist()], noise, options.replace(prompt_index=index), batch_size)


def optimized_images(generator, prompts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
    """The images of every training prompt from its optimized noise, (N, 3, H, W) on the CPU."""
    return torch.cat([images for _, images in optimized_batches(generator, prompts, batch_size)])


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """One PNG grid, written atomically."""
    grid = make_grid(images, nrow=nrow or max(1, int(len(images) ** 0.5 + 0.5)), padding=2, pad_value=1.0)
    with atomic_write(path, f"sample grid {path}") as tmp:
        save_image(grid, tmp)


def save_pngs(images: torch.Tensor, out_dir: Path, prefix: str = "", start: int = 0) -> list[Path]:
    """One PNG per image, numbered from `start`, each written atomically."""
    paths = []
    for i, img in enumerate(images, start):
        path = out_dir / f"{prefix}{i:04d}.png"
        with atomic_write(path) as tmp:
            save_image(img, tmp)
        paths.append(path)
    return paths


def default_device() -> torch.device:
    """Where inference runs outside training: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
