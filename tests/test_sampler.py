"""R0's K-step sampler on its own (rewardkit/sampler.py): a predict callable, no pipeline."""

from __future__ import annotations

import pytest
import torch

from rewardkit import sampler

ALPHA = torch.tensor([0.1, 0.5, 0.8, 0.95])  # alpha rises, sigma falls: steps go from noisy to clean
SIGMA = (1 - ALPHA**2).sqrt()


def test_with_an_exact_denoiser_and_eta_zero_every_step_lands_on_the_data():
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    visited = []

    def predict(x, k, rows):  # the exact posterior mean of a point mass: x0, and the noise that explains x_t
        visited.append(k)
        return x0, (x - ALPHA[k] * x0) / SIGMA[k]

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    trajectory = []
    out = sampler.sample(predict, noise, ALPHA, SIGMA, eta=0.0, trajectory=trajectory)
    torch.testing.assert_close(out, x0)
    assert visited == [0, 1, 2, 3] and len(trajectory) == 4
    # DDIM at eta = 0 keeps the first step's noise estimate z: x_t = alpha_t x0 + sigma_t z at every later step
    z = (noise - ALPHA[0] * x0) / SIGMA[0]
    torch.testing.assert_close(trajectory[0], noise)
    for k in range(1, 4):
        torch.testing.assert_close(trajectory[k], ALPHA[k] * x0 + SIGMA[k] * z, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_exactly_the_steps_asked_for():
    weights = torch.nn.Parameter(torch.ones(4))

    def predict(x, k, rows):  # step k scales by its own weight, so d out / d weights[k] != 0 iff step k is on the graph
        x0 = weights[k] * x
        return x0, x - x0

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))

    def grads(**kw):
        weights.grad = None
        sampler.sample(predict, noise, ALPHA, SIGMA, **kw).sum().backward()
        return (weights.grad != 0).tolist()

    assert grads() == [True, True, True, True]
    assert grads(grad_steps=2) == [False, False, True, True]
    assert grads(supervise_step=1) == [False, True, False, False]  # R0+: earlier steps without gradient, later ones not run
    assert grads(supervise_step=torch.tensor([1, 2])) == [False, True, True, False]
    assert grads(supervise_step=2, grad_to_noise=True) == [True, True, True, False]


# --- the stochastic update ----------------------------------------------------------------------
def test_an_sd_update_with_eta_is_diffusers_ddim_step():
    """SD's schedule: one update with eta > 0 equals DDIMScheduler.step(..., eta, variance_noise=xi)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
                              set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(4)  # 999, 749, 499, 249
    g = torch.Generator().manual_seed(3)
    x, eps, xi = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for t, s in [(999, 749), (749, 499), (499, 249)]:
        abar_t, abar_s = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[s]
        alpha_t, sigma_t, alpha_s, sigma_s = abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()
        for eta in (0.3, 1.0):
            expected = scheduler.step(eps, t, x, eta=eta, variance_noise=xi).prev_sample
            x0 = (x - sigma_t * eps) / alpha_t
            got = sampler.ddim_update(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, torch.full((2,), eta), xi)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t, s", [(0.75, 0.5), (0.9, 0.75), (0.5, 0.25), (0.25, 0.05)])
def test_a_flow_matching_update_at_eta_one_is_the_gaussian_posterior(t, s):
    """alpha = 1 - t, sigma = t: at eta = 1 the update is q(x_s | x_t, x0), mean and standard deviation, analytically."""
    alpha_t, sigma_t, alpha_s, sigma_s = (torch.tensor(v, dtype=torch.float64) for v in (1 - t, t, 1 - s, s))
    g = torch.Generator().manual_seed(4)
    x0, noise, xi = (torch.randn(3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    x_t = alpha_t * x0 + sigma_t * noise
    eps = (x_t - alpha_t * x0) / sigma_t
    # the posterior of x_s given x_t and x0, from x_t = (alpha_t / alpha_s) x_s + sigma_ts * n
    a_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - a_ts**2 * sigma_s**2
    mean = (a_ts * sigma_s**2 / sigma_t**2) * x_t + (alpha_s * var_ts / sigma_t**2) * x0
    std = torch.sqrt(var_ts * sigma_s**2 / sigma_t**2)
    one = torch.ones(3, dtype=torch.float64)
    deterministic = sampler.ddim_update(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, one, None)
    stochastic = sampler.ddim_update(x0, eps, alpha_t, sigma_t, alpha_s, sigma_s, one, xi)
    torch.testing.assert_close(deterministic, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((stochastic - deterministic) / xi, std.expand_as(xi), rtol=1e-9, atol=1e-12)
    assert float(std) < s  # the predicted-noise term keeps a share: sqrt(s^2 - std^2) > 0


def test_eta_outside_zero_one_and_updates_towards_noise_are_refused():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sampler.eta_matrix(1.2, 2, 4, "cpu")
    with pytest.raises(ValueError, match="less noisy level"):
        sampler.posterior_std(torch.tensor(0.9), torch.tensor(0.1), torch.tensor(0.5), torch.tensor(0.5))


# --- deep supervision (R0+'s second reading) ----------------------------------------------------
def test_deep_supervision_returns_every_steps_prediction_with_the_gradient_through_the_chain():
    """Against a hand-written DDIM loop (eta = 0) on a model with one weight per step: the stacked outputs are
    each step's x0_hat, and d(sum_k c_k . x0_k)/d weights is the gradient of the whole unrolled chain."""
    weights = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7, 1.3]))

    def predict(x, k, rows):
        x0 = torch.tanh(weights[k] * x)
        return x0, (x - ALPHA[k] * x0) / SIGMA[k]

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    c = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(5))  # one direction per supervised step
    steps = (0, 2, 3)

    x, expected = noise, []  # the independent computation: the chain unrolled by hand
    for k in range(4):
        x0 = torch.tanh(weights[k] * x)
        eps = (x - ALPHA[k] * x0) / SIGMA[k]
        if k in steps:
            expected.append(x0)
        if k < 3:
            x = ALPHA[k + 1] * x0 + SIGMA[k + 1] * eps
    (want,) = torch.autograd.grad(sum((ci * e).sum() for ci, e in zip(c, expected)), weights)

    out = sampler.sample(predict, noise, ALPHA, SIGMA, deep_supervision=steps)
    assert out.shape == (3 * 2, 3)
    torch.testing.assert_close(out, torch.cat(expected).detach(), rtol=1e-6, atol=1e-6)
    (got,) = torch.autograd.grad((c.flatten(0, 1) * out).sum(), weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert bool((got != 0).all())  # every step is on the graph: step 1 through the steps it feeds

    for bad in ((), (2, 1), (0, 4)):
        with pytest.raises(ValueError, match="deep_supervision must be increasing"):
            sampler.sample(predict, noise, ALPHA, SIGMA, deep_supervision=bad)
    with pytest.raises(ValueError, match="excludes supervise_step and grad_steps"):
        sampler.sample(predict, noise, ALPHA, SIGMA, deep_supervision=(3,), grad_steps=1)


# --- transition log-probabilities (the score-function estimator's) -----------------------------------
def test_transition_log_prob_is_the_gaussian_density():
    g = torch.Generator().manual_seed(7)
    mean, x = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.3, 1.0, 2.5])
    expected = torch.distributions.Normal(mean.double(), std.double().view(3, 1, 1)).log_prob(x.double()).sum((1, 2))
    torch.testing.assert_close(sampler.transition_log_prob(x, mean, std), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="needs eta > 0"):
        sampler.transition_log_prob(x, mean, torch.tensor([0.3, 0.0, 1.0]))


def test_the_log_probs_of_a_trajectory_are_its_gaussian_posteriors_and_recompute_exactly():
    """Flow matching (alpha = 1 - t, sigma = t) at eta = 1 with a model that predicts x0 = tanh(w_k x): each recorded
    log p(x_s | x_t) is the density of x_s under the analytic posterior q(x_s | x_t, x0_hat), and recomputing them
    from the trajectory with the same model gives the same values bit for bit (GRPO's first importance ratio: 1)."""
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    alpha, sigma = 1 - t, t
    weights = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7, 1.3]))

    def predict(x, k, rows):
        x0 = torch.tanh(weights[k] * x)
        return x0, x if k == 0 else (x - alpha[k] * x0) / sigma[k]  # at t = 1, x is the noise

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    trajectory, recorded = [], []
    with torch.no_grad():
        sampler.sample(predict, noise, alpha, sigma, eta=1.0, trajectory=trajectory, log_probs=recorded)
    recorded = torch.stack(recorded, 1)
    assert recorded.shape == (3, 3)
    for k in range(3):  # the independent computation: the posterior of x_s given x_t and x0, in float64
        x_t, x_s = trajectory[k].double(), trajectory[k + 1].double()
        a_t, s_t, a_s, s_s = (v.double() for v in (alpha[k], sigma[k], alpha[k + 1], sigma[k + 1]))
        x0 = torch.tanh(weights[k].double().detach() * x_t)
        a_ts = a_t / a_s
        var_ts = s_t**2 - a_ts**2 * s_s**2
        post_mean = (a_ts * s_s**2 / s_t**2) * x_t + (a_s * var_ts / s_t**2) * x0
        post_std = torch.sqrt(var_ts * s_s**2 / s_t**2)
        z = (x_s - post_mean) / post_std
        expected = torch.distributions.Normal(post_mean, post_std).log_prob(x_s).flatten(1).sum(1)
        # float32 states and means: each z carries about 1e-6 of rounding, so log p about sum |z| * 1e-6
        tol = 4e-6 * (z.abs() * (1 + post_mean.abs() / post_std)).flatten(1).sum(1).max().item()
        torch.testing.assert_close(recorded[:, k], expected, rtol=0, atol=tol)

    again = sampler.trajectory_log_probs(predict, trajectory, alpha, sigma, 1.0, [0, 1, 2])
    assert torch.equal(again.detach(), recorded)
    again[:, 1].sum().backward()  # the gradient reaches the model through step 1's mean only
    assert weights.grad[1] != 0 and weights.grad[[0, 2, 3]].abs().sum() == 0
    with pytest.raises(ValueError, match="need eta > 0"):
        sampler.sample(predict, noise, alpha, sigma, eta=0.0, log_probs=[])


def test_the_flow_sde_update_is_flow_grpos_euler_maruyama_step():
    """Written as Flow-GRPO writes it, in the velocity v: x_s = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] (s - t)
    + sigma_t sqrt(t - s) xi with sigma_t = a sqrt(t / (1 - t)), and at t = 1 the next level in 1 - t. Checked on
    states built from (x0, eps) as the sampler's models return them; at a = 0 it is the Euler step; against R0's DDIM
    form with the same injected noise, the means differ at second order in the step only."""
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    a = torch.tensor([0.7, 0.3, 0.0])
    for t, s in ((0.8, 0.6), (1.0, 0.75)):
        t, s = torch.tensor(t), torch.tensor(s)
        x_t, v = (1 - t) * x0 + t * eps, eps - x0
        var = a**2 * t / (1 - (s if t == 1 else t))
        w = (var / (2 * t)).view(-1, 1, 1, 1)
        expected = x_t + (v + w * (x_t + (1 - t) * v)) * (s - t)
        mean, std = sampler.update_transition("flow_sde", x0, eps, 1 - t, t, 1 - s, s, a)
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6 * (1 + expected.abs().max()))
        torch.testing.assert_close(std, torch.sqrt(var * (t - s)))
        torch.testing.assert_close(mean[2], x_t[2] + (s - t) * v[2], rtol=0, atol=1e-6)  # a = 0: Euler
    # first order: with R0's eta set so that both inject the same noise, the means agree to O(dt^2)
    t = torch.tensor(0.6)
    gaps = []
    for dt in (0.04, 0.02, 0.01):
        s = t - dt
        sde_mean, std = sampler.update_transition("flow_sde", x0, eps, 1 - t, t, 1 - s, s, torch.full((3,), 0.5))
        eta = std / sampler.posterior_std(1 - t, t, 1 - s, s)
        ddim_mean, ddim_std = sampler.update_transition("ddim", x0, eps, 1 - t, t, 1 - s, s, eta)
        torch.testing.assert_close(ddim_std, std)
        gaps.append(float((sde_mean - ddim_mean).abs().max()))
    assert 3.0 < gaps[0] / gaps[1] < 5.0 and 3.0 < gaps[1] / gaps[2] < 5.0, gaps  # halving dt quarters the gap


def test_a_flow_sde_trajectory_records_its_densities_and_a_reference_kl():
    """sample(update='flow_sde') records log N(x_s; mean, std) of the flow SDE's steps, trajectory_log_probs recomputes
    them exactly, and against a reference model the KL of each update is mean ||mean - mean_ref||^2 / (2 std^2):
    torch.distributions' KL of the two Gaussians, per element; 0 against itself."""
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    alpha, sigma = 1 - t, t
    w = torch.nn.Parameter(torch.tensor([0.9, 1.1, 0.7, 1.3]))

    def model(weights):
        def predict(x, k, rows):
            x0 = torch.tanh(weights[k] * x)
            return x0, x if k == 0 else (x - alpha[k] * x0) / sigma[k]
        return predict

    def sde_step(weights, k):  # Flow-GRPO's step in the velocity: (mean, std), t = 1 taking the schedule's second level
        x_t = trajectory[k]
        x0, eps = model(weights.detach())(x_t, k, None)
        tk, sk, v = t[k], t[k + 1], eps - x0
        var = 0.49 * tk / (1 - (t[1] if tk == 1 else tk))
        return x_t + (v + var / (2 * tk) * (x_t + (1 - tk) * v)) * (sk - tk), torch.sqrt(var * (tk - sk))

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    trajectory, recorded = [], []
    with torch.no_grad():
        sampler.sample(model(w), noise, alpha, sigma, eta=0.7, trajectory=trajectory, log_probs=recorded, update="flow_sde")
    recorded = torch.stack(recorded, 1)
    for k in range(3):
        mean, std = sde_step(w, k)
        expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(trajectory[k + 1].double()).flatten(1).sum(1)
        z = (trajectory[k + 1].double() - mean.double()) / std
        tol = 4e-6 * (z.abs() * (1 + mean.abs() / std)).flatten(1).sum(1).max().item()
        torch.testing.assert_close(recorded[:, k], expected, rtol=0, atol=tol)

    same, kl0 = sampler.trajectory_log_probs(model(w), trajectory, alpha, sigma, 0.7, [0, 1, 2], update="flow_sde", reference=model(w))
    assert torch.equal(same.detach(), recorded) and torch.equal(kl0, torch.zeros_like(kl0))
    ref_w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    _, kl = sampler.trajectory_log_probs(model(w), trajectory, alpha, sigma, 0.7, [0, 2], update="flow_sde", reference=model(ref_w))
    for j, k in enumerate((0, 2)):
        (m, sd), (m_ref, _) = sde_step(w, k), sde_step(ref_w, k)
        expected = torch.distributions.kl_divergence(torch.distributions.Normal(m.double(), sd.double()),
                                                     torch.distributions.Normal(m_ref.double(), sd.double())).flatten(1).mean(1)
        # float32 means computed in two orders: each off by about 1e-6 (1 + |mean|), the KL by mean |d| 2e-6 (...) / std^2
        d = (m - m_ref).double().abs()
        tol = (4e-6 * d * (1 + m.double().abs()) / (2 * sd.double() ** 2)).flatten(1).mean(1).max().item()
        assert expected.min() > 100 * tol
        torch.testing.assert_close(kl[:, j].detach(), expected, rtol=0, atol=tol)
    kl.sum().backward()  # the gradient reaches the trained model through the updates asked for only
    assert w.grad[0] != 0 and w.grad[2] != 0 and w.grad[[1, 3]].abs().sum() == 0
