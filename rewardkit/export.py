"""`rewardkit export`: a trained generator as files people already load.

    rewardkit export RUN_DIR --format diffusers --out DIR   # a full pipeline folder
    rewardkit export RUN_DIR --format lora --out DIR        # LoRA weights for load_lora_weights

The generator is rebuilt exactly as `rewardkit sample` rebuilds it (recipe +
newest checkpoint), then written out by `export_generator`: diffusion
generators (sd, sdxl, sd3, flux, zimage) export to diffusers formats. Next to the weights,
`rewardkit_export.json` records the sampling settings (steps, timesteps,
eta, guidance, size) that reproduce the generator's images with plain
diffusers; a LoRA export also carries the matching scheduler in
`scheduler/`. See docs/generators.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from rewardkit.durable import writable_dir, write_text_atomic
from rewardkit.errors import UserError
from rewardkit.generators.diffusion import DTYPES, DiffusionGenerator
from rewardkit.rundir import load_generator

FORMATS = ("diffusers", "lora")


def export(path: str | Path, format: str, out: str | Path, registry, ema: bool = False) -> Path:
    """Export the generator of a run directory (or checkpoint folder) to `out` (`ema`: its averaged weights); returns `out`."""
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    writable_dir(out, "--out")  # before the model loads
    generator, _, checkpoint = load_generator(path, registry=registry, ema=ema)
    if not isinstance(generator, DiffusionGenerator):
        raise UserError(f"generator '{generator.name}' cannot be exported: only the diffusion generators "
                        "(sd, sdxl, sd3, flux, zimage) write diffusers formats")
    export_generator(generator, out, format)
    return out


def export_generator(generator: DiffusionGenerator, out: str | Path, format: str) -> Path:
    """Write a diffusers pipeline folder ('diffusers') or diffusers-loadable LoRA weights ('lora')."""
    out = Path(out)
    training = generator.options.training
    if training == "noise":
        raise UserError(
            "this run optimized input noise (training = 'noise') and left every weight as it was: there is no model "
            "to export. Its images are in the run directory's images/ folder; the model is generator.model itself."
        )
    if format == "lora":
        if training != "lora":
            raise UserError("--format lora needs a generator trained with training = 'lora'; this one was fully fine-tuned: use --format diffusers")
        _export_lora(generator, out)
    elif format == "diffusers":
        _export_pipeline(generator, out)
    else:
        raise UserError(f"unknown export format {format!r}; choose 'diffusers' or 'lora'")
    settings = generator.sampling_settings() | {"format": format}
    write_text_atomic(out / "rewardkit_export.json", json.dumps(settings, indent=2))
    return out


def _export_pipeline(gen: DiffusionGenerator, out: Path) -> None:
    """Save the pipeline with the trained denoiser (LoRA merged) and the matching scheduler.

    Weights keep their storage dtype: weights_dtype for frozen and merged
    weights, float32 for a fully fine-tuned denoiser.
    """
    import copy

    pipe = gen.pipe
    if gen.options.training == "lora":
        denoiser = copy.deepcopy(gen.denoiser).float()  # merge in float32, leave the live model as is
        denoiser.fuse_lora()
        denoiser.unload_lora()
        denoiser.to(DTYPES[gen.options.weights_dtype])
    else:
        denoiser = gen.denoiser
    original = {gen.denoiser_name: gen.denoiser, "scheduler": pipe.scheduler}
    pipe.register_modules(**{gen.denoiser_name: denoiser, "scheduler": gen.export_scheduler()})
    try:
        pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.register_modules(**original)


def _export_lora(gen: DiffusionGenerator, out: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(gen.denoiser).items()}
    metadata = gen.denoiser.peft_config["default"].to_dict()
    type(gen.pipe).save_lora_weights(out, **{f"{gen.denoiser_name}_lora_layers": state, f"{gen.denoiser_name}_lora_adapter_metadata": metadata})
    gen.export_scheduler().save_pretrained(out / "scheduler")
