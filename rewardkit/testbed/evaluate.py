"""Evaluation on the testbed with the independent evaluator (never a reward).

For a generator, `evaluate_generator` draws `per_digit` images for each of
the prompts "a handwritten digit 0" .. "9" from fixed noise and reports

- accuracy: the evaluator (an MLP trained on split B, another architecture
  and seed than the reward classifier) agrees with the prompt's digit;
- frechet: the Frechet distance between the evaluator's 64-d penultimate
  features of the generated images and of the 400 held-out real digits;
- diversity: the mean pairwise distance of those features among the images
  of the same digit, averaged over digits (the held-out real digits score
  about the same as the reference row of the table shows);
- ms_per_image: wall time of sampling (text encoding, K network calls - twice
  with classifier-free guidance - and VAE decoding) in batches of 100,
  after one warm-up batch, divided by the number of images.

`rewardkit testbed-report RUN_DIR` prints the table of a finished
`rewardkit run` on the testbed; `rewardkit run` prints it when it ends
(both through the testbed's plugin module, rewardkit/testbed/__init__.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from rewardkit.durable import write_text_atomic
from rewardkit.images import save_grid
from rewardkit.testbed import data
from rewardkit.testbed.data import PACKAGED, weights_dir
from rewardkit.testbed.plugins import TestbedGenerator

EVAL_SEED = 777


def load_evaluator(name: str = PACKAGED):
    from safetensors.torch import load_file

    from rewardkit.testbed.models import DigitMLP

    model = DigitMLP()
    model.load_state_dict(load_file(str(weights_dir(name) / "evaluator.safetensors")))
    return model.eval()


@torch.no_grad()
def evaluator_outputs(evaluator, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of images (N, 3, H, W) in [0, 1]."""
    feats = evaluator.features(data.to_gray(images.float().clamp(0, 1)))
    return evaluator.head(feats), feats


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise feature distance among samples of the same digit, averaged over digits."""
    out = []
    for d in labels.unique():
        f = feats[labels == d].double()
        if len(f) > 1:
            dist = torch.cdist(f, f)
            out.append(float(dist.sum() / (len(f) * (len(f) - 1))))
    return float(np.mean(out))


def eval_batch(generator, per_digit: int, seed: int = EVAL_SEED):
    """Prompts, labels and fixed noise: `per_digit` samples of each digit, the same for every generator."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    prompts = [data.prompt(int(d)) for d in labels]
    noise = torch.randn((len(labels), *generator.noise_shape()), generator=torch.Generator().manual_seed(seed))
    return prompts, labels, noise


@torch.no_grad()
def sample(generator, prompts, noise, options=None, batch: int = 100) -> tuple[torch.Tensor, float]:
    """(images, seconds per image): one warm-up batch, then every batch timed."""
    options = options or generator.sample_options()
    was = generator.training
    generator.eval()
    try:
        generator(list(prompts[:batch]), noise[:batch], options)  # warm-up
        t0 = time.perf_counter()
        out = [generator(list(prompts[i : i + batch]), noise[i : i + batch], options).float().clamp(0, 1) for i in range(0, len(prompts), batch)]
        seconds = time.perf_counter() - t0
    finally:
        generator.train(was)
    return torch.cat(out).cpu(), seconds / len(prompts)


class Reference:
    """The evaluator and the held-out real digits' features, loaded once."""

    def __init__(self, weights: str = PACKAGED):
        self.evaluator = load_evaluator(weights)
        x, y = data.splits()["heldout"]
        _, self.feats = evaluator_outputs(self.evaluator, x)
        self.labels = y

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits, feats = evaluator_outputs(self.evaluator, images)
        return {
            "accuracy": float((logits.argmax(1) == labels).float().mean()),
            "frechet": frechet_distance(feats, self.feats),
            "diversity": diversity(feats, labels),
        }

    def real_row(self) -> dict:
        """Real digits of split A (not held out) scored like a generator: the floor of the table."""
        x, y = data.splits()["a"]
        return self.score(x, y) | {"ms_per_image": float("nan")}


def evaluate_generator(generator, reference: Reference, per_digit: int = 30, options=None, seed: int = EVAL_SEED, return_images: bool = False):
    prompts, labels, noise = eval_batch(generator, per_digit, seed)
    images, spi = sample(generator, prompts, noise, options)
    row = reference.score(images, labels) | {"ms_per_image": 1000 * spi}
    return (row, images) if return_images else row


def teacher(steps: int = 25, guidance: float = 2.0, model: str = PACKAGED, eta: float = 0.0):
    """The packaged teacher as a `testbed` generator (no adapter), set up for sampling."""
    gen = TestbedGenerator(model=model, num_steps=steps, guidance_scale=guidance, eta=eta, training="full", report=False)
    gen.setup([], 0)
    return gen.eval()


def format_table(rows: dict[str, dict]) -> str:
    lines = [
        "| generator | evaluator accuracy | Frechet distance | diversity | ms / image |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ms = "-" if not np.isfinite(r["ms_per_image"]) else f"{r['ms_per_image']:.2f}"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['frechet']:.2f} | {r['diversity']:.3f} | {ms} |")
    return "\n".join(lines)


def report_run(run_dir, *, registry, per_digit: int | None = None) -> str:
    """Evaluate teacher (25 steps + CFG), teacher (K steps) and the trained generator of RUN_DIR
    (its newest checkpoint; `registry` reads its recipe).

    Writes RUN_DIR/testbed_report.{md,json} and a grid per row in RUN_DIR/samples/,
    and returns the markdown table.
    """
    from rewardkit.errors import UserError
    from rewardkit.rundir import load_generator

    run_dir = Path(run_dir)
    trained, _, _ = load_generator(run_dir, registry)
    if not isinstance(trained, TestbedGenerator):
        raise UserError(f"{run_dir} trained generator '{trained.name}'; the testbed report evaluates runs of the 'testbed' generator")
    o = trained.options
    per_digit = per_digit or o.report_samples_per_digit
    ref = Reference(o.model)
    K = o.num_steps
    rows, grids = {}, {}
    big = teacher(o.report_teacher_steps, o.report_teacher_guidance, o.model)
    rows[f"teacher, {o.report_teacher_steps} steps, CFG {o.report_teacher_guidance:g}"], grids["teacher_cfg"] = evaluate_generator(big, ref, per_digit, return_images=True)
    small = teacher(K, 1.0, o.model, eta=o.eta)
    rows[f"teacher, {K} steps, untrained"], grids["teacher_k"] = evaluate_generator(small, ref, per_digit, return_images=True)
    rows[f"trained ({run_dir.name}), {K} steps"], grids["trained"] = evaluate_generator(trained, ref, per_digit, return_images=True)
    rows["real digits (split A), reference"] = ref.real_row()
    table = format_table(rows)
    for name, images in grids.items():
        # one row per digit, the first 10 samples of each
        pick = torch.cat([images[d * per_digit : d * per_digit + min(10, per_digit)] for d in range(10)])
        save_grid(pick, run_dir / "samples" / f"eval_{name}.png", nrow=min(10, per_digit))
    write_text_atomic(run_dir / "testbed_report.md", table + "\n")
    write_text_atomic(run_dir / "testbed_report.json", json.dumps(rows, indent=2) + "\n")
    return table
