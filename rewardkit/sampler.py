"""R0's K-step stochastic sampler, apart from any model (as diffusers keeps schedulers apart from models).

A schedule is written as x_t = alpha_t * x0 + sigma_t * eps:

    SD (eps / v prediction):  alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)
    SD3 (flow matching):      alpha_t = 1 - t,         sigma_t = t

Each step asks the model, through a `predict(x_t, k, rows)` callable, for the clean
image and the noise (x0_hat, eps_hat) and moves to the next, lower noise level
s with R0's DDIM-form update

    sigma_eta = eta * sigma_s * sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2)
    x_s = alpha_s * x0_hat + sqrt(sigma_s^2 - sigma_eta^2) * eps_hat + sigma_eta * xi

sigma_eta at eta = 1 is the standard deviation of the Gaussian posterior
q(x_s | x_t, x0) for any alpha / sigma schedule, and x_s then has that
posterior's mean; eta in [0, 1] interpolates to the deterministic update at
eta = 0. For SD's variance-preserving schedule this is exactly DDIM's
sigma = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s); for flow
matching it is the Euler step at eta = 0 (x_s = x_t + (s - t) v) and never
asks for more fresh noise than sigma_s (DDIM's VP-only formula does, for
flow matching). Whatever eta is, x_s keeps the marginal noise level sigma_s.
The output is the x0_hat of the last step, of one supervised step (R0+ as a
random step) or of several steps stacked (R0+ as deep supervision).
The method and which parts of it are reconstructed: docs/r0.md.

Only torch is imported: the sampler knows nothing of pipelines.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch

Predict = Callable[[torch.Tensor, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
"""predict(x_t, k, rows) -> (x0_hat, eps_hat) at step k, float32, for the samples `rows` of the batch
(x_t holds just those rows; None: the whole batch, in order)."""


def eta_matrix(eta: float | torch.Tensor, batch: int, steps: int, device) -> torch.Tensor:
    """eta as a (B, K) float32 tensor in [0, 1]: column k is used by the update after step k."""
    e = torch.as_tensor(eta, dtype=torch.float32, device=device)
    if e.dim() == 0:
        e = e.expand(batch, steps)
    elif e.dim() == 1 and e.shape[0] == batch:
        e = e[:, None].expand(batch, steps)
    elif e.dim() != 2 or e.shape != (batch, steps):
        raise ValueError(f"eta must be a float, a ({batch},) or a ({batch}, {steps}) tensor; got shape {tuple(e.shape)}")
    if not bool(((e >= 0) & (e <= 1)).all()):  # NaN fails too
        raise ValueError(f"eta must be in [0, 1] (0: deterministic, 1: the posterior's noise); got values in [{float(e.min())}, {float(e.max())}]")
    return e


def step_noise(noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The fresh noise xi of each update, (B, steps, *shape), determined by each sample's own noise.

    Every sample seeds a torch.Generator with a hash of its input noise, so:
    a fixed seed gives the same images (`rewardkit sample`), a resumed run
    draws exactly what the uninterrupted one would have, and a sample's
    images do not depend on the batch it was generated in.
    """
    out = [torch.randn((steps, *z.shape), generator=rng_of(z)) for z in noise.detach().to("cpu", torch.float32)]
    return torch.stack(out).to(noise.device)


def rng_of(t: torch.Tensor) -> torch.Generator:
    """A CPU torch.Generator seeded by a hash of the tensor's values: the same tensor, the same draws."""
    seed = int.from_bytes(hashlib.blake2b(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


def posterior_std(alpha_t, sigma_t, alpha_s, sigma_s):
    """The standard deviation of q(x_s | x_t, x0) for x = alpha x0 + sigma eps, s less noisy than t."""
    r = (alpha_t * sigma_s) / (alpha_s * sigma_t)  # the signal-to-noise ratio of t over that of s: below 1
    if bool((r > 1 + 1e-6).any()):
        raise ValueError(f"an update must go to a less noisy level: alpha/sigma {float(alpha_s / sigma_s):.4g} at s is below {float(alpha_t / sigma_t):.4g} at t")
    return sigma_s * torch.sqrt(torch.clamp(1 - r**2, min=0.0))  # clamp: rounding only


def transition(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta) -> tuple[torch.Tensor, torch.Tensor]:
    """The update from t to s as the Gaussian it is: (mean, like x0; standard deviation sigma_eta, (B,)); eta is (B,)."""
    sigma_eta = eta * posterior_std(alpha_t, sigma_t, alpha_s, sigma_s)
    s2 = (sigma_eta**2).view((-1,) + (1,) * (x0.dim() - 1))
    return alpha_s * x0 + torch.sqrt(torch.clamp(sigma_s**2 - s2, min=0.0)) * eps, sigma_eta  # clamp: rounding only


def flow_sde_transition(x0, eps, t, s, eta) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's update from t to s (flow matching, x_t = (1 - t) x0 + t eps) as the Gaussian it is: the Euler-Maruyama
    step of the SDE that has the flow ODE's marginals, dx = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw
    with sigma_t = eta sqrt(t / (1 - t)) (Flow-GRPO's noise level a is eta). With x + (1 - t) v = eps and v = eps - x0,
    mean = (1 - s) x0 + (s - sigma_t^2 (t - s) / (2t)) eps and std = sigma_t sqrt(t - s). At t = 1, where t / (1 - t)
    is infinite, the next level's 1 - s stands in for 1 - t (as Flow-GRPO's sigma_max, its schedule's second level)."""
    t_safe = torch.where(t >= 1, s, t)
    var = eta**2 * t / (1 - t_safe)  # sigma_t^2, (B,)
    view = (-1,) + (1,) * (x0.dim() - 1)
    mean = (1 - s) * x0 + (s - (var * (t - s) / (2 * t)).view(view)) * eps
    return mean, torch.sqrt(var * (t - s))


UPDATES = ("ddim", "flow_sde")
"""The stochastic updates: R0's DDIM form (any schedule) and Flow-GRPO's SDE step (flow matching only). At eta = 0
both are the deterministic DDIM / Euler step; for flow matching they agree to first order in the step size
(docs/methods.md)."""


def update_transition(update: str, x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta) -> tuple[torch.Tensor, torch.Tensor]:
    """The update `update` (one of UPDATES) from t to s as a Gaussian: (mean, std (B,))."""
    if update == "ddim":
        return transition(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta)
    if update == "flow_sde":
        return flow_sde_transition(x0, eps, sigma_t, sigma_s, eta)
    raise ValueError(f"update must be one of {UPDATES}; got {update!r}")


def ddim_update(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta, xi):
    """R0's update from noise level t to s (see the module docstring); eta is (B,) in [0, 1], xi like x0 or None."""
    mean, sigma_eta = transition(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, eta)
    return mean if xi is None else mean + sigma_eta.view((-1,) + (1,) * (x0.dim() - 1)) * xi


def transition_log_prob(x_s: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x_s; mean, std^2 I) per sample, (B,), summed over its elements in float64: the log-probability of one
    stochastic update (std > 0, i.e. eta > 0), what a score-function (policy-gradient) estimator differentiates."""
    if bool((std <= 0).any()):
        raise ValueError("a transition's log-probability needs eta > 0: at eta = 0 the update is deterministic")
    x_s, mean, std = x_s.double(), mean.double(), std.double()
    d = x_s[0].numel()
    z = (x_s - mean) / std.view((-1,) + (1,) * (x_s.dim() - 1))
    return -0.5 * z.pow(2).flatten(1).sum(1) - d * torch.log(std) - 0.5 * d * math.log(2 * math.pi)


def sample(
    predict: Predict,
    noise: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    eta: float | torch.Tensor = 0.0,
    supervise_step: int | torch.Tensor | None = None,
    grad_steps: int | None = None,
    grad_to_noise: bool = False,
    trajectory: list | None = None,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
    deep_supervision: tuple[int, ...] | None = None,
    log_probs: list | None = None,
    update: str = "ddim",
) -> torch.Tensor:
    """Run the K = len(alpha) steps from `noise`; the returned clean prediction, with gradient where asked.

    `update` is the stochastic update between steps (one of UPDATES): R0's DDIM form, or for flow matching
    Flow-GRPO's SDE step; eta sets the noise either way.

    Gradient flows into step k of sample i when first_i <= k <= end_i, where
    end_i is the returned step (the last one, or `supervise_step`) and
    first_i = end_i - grad_steps + 1 (grad_steps defaults to all steps, or to
    1 when a step is supervised: R0+ runs the earlier steps without gradient).
    `grad_to_noise`: the noise itself is being optimized, so the gradient
    must reach it through every step (grad_steps then defaults to all).
    If `trajectory` is a list, the x_t entering each step is appended to it
    (for rows past their returned step, what it holds there is meaningless).
    If `log_probs` is a list, the log-probability (B,) of each update under
    the model that made it is appended (NaN where eta is 0; see
    `trajectory_log_probs`, which recomputes them from the trajectory).

    `deep_supervision` (increasing steps, R0+'s second reading): the x0_hat of
    each of these steps is returned, stacked step-major (len x B rows), with
    the gradient of each kept through every step before it, for every row.
    It excludes `supervise_step` and `grad_steps`.

    Each step runs the model with gradient only for the rows that need it and
    not at all for rows already past their returned step, so R0+'s per-sample
    supervised steps cost what their steps imply, not a full backward pass.

    `agree(t)`, the elementwise maximum of an integer tensor over processes, is
    for sharded models (FSDP), whose every forward and backward is a
    collective: every process must then make the same calls. With it, each
    step is one call for the process's whole shard, as many steps and the
    same gradient mode at each step on every process (the union of what their
    rows need), at the memory cost of the rows that did not need gradient (for
    R0+ with a step per sample and a global batch of K or more, about the
    whole chain's activations: gradient checkpointing limits that);
    each call with gradient is tied to the output by a zero, so that its
    backward runs on every process too.
    """
    K = len(alpha)
    B, device = noise.shape[0], noise.device
    eta = eta_matrix(eta, B, K, device)
    if deep_supervision is not None:
        steps_out = [int(k) for k in deep_supervision]
        if supervise_step is not None or grad_steps is not None:
            raise ValueError("deep_supervision keeps the gradient through the whole chain: it excludes supervise_step and grad_steps")
        if not steps_out or any(a >= b for a, b in zip(steps_out, steps_out[1:])) or steps_out[0] < 0 or steps_out[-1] >= K:
            raise ValueError(f"deep_supervision must be increasing steps in [0, {K - 1}] for {K} steps; got {steps_out}")
        supervise_step, grad_steps = steps_out[-1], K
    if supervise_step is None:
        end = torch.full((B,), K - 1, dtype=torch.long, device=device)
    else:
        end = torch.as_tensor(supervise_step, dtype=torch.long, device=device).expand(B)
        if bool(((end < 0) | (end >= K)).any()):
            raise ValueError(f"supervise_step must be in [0, {K - 1}] for {K} steps; got {end.tolist()}")
    span = grad_steps if grad_steps is not None else (1 if supervise_step is not None and not grad_to_noise else K)
    first = (end - span + 1).clamp(min=0)
    last = int(end.max())
    if agree is not None:
        steps = torch.arange(K, device=device)
        needs = ((first[:, None] <= steps) & (steps <= end[:, None])).any(0)  # (K,): some row of this shard needs gradient
        agreed = agree(torch.cat([end.max().view(1), needs.long()]))
        last, needs = int(agreed[0]), agreed[1:] > 0
    xi = step_noise(noise, K - 1) if K > 1 and bool((eta[:, : K - 1] > 0).any()) else None
    view = (B,) + (1,) * (noise.dim() - 1)

    want_grad = torch.is_grad_enabled()
    x, out, tie, stacked = noise.float(), None, None, []
    for k in range(last + 1):
        # Cut the graph in front of each sample's first step with gradient (not in front of
        # step 0: there x is the input noise, which only has a graph when it is optimized).
        if k > 0:
            x = torch.where((first == k).view(view), x.detach(), x)
        if trajectory is not None:
            trajectory.append(x.detach())
        if agree is not None:
            with torch.set_grad_enabled(want_grad and bool(needs[k])):
                x0, eps = predict(x, k, None)
                if x0.requires_grad:  # tie the call to the output, so its backward (a collective too) runs everywhere
                    tie = x0.sum() * 0.0 if tie is None else tie + x0.sum() * 0.0
        else:
            active = k <= end
            x0, eps = _predict_rows(predict, x, k, active & (first <= k) if want_grad else torch.zeros_like(active), active)
        if deep_supervision is None:
            out = x0 if out is None else torch.where((end == k).view(view), x0, out)
        elif k in steps_out:
            stacked.append(x0)
        if k < last:
            if xi is None and log_probs is not None:
                raise ValueError("log-probabilities of the updates need eta > 0: at eta = 0 the sampler is deterministic")
            mean, std = update_transition(update, x0, eps, alpha[k], sigma[k], alpha[k + 1], sigma[k + 1], eta[:, k])
            x = mean if xi is None else mean + std.view(view) * xi[:, k]
            if log_probs is not None:  # (NaN where eta is 0: a deterministic update has no density)
                stochastic = std > 0
                lp = transition_log_prob(x.detach(), mean, torch.where(stochastic, std, torch.ones_like(std)))
                log_probs.append(torch.where(stochastic, lp, torch.full_like(lp, math.nan)))
    if deep_supervision is not None:
        out = torch.cat(stacked)
    return out if tie is None else out + tie


def trajectory_log_probs(predict: Predict, trajectory: list[torch.Tensor], alpha: torch.Tensor, sigma: torch.Tensor,
                         eta: float | torch.Tensor, steps: list[int], update: str = "ddim", reference: Predict | None = None):
    """log p(x_{k+1} | x_k) (B, len(steps)) of a recorded trajectory (`sample(trajectory=...)`, x_0 .. x_{K-1}) under
    `predict`: the states are data (detached), the gradient, where enabled, reaches the model through each update's
    mean. With the model that sampled it, these are `sample(log_probs=...)`'s values: an importance ratio of 1.

    With a `reference` model, (log_p, kl): kl (B, len(steps)) is KL(p(. | x_k) || p_ref(. | x_k)) of each update per
    element, float64. The two Gaussians share their standard deviation (it depends on the schedule and eta only), so
    it is mean ||mean - mean_ref||^2 / (2 std^2), with gradient through `predict`'s mean only."""
    K = len(alpha)
    B = trajectory[0].shape[0]
    eta = eta_matrix(eta, B, K, trajectory[0].device)
    out, kls = [], []
    for k in steps:
        if not 0 <= k < len(trajectory) - 1:
            raise ValueError(f"step {k}: the trajectory's updates are steps 0 .. {len(trajectory) - 2}")
        x0, eps = predict(trajectory[k].detach(), k, None)
        mean, std = update_transition(update, x0, eps, alpha[k], sigma[k], alpha[k + 1], sigma[k + 1], eta[:, k])
        out.append(transition_log_prob(trajectory[k + 1].detach(), mean, std))
        if reference is not None:
            with torch.no_grad():
                ref_mean, _ = update_transition(update, *reference(trajectory[k].detach(), k, None),
                                                alpha[k], sigma[k], alpha[k + 1], sigma[k + 1], eta[:, k])
            d = (mean.double() - ref_mean.double()).flatten(1)
            kls.append(d.pow(2).mean(1) / (2 * std.double() ** 2))
    log_p = torch.stack(out, 1)
    return log_p if reference is None else (log_p, torch.stack(kls, 1))


def _predict_rows(predict: Predict, x: torch.Tensor, k: int, with_grad: torch.Tensor, active: torch.Tensor):
    """(x0_hat, eps_hat) for the whole batch: `with_grad` rows with gradient, the other active rows without,
    inactive rows (past their returned step) not computed (zeros, never used)."""
    if bool(active.all()) and (bool(with_grad.all()) or not bool(with_grad.any())):
        with torch.set_grad_enabled(bool(with_grad.any())):
            return predict(x, k, None)
    parts, order = [], []
    for rows, grad in ((with_grad.nonzero()[:, 0], True), ((active & ~with_grad).nonzero()[:, 0], False)):
        if len(rows):
            with torch.set_grad_enabled(grad):
                parts.append(predict(x[rows], k, rows))
            order.append(rows)
    rows = torch.cat(order)
    x0, eps = (torch.zeros_like(x).index_put((rows,), torch.cat([p[i] for p in parts])) for i in (0, 1))
    return x0, eps
