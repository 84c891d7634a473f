"""`rewardkit export`: a trained generator as files people already load.

    rewardkit export RUN_DIR --format diffusers --out DIR   # a full pipeline folder
    rewardkit export RUN_DIR --format lora --out DIR        # LoRA weights for load_lora_weights

The generator is rebuilt exactly as `rewardkit sample` rebuilds it (recipe +
newest checkpoint), then asked to write itself out; generators that can be
exported implement `export(out, format)`. Next to the weights,
`rewardkit_export.json` records the sampling settings (steps, timesteps,
eta, guidance, size) that reproduce the generator's images with plain
diffusers; a LoRA export also carries the matching scheduler in
`scheduler/`. See docs/generators.md.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("diffusers", "lora")


def export(path: str | Path, format: str, out: str | Path, registry=None) -> Path:
    """Export the generator of a run directory (or checkpoint folder) to `out`; returns `out`."""
    from rewardkit.errors import UserError
    from rewardkit.sampling import load_generator

    if format not in FORMATS:
        raise UserError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    generator, _, checkpoint = load_generator(path, registry=registry)
    if not hasattr(generator, "export"):
        raise UserError(f"generator '{generator.name}' cannot be exported: only diffusion generators (sd, sd3) write diffusers formats")
    out.mkdir(parents=True, exist_ok=True)
    generator.export(out, format)
    return out
