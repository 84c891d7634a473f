"""Train everything the testbed ships: `python -m rewardkit.testbed.train [--out DIR]`.

Seeded and reproducible on one machine (same torch build, same thread
count). Stages, each with its own seed:

1. the VAE (16x16 images <-> 4x8x8 latents) on the teacher split;
2. the teacher: UNet + CLIP text encoder trained jointly with the epsilon
   loss on the VAE's latents, prompts drawn from several phrasings, and the
   prompt dropped to "" 10% of the time (classifier-free guidance);
3. the reward models, from split A only: the CNN classifier (`digit_classifier`),
   a PCA of real digits (`digit_realism`) and the class-mean images
   (`digit_prototype`);
4. the evaluator, an MLP trained on split B with another seed; it is never
   used as a reward.

Writes DIR/teacher/ (a diffusers pipeline folder, fp16 safetensors),
DIR/reward_models.safetensors, DIR/evaluator.safetensors and DIR/manifest.json.
The default DIR is the package's weights folder, which is what ships.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rewardkit.testbed import data, models

log = logging.getLogger("rewardkit.testbed")
SEEDS = {"vae": 1, "teacher": 2, "classifier": 3, "evaluator": 4}
PCA_COMPONENTS = 16
CFG_DROPOUT = 0.1
TEXT_PRETRAIN_STEPS = 200


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (of 16) and a little brightness jitter."""
    B = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2, B), generator=g)
    out = torch.stack([pad[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16] for i in range(B)])
    return (out * (0.8 + 0.4 * torch.rand(B, 1, 1, 1, generator=g))).clamp(0, 1)


def train_vae(x: torch.Tensor, steps: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = models.vae()
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for step in range(steps):
        batch = x[torch.randint(len(x), (64,), generator=g)] * 2 - 1
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, batch) + 1e-5 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("vae %d/%d  mse %.5f", step, steps, F.mse_loss(rec, batch).item())
    vae.eval()
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


def train_teacher(x, y, vae, steps: int, batch: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet, te, tok, sched = models.unet(), models.text_encoder(), models.clip_tokenizer(), models.scheduler()
    with torch.no_grad():
        post = vae.encode(x * 2 - 1).latent_dist
        mean, std = post.mean, post.std
    sf = vae.config.scaling_factor
    abar = sched.alphas_cumprod.float()
    # every (digit, phrasing) prompt, tokenized once; index -1 is the empty prompt
    texts = [data.prompt(d, t) for d in range(10) for t in data.PHRASINGS] + [""]
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    n_phr = len(data.PHRASINGS)
    # A freshly initialized causal text encoder maps prompts that differ in one late character to
    # nearly the same states, and the UNet then never learns to listen. So first teach the encoder
    # to tell the digits apart (a linear probe on its mean state), then train both jointly.
    probe = torch.nn.Linear(te.config.hidden_size, 10)
    opt_te = torch.optim.Adam(list(te.parameters()) + list(probe.parameters()), lr=1e-3)
    for step in range(TEXT_PRETRAIN_STEPS):
        which = torch.randint(0, len(texts) - 1, (128,), generator=g)
        loss = F.cross_entropy(probe(te(ids[which])[0].mean(1)), which // n_phr)
        opt_te.zero_grad()
        loss.backward()
        opt_te.step()
    log.info("text encoder pre-training: %d steps, loss %.4f", TEXT_PRETRAIN_STEPS, loss.item())
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    warm = max(1, steps // 20)
    lr = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps)))
    )
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in te.state_dict().items()}
    unet.train(), te.train()
    t_start = time.time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        which = y[idx] * n_phr + torch.randint(0, n_phr, (batch,), generator=g)
        which = torch.where(torch.rand(batch, generator=g) < CFG_DROPOUT, torch.full_like(which, len(texts) - 1), which)
        h = te(ids[which])[0]
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=h).sample, eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet.state_dict(), ema), (te.state_dict(), ema_te)):
                for k, v in src.items():
                    if v.dtype.is_floating_point:
                        dst[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                    else:
                        dst[k].copy_(v)
        if step % 100 == 0 or step == steps - 1:
            log.info("teacher %d/%d  loss %.4f  (%.0f s)", step, steps, loss.item(), time.time() - t_start)
    unet.load_state_dict(ema)
    te.load_state_dict(ema_te)
    return unet.eval(), te.eval(), tok, sched


def train_classifier(model, x, y, epochs: int, seed: int, lr: float = 2e-3, batch: int = 64):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            inp = data.to_gray(_augment(x[idx], g))
            loss = F.cross_entropy(model(inp), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(data.to_gray(x)).argmax(1) == y).float().mean())


def reward_model_tensors(cnn, xa, ya) -> dict[str, torch.Tensor]:
    """The classifier's weights (cnn.*), the PCA of split A (pca.*, realism.basis) and class means (proto.*)."""
    flat = data.to_gray(xa).flatten(1)
    mean = flat.mean(0)
    _, s, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    out = {f"cnn.{k}": v.contiguous() for k, v in cnn.state_dict().items()}
    out["pca.mean"] = mean.contiguous()
    out["pca.components"] = vh[:PCA_COMPONENTS].contiguous()
    # digit_realism: the top principal directions of the raw (uncentred) digits, so the mean digit is in the span
    out["realism.basis"] = torch.linalg.svd(flat, full_matrices=False)[2][:PCA_COMPONENTS].contiguous()
    out["proto.means"] = torch.stack([flat[ya == d].mean(0) for d in range(10)]).contiguous()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rewardkit.testbed.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=data.WEIGHTS_DIR, help=f"output folder (default: the package's, {data.WEIGHTS_DIR})")
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--teacher-batch", type=int, default=64)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--reuse-classifiers", action="store_true", help="keep the classifier and evaluator already in --out (retrain VAE and teacher only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    t0 = time.time()
    sp = data.splits()
    xt, yt = sp["teacher"]
    xa, ya = sp["a"]
    xb, yb = sp["b"]
    xh, yh = sp["heldout"]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"seeds": SEEDS, "split_seed": data.SPLIT_SEED, "sizes": {k: len(v[0]) for k, v in sp.items()}, "args": {k: str(v) for k, v in vars(args).items()}}

    if args.reuse_classifiers:
        from safetensors.torch import load_file

        cnn, mlp = models.DigitCNN(), models.DigitMLP()
        cnn.load_state_dict({k[4:]: v for k, v in load_file(str(args.out / "reward_models.safetensors")).items() if k.startswith("cnn.")})
        mlp.load_state_dict(load_file(str(args.out / "evaluator.safetensors")))
        cnn.eval(), mlp.eval()
    else:
        cnn = train_classifier(models.DigitCNN(), xa, ya, args.classifier_epochs, SEEDS["classifier"])
        save_file(reward_model_tensors(cnn, xa, ya), args.out / "reward_models.safetensors")
        mlp = train_classifier(models.DigitMLP(), xb, yb, args.classifier_epochs * 2, SEEDS["evaluator"], lr=1e-3)
        save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, args.out / "evaluator.safetensors")
    manifest["classifier_heldout_accuracy"] = accuracy(cnn, xh, yh)
    log.info("classifier: held-out accuracy %.4f", manifest["classifier_heldout_accuracy"])
    manifest["evaluator_heldout_accuracy"] = accuracy(mlp, xh, yh)
    log.info("evaluator: held-out accuracy %.4f", manifest["evaluator_heldout_accuracy"])

    vae = train_vae(xt, args.vae_steps, SEEDS["vae"])
    with torch.no_grad():
        rec = (vae.decode(vae.encode(xh * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
    manifest["vae_heldout_mse"] = float(F.mse_loss(rec, xh))
    manifest["vae_heldout_evaluator_accuracy"] = accuracy(mlp, rec, yh)
    log.info("vae: held-out mse %.5f, evaluator accuracy on reconstructions %.4f", manifest["vae_heldout_mse"], manifest["vae_heldout_evaluator_accuracy"])

    unet, te, tok, sched = train_teacher(xt, yt, vae, args.teacher_steps, args.teacher_batch, SEEDS["teacher"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(args.out / "teacher", safe_serialization=True)
    manifest["train_seconds"] = round(time.time() - t0, 1)
    manifest["torch"] = torch.__version__
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s in %.0f s", args.out, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
