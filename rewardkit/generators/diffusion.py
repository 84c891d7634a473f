"""The K-step sampler shared by the `sd` and `sd3` generators (R0.md).

Both families are written as x_t = alpha_t * x0 + sigma_t * eps:

    SD (eps / v prediction):  alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)
    SD3 (flow matching):      alpha_t = 1 - t,         sigma_t = t

Each step predicts (x0_hat, eps_hat) with the network and moves to the next,
lower noise level s with R0's DDIM-form update

    sigma_eta = eta * (sigma_s / sigma_t) * sqrt(1 - (alpha_t / alpha_s)^2)
    x_s = alpha_s * x0_hat + sqrt(sigma_s^2 - sigma_eta^2) * eps_hat + sigma_eta * xi

which is DDIM for SD (eta = 0: deterministic DDIM; eta = 1: DDPM posterior)
and, for flow matching, the Euler step at eta = 0 (x_s = x_t + (s - t) v).
Whatever eta is, x_s keeps the schedule's marginal noise level sigma_s.
The output is the x0_hat of the last step (or of the supervised step, R0+),
decoded by the VAE.

This module imports only torch and pydantic at import time: diffusers,
transformers and peft are imported inside the methods that need them, so
listing plugins or running the pixels generator never pays for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from rewardkit.errors import UserError
from rewardkit.generators.base import Generator, SampleOptions, full_tensor, is_sharded
from rewardkit.options import PluginOptions

log = logging.getLogger("rewardkit")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Blocks of the denoisers, VAEs and text encoders that FSDP shards as units.
FSDP_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer", "T5Block")


class DiffusionOptions(PluginOptions):
    """Options shared by the diffusion generators (`sd`, `sd3`)."""

    model: str
    """A hub id (loaded from the local Hugging Face cache, or downloaded when online), a local
    diffusers folder, or a single-file .safetensors checkpoint."""
    config: str | None = None
    """Single-file checkpoints only: a diffusers folder or hub id whose configs describe the
    checkpoint (diffusers' `from_single_file(config=...)`); needed offline."""
    revision: str | None = None
    height: PositiveInt | None = None
    """Image height in pixels (default: the model's native size)."""
    width: PositiveInt | None = None
    num_steps: PositiveInt = 4
    """K, the number of sampler steps."""
    eta: NonNegativeFloat = 0.0
    """Stochasticity used at inference (and in training unless a regularizer such as
    random_eta sets it): 0 is deterministic DDIM / Euler."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale; 1 disables guidance (one network call per step)."""
    negative_prompt: str = ""
    """The unconditional prompt of classifier-free guidance."""
    training: Literal["lora", "full", "noise"] = "lora"
    """'lora': train a peft LoRA adapter on the denoiser; 'full': train every denoiser weight;
    'noise': keep every weight frozen and optimize one input noise per training prompt
    (test-time noise optimization, ReNO-style)."""
    lora_rank: PositiveInt = 16
    lora_alpha: PositiveFloat | None = None
    """LoRA scaling numerator (the update is alpha / rank * B A); default: the rank."""
    lora_target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    grad_steps: PositiveInt | None = None
    """Backpropagate through the last k steps only (None: through all of them)."""
    gradient_checkpointing: bool = False
    """Recompute denoiser and VAE-decoder activations in the backward pass: less memory, more time."""
    weights_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the frozen weights (text encoders, VAE, the denoiser's base under LoRA).
    Trainable weights stay float32 (master weights); compute precision follows run.mixed_precision."""
    vae_decode: Literal["full", "sliced", "tiled"] = "full"
    """'sliced': decode one image at a time; 'tiled': decode in overlapping tiles (large images)."""


def _sharded_lora_penalty(A, B, scale: float) -> torch.Tensor:
    """||scale * B A||_F^2 for FSDP-sharded LoRA weights: the value of the whole layer, the gradient of this
    process's rows only.

    FSDP adds each process's gradient into that process's shard, so the gradient must have the
    shard's shape: it is built from the local rows (d/dB = 2 s^2 B (A A^T), d/dA = 2 s^2 (B^T B) A)
    with the rank x rank factors gathered without gradient, and attached through a surrogate.
    """
    from torch.distributed.tensor import DTensor, Replicate

    s2 = scale**2
    a_loc, b_loc = A.to_local().float().flatten(1), B.to_local().float().flatten(1)
    with torch.no_grad():
        a_full, b_full = A.full_tensor().float().flatten(1), B.full_tensor().float().flatten(1)
        G, H = b_full.T @ b_full, a_full @ a_full.T
        value = s2 * (G * H).sum()
        grad_a_full = (2 * s2 * G @ a_full).view(A.shape)
        # this process's rows of dA, laid out exactly as A is sharded
        grad_a = DTensor.from_local(grad_a_full, A.device_mesh, [Replicate()] * A.device_mesh.ndim).redistribute(placements=A.placements).to_local()
        grad_b = 2 * s2 * b_loc @ H
    surrogate = (grad_a.float().flatten(1) * a_loc).sum() + (grad_b * b_loc).sum()
    return value + surrogate - surrogate.detach()


def eta_matrix(eta: float | torch.Tensor, batch: int, steps: int, device) -> torch.Tensor:
    """eta as a (B, K) float32 tensor: column k is used by the update after step k."""
    e = torch.as_tensor(eta, dtype=torch.float32, device=device)
    if e.dim() == 0:
        e = e.expand(batch, steps)
    elif e.dim() == 1 and e.shape[0] == batch:
        e = e[:, None].expand(batch, steps)
    elif e.dim() != 2 or e.shape != (batch, steps):
        raise ValueError(f"eta must be a float, a ({batch},) or a ({batch}, {steps}) tensor; got shape {tuple(e.shape)}")
    if bool((e < 0).any()):
        raise ValueError("eta must be non-negative")
    return e


def step_noise(noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The fresh noise xi of each update, (B, steps, *shape), determined by each sample's own noise.

    Every sample seeds a torch.Generator with a hash of its input noise, so:
    a fixed seed gives the same images (`rewardkit sample`), a resumed run
    draws exactly what the uninterrupted one would have, and a sample's
    images do not depend on the batch it was generated in.
    """
    out = []
    for z in noise.detach().to("cpu", torch.float32):
        seed = int.from_bytes(hashlib.blake2b(z.contiguous().numpy().tobytes(), digest_size=8).digest(), "little")
        rng = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        out.append(torch.randn((steps, *z.shape), generator=rng))
    return torch.stack(out).to(noise.device)


def ddim_update(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta, xi):
    """R0's update from noise level t to s (see the module docstring); eta is (B,), xi like x0 or None."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    ratio = (alpha_t / alpha_s) ** 2
    c = sigma_s / sigma_t * torch.sqrt(torch.clamp(1 - ratio, min=0.0))
    # eta > 1 would ask for more fresh noise than the level holds: cap at sigma_s.
    sigma_eta = torch.minimum(eta * c, sigma_s.expand_as(eta)).view(shape)
    x_s = alpha_s * x0 + torch.sqrt(torch.clamp(sigma_s**2 - sigma_eta**2, min=0.0)) * eps
    if xi is not None:
        x_s = x_s + sigma_eta * xi
    return x_s


class DiffusionGenerator(Generator):
    """A K-step sampler on a diffusers pipeline; `sd` and `sd3` fill in the model-specific parts.

    Subclasses define: `pipeline_class` (diffusers class name), `supported_pipelines`,
    `denoiser_name` ('unet' / 'transformer'), `_check_pipeline`, `_schedule`,
    `_encode`, `_predict`, `_latents_to_vae` and `_export_scheduler`.
    """

    Options = DiffusionOptions
    pipeline_class: str = ""
    supported_pipelines: tuple[str, ...] = ()
    denoiser_name: str = ""

    # --- setup -----------------------------------------------------------------------
    def setup(self, prompts: Sequence[str], seed: int) -> None:
        pipe = self._load_pipeline()
        self._check_pipeline(pipe)
        self.pipe = pipe  # not a Module: a plain attribute; its modules are registered below
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
                self.add_module(name, module)
        frozen_dtype = DTYPES[self.options.weights_dtype]
        for name, module in pipe.components.items():
            if frozen_dtype != torch.float32 and isinstance(module, torch.nn.Module) and not (module is self.denoiser and self.options.training == "full"):
                module.to(frozen_dtype)

        if self.options.training == "lora":
            from peft import LoraConfig

            config = LoraConfig(
                r=self.options.lora_rank,
                lora_alpha=self.options.lora_alpha or self.options.lora_rank,
                target_modules=list(self.options.lora_target_modules),
                init_lora_weights=True,  # B = 0: the generator starts exactly at theta_0
            )
            try:
                self.denoiser.add_adapter(config)
            except ValueError as exc:
                raise UserError(f"generator.lora_target_modules {self.options.lora_target_modules}: {exc}") from None
            self.denoiser.eval()  # the sampler always runs as at inference, adapter layers included
            for n, p in self.denoiser.named_parameters():
                if "lora_" in n:
                    p.data = p.data.float()  # fp32 master weights for the adapter
                    p.requires_grad_(True)
        elif self.options.training == "full":
            self.denoiser.float().requires_grad_(True)

        if self.options.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
            if getattr(self.vae, "_supports_gradient_checkpointing", False):
                self.vae.enable_gradient_checkpointing()
        if self.options.vae_decode == "sliced":
            self.vae.enable_slicing()
        elif self.options.vae_decode == "tiled":
            self.vae.enable_tiling()

        # FSDP's shard groups (accelerate's transformer-based wrap reads this): the repeated blocks present
        self._no_split_modules = sorted({type(m).__name__ for m in self.modules()} & set(FSDP_BLOCKS))

        factor = pipe.vae_scale_factor * self._patch_size()
        native = self.denoiser.config.sample_size * pipe.vae_scale_factor
        self.height = self.options.height or native
        self.width = self.options.width or native
        if self.height % factor or self.width % factor:
            raise UserError(f"generator.height / width must be multiples of {factor} for {self.options.model}; got {self.height} x {self.width}")
        if self.options.training == "noise":
            self._setup_noise_table(prompts, seed)

    def _setup_noise_table(self, prompts: Sequence[str], seed: int) -> None:
        """One trainable input noise per training prompt, drawn from N(0, I) with the run's seed.

        A prompt that occurs several times in the list gets one noise per
        occurrence (the optimizer says which through SampleOptions.prompt_index).
        """
        if not prompts:
            raise UserError("generator.training = 'noise' optimizes one noise per training prompt, and there are no prompts")
        if self.options.grad_steps is not None:
            raise UserError("generator.grad_steps cannot be used with training = 'noise': the gradient must flow through every step to reach the noise")
        rng = torch.Generator().manual_seed(seed)
        self.noise_prompts = list(prompts)
        self.noise_table = torch.nn.Parameter(torch.randn((len(prompts), *self.noise_shape()), generator=rng))
        self._noise_slot = {}
        for i, p in enumerate(self.noise_prompts):
            self._noise_slot.setdefault(p, i)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network being trained: the UNet (sd) or the MMDiT transformer (sd3)."""
        return getattr(self, self.denoiser_name)

    def _patch_size(self) -> int:
        return 1

    def _load_pipeline(self):
        """The diffusers pipeline of `model`: a single file, a local folder, or a hub id (cache first)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        model, opts = self.options.model, self.options
        kwargs = self._load_kwargs()
        path = Path(model).expanduser()
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise UserError(
                f"generator.model {model!r}: pickled checkpoints are never loaded (they can run arbitrary code); "
                "convert it to .safetensors, or give a diffusers folder or hub id"
            )
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise UserError(f"generator.model {model!r}: no such file")
            return self._guard(model, lambda: cls.from_single_file(str(path), config=opts.config, **kwargs))
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                raise UserError(f"generator.model {model!r}: the folder has no model_index.json, so it is not a diffusers pipeline folder")
            self._check_class(json.loads(index.read_text()).get("_class_name"))
            return self._guard(model, lambda: cls.from_pretrained(str(path), **kwargs))
        if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model and os.sep != "/":
            raise UserError(f"generator.model {model!r}: no such folder or file")
        config = self._guard(model, lambda: diffusers.DiffusionPipeline.load_config(model, revision=opts.revision))
        self._check_class(config.get("_class_name"))
        return self._guard(model, lambda: cls.from_pretrained(model, revision=opts.revision, **kwargs))

    def _load_kwargs(self) -> dict:
        return {}

    def _guard(self, model: str, load):
        """Run `load`, turning "not cached and not reachable" into a UserError that says what to do."""
        try:
            return load()
        except OSError as exc:
            raise UserError(
                f"generator.model {model!r} could not be loaded: it is neither a local folder or file nor in the "
                "Hugging Face cache, and it could not be downloaded (no network, or HF_HUB_OFFLINE=1). Provide it as a "
                f"local diffusers folder (generator.model = '/path/to/folder'), or download it beforehand into the cache "
                f"on a machine with network access: `huggingface-cli download {model}` (copy ~/.cache/huggingface/hub "
                f"if needed). Cause: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None

    def _check_class(self, class_name: str | None) -> None:
        if class_name not in self.supported_pipelines:
            raise UserError(
                f"generator.model {self.options.model!r} is a {class_name or 'unknown'} pipeline; the '{self.name}' "
                f"generator supports {', '.join(self.supported_pipelines)}. (SD 1.x/2.x models: type = 'sd'; "
                "SD3: type = 'sd3'.)"
            )

    # --- what the optimizer calls ----------------------------------------------------------
    def noise_shape(self) -> tuple[int, ...]:
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, self.height // f, self.width // f)

    def sample_options(self) -> SampleOptions:
        return SampleOptions(num_steps=self.options.num_steps, eta=self.options.eta, grad_steps=self.options.grad_steps)

    def train(self, mode: bool = True):
        # The sampler is always run as at inference: no dropout (e.g. T5's) in any
        # submodule, whether training or sampling. Only the flag changes.
        self.training = mode
        return self

    def forward(self, prompts: Sequence[str], noise: torch.Tensor, options: SampleOptions) -> torch.Tensor:
        if self.options.training == "noise":
            noise = self._table_noise(prompts, noise, options.prompt_index)
        x0 = self.sample_latents(prompts, noise, options)
        return self.decode(x0)

    # --- optimized noise (training = 'noise') ----------------------------------------------
    def optimized_noise(self) -> torch.Tensor | None:
        return self.noise_table if self.options.training == "noise" else None

    def _table_noise(self, prompts: Sequence[str], noise: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """The optimized noise of each sample: its training slot's during training; outside
        training a prompt of the training set uses its (first) slot's, any other prompt the
        noise it was given, so it is sampled by the frozen model as usual."""
        table = self.noise_table
        if index is not None:
            return table[index.to(table.device)]
        slots = [self._noise_slot.get(p, -1) for p in prompts]
        known = torch.tensor([s >= 0 for s in slots], device=table.device).view(-1, *([1] * (noise.dim() - 1)))
        rows = table[torch.tensor([max(s, 0) for s in slots], device=table.device)]
        return torch.where(known, rows, noise.to(table.device, table.dtype))

    @torch.no_grad()
    def optimized_batches(self, batch_size: int = 8):
        """Yield (first index, images on the CPU) for every training slot, from its optimized noise."""
        options = self.sample_options()
        for i in range(0, len(self.noise_prompts), batch_size):
            index = torch.arange(i, min(i + batch_size, len(self.noise_prompts)))
            prompts = [self.noise_prompts[j] for j in index.tolist()]
            yield i, self(prompts, self.noise_table[index], options.replace(prompt_index=index)).float().clamp(0, 1).cpu()

    def optimized_images(self, batch_size: int = 8) -> torch.Tensor:
        """The images of every training slot from its optimized noise, (N, 3, H, W) on the CPU."""
        return torch.cat([images for _, images in self.optimized_batches(batch_size)])

    def after_fit(self, run_dir) -> str:
        """With training = 'noise', the result is the images: write one PNG per training prompt."""
        if self.options.training != "noise":
            return ""
        from rewardkit.checkpoint import write_text_atomic
        from rewardkit.sampling import save_pngs

        folder = Path(run_dir) / "images"
        was = self.training
        self.eval()
        paths = []
        try:
            for start, images in self.optimized_batches():  # written batch by batch: N images need not fit in memory
                paths += save_pngs(images, folder, start=start)
        finally:
            self.train(was)
        index = [{"index": i, "prompt": p, "file": path.name} for i, (p, path) in enumerate(zip(self.noise_prompts, paths))]
        write_text_atomic(folder / "index.jsonl", "".join(json.dumps(row) + "\n" for row in index))
        return f"{len(paths)} images from the optimized noise, one per training prompt: {folder} (index.jsonl lists the prompts)"

    def sample_latents(self, prompts: Sequence[str], noise: torch.Tensor, options: SampleOptions, trajectory: list | None = None) -> torch.Tensor:
        """The K-step sampler: the returned clean latents, with gradient where options ask for it.

        Gradient flows into step k of sample i when first_i <= k <= end_i, where
        end_i is the returned step (the last one, or `supervise_step`) and
        first_i = end_i - grad_steps + 1 (grad_steps defaults to all steps, or to
        1 when a step is supervised: R0+ runs the earlier steps without gradient).
        If `trajectory` is a list, the x_t entering each step is appended to it.
        """
        K = options.num_steps or self.options.num_steps
        B, device = noise.shape[0], noise.device
        schedule = self._schedule(K, device)
        eta = eta_matrix(options.eta, B, K, device)
        if options.supervise_step is None:
            end = torch.full((B,), K - 1, dtype=torch.long, device=device)
        else:
            end = torch.as_tensor(options.supervise_step, dtype=torch.long, device=device).expand(B)
            if bool(((end < 0) | (end >= K)).any()):
                raise ValueError(f"supervise_step must be in [0, {K - 1}] for {K} steps; got {end.tolist()}")
        # Optimized noise needs the gradient through every step down to itself.
        span = options.grad_steps if options.grad_steps is not None else (1 if options.supervise_step is not None and self.options.training != "noise" else K)
        first = (end - span + 1).clamp(min=0)
        last = int(end.max())
        xi = step_noise(noise, K - 1) if K > 1 and bool((eta[:, : K - 1] > 0).any()) else None
        view = (B,) + (1,) * (noise.dim() - 1)

        with torch.no_grad():
            cond = self._encode(list(prompts), device)
        want_grad = torch.is_grad_enabled()
        x, out = noise.float(), None
        for k in range(last + 1):
            # Cut the graph in front of each sample's first step with gradient (not in front of
            # step 0: there x is the input noise, which only has a graph when it is optimized).
            if k > 0:
                x = torch.where((first == k).view(view), x.detach(), x)
            if trajectory is not None:
                trajectory.append(x.detach())
            with torch.set_grad_enabled(want_grad and bool(((first <= k) & (k <= end)).any())):
                x0, eps = self._predict(x, schedule, k, cond)
                out = x0 if out is None else torch.where((end == k).view(view), x0, out)
                if k < last:
                    alpha, sigma = schedule["alpha"], schedule["sigma"]
                    x = ddim_update(x0, eps, alpha[k], sigma[k], alpha[k + 1], sigma[k + 1], eta[:, k], None if xi is None else xi[:, k])
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images in [0, 1], as diffusers' pipelines decode them (with gradient)."""
        z = self._latents_to_vae(latents).to(self.vae.dtype)
        images = self.vae.decode(z, return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    def _denoiser_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.denoiser.dtype)

    def _guided(self, out: torch.Tensor) -> torch.Tensor:
        """Combine [uncond, cond] outputs with the guidance scale (the outputs are linear in x0 and eps)."""
        if self.options.guidance_scale == 1.0:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.options.guidance_scale * (cond - uncond)

    def _cfg_batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.options.guidance_scale != 1.0 else x

    # --- weights: reference and LoRA delta ------------------------------------------------
    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]

    def snapshot_reference(self) -> None:
        if self.options.training == "lora":
            self._reference = {}  # theta_0 is the frozen base: the distance is the adapter's delta
        else:
            super().snapshot_reference()

    def squared_distance_to_reference(self) -> torch.Tensor:
        """sum ||theta - theta_0||^2; under LoRA, sum over adapted layers of ||scale * B A||_F^2.

        ||B A||_F^2 = sum((B^T B) * (A A^T)) uses only rank x rank matrices, so
        the full-size delta W is never materialized (equal to peft's
        get_delta_weight squared, to rounding; see the tests).
        """
        if self.options.training != "lora":
            return super().squared_distance_to_reference()
        total = torch.zeros((), device=next(self.denoiser.parameters()).device)
        for layer in self._lora_layers():
            for name in layer.active_adapters:
                if name not in layer.lora_A:
                    continue
                if layer.use_dora.get(name, False):
                    total = total + full_tensor((layer.get_delta_weight(name).float() ** 2).sum())
                    continue
                A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
                if is_sharded(A):
                    total = total + _sharded_lora_penalty(A, B, layer.scaling[name])
                    continue
                a, b = A.float().flatten(1), B.float().flatten(1)  # (r, in * k * k), (out, r)
                total = total + layer.scaling[name] ** 2 * ((b.T @ b) * (a @ a.T)).sum()
        return total

    # --- export ------------------------------------------------------------------------
    def sampling_settings(self) -> dict:
        """What it takes to reproduce this generator's images with plain diffusers."""
        K = self.options.num_steps
        schedule = self._schedule(K, "cpu")
        return {
            "generator": self.name,
            "base_model": self.options.model,
            "num_inference_steps": K,
            "timesteps": [float(t) for t in schedule["timesteps"]],
            "eta": self.options.eta,
            "guidance_scale": self.options.guidance_scale,
            "negative_prompt": self.options.negative_prompt,
            "height": self.height,
            "width": self.width,
        }

    def export(self, out: str | Path, format: str) -> Path:
        """Write a diffusers pipeline folder ('diffusers') or diffusers-loadable LoRA weights ('lora')."""
        out = Path(out)
        if self.options.training == "noise":
            raise UserError(
                "this run optimized input noise (training = 'noise') and left every weight as it was: there is no model "
                "to export. Its images are in the run directory's images/ folder; the model is generator.model itself."
            )
        if format == "lora":
            if self.options.training != "lora":
                raise UserError("--format lora needs a generator trained with training = 'lora'; this one was fully fine-tuned: use --format diffusers")
            self._export_lora(out)
        elif format == "diffusers":
            self._export_pipeline(out)
        else:
            raise UserError(f"unknown export format {format!r}; choose 'diffusers' or 'lora'")
        settings = self.sampling_settings() | {"format": format}
        (out / "rewardkit_export.json").write_text(json.dumps(settings, indent=2))
        return out

    def _export_pipeline(self, out: Path) -> None:
        """Save the pipeline with the trained denoiser (LoRA merged) and the matching scheduler.

        Weights keep their storage dtype: weights_dtype for frozen and merged
        weights, float32 for a fully fine-tuned denoiser.
        """
        import copy

        pipe = self.pipe
        if self.options.training == "lora":
            denoiser = copy.deepcopy(self.denoiser).float()  # merge in float32, leave the live model as is
            denoiser.fuse_lora()
            denoiser.unload_lora()
            denoiser.to(DTYPES[self.options.weights_dtype])
        else:
            denoiser = self.denoiser
        original = {self.denoiser_name: self.denoiser, "scheduler": pipe.scheduler}
        pipe.register_modules(**{self.denoiser_name: denoiser, "scheduler": self._export_scheduler()})
        try:
            pipe.save_pretrained(out, safe_serialization=True)
        finally:
            pipe.register_modules(**original)

    def _export_lora(self, out: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.denoiser).items()}
        metadata = self.denoiser.peft_config["default"].to_dict()
        type(self.pipe).save_lora_weights(out, **{f"{self.denoiser_name}_lora_layers": state, f"{self.denoiser_name}_lora_adapter_metadata": metadata})
        self._export_scheduler().save_pretrained(out / "scheduler")

    # --- family-specific ---------------------------------------------------------------------
    def _check_pipeline(self, pipe) -> None:
        raise NotImplementedError

    def _schedule(self, steps: int, device) -> dict[str, torch.Tensor]:
        """{'timesteps': network time input (K,), 'alpha': (K,), 'sigma': (K,)}, float32."""
        raise NotImplementedError

    def _encode(self, prompts: list[str], device):
        raise NotImplementedError

    def _predict(self, x: torch.Tensor, schedule: dict, k: int, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at step k, float32."""
        raise NotImplementedError

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _export_scheduler(self):
        raise NotImplementedError
