"""`rewardkit eval`: score generators on a prompt set, in the layout of the paper's table.

    rewardkit eval runs/r0 sd:runwayml/stable-diffusion-v1-5,num_steps=25,guidance_scale=7.5 \\
        --prompts prompts.txt --metrics hps,aesthetic,clip,imagereward,fid --reference coco5k/

One row per generator. Images are generated with fixed seeds, saved as PNG
under OUT/images/<key>/ (a captioned grid of the first ones in
OUT/grids/<key>.png) and reused by later calls with the same generator,
steps, seed, prompts and count, so re-scoring with another metric never
regenerates. Every metric scores the saved 8-bit images, so a fresh and a
cached call give the same numbers.

Metrics are reward plugins by name (aliases: aesthetic -> laion_aesthetic,
clip -> clip_score) and `fid`, computed by torchmetrics'
FrechetInceptionDistance (torch-fidelity's InceptionV3) against a folder of
real images or statistics saved with --save-reference-stats; the same
implementation on every row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rewardkit.durable import write_text_atomic
from rewardkit.errors import UserError, did_you_mean
from rewardkit.recipe import parse_override

log = logging.getLogger("rewardkit")

ALIASES = {"aesthetic": "laion_aesthetic", "clip": "clip_score"}
# The paper's Table 1 columns, in order. The reward plugins already report in the paper's units
# (HPS and CLIP score as 100 x cosine), so values are shown as scored.
PAPER_COLUMNS = {"hps": "HPS", "laion_aesthetic": "Aes", "clip_score": "CLIP score", "fid": "FID", "imagereward": "ImageReward"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SIZE = (299, 299)


@dataclass
class Row:
    label: str
    steps: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    by_style: dict[str, dict[str, float]] = field(default_factory=dict)
    ms_per_image: float | None = None
    images: str = ""


# --- generators ----------------------------------------------------------------
@dataclass
class GeneratorSpec:
    """A run directory / checkpoint, or TYPE:MODEL[,key=value,...] for a base model."""

    text: str
    label: str
    identity: dict
    ema: bool = False
    checkpoint: tuple[Path, Path] | None = None  # (run directory, checkpoint), chosen and verified once

    def build(self, registry, prompts: Sequence[str], seed: int):
        if self.checkpoint is not None:
            from rewardkit.rundir import generator_from_checkpoint

            return generator_from_checkpoint(*self.checkpoint, registry, ema=self.ema)[0]
        from rewardkit.options import validate_plugin_options

        kind, _, rest = self.text.partition(":")
        model, *pairs = rest.split(",")
        options = {"model": model}
        for pair in pairs:
            keys, value = parse_override(pair)
            options[".".join(keys)] = value
        cls = registry.get("generator", kind)
        validate_plugin_options(cls, options, self.text, source=f"generator spec {self.text!r}")
        generator = cls(**options)
        generator.setup(list(prompts), seed)
        from rewardkit.images import default_device

        return generator.to(default_device()).eval()


def parse_generator_spec(text: str, ema: bool = False) -> GeneratorSpec:
    path = Path(text)
    if (path / "state.json").is_file() or (path / "recipe.toml").is_file():
        from rewardkit.rundir import resolve_run_path

        run_dir, ckpt = resolve_run_path(path)
        weights = ckpt / "generator.safetensors"
        identity = {"checkpoint": str(ckpt.resolve()), "mtime_ns": weights.stat().st_mtime_ns, "size": weights.stat().st_size, **({"ema": True} if ema else {})}
        label = path.name if ckpt != path else f"{path.parent.parent.name}@{path.name}"
        return GeneratorSpec(text, label + (" (EMA)" if ema else ""), identity, ema, (run_dir, ckpt))
    if ":" in text and not path.exists():
        return GeneratorSpec(text, text.split(",")[0], {"spec": text})
    raise UserError(
        f"generator {text!r}: expected a run directory, a checkpoint folder, or TYPE:MODEL[,key=value,...] "
        "(e.g. sd:runwayml/stable-diffusion-v1-5,num_steps=25,guidance_scale=7.5)"
    )


# --- images --------------------------------------------------------------------
def generate_or_reuse(spec: GeneratorSpec, registry, prompts, n: int, steps: int | None, seed: int, out: Path, batch_size: int):
    """PNG files for every (prompt, k), generated once and cached; returns (paths, ms/image or None)."""
    key_data = {"generator": spec.identity, "steps": steps, "seed": seed, "n": n, "prompts": list(prompts)}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    folder = out / "images" / key
    manifest = folder / "manifest.json"
    expanded = [p for p in prompts for _ in range(n)]
    paths = [folder / f"{i:05d}.png" for i in range(len(expanded))]
    grid, grid_index, grid_columns = out / "grids" / f"{key}.png", *_grid_layout(len(prompts), n)
    if manifest.is_file() and all(p.is_file() for p in paths):
        try:
            ms = json.loads(manifest.read_text(encoding="utf-8")).get("ms_per_image")
            log.info("%s: reusing %d cached images in %s", spec.label, len(paths), folder)
            if not grid.is_file():  # images cached before grids were written
                _save_eval_grid(load_images([paths[i] for i in grid_index]), expanded, grid_index, grid_columns, grid, spec.label)
            return paths, ms, key
        except (ValueError, AttributeError):  # a damaged manifest: the cache is not trusted, the images are made again
            log.warning("%s: %s does not parse; generating the images again", spec.label, manifest)

    import time

    from rewardkit.images import fixed_noise, generate, progress_bar, save_image

    generator = spec.build(registry, prompts, seed)
    options = generator.sample_options()
    if steps is not None:
        options = options.replace(num_steps=steps)
    noise = fixed_noise(generator, len(expanded), seed)
    folder.mkdir(parents=True, exist_ok=True)
    elapsed, picked = 0.0, {}
    bar = progress_bar(len(expanded), f"generating {spec.label}", "image", leave=False)
    for start in range(0, len(expanded), batch_size):
        t = time.perf_counter()
        images = generate(generator, expanded[start : start + batch_size], noise[start : start + batch_size], options, batch_size)
        elapsed += time.perf_counter() - t
        for j, img in enumerate(images):
            save_image(img, paths[start + j])
        picked.update({start + j: img for j, img in enumerate(images) if start + j in grid_index})  # the grid's few, kept as made
        bar.update(len(images))
    bar.close()
    ms = 1000 * elapsed / len(expanded)
    write_text_atomic(manifest, json.dumps({**key_data, "ms_per_image": ms, "label": spec.label}, indent=2))
    _save_eval_grid(torch.stack([picked[i] for i in grid_index]), expanded, grid_index, grid_columns, grid, spec.label)  # after: a failed grid costs no regeneration
    return paths, ms, key


GRID_TILES = 16  # at most, per generator: a 4 x 4 grid of 1024 px images is already 4096 px square


def _grid_layout(n_prompts: int, n: int) -> tuple[list[int], int | None]:
    """Which images (indices into the prompt-major list, n per prompt) a generator's grid shows, and its columns:
    with one image per prompt, the first 16 prompts in a square-ish grid, each tile captioned with its prompt;
    with several, one row per prompt (its first samples side by side, up to 4, under one caption)."""
    if n == 1:
        return list(range(min(n_prompts, GRID_TILES))), None
    cols = min(n, 4)
    return [p * n + k for p in range(min(n_prompts, GRID_TILES // cols)) for k in range(cols)], cols


def _save_eval_grid(images: torch.Tensor, prompts: Sequence[str], index: list[int], cols: int | None, path: Path, label: str) -> None:
    """OUT/grids/<key>.png, apart from OUT/images/<key>/, which holds the generated images and nothing else
    (a folder one may glob, score or give as an FID --reference)."""
    from rewardkit.images import save_grid

    save_grid(images, path, nrow=cols, prompts=[prompts[i] for i in index])
    log.info("%s: grid of its first images in %s", label, path)


def load_images(paths: Sequence[Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images as a float (N, 3, H, W) tensor in [0, 1]; all must share a size unless `size` is given, in which
    case each is centre-cropped to a square and resized to it (never squashed)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    tensors = []
    for p in paths:
        with Image.open(p) as im:
            t = pil_to_tensor(im.convert("RGB")).float() / 255
        tensors.append(t if size is None else _square_resize(t, size))
    return torch.stack(tensors)


def _square_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop to a square, then an antialiased resize (the clean-fid / torch-fidelity users' convention)."""
    from torchvision.transforms.functional import center_crop, resize

    h, w = images.shape[-2:]
    if h != w:
        images = center_crop(images, [min(h, w)] * 2)
    return images if tuple(images.shape[-2:]) == tuple(size) else resize(images, list(size), antialias=True)


# --- metrics -------------------------------------------------------------------
def resolve_metrics(names: Sequence[str], registry) -> dict[str, str]:
    """--metrics' entries as {label: reward plugin or 'fid'}: 'NAME' (its own label; aliases resolved) or 'LABEL=NAME',
    which lets one plugin serve several columns (two `remote` servers, a local and a remote HPS)."""
    out = {}
    for entry in names:
        label, _, name = entry.rpartition("=")
        name = ALIASES.get(name.strip(), name.strip())
        label = label.strip() or name
        if not re.fullmatch(r"[\w-]+", label):
            raise UserError(f"--metrics: {entry!r}: a label is letters, digits, '_' and '-' (it names the column and --metric-option LABEL.KEY)")
        if name != "fid" and name not in registry.plugins["reward"]:
            known = sorted(set(registry.names("reward")) | {"fid", *ALIASES})
            hint = did_you_mean(name, known)
            install = "" if hint else (" (the paper's rewards come with pip install 'rewardkit[all]'; from a checkout: "
                                       "pip install -e plugins/rewardkit-NAME, docs/rewards.md#installing)")
            raise UserError(f"--metrics: no reward plugin or metric named '{name}'{hint}{install}; available: {', '.join(known)}")
        if name == "fid" and label != "fid":
            raise UserError(f"--metrics: {entry!r}: fid is not a reward and takes no label")
        if label in out:
            raise UserError(f"--metrics: the column '{label}' is named twice; give one of them a label, e.g. {label}2={name}")
        out[label] = name
    return out


def score_rewards(rewards: dict, images: torch.Tensor, prompts: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    scores = {}
    with torch.no_grad():
        for label, reward in rewards.items():
            device = next(iter(reward.parameters()), torch.empty(0)).device
            scores[label] = torch.cat(
                [reward(images[i : i + batch_size].to(device), list(prompts[i : i + batch_size])).float().cpu() for i in range(0, len(images), batch_size)]
            )
    return scores


def score_files(rewards: dict, fid: "FID | None", paths: Sequence[Path], prompts: Sequence[str], batch_size: int,
                what: str = "") -> tuple[dict[str, torch.Tensor], float | None]:
    """Every metric on saved images, streamed: one batch of images in memory at a time, whatever their number
    (COCO-5k at 1024 px would be 63 GB of float32)."""
    from rewardkit.images import progress_bar

    parts: dict[str, list] = {label: [] for label in rewards}
    if fid is not None:
        fid.metric.reset()  # fake features only: the reference is kept (reset_real_features=False)
    bar = progress_bar(len(paths), f"scoring {what}".rstrip(), "image", leave=False)
    for i in range(0, len(paths), batch_size):
        images = load_images(paths[i : i + batch_size])
        for label, s in score_rewards(rewards, images, prompts[i : i + batch_size], batch_size).items():
            parts[label].append(s)
        if fid is not None:
            fid.metric.update(_inception_input(images), real=False)
        bar.update(len(images))
    bar.close()
    scores = {label: torch.cat(chunks) for label, chunks in parts.items()}
    for label, s in scores.items():
        if (lost := int(torch.isnan(s).sum())):  # a remote reward's batch no server answered scores NaN
            log.warning("%s: %d of %d images scored NaN (for a remote reward: batches no server answered, see above); "
                        "its mean is NaN: score again once its servers answer (the images are cached)", label, lost, len(s))
    return scores, (float(fid.metric.compute()) if fid is not None else None)


class FID:
    """torchmetrics' FID with reference statistics that can be saved and reloaded."""

    STATS_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    DIMS = (64, 192, 768, 2048)

    def __init__(self, weights: str | Path | None = None, dims: int = 2048):
        """`dims`: which Inception features; 2048 (pool3) is standard FID, the smaller ones are
        earlier layers (as pytorch-fid's --dims): cheap checks, not comparable with published FIDs."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        if dims not in self.DIMS:
            raise UserError(f"--fid-dims must be one of {', '.join(map(str, self.DIMS))}, got {dims}")
        path = _inception_weights(weights)
        self.dims = dims
        self.metric = FrechetInceptionDistance(feature=dims, reset_real_features=False, feature_extractor_weights_path=str(path))

    def add_reference(self, reference: Path, batch_size: int = 32) -> None:
        if reference.suffix == ".safetensors":
            from safetensors.torch import load_file

            from safetensors import safe_open

            stats = load_file(reference)
            missing = [k for k in self.STATS_KEYS if k not in stats]
            if missing:
                raise UserError(f"--reference {reference}: not a statistics file saved by rewardkit eval (missing {missing})")
            with safe_open(reference, "pt") as f:
                dims = int((f.metadata() or {}).get("dims", 2048))
            if dims != self.dims:
                raise UserError(f"--reference {reference} holds statistics of {dims}-d features, but --fid-dims is {self.dims}")
            for k in self.STATS_KEYS:
                setattr(self.metric, k, stats[k])
            return
        files = sorted(p for p in reference.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) < 2:
            raise UserError(f"--reference {reference}: needs at least 2 images (.png/.jpg/...), found {len(files)}")
        from rewardkit.images import progress_bar

        bar = progress_bar(len(files), "FID reference statistics", "image", leave=False)
        for i in range(0, len(files), batch_size):
            self.metric.update(_inception_input(load_images(files[i : i + batch_size], size=INCEPTION_SIZE)), real=True)
            bar.update(min(batch_size, len(files) - i))
        bar.close()

    def save_reference(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: getattr(self.metric, k).contiguous() for k in self.STATS_KEYS}, path, metadata={"features": "torch-fidelity inception-v3-compat", "dims": str(self.dims)})

    def score(self, images: torch.Tensor, batch_size: int = 32) -> float:
        self.metric.reset()  # fake features only: the reference is kept (reset_real_features=False)
        for i in range(0, len(images), batch_size):
            self.metric.update(_inception_input(images[i : i + batch_size]), real=False)
        return float(self.metric.compute())


def _inception_input(images: torch.Tensor) -> torch.Tensor:
    """Real and generated images take the same path: centre-cropped to a square, antialiased resize to 299 px, 8 bits."""
    return (_square_resize(images, INCEPTION_SIZE).clamp(0, 1) * 255).round().to(torch.uint8)


def _inception_weights(path: str | Path | None) -> Path:
    """The FID InceptionV3 weights: a given file, or torch-fidelity's file in the torch hub cache."""
    if path is None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not path.is_file():
            raise UserError(
                f"FID needs the InceptionV3 weights ({INCEPTION_FILE}, from torch-fidelity's releases), which are not in "
                f"{path.parent}. Download that file on a machine with network access and put it there, "
                "or pass its location with --fid-weights PATH."
            )
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--fid-weights {path}: no such file")
    try:  # torch-fidelity unpickles the file fully: accept only plain tensors
        torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise UserError(f"--fid-weights {path}: not a plain PyTorch state dict ({type(exc).__name__}); refusing to unpickle it") from None
    return path


# --- the command ---------------------------------------------------------------
def evaluate(
    generators: Sequence[str],
    prompts_path: str | Path,
    metrics: Sequence[str],
    out: str | Path,
    registry,
    reference: str | Path | None = None,
    steps: int | None = None,
    n: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    metric_options: Sequence[str] = (),
    fid_weights: str | Path | None = None,
    fid_dims: int = 2048,
    ema: bool = False,
) -> list[Row]:
    from rewardkit.prompts import read_prompts

    out = Path(out)
    prompts, styles = read_prompts(prompts_path)
    metrics = resolve_metrics(metrics, registry)
    specs = [parse_generator_spec(g, ema) for g in generators]  # all checked before any model loads
    fid = None
    if "fid" in metrics.values():
        if reference is None:
            raise UserError("--metrics includes fid, which needs --reference: a folder of real images, or statistics saved with --save-reference-stats")
        reference = Path(reference)
        if not reference.exists():
            raise UserError(f"--reference {reference}: no such file or folder")
        fid = FID(fid_weights, fid_dims)
        fid.add_reference(reference)
    rewards = build_rewards({label: name for label, name in metrics.items() if name != "fid"}, registry, metric_options)

    rows = []
    for spec in specs:
        paths, ms, key = generate_or_reuse(spec, registry, prompts, n, steps, seed, out, batch_size)
        expanded_prompts = [p for p in prompts for _ in range(n)]
        expanded_styles = [s for s in styles for _ in range(n)]
        scores, fid_value = score_files(rewards, fid, paths, expanded_prompts, batch_size, spec.label)
        row = Row(spec.label, steps if steps is not None else _default_steps(spec, registry), ms_per_image=ms, images=str(paths[0].parent))
        row.metrics = {label: float(s.mean()) for label, s in scores.items()}
        if fid_value is not None:
            row.metrics["fid"] = fid_value
        for style in sorted({s for s in expanded_styles if s is not None}):
            mask = torch.tensor([s == style for s in expanded_styles])
            row.by_style[style] = {label: float(s[mask].mean()) for label, s in scores.items()}
        rows.append(row)
    write_table(rows, list(metrics), out)
    return rows


def build_rewards(names: dict[str, str], registry, metric_options: Sequence[str]) -> dict:
    """{label: the built reward} for {label: reward plugin}, with --metric-option LABEL.KEY=VALUE applied."""
    options: dict[str, dict] = {label: {} for label in names}
    for text in metric_options:
        keys, value = parse_override(text)
        label = keys[0] if keys[0] in options else ALIASES.get(keys[0], keys[0])  # a label as given, before an alias
        if label not in options or len(keys) != 2:
            raise UserError(f"--metric-option {text!r}: expected METRIC.KEY=VALUE for one of the chosen metrics ({', '.join(names)})")
        options[label][keys[1]] = value
    from rewardkit.rewards.base import standalone_reward

    return {label: standalone_reward(registry.get("reward", name), options[label], label, source="--metric-option")
            for label, name in names.items()}


def _default_steps(spec: GeneratorSpec, registry) -> int | None:
    from rewardkit.recipe import load_recipe

    if spec.checkpoint is None:
        for pair in spec.text.split(",")[1:]:
            key, _, value = pair.partition("=")
            if key.strip() == "num_steps":
                return int(value)
        return None
    recipe = load_recipe(spec.checkpoint[0] / "recipe.toml", registry=registry)
    return getattr(recipe.generator.options, "num_steps", None)


def write_table(rows: list[Row], metrics: Sequence[str], out: Path) -> None:
    """OUT/results.md (the paper's layout) and OUT/results.json (the same means, unrounded)."""
    out.mkdir(parents=True, exist_ok=True)
    ordered = [m for m in PAPER_COLUMNS if m in metrics] + [m for m in metrics if m not in PAPER_COLUMNS]
    titles = [PAPER_COLUMNS.get(m, m) for m in ordered]
    lines = ["| Model | Steps | " + " | ".join(titles) + " | ms / image |", "|---" * (len(ordered) + 3) + "|"]
    for row in rows:
        cells = [_fmt(row.metrics.get(m)) for m in ordered]
        lines.append(f"| {row.label} | {row.steps if row.steps is not None else ''} | " + " | ".join(cells) + f" | {_fmt(row.ms_per_image, 1)} |")
    styles = sorted({s for row in rows for s in row.by_style})
    for m in [m for m in ordered if m != "fid"] if styles else []:
        lines += ["", f"{PAPER_COLUMNS.get(m, m)} by style", "", "| Model | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
        for row in rows:
            lines.append(f"| {row.label} | " + " | ".join(_fmt(row.by_style.get(s, {}).get(m)) for s in styles) + " |")
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    data = {"columns": {m: PAPER_COLUMNS.get(m, m) for m in ordered}, "rows": [row.__dict__ for row in rows]}
    write_text_atomic(out / "results.json", json.dumps(data, indent=2))


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"
