"""The score-function (policy-gradient) estimator: GRPO on the sampler's transition log-probabilities.

A reward with `estimator = "score_function"` reaches the generator not through
its image gradient (R0's pathwise estimator) but through the log-probabilities
of the sampler's stochastic updates: at eta > 0 each update is a Gaussian with
a known mean and standard deviation (rewardkit.sampler.transition), so a
trajectory's log-probability is exact and the reward need not be
differentiable. GRPO (as Flow-GRPO uses it):

- each prompt of a batch is sampled G times (`group_size`); a sample's
  advantage is its reward minus its group's mean, over the group's standard
  deviation (or the batch's: `standardize = "global"`), clipped to
  +-`advantage_clip`;
- the loss of an update at a step k is -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
  with rho = exp((log p_theta - log p_old) / d) the importance ratio against the
  log-probabilities at sampling time, per element of the d-dimensional update
  (the geometric mean of the per-element ratios, Flow-GRPO's form, whose
  clip range 1e-4 assumes it); averaged over samples and the trained steps;
- `updates_per_batch` optimizer updates reuse one batch of samples: the first
  at rho = 1 exactly (the log-probabilities are recomputed bit for bit), later
  ones off-policy, clipped.

Only torch is imported; the optimizer (rewardkit.optimizer) calls these; what a recipe must satisfy to use them is
checked with the rest of the recipe (rewardkit.recipe.check_estimators).
"""

from __future__ import annotations

import torch


def group_advantages(scores: torch.Tensor, group_size: int, standardize: str = "group", clip: float = 5.0) -> torch.Tensor:
    """Advantages (N,) of the scores (N,) of consecutive groups of `group_size` samples of one prompt each.

    The group's mean is subtracted; the result is divided by the group's standard deviation ('group') or the whole
    batch's ('global'), each + 1e-4 (a group whose rewards are all equal gets advantage 0), then clipped."""
    if scores.dim() != 1 or len(scores) % group_size:
        raise ValueError(f"scores must be (N,) with N a multiple of the group size {group_size}; got {tuple(scores.shape)}")
    groups = scores.double().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if standardize == "group":
        spread = groups.std(1, unbiased=False, keepdim=True)
    elif standardize == "global":
        spread = scores.double().std(unbiased=False)
    else:
        raise ValueError(f"standardize must be 'group' or 'global', got {standardize!r}")
    return (centred / (spread + 1e-4)).clamp(-clip, clip).flatten().float()


def clipped_surrogate(log_p: torch.Tensor, old_log_p: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                      elements: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped objective as a loss to minimize, averaged over samples and steps; and what to log.

    log_p, old_log_p: (B, S) log-probabilities of S updates of B samples (with gradient / without); advantages: (B,);
    elements: d, the number of elements of one update (the ratio is per element)."""
    ratio = torch.exp((log_p - old_log_p.detach()) / elements)
    a = advantages.detach()[:, None].to(ratio.dtype)
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_range, 1 + clip_range) * a
    loss = -torch.minimum(unclipped, clipped).mean()
    stats = {"ratio": ratio.detach().mean(), "clipped": ((ratio.detach() - 1).abs() > clip_range).float().mean()}
    return loss, stats
