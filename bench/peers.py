"""rewardkit's training step against a hand-written diffusers + peft loop doing the same work.

    python bench/peers.py                    # K = 4 all steps, K = 25 last step, K = 4 with CFG; 1 thread
    python bench/peers.py --rounds 9 --steps 5

Both train a LoRA (rank 4, on the UNet's attention projections) of the
packaged testbed teacher (an SD 1.x pipeline) to raise the colour reward of
its images, batch 8, Adam, no regularizer: prompts are embedded once (the
loop keeps them; rewardkit's prompt cache does), noise is drawn per step,
K DDIM steps at eta = 0 (diffusers' DDIMScheduler in the loop, rewardkit's
sampler in rewardkit) with gradient through all steps or the last one, VAE
decode, reward, backward, optimizer step. rewardkit's step is the whole
`Optimizer` step: drawing the batch, the pathwise surrogate, the NaN guard,
logging one metrics line. UNet calls are counted (a forward pre-hook) to
show the work is the same.

Timing: one torch thread, rounds interleaved (A then B, then B then A, ...)
so that a shared machine's slow moments hit both; per step the median and
the minimum over all rounds' steps. Memory: what a step's autograd graph
holds for backward (saved tensors, parameters excluded), on an untimed step.
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

BATCH, RANK, LR = 8, 4, 1e-4
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


# ----------------------------------------------------------------------------- measuring
class UNetCalls:
    def __init__(self, unet):
        self.n = 0
        unet.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def timed_step(runner, calls: UNetCalls) -> tuple[float, int]:
    """(seconds, UNet calls) of one step."""
    n0 = calls.n
    t = time.perf_counter()
    runner.step()
    return time.perf_counter() - t, calls.n - n0


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


def compare(name: str, K: int, grad_last: int | None, guidance: float, rounds: int, steps: int, tmp: Path) -> dict:
    from rewardkit.testbed.data import weights_dir

    runners = {"hand-written": HandWritten(weights_dir() / "teacher", K, grad_last, guidance),
               "rewardkit": Rewardkit(tmp / name.replace(" ", "_"), K, grad_last, guidance)}
    calls = {k: UNetCalls(r.unet) for k, r in runners.items()}
    results = {k: {"times": [], "calls": set(), "activations_mb": activation_mb(r)} for k, r in runners.items()}  # also the warm-up
    order = list(runners)
    for i in range(rounds):
        for k in order if i % 2 == 0 else order[::-1]:
            for _ in range(steps):
                dt, n = timed_step(runners[k], calls[k])
                results[k]["times"].append(dt)
                results[k]["calls"].add(n)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per runner per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default="k4,k25,cfg", help="k4: K = 4, gradient through all steps; k25: K = 25, through the last; cfg: K = 4 with guidance 2")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {"k4": ("K = 4, gradient through all steps", 4, None, 1.0),
             "k25": ("K = 25, gradient through the last step", 25, 1, 1.0),
             "cfg": ("K = 4, all steps, CFG 2", 4, None, 2.0)}
    print(f"torch {torch.__version__}, {args.threads} thread(s); batch {BATCH}, LoRA rank {RANK}, colour reward; "
          f"{args.rounds} interleaved rounds x {args.steps} steps each\n")
    print("| case | loop | median ms / step | min ms / step | UNet calls / step | activations (MB) | median ratio | min ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.cases.split(","):
            label, K, grad_last, guidance = cases[key]
            res = compare(label, K, grad_last, guidance, args.rounds, args.steps, Path(tmp))
            base = res["hand-written"]
            for loop, r in res.items():
                med, mn = 1000 * statistics.median(r["times"]), 1000 * min(r["times"])
                ratio = (f"{med / (1000 * statistics.median(base['times'])):.3f} | {mn / (1000 * min(base['times'])):.3f}"
                         if loop == "rewardkit" else "1 | 1")
                calls = ",".join(map(str, sorted(r["calls"])))
                print(f"| {label} | {loop} | {med:.1f} | {mn:.1f} | {calls} | {r['activations_mb']:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
