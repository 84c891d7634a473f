"""Images from a generator, outside training: the same generator call as in training, under no_grad.

The optimizer's sample grids and evaluations, `rewardkit sample` and
`rewardkit eval` all go through `generate`, so training and inference cannot
drift apart (the testbed's report times its own batches, through the same
generator call). This module knows nothing else of rewardkit: it calls the
generator protocol (`noise_shape`, `sample_options`, `forward`) duck-typed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch

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


# Each tile of a grid is shown at least this large (its longer side). Small generators' images (the quick start's
# 16 px digits, 32-64 px test generators) are enlarged by a whole factor, nearest-neighbour, so each generated pixel
# becomes a sharp square block and nothing is invented by interpolation; 16, 32 and 64 px land exactly on 128.
# 128 px is about a thumbnail one can judge a digit or a colour at on a screen shown 1:1, and the narrowest tile on
# which the bundled font at a legible 12 px fits a short prompt on one line ("a handwritten digit 7" is 116 px).
# Full-size images (512-1024 px) are already larger and are not enlarged.
MIN_TILE_PX = 128
GRID_PADDING = 2  # white pixels between and around tiles (torchvision's make_grid default, as grids had before)
CAPTION_LINES = 3  # at most; longer prompts are elided


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, prompts: Sequence[str] | None = None) -> None:
    """One PNG grid, written atomically: `nrow` images per row (default: a square-ish grid), each enlarged to at
    least MIN_TILE_PX by nearest-neighbour, and, with `prompts` (one per image), each prompt written in a band
    under its row, wrapped or elided to the width of its tiles; adjacent tiles of a row that share a prompt (one
    prompt's samples side by side) share one caption."""
    images = images.detach()
    if images.dim() != 4:
        raise ValueError(f"save_grid takes (N, C, H, W) images, got shape {tuple(images.shape)}")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"save_grid: {len(prompts)} prompts for {len(images)} images")
    pixels = to_uint8(images).cpu()  # as each image's own PNG holds it
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    n, _, h, w = pixels.shape
    factor = max(1, math.ceil(MIN_TILE_PX / max(h, w, 1)))
    pixels = pixels.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    tile_h, tile_w = h * factor, w * factor
    cols = max(1, min(nrow or max(1, int(n**0.5 + 0.5)), n))
    rows = math.ceil(n / cols) if n else 0
    font, captions, band = _captions(prompts, cols, tile_w) if prompts is not None else (None, [], 0)
    pad = GRID_PADDING
    canvas = torch.full((pad + rows * (tile_h + band + pad), pad + cols * (tile_w + pad), 3), 255, dtype=torch.uint8)
    for i in range(n):
        y, x = pad + (i // cols) * (tile_h + band + pad), pad + (i % cols) * (tile_w + pad)
        canvas[y : y + tile_h, x : x + tile_w] = pixels[i].permute(1, 2, 0)
    from PIL import Image, ImageDraw

    picture = Image.fromarray(canvas.numpy())
    if captions:
        draw, line_h = ImageDraw.Draw(picture), _line_height(font)
        for row, first, span, lines in captions:
            x0, y = pad + first * (tile_w + pad), pad + row * (tile_h + band + pad) + tile_h + pad
            width = span * tile_w + (span - 1) * pad
            for k, line in enumerate(lines):
                draw.text((x0 + (width - font.getlength(line)) / 2, y + k * line_h), line, fill=(0, 0, 0), font=font)
    with atomic_write(path, f"sample grid {path}") as tmp:
        picture.save(tmp, format="PNG")


def _captions(prompts: Sequence[str], cols: int, tile_w: int):
    """(font, [(row, first column, columns spanned, lines)], band height in px) for the prompts of a grid."""
    from PIL import ImageFont

    size = max(12, round(tile_w / 24))  # 12 px on small tiles; on 512-1024 px tiles larger, to stay legible scaled down
    try:
        font = ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow without FreeType: its fixed bitmap font
        font = ImageFont.load_default()
    margin = max(2, size // 3)
    captions = []
    for row_start in range(0, len(prompts), cols):
        row = list(prompts[row_start : row_start + cols])
        c = 0
        while c < len(row):
            span = 1
            while c + span < len(row) and row[c + span] == row[c]:
                span += 1
            lines = _wrap(str(row[c]), font, span * tile_w + (span - 1) * GRID_PADDING - 2 * margin)
            if lines:
                captions.append((row_start // cols, c, span, lines))
            c += span
    if not captions:
        return font, [], 0
    return font, captions, GRID_PADDING + max(len(lines) for *_, lines in captions) * _line_height(font) + margin


def _line_height(font) -> int:
    # ascent + descent; Pillow's bitmap fallback font has no metrics, only boxes
    return sum(font.getmetrics()) if hasattr(font, "getmetrics") else font.getbbox("Ag")[3] + 2


def _wrap(text: str, font, width: float, max_lines: int = CAPTION_LINES) -> list[str]:
    """`text` in lines no wider than `width` px: broken at spaces (a word too long for a line, within it), the
    last line elided with '...' when it does not fit in `max_lines`; [] when not even '...' fits."""
    if width < font.getlength("..."):
        return []
    lines: list[str] = []
    for word in text.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(line) <= width:
            lines[-1] = line
            continue
        while font.getlength(word) > width:  # a word wider than a line: as much of it as fits, then the rest
            k = 1
            while font.getlength(word[: k + 1]) <= width:
                k += 1
            lines.append(word[:k])
            word = word[k:]
        if word:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def save_pngs(images: torch.Tensor, out_dir: Path, prefix: str = "", start: int = 0) -> list[Path]:
    """One PNG per image, numbered from `start`, each written atomically."""
    paths = []
    for i, img in enumerate(images, start):
        path = out_dir / f"{prefix}{i:04d}.png"
        with atomic_write(path) as tmp:
            save_image(img, tmp)
        paths.append(path)
    return paths


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (any shape, any float dtype) as 8-bit values, rounded as torchvision's save_image rounds
    (x * 255 + 0.5, clamped, truncated): what a saved PNG holds, and what a reward on 8-bit images sees."""
    return images.detach().float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def save_image(image: torch.Tensor, path: Path) -> None:
    """One (C, H, W) image in [0, 1] as an 8-bit file (the format from the suffix), byte for byte what
    torchvision.utils.save_image writes; here because importing torchvision pulls in torch._dynamo (seconds in every
    process that writes an image or merely imports this module, such as `rewardkit run` launching its processes)."""
    from PIL import Image

    if image.dim() == 2:
        image = image[None]
    if image.size(0) == 1:
        image = image.expand(3, -1, -1)
    array = to_uint8(image).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


def progress_disable(enabled: bool = True) -> bool | None:
    """tqdm's `disable` for rewardkit's progress bars (on stderr): True when switched off (run.progress = false, a
    process other than the main one); otherwise None, tqdm's convention of a bar on a terminal only, since a log
    file would fill with its carriage-return redraws. REWARDKIT_PROGRESS=1 shows bars anyway (a batch job's log
    one tails), =0 never."""
    if not enabled:
        return True
    forced = os.environ.get("REWARDKIT_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return False
    if forced in ("0", "false", "no", "off"):
        return True
    return None


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kwargs):
    """rewardkit's one kind of progress bar: tqdm on stderr, shown as `progress_disable(enabled)` decides, its width
    following the terminal's. `kwargs` go to tqdm (initial, leave, unit_scale, file, ...)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=progress_disable(enabled), dynamic_ncols=True, **kwargs)


def default_device() -> torch.device:
    """Where inference runs outside training: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
