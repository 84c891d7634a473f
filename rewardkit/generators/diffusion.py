"""What the diffusion generators (`sd`, `sdxl`, `sd3`, `flux`, `zimage`) share: a diffusers pipeline, LoRA, and R0's K-step sampler on it.

This file loads the pipeline (hub id, local folder or single file), makes
its denoiser trainable (a peft LoRA adapter, every weight, or - training =
'noise' - none: rewardkit.generators.noise_table) and measures the distance
to the initial weights. The sampler maths is rewardkit.sampler; export to
diffusers formats is rewardkit.export.

This module imports only torch and pydantic at import time: diffusers,
transformers and peft are imported inside the methods that need them, so
listing plugins or running the pixels generator never pays for them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from rewardkit import sampler
from rewardkit.distributed import agree_max, fsdp_wrapped, full_tensor, is_sharded, lora_squared_norm
from rewardkit.errors import UserError
from rewardkit.generators.base import Generator, SampleOptions
from rewardkit.generators.noise_table import NoiseSlots, initial_noise
from rewardkit.options import PluginOptions

log = logging.getLogger("rewardkit")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Blocks of the denoisers, VAEs and text encoders that FSDP shards as units.
FSDP_BLOCKS = ("BasicTransformerBlock", "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
               "ResnetBlock2D", "CLIPEncoderLayer", "T5Block")


# The built-in generator type of each diffusers pipeline class (named in errors for a model given to the wrong type).
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "ZImagePipeline": "zimage",
}


class DiffusionOptions(PluginOptions):
    """Options shared by the diffusion generators (`sd`, `sdxl`, `sd3`, `flux`, `zimage`)."""

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
    eta: float = Field(default=0.0, ge=0, le=1)
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
    Trainable weights stay float32 (master weights); compute precision follows run.mixed_precision. Every frozen module is
    cast to it, whatever dtype its checkpoint holds (an fp16 text encoder is upcast under float32)."""
    prompt_cache: NonNegativeInt = 512
    """Text-encoder outputs kept per prompt (least recently used dropped; 0: encode every time). The encoders
    are frozen, so a cached embedding is the one encoding would give; entries live in CPU memory, in the
    denoiser's dtype: SD 1.5 0.24 MB each in float32, SD3 with T5 5.5 MB, FLUX.1 (512 T5 tokens) 8.4 MB, Z-Image (512
    Qwen3 tokens) 5.2 MB (512 entries: 0.12 / 2.8 / 4.3 / 2.7 GB per process).
    Not under FSDP, where sharded encoders must run on every process alike (text_encoders = 'free' works there)."""
    text_encoders: Literal["keep", "free"] = "keep"
    """'free': encode every prompt the run uses (training, sample and eval prompts, the negative prompt) at
    setup, then drop the text encoders from memory (SD3's T5-XXL: 9.5 GB in bf16); other prompts are then refused."""
    vae_decode: Literal["full", "sliced", "tiled"] = "full"
    """'sliced': decode one image at a time; 'tiled': decode in overlapping tiles (large images)."""


class DiffusionGenerator(Generator):
    """A K-step sampler on a diffusers pipeline; each family (sd.py, sdxl.py, sd3.py, flux.py, zimage.py) fills in its own parts.

    Subclasses define: `pipeline_class` (diffusers class name), `supported_pipelines`,
    `denoiser_name` ('unet' / 'transformer'), `_check_pipeline`, `schedule`, `noise_levels`,
    `_encode`, `_network`, `_x0_eps`, `_latents_to_vae`, `_vae_to_latents` and `export_scheduler`.
    """

    Options = DiffusionOptions
    supports_deep_supervision = True
    supports_score_function = True
    fsdp_blocks: tuple[str, ...] = FSDP_BLOCKS  # the repeated blocks FSDP shards as units; a family adds its own
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
        # Every frozen module in the declared dtype, float32 included: a checkpoint's own dtype (e.g. an fp16
        # text encoder, which transformers keeps as saved) must not decide the compute precision.
        frozen_dtype = DTYPES[self.options.weights_dtype]
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and not (module is self.denoiser and self.options.training == "full"):
                if any(p.dtype != frozen_dtype for p in module.parameters()):  # (diffusers warns on every cast)
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

        self._embedding_cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()  # prompt -> its encoders' outputs
        self._encoders_freed = False
        # Read once: diffusers' `module.dtype` walks every submodule, milliseconds per sampler step.
        self.denoiser_dtype, self.vae_dtype = self.denoiser.dtype, self.vae.dtype

        # FSDP's shard groups (accelerate's transformer-based wrap reads this): the repeated blocks present
        self._no_split_modules = sorted({type(m).__name__ for m in self.modules()} & set(self.fsdp_blocks))

        factor = pipe.vae_scale_factor * self._patch_size()
        native = self._native_size()
        self.height = self.options.height or native
        self.width = self.options.width or native
        if self.height % factor or self.width % factor:
            raise UserError(f"generator.height / width must be multiples of {factor} for {self.options.model}; got {self.height} x {self.width}")
        if self.options.training == "noise":
            self._setup_noise_table(prompts, seed)

    def _setup_noise_table(self, prompts: Sequence[str], seed: int) -> None:
        if self.options.grad_steps is not None:
            raise UserError("generator.grad_steps cannot be used with training = 'noise': the gradient must flow through every step to reach the noise")
        self.noise_table = initial_noise(prompts, self.noise_shape(), seed)
        self._noise_slots = NoiseSlots(prompts)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network being trained: the UNet (sd) or the MMDiT transformer (sd3)."""
        return getattr(self, self.denoiser_name)

    def _patch_size(self) -> int:
        return 1

    def _native_size(self) -> int:
        """The model's default image side in pixels."""
        return self.denoiser.config.sample_size * self.pipe.vae_scale_factor

    def _load_pipeline(self):
        """The diffusers pipeline of `model`: a single file, a local folder, or a hub id (cache first)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class, None)
        if cls is None:
            raise UserError(f"the '{self.name}' generator needs diffusers' {self.pipeline_class}, which diffusers {diffusers.__version__} "
                            "does not have: upgrade diffusers (pip install -U diffusers)")
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
                f"generator supports {', '.join(self.supported_pipelines)}. ({'; '.join(f'{c}: type = {t!r}' for c, t in FAMILIES.items())}.)"
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
        if options.score_steps is not None:
            return self._transition_log_probs(prompts, options)
        if self.options.training == "noise":
            noise = self._noise_slots.lookup(self.noise_table, prompts, noise, options.prompt_index)
        rollout = options.rollout
        if rollout is not None:
            K = options.num_steps or self.options.num_steps
            if K > 1 and not bool((sampler.eta_matrix(options.eta, len(noise), K, noise.device)[:, : K - 1] > 0).any()):
                raise UserError(_NEEDS_ETA)
        x0 = self.sample_latents(prompts, noise, options, trajectory=None if rollout is None else rollout.trajectory,
                                 log_probs=None if rollout is None else rollout.log_probs)
        return self.decode(x0)

    def _transition_log_probs(self, prompts: Sequence[str], options: SampleOptions):
        """log p(x_{k+1} | x_k) (B, len(score_steps)) of the updates `score_steps` of options.rollout's trajectory,
        under the current weights, with gradient (rewardkit.sampler.trajectory_log_probs); with score_reference,
        (log_p, the KL of each update to theta_0's)."""
        if self.options.training == "noise":
            raise UserError("a score-function estimator trains the weights through the sampler's transitions; with training = "
                            "'noise' nothing it reaches is trained: use training = 'lora' or 'full'")
        if options.rollout is None or not options.rollout.trajectory:
            raise ValueError("SampleOptions.score_steps needs the rollout of a sampling pass (SampleOptions.rollout, filled)")
        trajectory = options.rollout.trajectory
        K = options.num_steps or self.options.num_steps
        if not bool((sampler.eta_matrix(options.eta, len(prompts), K, "cpu")[:, list(options.score_steps)] > 0).all()):
            raise UserError(_NEEDS_ETA)
        schedule = self.schedule(K, trajectory[0].device)
        with torch.no_grad():
            cond = self._conditioning(list(prompts), trajectory[0].device)
        if options.score_reference and self.options.training == "full" and fsdp_wrapped(self):
            raise UserError("a KL penalty to the reference (regularizers.kl_reference) with training = 'full' does not run under "
                            "FSDP yet (theta_0 is kept whole, the weights in shards): use LoRA, or the 'ddp' accelerate config")
        reference = (lambda x, k, rows: self._predict(x, schedule, k, cond, base=True)) if options.score_reference else None
        return sampler.trajectory_log_probs(lambda x, k, rows: self._predict(x, schedule, k, cond), trajectory,
                                            schedule["alpha"], schedule["sigma"], options.eta, list(options.score_steps),
                                            update=self.stochastic_update(), reference=reference)

    def stochastic_update(self) -> str:
        """The sampler's update between steps (one of rewardkit.sampler.UPDATES): R0's DDIM form."""
        return "ddim"

    def optimized_noise(self) -> torch.Tensor | None:
        return self.noise_table if self.options.training == "noise" else None

    @classmethod
    def planned_steps(cls, options) -> int:
        return options.num_steps

    @classmethod
    def planned_noise_optimization(cls, options) -> bool:
        return options.training == "noise"

    def sample_latents(self, prompts: Sequence[str], noise: torch.Tensor, options: SampleOptions, trajectory: list | None = None,
                       log_probs: list | None = None) -> torch.Tensor:
        """The K-step sampler (rewardkit.sampler) on this model: the clean latents, with gradient where options ask
        (under deep supervision, those of every supervised step, stacked step-major); `trajectory` and `log_probs`
        as rewardkit.sampler.sample records them."""
        K = options.num_steps or self.options.num_steps
        return self._sample(prompts, noise, self.schedule(K, noise.device), options, trajectory, log_probs)

    def _sample(self, prompts, x_start: torch.Tensor, schedule: dict, options: SampleOptions, trajectory: list | None = None,
                log_probs: list | None = None) -> torch.Tensor:
        """The sampler over `schedule`'s steps from x_start, the latents entering its first step."""
        with torch.no_grad():
            cond = self._conditioning(list(prompts), x_start.device)
        return sampler.sample(
            lambda x, k, rows: self._predict(x, schedule, k, cond if rows is None else _rows_of(cond, rows, len(prompts))),
            x_start, schedule["alpha"], schedule["sigma"], options.eta,
            supervise_step=options.supervise_step, grad_steps=options.grad_steps,
            grad_to_noise=self.options.training == "noise", trajectory=trajectory, deep_supervision=options.deep_supervision,
            log_probs=log_probs, update=self.stochastic_update(),
            # sharded (FSDP): every network call is a collective, so all processes make the same calls
            agree=agree_max if fsdp_wrapped(self) else None,
        )

    def edit(self, prompts: Sequence[str], images: torch.Tensor, noise: torch.Tensor, strength: float) -> torch.Tensor:
        """Edit images (B, 3, H, W) in [0, 1] toward the prompts, as diffusers' img2img pipelines do (SDEdit): their
        latents (the VAE posterior's mean; diffusers draws a sample of it) noised to the level of step K - n, then the
        last n = edit_steps(K, strength) steps of the sampler, at the generator's inference eta. Strength 0 returns the
        images through the VAE; strength 1 starts from the noise alone, i.e. plain sampling (diffusers' img2img keeps
        alpha_t x0 in it, 0.07 x0 at SD's t = 999; its inpainting pipelines start from the noise, as here). No gradient."""
        if not 0 <= strength <= 1:
            raise UserError(f"--strength must be in [0, 1], got {strength}")
        if self.options.training == "noise":
            raise UserError("--init-image: this run optimized input noise (training = 'noise') and left the model as it was; "
                            "edit with the base model itself, or with a run that trained weights")
        K = self.options.num_steps
        n = self.edit_steps(K, strength)
        if n == 0 and strength > 0:
            raise UserError(f"--strength {strength} runs no step of this {K}-step generator (each step is 1/{K} of the strength); "
                            f"give at least {1 / K:.3g}, or 0 for the image through the VAE")
        with torch.no_grad():
            x0 = self.encode(images.to(noise.device))
            if n == 0:
                return self.decode(x0)
            schedule = {k: v[K - n :] for k, v in self.schedule(K, noise.device).items()}
            start = noise if n == K else schedule["alpha"][0] * x0 + schedule["sigma"][0] * noise
            return self.decode(self._sample(prompts, start, schedule, self.sample_options()))

    @staticmethod
    def edit_steps(steps: int, strength: float) -> int:
        """How many of the K steps an edit at `strength` runs: int(K * strength), as diffusers' SD / SDXL img2img."""
        return int(steps * strength)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images in [0, 1], as diffusers' pipelines decode them (with gradient)."""
        z = self._latents_to_vae(latents).to(self.vae_dtype)
        images = self.vae.decode(z, return_dict=False)[0].float()
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> clean latents (the VAE posterior's mean), with gradient: `decode`'s inverse."""
        z = self.vae.encode((images * 2 - 1).to(self.vae_dtype), return_dict=False)[0].mean.float()
        return self._vae_to_latents(z)

    def _predict(self, x: torch.Tensor, schedule: dict, k: int, cond, base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at step k, float32, with classifier-free guidance when the scale is not 1; `base`: of
        the frozen theta_0.

        Guidance combines the [unconditional; conditional] outputs, which are linear in x0 and eps."""
        alpha, sigma = schedule["alpha"][k], schedule["sigma"][k]
        guided = self.options.guidance_scale != 1.0
        if guided and not self._guided_at(schedule, k):  # an unguided step: the conditional rows alone
            cond, guided = _conditional_half(cond), False
        x_in = torch.cat([x, x]) if guided else x
        out = self._network(x_in, schedule["timesteps"][k].expand(x_in.shape[0]), cond, base=base)
        if guided:
            out = self._guide(*out.chunk(2))
        return self._x0_eps(x, out, alpha, sigma)

    def _guided_at(self, schedule: dict, k: int) -> bool:
        """Whether step k is guided, when guidance is on: every step, unless the family's pipeline truncates it."""
        return True

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of the network outputs: uncond + scale * (cond - uncond)."""
        return uncond + self.options.guidance_scale * (cond - uncond)

    def guidance_direction(self, latents: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor, prompts: Sequence[str], negative_prompt: str) -> torch.Tensor:
        """The frozen base model's classifier-free guidance direction for the clean latents, float32, without gradient.

        With x_t = alpha_t x0 + sigma_t eps at the training-schedule levels `levels` (B,), the implicit
        classifier's gradient grad_{x_t} log p(c | x_t) = -(eps(x_t, c) - eps(x_t, negative)) / sigma_t,
        computed with theta_0 (LoRA: the adapters disabled; full fine-tuning: the reference weights), times
        alpha_t = d x_t / d x0: the gradient of log p(c | x_t) with respect to `latents`.
        """
        lv = self.noise_levels(levels)
        shape = (-1,) + (1,) * (latents.dim() - 1)
        alpha, sigma = lv["alpha"].view(shape), lv["sigma"].view(shape)
        x_t = alpha * latents + sigma * noise
        with torch.no_grad():
            cond = self._conditioning(list(prompts), latents.device, negative=negative_prompt)
            out = self._network(torch.cat([x_t, x_t]), torch.cat([lv["timesteps"], lv["timesteps"]]), cond, base=True)
            _, eps = self._x0_eps(torch.cat([x_t, x_t]), out, torch.cat([alpha, alpha]), torch.cat([sigma, sigma]))
        eps_negative, eps_cond = eps.chunk(2)
        return -alpha * (eps_cond - eps_negative) / sigma

    # --- prompt embeddings: computed once ---------------------------------------------
    def prepare_prompts(self, prompts: Sequence[str]) -> None:
        """Every prompt the run will use; with text_encoders = 'free', encode them all now and drop the encoders."""
        if self.options.text_encoders != "free":
            return
        wanted = list(dict.fromkeys([*prompts, self.options.negative_prompt]))
        device = next(self.vae.parameters()).device
        for start in range(0, len(wanted), 64):
            self._cache_embeddings(wanted[start : start + 64], device, keep=None)
        for name in [n for n in self.pipe.components if n.startswith("text_encoder")]:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
                del self._modules[name]
        self._encoders_freed = True
        self._no_split_modules = sorted({type(m).__name__ for m in self.modules()} & set(self.fsdp_blocks))  # FSDP wraps what is left
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("encoded %d prompts and freed the text encoders (generator.text_encoders = 'free')", len(wanted))

    def _conditioning(self, prompts: list[str], device, negative: str | None = None):
        """`_encode` through the per-prompt cache: [negative; prompts] when guided (the sampler's own guidance,
        or `negative` given), else prompts; what `_encode` would give for the whole batch."""
        if negative is None and self.options.guidance_scale != 1.0:
            negative = self.options.negative_prompt
        freed = self._encoders_freed
        # Under FSDP the encoders' forward is a collective: a cache hit on one process and a miss on another
        # would deadlock, so sharded encoders encode every batch (text_encoders = 'free' encodes before sharding).
        if not freed and (not self.options.prompt_cache or self._encoders_sharded()):
            return self._encode(prompts, device, negative=[negative] * len(prompts) if negative is not None else [])
        zero_negative = negative is not None and self._zero_negative(negative)
        rows = prompts if negative is None or zero_negative else [negative] * len(prompts) + prompts
        cache, unique = self._embedding_cache, list(dict.fromkeys(rows))
        missing = [p for p in unique if p not in cache]
        if missing and freed:
            raise UserError(
                f"prompt {missing[0]!r} was not encoded at setup, and the text encoders were freed (generator.text_encoders = 'free'); "
                "list it among the run's prompts, or keep the encoders"
            )
        for p in unique:  # the batch's own entries are the most recent: never the ones dropped below
            if p in cache:
                cache.move_to_end(p)
        if missing:
            self._cache_embeddings(missing, device, keep=len(unique))
        parts = zip(*(cache[p] for p in rows))
        out = tuple(torch.stack(part).to(device, non_blocking=True) for part in parts)
        if zero_negative:
            out = tuple(torch.cat([torch.zeros_like(t), t]) for t in out)
        return out if len(out) > 1 else out[0]

    def _encoders_sharded(self) -> bool:
        encoders = [m for n, m in self.pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]
        return fsdp_wrapped(self) and any(is_sharded(p) for m in encoders for p in m.parameters())  # walked under FSDP only

    def _cache_embeddings(self, prompts: list[str], device, keep: int | None) -> None:
        """Encode `prompts` into the cache; then drop the least recently used entries past the cache's size
        (but never the `keep` most recent ones; None: drop nothing)."""
        cache = self._embedding_cache
        with torch.no_grad():
            out = self._encode(prompts, device, negative=[])
        out = out if isinstance(out, tuple) else (out,)
        for i, p in enumerate(prompts):
            cache[p] = tuple(t[i].to("cpu").clone() for t in out)  # a copy: not a view keeping the whole batch alive
        while keep is not None and len(cache) > max(self.options.prompt_cache, keep):
            cache.popitem(last=False)

    def _call_denoiser(self, base: bool, *args, **kwargs):
        """The denoiser's forward, as trained (base = False) or as the frozen base theta_0 (no second copy of it is made)."""
        if not base or self.options.training == "noise":  # training = 'noise' never changes a weight
            return self.denoiser(*args, **kwargs)
        if self.options.training == "lora":
            # peft's disable / enable also set requires_grad on the adapters: put back exactly what was there
            flags = [(p, p.requires_grad) for p in self.denoiser.parameters()]
            self.denoiser.disable_adapters()
            try:
                return self.denoiser(*args, **kwargs)
            finally:
                self.denoiser.enable_adapters()
                for p, flag in flags:
                    p.requires_grad_(flag)
        if self._reference is None:
            raise RuntimeError("the base weights are asked for before snapshot_reference()")
        prefix = self.denoiser_name + "."
        theta_0 = {n[len(prefix):]: t for n, t in self._reference.items() if n.startswith(prefix)}
        if set(theta_0) != {n for n, p in self.denoiser.named_parameters() if p.requires_grad}:
            raise RuntimeError("the reference weights do not cover the trained denoiser's parameters")
        return torch.func.functional_call(self.denoiser, theta_0, args, kwargs)

    def _guided_rows(self, parts: tuple, negative_parts: tuple | None):
        """The text conditioning as `_encode` returns it: [negative; prompts] for each part when guided (negative_parts
        given); float parts in the denoiser's dtype (a float32, fully trained denoiser next to bf16 text encoders),
        integer and boolean ones as they are."""
        if negative_parts is not None:
            parts = tuple(torch.cat([n, p]) for n, p in zip(negative_parts, parts))
        return tuple(p.to(self.denoiser_dtype) if p.is_floating_point() else p for p in parts)

    def _zero_negative(self, negative: str) -> bool:
        """Whether the negative prompt's conditioning is zeros rather than its encoding (SDXL's empty prompt)."""
        return False

    def _negative_prompts(self, n: int) -> list[str]:
        """The unconditional prompts of classifier-free guidance at sampling, or [] without guidance."""
        return [self.options.negative_prompt] * n if self.options.guidance_scale != 1.0 else []

    def _denoiser_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.denoiser_dtype)

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

        Computed from rank x rank products (rewardkit.distributed.lora_squared_norm), so the
        full-size delta W is never materialized (equal to peft's get_delta_weight squared, to
        rounding; see the tests).
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
                total = total + lora_squared_norm(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        return total

    def sampling_settings(self) -> dict:
        """What it takes to reproduce this generator's images with plain diffusers (written by rewardkit.export)."""
        K = self.options.num_steps
        schedule = self.schedule(K, "cpu")
        return {
            "generator": self.name,
            "base_model": self.options.model,
            "num_inference_steps": K,
            "timesteps": [float(t) for t in schedule["timesteps"]],
            "eta": self.options.eta,
            "stochastic_update": self.stochastic_update(),
            "guidance_scale": self.options.guidance_scale,
            "negative_prompt": self.options.negative_prompt,
            "height": self.height,
            "width": self.width,
            "pipeline_call": self.pipeline_call(),
        }

    def pipeline_call(self) -> dict:
        """The arguments of the family pipeline's __call__, besides the prompts and `latents`, that reproduce this
        generator's eta = 0 images (with the scheduler `export_scheduler` gives)."""
        call = {"num_inference_steps": self.options.num_steps, "guidance_scale": self.options.guidance_scale,
                "height": self.height, "width": self.width}
        if self.options.guidance_scale != 1.0:
            call["negative_prompt"] = self.options.negative_prompt
        return call

    # --- family-specific ---------------------------------------------------------------------
    def _check_pipeline(self, pipe) -> None:
        raise NotImplementedError

    def schedule(self, steps: int, device) -> dict[str, torch.Tensor]:
        """{'timesteps': network time input (K,), 'alpha': (K,), 'sigma': (K,)}, float32."""
        raise NotImplementedError

    def noise_levels(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Like `schedule`, for levels u (B,) in [0, 1] of the model's training noise schedule (0: clean, 1: noisiest)."""
        raise NotImplementedError

    def _encode(self, prompts: list[str], device, negative: list[str] | None = None):
        """Text conditioning, without gradient; with `negative` (default: the guidance's, if any) [negative; prompts]."""
        raise NotImplementedError

    def _network(self, x: torch.Tensor, timesteps: torch.Tensor, cond, base: bool = False) -> torch.Tensor:
        """The denoiser's raw output, float32 (through `_call_denoiser(base, ...)`)."""
        raise NotImplementedError

    def _x0_eps(self, x, out, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network output at x with x = alpha x0 + sigma eps."""
        raise NotImplementedError

    def _latents_to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export_scheduler(self):
        """The diffusers scheduler whose default `num_inference_steps = K` reproduces this sampler (rewardkit.export)."""
        raise NotImplementedError


_NEEDS_ETA = ("the score-function estimator needs eta above 0 at every update it trains (they must be Gaussians): set "
              "generator.eta > 0, or regularizers.random_eta.low > 0")


def _conditional_half(cond):
    """The conditional rows of guided text conditioning ([unconditional; conditional]): a tensor or a tuple of them."""
    if isinstance(cond, tuple):
        return tuple(_conditional_half(c) for c in cond)
    return cond[len(cond) // 2 :]


def _rows_of(cond, rows: torch.Tensor, batch: int):
    """The text conditioning of some rows of the batch: a tensor or a tuple of tensors whose first dimension
    is the batch, or twice the batch under classifier-free guidance ([unconditional; conditional])."""
    if isinstance(cond, tuple):
        return tuple(_rows_of(c, rows, batch) for c in cond)
    rows = rows.to(cond.device)
    return cond[rows] if len(cond) == batch else cond[torch.cat([rows, rows + batch])]

