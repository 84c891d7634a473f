"""rewardkit's training step against a hand-written diffusers + peft loop doing the same work, and trl's AlignPropTrainer.

    python bench/peers.py                          # K = 4 all steps, K = 25 last step, K = 4 with CFG; 1 thread
    python bench/peers.py --rounds 100 --cases k4,cfg
    /tmp/trl-venv/bin/python bench/peers.py --trl  # also trl 0.23.1's AlignPropTrainer (side environment: docs/benchmarks.md)

Each loop trains a LoRA (rank 4, on the UNet's attention projections) of
the packaged testbed teacher (an SD 1.x pipeline) to raise the colour reward
of its images, batch 8, Adam, no regularizer: noise drawn per step, K DDIM
steps at eta = 0 (diffusers' DDIMScheduler in the loop and in trl,
rewardkit's sampler in rewardkit) with gradient through all steps or the
last one, VAE decode, reward, backward, optimizer step. rewardkit's step is
the whole `Optimizer` step: drawing the batch, the prompt cache, the
pathwise surrogate, the NaN guard, logging one metrics line.

Timing: CPU time of the process per step on one torch thread (the step's
work; a shared machine's preemption does not count), rounds interleaved
(A B, then B A, ...) after a warm-up; the ratio is the median over rounds of
each loop's round median over the hand-written loop's, with a bootstrap
interval. The work is counted: UNet calls (a forward pre-hook), FLOPs and
aten operators (at torch's dispatcher), and what a step's autograd graph
saves, on untimed steps.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

BATCH, RANK, LR = 8, 4, 1e-4
WARMUP = 4  # untimed steps per loop before measuring (4 x 8 draws: every one of the 10 prompts seen, almost surely)
TARGET = (0.9, 0.1, 0.1)
PROMPTS = [f"a handwritten digit {d}" for d in range(10)]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------- the hand-written loop (diffusers + peft)
class HandWritten:
    """What one would write without rewardkit: ~50 lines."""

    def __init__(self, folder: Path, K: int, grad_last: int | None, guidance: float):
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
        self.unet, self.vae = pipe.unet, pipe.vae
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False).eval()
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True))
        self.params = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=LR)
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        self.scheduler.set_timesteps(K)
        self.K, self.grad_last, self.guidance = K, grad_last, guidance
        with torch.no_grad():  # the prompts' embeddings, once
            tok = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
            embeds = pipe.text_encoder(tok.input_ids)[0]
        self.embeds, self.negative = embeds[:-1], embeds[-1:]
        self.shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.sf = pipe.vae.config.scaling_factor
        self.rng = torch.Generator().manual_seed(0)
        self.target = torch.tensor(TARGET).view(1, 3, 1, 1)

    def step(self):
        idx = torch.randint(len(PROMPTS), (BATCH,), generator=self.rng)
        cond = self.embeds[idx]
        if self.guidance != 1.0:
            cond = torch.cat([self.negative.expand(BATCH, -1, -1), cond])
        x = torch.randn((BATCH, *self.shape), generator=self.rng)
        for i, t in enumerate(self.scheduler.timesteps):
            with torch.set_grad_enabled(self.grad_last is None or i >= self.K - self.grad_last):
                x_in = torch.cat([x, x]) if self.guidance != 1.0 else x
                eps = self.unet(x_in, t, encoder_hidden_states=cond).sample
                if self.guidance != 1.0:
                    uncond, c = eps.chunk(2)
                    eps = uncond + self.guidance * (c - uncond)
                out = self.scheduler.step(eps, t, x, eta=0.0)
                x, x0 = out.prev_sample, out.pred_original_sample
        images = (self.vae.decode(x0 / self.sf).sample / 2 + 0.5).clamp(0, 1)
        reward = -((images - self.target) ** 2).mean(dim=(1, 2, 3))
        loss = -reward.mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ----------------------------------------------------------------------------- rewardkit
class Rewardkit:
    def __init__(self, run_dir: Path, K: int, grad_last: int | None, guidance: float):
        from rewardkit import Optimizer
        from rewardkit.rewards.color import Color
        from rewardkit.testbed.plugins import TestbedGenerator

        gen = TestbedGenerator(num_steps=K, training="lora", lora_rank=RANK, grad_steps=grad_last, guidance_scale=guidance, report=False)
        run = {"dir": str(run_dir), "steps": 10**6, "batch_size": BATCH, "trackers": [], "progress": False, "sample_every": 0, "checkpoint_every": 0}
        self.opt = Optimizer(gen, {"color": Color(target=TARGET)}, prompts=PROMPTS, run=run, optimizer={"name": "adam", "lr": LR})
        self.opt._setup(resume=False)  # the loop's own set-up; each timed step is then exactly Optimizer._step
        self.unet = gen.unet
        self.k = 0

    def step(self):
        self.k += 1
        return self.opt._step(self.k)["loss"]


# ----------------------------------------------------------------------------- trl's AlignPropTrainer (side environment)
class AlignProp:
    """trl 0.23.1's AlignPropTrainer (the last trl that has it) on the same work, with two changes so that it
    is the same work: its pipeline's `rgb_with_grad` runs without gradient checkpointing (trl turns it on and
    the trainer does not expose it; the other two loops do not checkpoint), and diffusers' deprecated
    `_encode_prompt`, which always concatenates negative and positive embeddings, returns the positive ones
    alone when there is no guidance (trl's no-CFG path fails without it). It encodes its prompts every step and
    clips the gradient norm, as trl does."""

    def __init__(self, folder: Path, K: int, grad_last: int | None, guidance: float):
        from accelerate import PartialState

        PartialState()  # trl 0.23's trainer reads accelerate's state before it creates its Accelerator
        from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

        class Pipeline(DefaultDDPOStableDiffusionPipeline):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                sd = self.sd_pipeline

                def encode(prompt, device, n, cfg, negative_prompt=None, **kw):
                    positive, negative = sd.encode_prompt(prompt, device, n, cfg, negative_prompt, **kw)
                    return torch.cat([negative, positive]) if cfg else positive

                sd._encode_prompt = encode

            def rgb_with_grad(self, *args, **kwargs):
                return super().rgb_with_grad(*args, gradient_checkpoint=False, **kwargs)

        rng = torch.Generator().manual_seed(0)
        target = torch.tensor(TARGET).view(1, 3, 1, 1)
        config = AlignPropConfig(mixed_precision="no", log_with=None, sample_num_steps=K, sample_eta=0.0,
                                 sample_guidance_scale=guidance, train_batch_size=BATCH, train_learning_rate=LR,
                                 train_adam_weight_decay=0.0, truncated_backprop_rand=False,
                                 truncated_backprop_timestep=0 if grad_last is None else K - grad_last)
        self.trainer = AlignPropTrainer(
            config,
            lambda images, prompts, meta: (-((images - target) ** 2).mean(dim=(1, 2, 3)), {}),
            lambda: (PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=rng))], {}),
            Pipeline(str(folder), use_lora=True))
        self.trainer.sd_pipeline.set_progress_bar_config(disable=True)
        self.unet = self.trainer.sd_pipeline.unet
        self.k = 0

    def step(self):
        self.k += 1
        self.trainer.step(0, self.k)  # epoch 0: trl saves a checkpoint at every other epoch


# ----------------------------------------------------------------------------- measuring
class UNetCalls:
    def __init__(self, unet):
        self.n = 0
        unet.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def timed_step(runner, calls: UNetCalls) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, UNet calls) of one step."""
    n0 = calls.n
    wall, cpu = time.perf_counter(), time.process_time()
    runner.step()
    return time.perf_counter() - wall, time.process_time() - cpu, calls.n - n0


def activation_mb(runner) -> float:
    """What one step's autograd graph holds for backward: distinct saved tensors, parameters excluded (MB).
    Measured on an untimed step (the hooks cost time); exact on CPU, where no allocator statistic exists."""
    params = {p.untyped_storage().data_ptr() for p in runner.unet.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.step()
    return sum(seen.values()) / 2**20


def compare(name: str, K: int, grad_last: int | None, guidance: float, rounds: int, steps: int, tmp: Path, trl: bool) -> dict:
    from rewardkit.testbed.data import weights_dir

    teacher = weights_dir() / "teacher"
    runners = {"hand-written": HandWritten(teacher, K, grad_last, guidance),
               "rewardkit": Rewardkit(tmp / name.replace(" ", "_"), K, grad_last, guidance)}
    if trl:
        runners["trl AlignProp"] = AlignProp(teacher, K, grad_last, guidance)
    calls = {k: UNetCalls(r.unet) for k, r in runners.items()}
    for r in runners.values():  # warm-up: rewardkit encodes each prompt at its first use (the loop, all at set-up)
        for _ in range(WARMUP):
            r.step()
    results = {k: {"wall": [], "cpu": [], "rounds": [], "calls": set(), "activations_mb": activation_mb(r),
                   "work": work(r)} for k, r in runners.items()}  # untimed steps
    order = list(runners)
    for i in range(rounds):
        for k in order if i % 2 == 0 else order[::-1]:
            cpu = []
            for _ in range(steps):
                dt, dc, n = timed_step(runners[k], calls[k])
                results[k]["wall"].append(dt)
                cpu.append(dc)
                results[k]["calls"].add(n)
            results[k]["cpu"] += cpu
            results[k]["rounds"].append(statistics.median(cpu))
    return results


def ratio(r: dict, base: dict) -> tuple[float, float, float]:
    """Per round, the loop's median CPU time over the hand-written loop's in the same round (pairing by round
    cancels the machine's slow drift, which moves both loops alike): the median of these ratios and its 95 %
    bootstrap interval (resampling rounds)."""
    each = [a / b for a, b in zip(r["rounds"], base["rounds"])]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(each, k=len(each))) for _ in range(2000))
    return statistics.median(each), boot[50], boot[1949]


def work(runner) -> tuple[float, int]:
    """(GFLOP, aten operators) of one step, forward and backward, counted at torch's dispatcher with the FLOP
    formulas of torch.utils.flop_counter (its FlopCounterMode's module hooks break autograd.grad): the same work
    is the same count."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        flops, ops = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            self.ops += 1
            if func._overloadpacket in flop_registry:
                self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            return out

    with Count() as count:
        runner.step()
    return count.flops / 1e9, count.ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=2, help="steps per runner per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="k4,k25,cfg", help="k4: K = 4, gradient through all steps; k25: K = 25, through the last; cfg: K = 4 with guidance 2")
    parser.add_argument("--trl", action="store_true", help="also trl 0.23.1's AlignPropTrainer (run this script in the side environment docs/benchmarks.md describes)")
    args = parser.parse_args(argv)
    if args.trl:
        try:
            import trl
        except ImportError:
            print("--trl: trl is not importable here. Make the side environment docs/benchmarks.md describes "
                  "(trl 0.23.1 is not a rewardkit dependency) and run this script with its python.", file=sys.stderr)
            return 2
        if not hasattr(trl, "AlignPropTrainer"):
            print(f"--trl: trl {trl.__version__} has no AlignPropTrainer (removed in 0.24); install trl==0.23.1 "
                  "in the side environment.", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    cases = {"k4": ("K = 4, gradient through all steps", 4, None, 1.0),
             "k25": ("K = 25, gradient through the last step", 25, 1, 1.0),
             "cfg": ("K = 4, all steps, CFG 2", 4, None, 2.0)}
    print(f"torch {torch.__version__}, {args.threads} thread(s); batch {BATCH}, LoRA rank {RANK}, colour reward; "
          f"{args.rounds} interleaved rounds x {args.steps} steps each; CPU time of the process per step\n")
    print("| case | loop | median CPU ms / step | min CPU ms / step | median wall ms / step | UNet calls / step "
          "| GFLOP / step | aten ops / step | activations (MB) | ratio (median of rounds) | 95 % interval |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases.split(","):
            label, K, grad_last, guidance = cases[key]
            res = compare(label, K, grad_last, guidance, args.rounds, args.steps, Path(tmp), args.trl)
            base = res["hand-written"]
            for loop, r in res.items():
                med, mn, wall = (1000 * f(r[k]) for f, k in ((statistics.median, "cpu"), (min, "cpu"), (statistics.median, "wall")))
                mid, lo, hi = ratio(r, base)
                calls = ",".join(map(str, sorted(r["calls"])))
                print(f"| {label} | {loop} | {med:.1f} | {mn:.1f} | {wall:.1f} | {calls} | {r['work'][0]:.2f} | {r['work'][1]} | {r['activations_mb']:.1f} "
                      f"| {mid:.3f} | {lo:.3f}-{hi:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
