"""Inference: the same generator call as training, under no_grad.

Both the optimizer's sample grids and `rewardkit sample` go through
`generate`, so training and inference cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torchvision.utils import make_grid, save_image


def fixed_noise(generator, n: int, seed: int, device=None) -> torch.Tensor:
    """Noise for `n` samples, determined by `seed` alone."""
    rng = torch.Generator().manual_seed(seed)
    return torch.randn((n, *generator.noise_shape()), generator=rng).to(device or "cpu")


@torch.no_grad()
def generate(generator, prompts: Sequence[str], noise: torch.Tensor, options=None, batch_size: int = 8) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] on the CPU, generated in batches."""
    options = options or generator.sample_options()
    device = next(generator.parameters(), torch.empty(0)).device
    was_training = generator.training
    generator.eval()
    try:
        chunks = [
            generator(list(prompts[i : i + batch_size]), noise[i : i + batch_size].to(device), options).float().clamp(0, 1).cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    finally:
        generator.train(was_training)
        _reshard(generator)
    return torch.cat(chunks)


def _reshard(generator) -> None:
    """FSDP leaves parameters gathered after a forward without gradient (the root's always): shard them
    again, so the optimizer and the checkpoint see the shards they hold. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for module in generator.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """One PNG grid, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.5))
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), tmp)
    os.replace(tmp, path)


def save_pngs(images: torch.Tensor, out_dir: Path, prefix: str = "", start: int = 0) -> list[Path]:
    """One PNG per image, numbered from `start`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images, start):
        path = out_dir / f"{prefix}{i:04d}.png"
        save_image(img, path)
        paths.append(path)
    return paths


def load_generator(path: str | Path, registry=None):
    """The trained generator of a run directory (newest checkpoint) or of one checkpoint.

    Returns (generator, recipe, checkpoint path), the generator set up exactly
    as in training and with the checkpoint's weights loaded, in eval mode.
    """
    from rewardkit.checkpoint import load_checkpoint
    from rewardkit.recipe import load_recipe

    run_dir, checkpoint = resolve_run_path(path)
    recipe = load_recipe(run_dir / "recipe.toml", registry=registry)
    generator = recipe.generator.build()
    generator.setup(recipe.prompts, recipe.run.seed)
    generator.load_trainable_state_dict(load_checkpoint(checkpoint)[0])
    return generator.to(default_device()).eval(), recipe, checkpoint


def resolve_run_path(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (its newest checkpoint) or a checkpoint folder."""
    from rewardkit.checkpoint import latest_checkpoint
    from rewardkit.errors import UserError

    path = Path(path)
    if (path / "state.json").is_file():
        return path.parent.parent, path
    if (path / "recipe.toml").is_file():
        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is None:
            raise UserError(f"{path} holds no complete checkpoint yet; train first, or name a checkpoint folder")
        return path, checkpoint
    raise UserError(f"{path} is neither a run directory (with recipe.toml) nor a checkpoint (with state.json)")


def default_device() -> torch.device:
    """Where inference runs outside training: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
