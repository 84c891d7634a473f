"""`rewardkit export`: a trained generator as files people already load.

    rewardkit export RUN_DIR --format diffusers --out DIR                      # a full pipeline folder
    rewardkit export RUN_DIR --format lora --out DIR                           # LoRA weights for load_lora_weights
    rewardkit export RUN_DIR --format lora --lora-layout kohya --out DIR       # the same LoRA for ComfyUI / A1111 (sd, sdxl)

The generator is rebuilt exactly as `rewardkit sample` rebuilds it (recipe +
newest checkpoint), then written out by `export_generator`: diffusion
generators (sd, sdxl, sd3, flux, zimage) export to diffusers formats. Next to the weights,
`rewardkit_export.json` records the sampling settings (steps, timesteps,
eta, guidance, size) that reproduce the generator's images with plain
diffusers; a LoRA export also carries the matching scheduler in
`scheduler/`. `README.md` is a Hugging Face model card (`model_card`): YAML
front matter (licence inherited from the base, base_model, tags), the
method and recipe, the sampling settings, the run's newest sample grid
(copied as `sample_grid.png`) and how to load the files.

Everything is written into a hidden sibling folder and renamed to `--out`
only when complete, so a crash or a full disk never leaves a folder that
looks like a finished export. See docs/generators.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from rewardkit.durable import WRITE_ERRORS, atomic_write, failure, fsync, writable_dir, write_text_atomic
from rewardkit.errors import UserError, WriteFailed
from rewardkit.generators.diffusion import DTYPES, DiffusionGenerator
from rewardkit.rundir import generator_from_checkpoint, recipe_table, resolve_run_path, sample_grids

FORMATS = ("diffusers", "lora")
LORA_LAYOUTS = ("diffusers", "kohya")
# The pipelines whose UNet LoRA diffusers reads back from the kohya layout (lora_conversion_utils); the
# transformer families' kohya layouts name the original fused blocks (FLUX's qkv), which a LoRA on
# diffusers' separate projections cannot be written as.
KOHYA_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
SETTINGS_FILE, CARD_FILE, GRID_FILE = "rewardkit_export.json", "README.md", "sample_grid.png"
# The packaged testbed teacher's reserved name (rewardkit.testbed.data.PACKAGED, which the core does not import:
# the testbed is a plugin; tests/test_model_card.py checks the two agree).
TESTBED_MODEL = "rewardkit-testbed"


@dataclass
class RunSource:
    """Where an exported generator comes from: what its model card describes."""

    run_dir: Path
    checkpoint: Path
    ema: bool = False


def export(path: str | Path, format: str, out: str | Path, registry, ema: bool = False, lora_layout: str | None = None) -> Path:
    """Export the generator of a run directory (or checkpoint folder) to `out` (`ema`: its averaged weights); returns `out`."""
    layout = _layout(format, lora_layout)
    out = writable_dir(_check_out(Path(out)), "--out")  # before the model loads
    run_dir, checkpoint = resolve_run_path(path)
    _check_recipe(run_dir, registry, format, layout)  # refusals that the recipe alone decides, before the model loads
    generator, _, checkpoint = generator_from_checkpoint(run_dir, checkpoint, registry, ema)
    export_generator(generator, out, format, lora_layout=layout, source=RunSource(run_dir, checkpoint, ema))
    return out


def _layout(format: str, lora_layout: str | None) -> str:
    """The LoRA layout to write, once `format` and `lora_layout` are known to go together."""
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if lora_layout is None:
        return "diffusers"
    if lora_layout not in LORA_LAYOUTS:
        raise UserError(f"--lora-layout {lora_layout!r}: choose one of {', '.join(LORA_LAYOUTS)}")
    if format != "lora" and lora_layout != "diffusers":
        raise UserError(f"--lora-layout {lora_layout} is a layout of LoRA weights: use it with --format lora")
    return lora_layout


def _check_out(out: Path) -> Path:
    """--out, resolved: a new or empty folder, and not the current folder or one holding it (the export replaces the
    folder as a whole)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder (a new one is created)")  # writable_dir's words
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    here = Path.cwd()
    if out.resolve() in (here, *here.parents):  # '.', '..'
        raise UserError(f"--out {out} is the current folder (or holds it); name a new folder, e.g. --out exported/")
    return out.resolve()


def _not_exportable(name: str) -> UserError:
    return UserError(f"generator '{name}' cannot be exported: only the diffusion generators (sd, sdxl, sd3, flux, zimage) "
                     "write diffusers formats")


def _refusal(cls: type, training: str, format: str, layout: str) -> str | None:
    """Why a generator of class `cls` trained as `training` cannot be exported this way (None: it can)."""
    if training == "noise":
        return ("this run optimized input noise (training = 'noise') and left every weight as it was: there is no model "
                "to export. Its images are in the run directory's images/ folder; the model is generator.model itself.")
    if format == "lora" and training != "lora":
        return "--format lora needs a generator trained with training = 'lora'; this one was fully fine-tuned: use --format diffusers"
    if layout == "kohya" and cls.pipeline_class not in KOHYA_PIPELINES:
        return (f"--lora-layout kohya is written for the UNet generators sd (SD 1.x / 2.x) and sdxl, whose kohya layout "
                f"diffusers, ComfyUI and A1111 read; the '{cls.name}' generator ({cls.pipeline_class}) is not one of them: "
                "export it with --lora-layout diffusers")
    return None


def _check_recipe(run_dir: Path, registry, format: str, layout: str) -> None:
    from rewardkit.recipe import load_recipe

    spec = load_recipe(run_dir / "recipe.toml", registry=registry).generator
    if not (isinstance(spec.cls, type) and issubclass(spec.cls, DiffusionGenerator)):
        raise _not_exportable(spec.cls.name)
    if (problem := _refusal(spec.cls, spec.options.training, format, layout)) is not None:
        raise UserError(problem)


def export_generator(generator: DiffusionGenerator, out: str | Path, format: str, lora_layout: str = "diffusers",
                     source: RunSource | None = None, progress: bool = True) -> Path:
    """Write a diffusers pipeline folder ('diffusers') or LoRA weights ('lora', in diffusers' or kohya's layout),
    with rewardkit_export.json and a model card (the recipe and sample grid of `source` when given).

    `progress`: a progress bar while a pipeline is saved (as rewardkit.images.progress_bar decides; False: none)."""
    if not isinstance(generator, DiffusionGenerator):
        raise _not_exportable(generator.name)
    layout = _layout(format, lora_layout)
    if (problem := _refusal(type(generator), generator.options.training, format, layout)) is not None:
        raise UserError(problem)
    out = _check_out(Path(out))

    # Written beside `out` and renamed onto it once complete: a crash leaves no folder that looks finished
    # (a kill leaves this hidden .partial folder, which no loader takes for an export).
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    weight_name = None
    try:
        stage.mkdir()
        if format == "diffusers":
            _export_pipeline(generator, stage, progress)
        elif layout == "kohya":
            weight_name = f"{out.name}.safetensors"  # UIs list LoRAs by file name: the folder's, not a generic one
            _export_kohya(generator, stage / weight_name)
        else:
            weight_name = DIFFUSERS_LORA_FILE
            _export_lora(generator, stage)
        settings = generator.sampling_settings() | {"format": format}
        if format == "lora":
            settings |= {"lora_layout": layout, "weight_name": weight_name}
        grid = _copy_grid(source, stage / GRID_FILE) if source is not None else None
        card = model_card(generator, format, layout=layout, weight_name=weight_name, source=source, grid=grid)
        write_text_atomic(stage / CARD_FILE, card)
        write_text_atomic(stage / SETTINGS_FILE, json.dumps(settings, indent=2))  # last, as before: the folder is complete
        _flush(stage)
        if out.exists():
            out.rmdir()  # the empty folder --out named (a rename replaces no folder on every platform)
        os.replace(stage, out)
        fsync(out.parent)
    except WRITE_ERRORS as exc:
        raise WriteFailed(f"writing the export to {out} failed: {failure(exc)}; nothing was left there") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # renamed away after a success; what a failure left
    return out


def _flush(folder: Path) -> None:
    """Every file and folder under `folder` on disk before the rename that makes the export visible
    (save_pretrained does not flush its files)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


def _export_pipeline(gen: DiffusionGenerator, out: Path, progress: bool = True) -> None:
    """Save the pipeline with the trained denoiser (LoRA merged) and the matching scheduler.

    Weights keep their storage dtype: weights_dtype for frozen and merged
    weights, float32 for a fully fine-tuned denoiser.
    """
    import copy

    import torch

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
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        total = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
        with _quiet_library_bars(), written_bytes_bar(out, total, "exporting pipeline", enabled=progress):
            pipe.save_pretrained(out, safe_serialization=True)
    finally:
        pipe.register_modules(**original)


@contextlib.contextmanager
def _quiet_library_bars():
    """diffusers' and transformers' own per-component bars off while the export shows one bar for the whole save."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def written_bytes_bar(folder: Path, total: int, desc: str, enabled: bool = True, file=None, interval: float = 0.5):
    """A progress bar of the bytes under `folder` against `total`, polled from a thread while the block writes there
    (save_pretrained reports no progress of its own); shown as rewardkit.images.progress_bar decides."""
    from rewardkit.images import progress_bar

    bar = progress_bar(total, desc, "B", enabled=enabled, unit_scale=True, unit_divisor=1024, file=file)
    stop = threading.Event()

    def poll():
        while not stop.wait(interval):
            bar.update(max(0, min(total, _folder_bytes(folder)) - bar.n))

    thread = None if bar.disable else threading.Thread(target=poll, daemon=True)
    if thread is not None:
        thread.start()
    finished = False
    try:
        yield bar
        finished = True
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        if finished:
            bar.update(total - bar.n)  # headers and shared tensors make the files' size only close to the total
        bar.close()


def _folder_bytes(folder: Path) -> int:
    size = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a temporary file renamed away meanwhile
                size += os.stat(os.path.join(root, name)).st_size
    return size


def _export_lora(gen: DiffusionGenerator, out: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(gen.denoiser).items()}
    metadata = gen.denoiser.peft_config["default"].to_dict()
    type(gen.pipe).save_lora_weights(out, **{f"{gen.denoiser_name}_lora_layers": state, f"{gen.denoiser_name}_lora_adapter_metadata": metadata})
    gen.export_scheduler().save_pretrained(out / "scheduler")


# --- the kohya layout -----------------------------------------------------------------------------------------------
def kohya_state_dict(gen: DiffusionGenerator) -> dict:
    """The UNet LoRA in kohya-ss's layout: `lora_unet_<module path, dots as underscores>.lora_down.weight` (peft's A),
    `.lora_up.weight` (B) and `.alpha`, a scalar with alpha / rank = peft's scaling (= lora_alpha without rsLoRA).
    Module paths are diffusers' UNet names: the spelling kohya-ss itself uses for SD 1.x / 2.x, and one that ComfyUI
    (its diffusers-to-UNet key map), A1111 and diffusers also read for SDXL, where kohya-ss's own SDXL trainer spells
    the original (sgm) blocks instead. rewardkit trains no text-encoder LoRA, so there are no lora_te_ keys."""
    import torch
    from peft.tuners.lora import LoraLayer

    state = {}
    for name, module in gen.denoiser.named_modules():
        if not (isinstance(module, LoraLayer) and "default" in module.lora_A):
            continue
        if module.use_dora.get("default", False):
            raise UserError("--lora-layout kohya: this adapter uses DoRA, which the kohya layout written here does not carry; use --lora-layout diffusers")
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().float().cpu().contiguous()
        state[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().float().cpu().contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(module.scaling["default"]) * module.r["default"], dtype=torch.float32)
    return state


def _check_kohya_round_trip(gen: DiffusionGenerator, state: dict) -> None:
    """Refuse a kohya file that diffusers' own kohya conversion would load onto other modules (its name heuristics
    cannot undo every underscore: SDXL's add_embedding.linear_1, for one), rather than write one that loads wrong."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict

    converted, _ = type(gen.pipe).lora_state_dict(dict(state), unet_config=gen.denoiser.config)
    back = set(convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()}))
    trained = set(get_peft_model_state_dict(gen.denoiser))
    if back != trained:
        lost = sorted({k.rsplit(".lora_", 1)[0] for k in trained ^ back})
        raise UserError(f"--lora-layout kohya: diffusers' kohya conversion would not load these LoRA modules back onto "
                        f"themselves: {', '.join(lost[:8])}{' ...' if len(lost) > 8 else ''}; export with --lora-layout "
                        "diffusers, or train without them (generator.lora_target_modules)")


def _export_kohya(gen: DiffusionGenerator, path: Path) -> None:
    from safetensors.torch import save_file

    state = kohya_state_dict(gen)
    _check_kohya_round_trip(gen, state)
    config = gen.denoiser.peft_config["default"]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)}
    if gen.pipeline_class == "StableDiffusionXLPipeline":
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    elif (dim := gen.denoiser.config.cross_attention_dim) in (768, 1024):  # SD 1.x's CLIP-L, SD 2.x's OpenCLIP-H
        metadata["ss_base_model_version"] = "sd_v1" if dim == 768 else "sd_v2"
    save_file(state, str(path), metadata=metadata)
    gen.export_scheduler().save_pretrained(path.parent / "scheduler")


# --- the model card ---------------------------------------------------------------------------------------------------
@dataclass
class Licence:
    """A base model's licence as model-card metadata: `license` (a Hub identifier, or 'other' with `name` and `link`)."""

    license: str
    name: str | None = None
    link: str | None = None
    source: str | None = None
    """Where it was learnt ('table', 'card', 'testbed'); None: not known, `license` is 'other'."""


def _sai_community(repo: str) -> Licence:
    return Licence("other", "stabilityai-ai-community", f"https://huggingface.co/{repo}/blob/main/LICENSE.md", "table")


# The licences of the bases rewardkit's recipes name, as each base's own Hub card declares them (looked up 2026-12;
# keys are Hub repo ids, compared case-insensitively as the Hub does). A base that is not here is looked up in its
# own model card when one is on this machine.
KNOWN_LICENCES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Licence("creativeml-openrail-m", source="table"),
    "runwayml/stable-diffusion-v1-5": Licence("creativeml-openrail-m", source="table"),
    "stabilityai/stable-diffusion-xl-base-1.0": Licence("openrail++", source="table"),
    "stabilityai/stable-diffusion-3-medium-diffusers": _sai_community("stabilityai/stable-diffusion-3-medium"),
    "stabilityai/stable-diffusion-3.5-medium": _sai_community("stabilityai/stable-diffusion-3.5-medium"),
    "stabilityai/stable-diffusion-3.5-large": _sai_community("stabilityai/stable-diffusion-3.5-large"),
    "black-forest-labs/flux.1-dev": Licence("other", "flux-1-dev-non-commercial-license",
                                            "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md", "table"),
    "black-forest-labs/flux.1-schnell": Licence("apache-2.0", source="table"),
    "tongyi-mai/z-image-turbo": Licence("apache-2.0", source="table"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(model: str) -> bool:
    """A Hub repo id ('owner/name') rather than a local file or folder."""
    return bool(_HUB_ID.match(model)) and not Path(model).expanduser().exists()


def base_card_metadata(model: str, revision: str | None = None) -> dict:
    """The YAML front matter of the base model's own card if it is on this machine (a local folder's README.md, or
    a Hub model's README.md in the Hugging Face cache); {} otherwise. Nothing is downloaded."""
    from huggingface_hub.repocard import metadata_load

    readme = None
    path = Path(model).expanduser()
    if path.is_dir():
        readme = path / CARD_FILE
    elif is_hub_id(model):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model, CARD_FILE, revision=revision)
        except Exception:  # noqa: BLE001 - an id the cache cannot hold, a damaged cache: no card then
            cached = None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception:  # noqa: BLE001 - a card whose front matter does not parse is no card
        return {}


def base_licence(model: str, revision: str | None = None) -> Licence:
    """The licence an export of a model trained from `model` inherits: the packaged testbed's, the table's, the base's
    own card's, or Licence('other') with source None (the card then tells the user to check it)."""
    if model == TESTBED_MODEL:
        return Licence("apache-2.0", source="testbed")
    if model.lower() in KNOWN_LICENCES:
        return KNOWN_LICENCES[model.lower()]
    meta = base_card_metadata(model, revision)
    if isinstance(meta.get("license"), str):
        return Licence(meta["license"], meta.get("license_name"), meta.get("license_link"), "card")
    return Licence("other")


FAMILY_NAMES = {"StableDiffusionPipeline": "Stable Diffusion", "StableDiffusionXLPipeline": "Stable Diffusion XL",
                "StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "FLUX.1", "ZImagePipeline": "Z-Image"}
FAMILY_TAGS = {"StableDiffusionPipeline": "stable-diffusion", "StableDiffusionXLPipeline": "stable-diffusion-xl",
               "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "ZImagePipeline": "z-image"}


def method_of(recipe: dict) -> tuple[str, list[str]]:
    """(a sentence naming the method, its tags) from a run's recipe: which estimators its rewards use, and the
    regularizers and options that make R0 into R0+ or DRaFT-K (docs/methods.md)."""
    rewards = recipe.get("rewards", {})
    estimators = {r.get("estimator", "pathwise") for r in rewards.values()}
    regularizers = {r.get("type", label) for label, r in recipe.get("regularizers", {}).items()}
    parts, tags = [], []
    if "pathwise" in estimators:
        if "intermediate_step" in regularizers:
            parts.append("R0+ (reward gradients through the few-step sampler, with intermediate supervision)")
            tags.append("r0-plus")
        elif recipe.get("generator", {}).get("grad_steps") is not None:
            parts.append("reward-gradient fine-tuning through the last K sampler steps (DRaFT-K / AlignProp style)")
            tags.append("draft-k")
        else:
            parts.append("R0 (reward gradients through the few-step sampler)")
            tags.append("r0")
    if "score_function" in estimators:
        parts.append("GRPO (a policy gradient on score-function rewards)")
        tags.append("grpo")
    return " plus ".join(parts), tags


def _cell(value) -> str:
    """A value in a Markdown table cell: JSON for anything but plain strings, pipes escaped."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _py(value) -> str:
    """A Python literal for the card's code (JSON strings are Python strings)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _options(table: dict, skip: tuple[str, ...]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items() if k not in skip) or "-"


ABRIDGE = 8  # list entries (prompts) the card's copy of the recipe keeps


def _abridged(recipe: dict) -> tuple[dict, list[str]]:
    """The recipe as the card embeds it: without run.dir (a path on the training machine) and with long lists
    (prompt lists of thousands) cut to their first entries; and notes saying what was cut."""
    notes = []

    def walk(node, path):
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items() if not (path == "run" and k == "dir")}
        if isinstance(node, list) and len(node) > ABRIDGE:
            notes.append(f"`{path}`: the first {ABRIDGE} of {len(node)} entries")
            return node[:ABRIDGE]
        return node

    return walk(recipe, ""), notes


def _copy_grid(source: RunSource, dest: Path) -> dict | None:
    """Copy the run's sample grid of the exported checkpoint's step (else the newest before it) to `dest`;
    returns {'step': ..., 'prompts': ...} or None when the run wrote none."""
    step = _checkpoint_step(source.checkpoint)
    grids = [(s, path) for s, path in sample_grids(source.run_dir) if step is None or s <= step]
    if not grids:
        return None
    grid_step, path = max(grids)
    with atomic_write(dest, f"the sample grid {dest}") as tmp:
        shutil.copyfile(path, tmp)
    return {"step": grid_step}


def _checkpoint_step(checkpoint: Path) -> int | None:
    try:
        return int(json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_recipe(source: RunSource | None) -> dict:
    return recipe_table(source.run_dir) if source is not None else {}


def model_card(gen: DiffusionGenerator, format: str, layout: str = "diffusers", weight_name: str | None = None,
               source: RunSource | None = None, grid: dict | None = None) -> str:
    """README.md of an export, in the Hugging Face model-card convention: YAML front matter (huggingface_hub's
    ModelCardData) and a Markdown body."""
    from huggingface_hub import ModelCardData

    from rewardkit import __version__
    opts = gen.options
    model = opts.model
    recipe = _read_recipe(source)
    method, method_tags = method_of(recipe) if recipe else ("", [])
    licence = base_licence(model, opts.revision)
    lineage = None if is_hub_id(model) or model == TESTBED_MODEL else base_card_metadata(model, opts.revision).get("base_model")
    base_model = model if is_hub_id(model) else lineage  # the Hub's model tree wants Hub ids: a local base's own base
    is_lora = format == "lora"
    family = FAMILY_NAMES.get(gen.pipeline_class, gen.name)

    tags = ["text-to-image", "diffusers", *(["lora"] if is_lora else []), "rewardkit", *method_tags]
    tags += [t for t in (FAMILY_TAGS.get(gen.pipeline_class), "rewardkit-testbed" if model == TESTBED_MODEL else None) if t]
    data = ModelCardData(
        license=licence.license, license_name=licence.name, license_link=licence.link, base_model=base_model,
        base_model_relation=("adapter" if is_lora else "finetune") if base_model else None,
        library_name="diffusers", pipeline_tag="text-to-image", tags=tags,
    )

    if model == TESTBED_MODEL:
        base_text = "rewardkit's packaged digits testbed teacher (`rewardkit-testbed`)"
    elif is_hub_id(model):
        base_text = f"[{model}](https://huggingface.co/{model})"
    else:
        base_text = f"the local model `{model}`" + (f" (itself derived from `{lineage}`)" if isinstance(lineage, str) else "")
    kind = {"diffusers": "The full diffusers pipeline", "lora": "LoRA weights"}[format]
    intro = f"{kind} of {base_text}"
    intro += f", post-trained with rewardkit {__version__}" + (f" by {method}." if method else ".")
    if format == "diffusers" and opts.training == "lora":
        intro += " The LoRA it trained is merged into the weights."

    sections = [f"# {family} {'LoRA' if is_lora else 'fine-tune'} trained with rewardkit", intro]
    sections += _recipe_sections(gen, recipe, source)
    sections += _sampling_section(gen)
    if grid is not None:
        prompts = recipe.get("prompts", {}).get("sample") or []
        caption = f"The run's sample grid at step {grid['step']}"
        if prompts:
            caption += ", one image per sample prompt (left to right, top to bottom; fixed noise): " + "; ".join(f"\"{p}\"" for p in prompts)
        if source is not None and source.ema:
            caption += ". It shows the training weights; this export holds their moving average (--ema)"
        sections += ["## Samples", f"![sample grid]({GRID_FILE})", caption + "."]
    sections += _loading_section(gen, format, layout, weight_name)
    sections += _licence_section(model, licence, base_text)
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _recipe_sections(gen: DiffusionGenerator, recipe: dict, source: RunSource | None) -> list[str]:
    if not recipe:
        return []
    import tomli_w

    opts, run, optim = gen.options, recipe.get("run", {}), recipe.get("optimizer", {})
    step = _checkpoint_step(source.checkpoint) if source is not None else None
    if opts.training == "lora":
        trained = (f"LoRA on the {gen.denoiser_name}: rank {opts.lora_rank}, alpha {opts.lora_alpha or opts.lora_rank:g}, "
                   f"modules {', '.join(opts.lora_target_modules)}")
    else:
        trained = f"every weight of the {gen.denoiser_name}"
    rows = [
        ["generator", f"`{gen.name}` on `{opts.model}`"],
        ["trained", trained],
        ["frozen weights dtype", opts.weights_dtype],
        ["steps", f"{step} of {run.get('steps')}" if step is not None else run.get("steps")],
        ["batch size", f"{run.get('batch_size')} x {run.get('gradient_accumulation_steps', 1)} accumulated"],
        ["optimizer", _options(optim, ())],
        ["training prompts", len(recipe.get("prompts", {}).get("train", []))],
        ["mixed precision", run.get("mixed_precision", "no")],
        ["seed", run.get("seed", 0)],
    ]
    if opts.grad_steps is not None:
        rows.insert(3, ["gradient through", f"the last {opts.grad_steps} sampler steps"])
    if source is not None and source.ema:
        rows.append(["weights", "the moving average of the trained weights (optimizer.ema_decay)"])
    rewards = [[label, r.get("type", label), r.get("weight", 1.0), r.get("estimator", "pathwise"),
                _options(r, ("type", "weight", "estimator"))] for label, r in recipe.get("rewards", {}).items()]
    regs = [[label, r.get("type", label), r.get("weight", "-"), _options(r, ("type", "weight"))]
            for label, r in recipe.get("regularizers", {}).items()]
    out = ["## Method and recipe", _table(["training", "value"], rows),
           "Rewards (the objective is their weighted sum):", _table(["reward", "plugin", "weight", "estimator", "options"], rewards),
           "Regularizers:", _table(["regularizer", "plugin", "weight", "options"], regs) if regs else "none."]
    if "policy_gradient" in recipe:
        out += [f"Policy gradient (`[policy_gradient]`): {_options(recipe['policy_gradient'], ())}."]
    if "eval" in recipe:
        ev = recipe["eval"]
        out += [f"Held-out evaluation during training: {', '.join(ev.get('rewards', {}))} on {len(ev.get('prompts', []))} prompts."]
    embedded, notes = _abridged(recipe)
    note = "The run's `recipe.toml`, without `run.dir`" + ("; abridged: " + "; ".join(notes) if notes else "") + ":"
    out += ["<details>\n<summary>recipe.toml</summary>\n\n" + note + "\n\n```toml\n" + tomli_w.dumps(embedded).strip() + "\n```\n\n</details>"]
    return out


_SHOWN = ("num_inference_steps", "timesteps", "guidance_scale", "negative_prompt", "eta", "height", "width")


def _sampling_section(gen: DiffusionGenerator) -> list[str]:
    s = gen.sampling_settings()
    scheduler = gen.export_scheduler()
    spacing = scheduler.config.get("timestep_spacing")
    rows = [
        ["steps (K)", s["num_inference_steps"]],
        ["timesteps", ", ".join(f"{t:g}" for t in s["timesteps"])],
        ["guidance scale", s["guidance_scale"]],
        ["negative prompt", s["negative_prompt"] or "(empty)"],
        ["eta", s["eta"]],
        ["resolution", f"{s['width']} x {s['height']} (width x height)"],
        ["scheduler", type(scheduler).__name__ + (f", timestep_spacing = {spacing}" if spacing else "")],
    ]
    rows += [[k, v] for k, v in s.items() if k not in _SHOWN + ("generator", "base_model", "pipeline_call")]
    return ["## Sampling settings",
            "The generator was trained to sample with these settings; `rewardkit_export.json` holds them with "
            "`pipeline_call`, the pipeline arguments that reproduce its images.", _table(["setting", "value"], rows)]


def _loading_section(gen: DiffusionGenerator, format: str, layout: str, weight_name: str | None) -> list[str]:
    cls, opts = gen.pipeline_class, gen.options
    call = {k: tuple(v) if isinstance(v, list) else v for k, v in gen.pipeline_call().items()}  # SDXL wants size tuples
    args = ", ".join(f"{k}={_py(v)}" for k, v in call.items())
    no_t5 = getattr(opts, "text_encoder_3", True) is False
    extra = ", text_encoder_3=None, tokenizer_3=None" if no_t5 else ""  # SD3 trained without T5: its embeddings zero
    here = '"path/to/this/folder"  # or the Hub repo id it is uploaded to'
    # bfloat16 on a GPU (every family runs in it), float32 on a CPU (where half-precision matmuls are missing or slow)
    setup = ["", 'device = "cuda" if torch.cuda.is_available() else "cpu"',
             'dtype = torch.bfloat16 if device == "cuda" else torch.float32', f"folder = {here}"]
    extra = ", dtype=dtype" + extra
    lines = ["import torch"]
    if format == "diffusers":
        lines += [f"from diffusers import {cls}", *setup, f"pipe = {cls}.from_pretrained(folder{extra})"]
    else:
        scheduler = gen.export_scheduler()
        replace = dict(scheduler.config) != dict(gen.pipe.scheduler.config)
        imports = sorted({cls, type(scheduler).__name__} if replace else {cls})
        lines += [f"from diffusers import {', '.join(imports)}"]
        if opts.model == TESTBED_MODEL:
            lines += ["from rewardkit.testbed.data import weights_dir", *setup,
                      f"pipe = {cls}.from_pretrained(weights_dir() / \"teacher\"{extra})"]
        elif opts.model.endswith(".safetensors"):
            lines += [*setup, f"pipe = {cls}.from_single_file({_py(opts.model)}{extra})"]
        else:
            lines += [*setup, f"pipe = {cls}.from_pretrained({_py(opts.model)}{extra})"]
        lines += [f"pipe.load_lora_weights(folder, weight_name={_py(weight_name)})"]
        if replace:
            lines += [f"pipe.scheduler = {type(scheduler).__name__}.from_pretrained(folder, subfolder=\"scheduler\")  # the sampler it was trained with"]
    lines += ["pipe.to(device)", f"image = pipe(\"a photo of a cat\", {args}).images[0]"]
    out = ["## How to use", "With diffusers:", "```python\n" + "\n".join(lines) + "\n```"]
    if format == "lora" and layout == "kohya":
        readers = "ComfyUI, AUTOMATIC1111 / Forge and kohya-ss" if cls == "StableDiffusionPipeline" else "ComfyUI and AUTOMATIC1111 / Forge"
        out += [f"`{weight_name}` is in the kohya-ss layout (`lora_unet_..._lora_down/up.weight` and `.alpha`) that {readers} "
                "read: copy it into their LoRA folder (ComfyUI: `models/loras`). Use the "
                f"steps, guidance and size above and the closest sampler to {type(gen.export_scheduler()).__name__} there; "
                "only diffusers reproduces the images exactly. diffusers reads the file through its own kohya conversion, as above."]
    elif format == "lora":
        out += [f"`{DIFFUSERS_LORA_FILE}` is in diffusers' layout, with the adapter's configuration (rank, alpha) in its "
                "metadata; `rewardkit export --format lora --lora-layout kohya` writes the kohya layout ComfyUI and AUTOMATIC1111 read (sd, sdxl)."]
    return out


def _licence_section(model: str, licence: Licence, base_text: str) -> list[str]:
    if licence.source is None:
        text = (f"rewardkit could not tell the licence of the base model, {base_text}: it is not in rewardkit's table of "
                "known bases and no model card with a `license` was found on this machine. This model is derived from it "
                "and is under its licence: check that licence before you use or share this model, and set `license` "
                "(with `license_name` and `license_link` where it is not a Hub identifier) in the front matter above.")
    elif licence.source == "testbed":
        text = ("The base is rewardkit's own packaged testbed teacher, released under the Apache-2.0 licence like rewardkit; "
                "this model is under the same licence (`apache-2.0`).")
    else:
        name = licence.name or licence.license
        link = f" ([{licence.link}]({licence.link}))" if licence.link else ""
        where = "the base model's own model card" if licence.source == "card" else "the base model's Hub card, as rewardkit's table of known bases records it"
        text = (f"This model is derived from {base_text} and inherits its licence: `{name}`{link}, from {where}. Its terms, "
                "use restrictions included, apply to this model: read them before you use or share it. rewardkit's own "
                "licence (Apache-2.0) covers rewardkit's code, not these weights.")
    return ["## Licence", text]
