"""Time and memory per training step of the `sd` / `sd3` generators, by training mode.

    python bench/generators.py                 # tiny random-weight models, CPU; prints a markdown table
    python bench/generators.py --model-sd PATH --model-sd3 PATH --size 512   # real models (GPU)

For each family, LoRA vs full fine-tune, gradient through all K steps / the
last step / one random intermediate step (R0+), with and without gradient
checkpointing, one training step is: sample K steps -> decode -> colour
reward -> weight-L2 penalty -> backward -> Adam step. Reported per step:

- time: median CPU time (process time) and median wall time over --repeat
  steps after one warm-up step. Run with --threads 1 (the default) on a
  shared CPU machine: CPU time then barely depends on other jobs, while wall
  time does;
- activations: bytes the autograd graph holds for the backward pass (sum of
  distinct tensors saved for backward, parameters excluded), measured with
  saved-tensor hooks at the end of the forward pass. It is what the gradient
  mode and checkpointing change, and it is exact on CPU, where no allocator
  statistic is available; tensors inside checkpointed regions are not held
  and are not counted;
- train state: trainable weights + their gradients + Adam's two moments;
- on CUDA, also the allocator's peak (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MODES = ("all", "last", "intermediate", "deep")


class SavedBytes:
    """Counts the distinct non-parameter tensors autograd saves for backward."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def bench_one(cls, model, *, training, mode, checkpointing, size, steps, batch, repeat, device, prompt_cache=4096):
    from rewardkit.regularizers.intermediate_step import IntermediateStep
    from rewardkit.regularizers.weight_l2 import WeightL2
    from rewardkit.rewards.color import Color

    gen = cls(model=model, training=training, num_steps=steps, lora_rank=8, gradient_checkpointing=checkpointing,
              height=size, width=size, grad_steps=1 if mode == "last" else None, prompt_cache=prompt_cache)
    gen.setup(["a"], 0)
    gen.to(device)
    l2, reward = WeightL2(weight=1.0), Color().to(device)
    picker = IntermediateStep(supervision="every_step" if mode == "deep" else "random_step")
    l2.setup(gen)
    params = gen.trainable_parameters()
    opt = torch.optim.Adam(params, lr=1e-5)
    rng = torch.Generator().manual_seed(0)
    prompts = ["a red cat", "a photo of a dog", "a blue house", "the sea"][:batch] * (1 + batch // 4)
    prompts = prompts[:batch]
    times, cpu, activations = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(repeat + 1):
        noise = torch.randn((batch, *gen.noise_shape()), generator=rng).to(device)
        options = gen.sample_options()
        if mode in ("intermediate", "deep"):
            options = picker.adjust_sampling(options, batch, rng)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t, c = time.perf_counter(), time.process_time()
        with SavedBytes(params) as saved:
            images = gen(prompts, noise, options)
            loss = -reward(images, prompts * (len(images) // batch)).mean() + l2.penalty(gen)  # deep: every step's images
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            activations.append(saved.bytes)
    trainable = sum(p.numel() * p.element_size() for p in params)
    row = {
        "time_ms": 1000 * statistics.median(times),
        "cpu_ms": 1000 * statistics.median(cpu),
        "activations_mb": statistics.mean(activations) / 2**20,
        "train_state_mb": 4 * trainable / 2**20,  # weights + grads + Adam m, v
        "trainable_params": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-sd", help="an SD model (default: a tiny random one)")
    parser.add_argument("--model-sd3", help="an SD3 model (default: a tiny random one)")
    parser.add_argument("--families", default="sd,sd3")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=4, help="K, sampler steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--prompt-cache", type=int, default=4096, help="generator.prompt_cache (0: encode the prompts at every step)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    from rewardkit.generators.sd import StableDiffusion
    from rewardkit.generators.sd3 import StableDiffusion3

    tmp = tempfile.TemporaryDirectory()
    models = {}
    for family in args.families.split(","):
        given = args.model_sd if family == "sd" else args.model_sd3
        if given is None:
            from tiny_models import save_tiny_sd, save_tiny_sd3

            given = str((save_tiny_sd if family == "sd" else save_tiny_sd3)(Path(tmp.name) / family))
        models[family] = (StableDiffusion if family == "sd" else StableDiffusion3, given)

    cuda = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'CPU'} ({torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{args.size} px, K = {args.steps}, batch {args.batch}, median of {args.repeat} steps\n")
    head = "| family | training | gradient through | checkpointing | CPU time / step (ms) | wall time / step (ms) | activations (MB) | train state (MB) |"
    print(head + (" CUDA peak (MB) |" if cuda else ""))
    print("|" + "---|" * (9 if cuda else 8))
    for family, (cls, model) in models.items():
        for training in ("lora", "full"):
            for mode in args.modes.split(","):
                for checkpointing in (False, True):
                    r = bench_one(cls, model, training=training, mode=mode, checkpointing=checkpointing, size=args.size,
                                  steps=args.steps, batch=args.batch, repeat=args.repeat, device=device, prompt_cache=args.prompt_cache)
                    label = {"all": f"all {args.steps} steps", "last": "last step", "intermediate": "random step (R0+)", "deep": "every step's x0 (R0+, deep)"}[mode]
                    line = (f"| {family} | {training} | {label} | {'on' if checkpointing else 'off'} | {r['cpu_ms']:.0f} | {r['time_ms']:.0f} | "
                            f"{r['activations_mb']:.2f} | {r['train_state_mb']:.2f} |")
                    print(line + (f" {r['cuda_peak_mb']:.0f} |" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
