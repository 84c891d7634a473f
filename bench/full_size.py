"""R0 training steps on the published architectures: peak memory and time per step, by phase.

    python bench/full_size.py                                   # this machine's table (see --rows)
    python bench/full_size.py --rows sd3:1024 --precision bf16  # SD3-Medium at 1024 px (a GPU: bench/gpu_check.sh)
    python bench/full_size.py --encoders                        # text encoders: forward time per prompt

SD 1.5, SDXL, SD3-Medium, SD3.5 Medium / Large, FLUX.1-dev and Z-Image-Turbo (denoiser,
VAE, text encoders: `FAMILIES`) are built from the configs in bench/configs/
(copied from the published model folders), with random weights: nothing is
downloaded. So
are the R0 rewards, HPS v2.1 (open_clip ViT-H-14), ImageReward (BLIP ViT-L +
BERT) and CLIP score (ViT-H-14). The generator, the regularizers and the
optimizer are the shipped recipe's (recipes/r0_sd15.toml, r0_sdxl.toml, ...) and
the steps are rewardkit's own `Optimizer`: LoRA and full fine-tuning, gradient
checkpointing on and off, in the run's precision.

Each configuration runs in its own process (one warm-up step, then --steps
timed ones), so one that runs out of memory is reported as such and the
others still run. Before starting one, its weights and optimizer state are
counted on the meta device; a configuration whose count exceeds the memory
available is not started. Reported per configuration:
- weights: frozen + trainable parameters + Adam's two moments + the gradients
  + weight L2's reference copy + the reward models, in their dtypes (GB);
- peak: during the timed steps, the CUDA allocator's peak, or on CPU the
  process's peak resident memory (VmHWM, reset after set-up);
- time per step (median) and its phases as the run logs them: generate
  (sampling with gradient, decode), rewards (forward + backward of each
  reward), backward (through the generator), and the rest (regularizers,
  the optimizer step): "optimizer".

SD3's text encoders are used with `text_encoders = "free"` (the prompts are
encoded at set-up and the encoders dropped), so a step never runs them;
`--t5-blocks` builds T5-XXL with fewer blocks (its output has the same
shape, so the steps are unchanged) where the full 4.8 B-parameter T5 does not
fit next to the rest. What the prompt cache saves per step is what
`--encoders` measures: each encoder's forward time per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RECIPES = HERE.parent / "recipes"
REWARDS = ("hps", "imagereward", "clip_score")
PROMPTS = ["a red bicycle leaning on a brick wall", "two cats asleep on a sofa", "a lighthouse at dusk, photograph", "a bowl of ramen"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 2**30


# ----------------------------------------------------------------------------- the models, from bench/configs
@contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


# Each family: its name in tables, its recipe, its generator, its pipeline, and where each component's published config
# is in bench/configs (copied from the published model folders; components the families share are stored once:
# CLIP-L, CLIP-G, T5-XXL and the 16-channel VAE with SD3 Medium's, SD 1.5's VAE and scheduler also serve SDXL).
# "clip" builds CLIPTextModel, "clip+proj" CLIPTextModelWithProjection, "t5:N" T5EncoderModel padding to N tokens,
# "qwen3:N" Qwen3Model padding to N tokens.
SD3_TEXT = {"text_encoder": ("sd3_medium/text_encoder", "clip+proj"), "text_encoder_2": ("sd3_medium/text_encoder_2", "clip+proj"),
            "text_encoder_3": ("sd3_medium/text_encoder_3", "t5:256")}
FAMILIES = {
    "sd15": {"name": "SD 1.5", "recipe": "r0_sd15", "pipeline": "StableDiffusionPipeline",
             "parts": {"unet": ("sd15/unet", None), "vae": ("sd15/vae", None), "text_encoder": ("sd15/text_encoder", "clip"),
                       "scheduler": ("sd15/scheduler", None)},
             "extra": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}},
    "sdxl": {"name": "SDXL", "recipe": "r0_sdxl", "pipeline": "StableDiffusionXLPipeline",
             "parts": {"unet": ("sdxl/unet", None), "vae": ("sd15/vae", None), "text_encoder": ("sd3_medium/text_encoder", "clip"),
                       "text_encoder_2": ("sd3_medium/text_encoder_2", "clip+proj"), "scheduler": ("sd15/scheduler", None)},
             "extra": {"add_watermarker": False}},
    "sd3": {"name": "SD3-Medium", "recipe": "r0_sd3", "pipeline": "StableDiffusion3Pipeline",
            "parts": {"transformer": ("sd3_medium/transformer", None), "vae": ("sd3_medium/vae", None), **SD3_TEXT,
                      "scheduler": ("sd3_medium/scheduler", None)}},
    "sd35": {"name": "SD3.5-Medium", "recipe": "r0_sd35", "pipeline": "StableDiffusion3Pipeline",
             "parts": {"transformer": ("sd35_medium/transformer", None), "vae": ("sd3_medium/vae", None), **SD3_TEXT,
                       "scheduler": ("sd3_medium/scheduler", None)}},
    "sd35_large": {"name": "SD3.5-Large", "recipe": "r0_sd35", "pipeline": "StableDiffusion3Pipeline",
                   "parts": {"transformer": ("sd35_large/transformer", None), "vae": ("sd3_medium/vae", None), **SD3_TEXT,
                             "scheduler": ("sd3_medium/scheduler", None)}},
    "flux": {"name": "FLUX.1-dev", "recipe": "r0_flux", "pipeline": "FluxPipeline",
             "parts": {"transformer": ("flux_dev/transformer", None), "vae": ("sd3_medium/vae", None),
                       "text_encoder": ("sd3_medium/text_encoder", "clip"), "text_encoder_2": ("sd3_medium/text_encoder_3", "t5:512"),
                       "scheduler": ("flux_dev/scheduler", None)}},
    "zimage": {"name": "Z-Image-Turbo", "recipe": "r0_zimage", "pipeline": "ZImagePipeline",
               "parts": {"transformer": ("z_image_turbo/transformer", None), "vae": ("sd3_medium/vae", None),
                         "text_encoder": ("z_image_turbo/text_encoder", "qwen3:512"), "scheduler": ("z_image_turbo/scheduler", None)}},
}


def _config(path: str) -> dict:
    raw = json.loads((CONFIGS / f"{path}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "architectures"}


def _class_name(path: str) -> str:
    return json.loads((CONFIGS / f"{path}.json").read_text())["_class_name"]


def _clip_text(path: str, tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPTextConfig(**_config(path), **ids)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_tokenizer(max_length: int):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_pipeline(family: str, dtype: torch.dtype, t5_blocks: int | None = None, device: str = "cpu"):
    """The family's diffusers pipeline at its published size, random weights, built in `dtype` (meta: no memory).

    Tokenizers are built in memory (byte-level CLIP BPE, a small T5 vocabulary): prompts pad to the published
    lengths (77 CLIP tokens, 256 T5 tokens for SD3, 512 for FLUX), so every network does the work it does with the
    real ones. `t5_blocks`: build T5-XXL with fewer blocks (same output shape)."""
    import diffusers
    from transformers import Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    from rewardkit.testbed.models import clip_tokenizer, qwen_tokenizer

    spec = FAMILIES[family]
    clip_tok = clip_tokenizer(max_length=77)
    parts = {}
    with torch.device(device), default_dtype(dtype):
        for name, (path, kind) in spec["parts"].items():
            if kind is None:
                parts[name] = getattr(diffusers, _class_name(path)).from_config(_config(path))
            elif kind.startswith("clip"):
                parts[name] = _clip_text(path, clip_tok, projection=kind == "clip+proj")
                parts[name.replace("text_encoder", "tokenizer")] = clip_tok
            elif kind.startswith("qwen3"):
                parts[name] = Qwen3Model(Qwen3Config(**_config(path)))
                parts[name.replace("text_encoder", "tokenizer")] = qwen_tokenizer(max_length=int(kind.split(":")[1]))
            else:
                t5 = _config(path) | ({"num_layers": t5_blocks} if t5_blocks is not None else {})
                parts[name] = T5EncoderModel(T5Config(**t5))
                parts[name.replace("text_encoder", "tokenizer")] = _t5_tokenizer(int(kind.split(":")[1]))
    return getattr(diffusers, spec["pipeline"])(**parts, **spec.get("extra", {}))


def full_size_generator(family: str, pipe, **options):
    """The recipe's generator class on `pipe` instead of a model folder."""
    from rewardkit.plugins import load_registry

    cls = load_registry().get("generator", recipe_of(family)["generator"]["type"])

    class FullSize(cls):
        def _load_pipeline(self):
            return pipe

    return FullSize(model=f"{family} from bench/configs (random weights)", **options)


def recipe_of(family: str) -> dict:
    return tomllib.loads((RECIPES / f"{FAMILIES[family]['recipe']}.toml").read_text())


def generator_options(family: str, row: dict) -> dict:
    options = {k: v for k, v in recipe_of(family)["generator"].items() if k not in ("type", "model")}
    options.update(height=row["size"], width=row["size"], training=row["training"], gradient_checkpointing=row["checkpointing"],
                   weights_dtype=str(DTYPES[row["precision"]]).removeprefix("torch."))
    if "text_encoder_3" in FAMILIES[family]["parts"]:  # SD3's T5-XXL: the prompts are encoded at set-up, the encoders freed
        options["text_encoders"] = "free"
    return options


# ----------------------------------------------------------------------------- counting before running
def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def planned_bytes(row: dict) -> dict:
    """Weights and training state of a configuration, counted on the meta device (GB, in their dtypes)."""
    family, training = row["family"], row["training"]
    frozen_size = DTYPES[row["precision"]].itemsize
    pipe = build_pipeline(family, torch.float32, row.get("t5_blocks"), device="meta")
    parts = {name: _numel(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    gen = full_size_generator(family, pipe, **generator_options(family, row))
    denoiser = getattr(pipe, gen.denoiser_name)
    from peft import LoraConfig

    if training == "lora":
        denoiser.add_adapter(LoraConfig(r=gen.options.lora_rank, lora_alpha=gen.options.lora_rank, target_modules=list(gen.options.lora_target_modules)))
        trainable = sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" in n)
        frozen = sum(parts.values())
        reference = 0  # weight L2 of a LoRA is the adapter's own norm
    else:
        trainable = parts[gen.denoiser_name]
        frozen = sum(parts.values()) - trainable
        reference = trainable * 4  # theta_0 in float32, for weight L2
    freed = gen.options.text_encoders == "free"
    encoders = sum(v for k, v in parts.items() if k.startswith("text_encoder")) if freed else 0
    rewards = reward_params(row.get("rewards", REWARDS))
    reward_size = getattr(torch, row["reward_dtype"]).itemsize if row.get("reward_dtype") else frozen_size
    out = {
        "frozen_gb": frozen * frozen_size / GB,
        "encoders_gb": encoders * frozen_size / GB,  # dropped after set-up (text_encoders = "free")
        "train_state_gb": trainable * 16 / GB,  # float32 weights, gradients, Adam's m and v
        "reference_gb": reference / GB,
        "rewards_gb": rewards * reward_size / GB,
        "trainable": trainable,
    }
    out["total_gb"] = out["frozen_gb"] + out["train_state_gb"] + out["reference_gb"] + out["rewards_gb"]
    return out


def reward_params(names) -> int:
    import open_clip
    from rewardkit_imagereward.model import ImageRewardModel, full_size_shapes

    with torch.device("meta"):  # (device="meta" alone would build the parameters first, then move them)
        vit_h = _numel(open_clip.create_model("ViT-H-14", pretrained=None, device="meta"))
        ir = _numel(ImageRewardModel(full_size_shapes()))
    return sum({"hps": vit_h, "clip_score": vit_h, "imagereward": ir}[n] for n in names)  # HPS and CLIP score: two ViT-H-14s


def available_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / GB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


# ----------------------------------------------------------------------------- one configuration (a child process)
def _vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_row(row: dict) -> dict:
    from rewards import build_full  # bench/rewards.py: the full-size reward models
    from rewardkit import Optimizer
    from rewardkit.metrics import read_metrics
    from rewardkit.plugins import load_registry

    device = row["device"]
    family, dtype = row["family"], DTYPES[row["precision"]]
    recipe = recipe_of(family)
    registry = load_registry()
    t0 = time.perf_counter()
    pipe = build_pipeline(family, dtype, row.get("t5_blocks"), device=device)  # random initialization where it will run
    generator = full_size_generator(family, pipe, **generator_options(family, row))
    tmp = Path(tempfile.mkdtemp(prefix="rk-full-size-"))
    rewards = build_full(tmp, names=row.get("rewards", REWARDS), **({"dtype": row["reward_dtype"]} if row.get("reward_dtype") else {}))
    regularizers = {name: registry.get("regularizer", opts.pop("type", name))(**opts) for name, opts in
                    ((n, dict(o)) for n, o in recipe.get("regularizers", {}).items())}
    peaks = {}

    class Measured(Optimizer):
        """The shipped optimizer; the peak counter restarts after set-up, and no multi-GB checkpoint is written."""

        def _setup(self, resume):
            start = super()._setup(resume)
            peaks["setup_s"] = time.perf_counter() - t0
            peaks["setup_gb"] = torch.cuda.max_memory_allocated() / GB if device == "cuda" else _vm_hwm_gb()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
            return start

        def _save_checkpoint(self, step):
            pass

    optim = {k: v for k, v in recipe["optimizer"].items() if k != "warmup_steps"}
    run = {"dir": str(tmp / "run"), "steps": 1 + row["steps"], "batch_size": row["batch"], "mixed_precision": "no" if row["precision"] == "fp32" else row["precision"],
           "trackers": [], "progress": False, "sample_every": 0, "seed": 0}
    Measured(generator, rewards, regularizers, prompts=PROMPTS, sample_prompts=PROMPTS[:1], run=run, optimizer=optim).fit()
    records = read_metrics(tmp / "run" / "metrics.jsonl")[1:]  # after the warm-up step
    med = {k: statistics.median(r[k] for r in records) for k in ("time/step", "time/generate", "time/rewards", "time/backward")}
    return {
        **peaks,
        "peak_gb": torch.cuda.max_memory_allocated() / GB if device == "cuda" else _vm_hwm_gb(),
        "step_s": med["time/step"], "generate_s": med["time/generate"], "rewards_s": med["time/rewards"], "backward_s": med["time/backward"],
        "optimizer_s": med["time/step"] - med["time/generate"] - med["time/rewards"] - med["time/backward"],
        "skipped": sum(bool(r["skipped"]) for r in records), "steps": len(records),
    }


def encoder_times(family: str, dtype: torch.dtype, device: str, repeat: int) -> list[dict]:
    """Forward time per prompt of each text encoder at full size: what the prompt cache saves per prompt and step."""
    pipe = build_pipeline(family, dtype, device="meta")
    rows = []
    for name in [k for k in pipe.components if k.startswith("text_encoder") and pipe.components[k] is not None]:
        tokenizer = pipe.components[name.replace("text_encoder", "tokenizer")]
        with torch.device(device), default_dtype(dtype):
            encoder = type(pipe.components[name])(pipe.components[name].config).eval()
        length = tokenizer.model_max_length
        ids = tokenizer(PROMPTS[:1], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids.to(device)
        times = []
        with torch.no_grad():
            for i in range(repeat + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                encoder(ids)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t)
        rows.append({"encoder": f"{name} ({type(encoder).__name__}, {_numel(encoder) / 1e6:.0f} M, {length} tokens)", "ms": 1000 * statistics.median(times)})
        del encoder
    return rows


def print_plan(precision: str, reward_dtype: str | None, families=tuple(FAMILIES)) -> None:
    """Weights and training state per process, before activations, for each family and training mode (GiB), at the
    recipes' settings (LoRA rank 64, Adam, weight L2; SD3's and FLUX's text encoders freed after set-up)."""
    print("| GiB per process, before activations | frozen weights (of it: text encoders, freed after set-up) "
          "| trainable: fp32 weights + grads + Adam m, v | weight L2's fp32 theta_0 | rewards: HPS v2.1 + ImageReward + CLIP H | total |")
    print("|---|---|---|---|---|---|")
    for family in families:
        for training in ("lora", "full"):
            p = planned_bytes({"family": family, "training": training, "size": 512, "checkpointing": True, "precision": precision,
                               "reward_dtype": reward_dtype})
            frozen = f"{p['frozen_gb']:.2f}" + (f" ({p['encoders_gb']:.2f})" if p["encoders_gb"] else "")
            print(f"| {FAMILIES[family]['name']}, {training} | {frozen} | {p['train_state_gb']:.2f} | {p['reference_gb']:.2f} "
                  f"| {p['rewards_gb']:.2f} | **{p['total_gb']:.2f}** |")


# ----------------------------------------------------------------------------- the table
def child(row: dict) -> dict:
    """Run one configuration in a fresh process, with its address space capped at what the machine has free."""
    plan = planned_bytes(row)
    free = available_gb(row["device"])
    if plan["total_gb"] > 0.95 * free:
        return {"plan": plan, "status": f"not run: weights and optimizer state alone {plan['total_gb']:.1f} GiB > {free:.1f} GiB free"}
    cmd = [sys.executable, __file__, "--_row", json.dumps(row)]
    limit = int((free + 4) * GB)  # + torch's own address-space reservations: allocations past it fail instead of the OOM killer striking

    def cap():
        if row["device"] == "cpu":
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        return {"plan": plan, "status": "ok", **json.loads(lines[-1][len("RESULT "):])}
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    oom = proc.returncode == -9 or "out of memory" in proc.stderr.lower() or "can't allocate memory" in proc.stderr.lower()
    return {"plan": plan, "status": "out of memory" if oom else f"failed (rc {proc.returncode}): {tail[:160]}"}


def parse_rows(text: str, trainings: list[str], checkpointing: list[bool]) -> list[tuple[str, int, str, bool]]:
    rows = []
    for item in text.split(","):
        family, size = item.split(":")
        family = {"sd": "sd15"}.get(family, family)
        if family not in FAMILIES:
            raise SystemExit(f"--rows: unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        rows += [(family, int(size), t, c) for t in trainings for c in checkpointing]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="sd15:256,sd15:512,sd3:256", help=f"family:size pairs (families: {', '.join(FAMILIES)})")
    parser.add_argument("--training", default="lora,full")
    parser.add_argument("--checkpointing", default="on,off")
    parser.add_argument("--precision", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU (which emulates bf16 slowly)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up step")
    parser.add_argument("--rewards", default=",".join(REWARDS), help="the R0 rewards to train on (default: all three)")
    parser.add_argument("--reward-dtype", choices=["float32", "bfloat16", "float16"], help="the rewards' dtype option (default: auto, the run's precision)")
    parser.add_argument("--t5-blocks", type=int, default=None, help="T5-XXL blocks to build (default: all 24)")
    parser.add_argument("--encoders", action="store_true", help="measure the text encoders' forward time per prompt instead")
    parser.add_argument("--plan", action="store_true", help="only count weights and training state of every family (meta device): a table")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args._row:
        print("RESULT " + json.dumps(run_row(json.loads(args._row))), flush=True)
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    rewards = f"rewards {args.rewards} in " + (args.reward_dtype or "the run's precision")
    print(f"{where}, torch {torch.__version__}, {precision}, {rewards}, batch {args.batch}, K = 4 (the recipes'), median of {args.steps} steps after 1 warm-up\n")
    if args.plan:
        print_plan(precision, args.reward_dtype)
        return 0
    if args.encoders:
        print("| model | text encoder | forward per prompt (ms) |\n|---|---|---|")
        for family in FAMILIES:
            for r in encoder_times(family, DTYPES[precision], device, repeat=args.steps):
                print(f"| {family} | {r['encoder']} | {r['ms']:.0f} |", flush=True)
        return 0

    head = ("| model | size | training | checkpointing | weights + state (GiB) | peak (GiB) | step (s) | generate | rewards | backward | optimizer | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    results = []
    trainings = args.training.split(",")
    for family, size, training, ckpt in parse_rows(args.rows, trainings, [c == "on" for c in args.checkpointing.split(",")]):
        row = {"family": family, "size": size, "training": training, "checkpointing": ckpt, "precision": precision,
               "batch": args.batch, "steps": args.steps, "device": device, "t5_blocks": args.t5_blocks, "reward_dtype": args.reward_dtype, "rewards": args.rewards.split(",")}
        r = child(row)
        results.append({**row, **r})
        plan = r["plan"]
        name = FAMILIES[family]["name"] + (f" (T5: {args.t5_blocks} blocks)" if args.t5_blocks is not None and family not in ("sd15", "sdxl", "zimage") else "")
        cells = (f"{r['peak_gb']:.1f} | {r['step_s']:.1f} | {r['generate_s']:.1f} | {r['rewards_s']:.1f} | {r['backward_s']:.1f} | {r['optimizer_s']:.2f}"
                 if r["status"] == "ok" else "- | - | - | - | - | -")
        status = r["status"] + (f" ({r['skipped']} of {r['steps']} steps skipped: non-finite)" if r.get("skipped") else "")
        print(f"| {name} | {size} | {training} | {'on' if ckpt else 'off'} | {plan['total_gb']:.1f} | {cells} | {status} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
